//go:build integration

package bench

// The writers' part of BenchmarkIncremental (incremental_test.go): what
// each capture of the changed keys costs the service's writes, capture off,
// trigger and wal alternated in one run, with the receiver's changes loop
// running beside the writers as it would in production.

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// incCaptures are the writers' phases of a round, in order: every
// invariant in full mode (no trigger, no slot), then incremental with the
// capture triggers, then incremental with the WAL capture read by the
// changes loop's SQL (capture_wal), then by the receiver's stream
// (refresh::wal_stream: internal/walstream, beside the changes loop).
var incCaptures = []string{"off", "trigger", "wal", "stream"}

// incWriterPhase is one phase of the writers: a capture, pgbench at each
// client count, and what the changes loop did meanwhile.
type incWriterPhase struct {
	round   int
	capture string
	tps     map[int]float64      // by clients
	loop    map[int]incLoopStats // by clients: the changes loop during that pgbench run
	switchD time.Duration        // the switch to this capture and its reconcile, before the phase
}

// incLoopStats is what the changes loop did over some time.
type incLoopStats struct {
	wall      time.Duration // the time observed
	passes    int
	plan      time.Duration // in refresh_changes_plan() (capture_wal, dispatch)
	refresh   time.Duration // in refresh_invariant() of what it listed
	refreshes int
	keys      int64 // re-checked by those refreshes
	changes   int64 // read from the slot by capture_wal (WAL capture), or stored by the stream
	// The stream (capture "stream"): its time in capture_wal_stream (the
	// keys' evaluation and storage), and the CPU time of its walsender
	// (the decoding), read from /proc.
	store  time.Duration
	sender time.Duration
}

func (s incLoopStats) sub(o incLoopStats) incLoopStats {
	return incLoopStats{wall: s.wall - o.wall, passes: s.passes - o.passes, plan: s.plan - o.plan,
		refresh: s.refresh - o.refresh, refreshes: s.refreshes - o.refreshes, keys: s.keys - o.keys, changes: s.changes - o.changes,
		store: s.store - o.store, sender: s.sender - o.sender}
}

// planShare and refreshShare are the loop's time in each step, as a share
// of the time observed.
func (s incLoopStats) planShare() float64    { return s.plan.Seconds() / s.wall.Seconds() }
func (s incLoopStats) refreshShare() float64 { return s.refresh.Seconds() / s.wall.Seconds() }
func (s incLoopStats) storeShare() float64   { return s.store.Seconds() / s.wall.Seconds() }
func (s incLoopStats) senderShare() float64  { return s.sender.Seconds() / s.wall.Seconds() }

// incChangesLoop is the receiver's changes loop (refresh::changes_interval):
// every interval, refresh_changes_plan() then refresh_invariant() of each
// invariant it lists, in transactions of their own, on a connection of its
// own; timed. stop lets the pass under way finish (a cancelled query would
// close the connection).
type incChangesLoop struct {
	captureOnly bool // the plan only (capture and dispatch), no refresh
	streamed    bool // the stream reads the slot (capture "stream")
	quit        chan struct{}
	done        chan struct{}
	start       time.Time
	mu          sync.Mutex
	stats       incLoopStats
	err         error
	readAt      *time.Time // the WAL capture's latest read the loop counted
}

func startChangesLoop(ctx context.Context, conn *pgx.Conn, interval time.Duration, captureOnly, streamed bool) *incChangesLoop {
	l := &incChangesLoop{quit: make(chan struct{}), done: make(chan struct{}), start: time.Now(), captureOnly: captureOnly, streamed: streamed}
	go func() {
		defer close(l.done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			if err := l.pass(ctx, conn); err != nil {
				l.mu.Lock()
				l.err = err
				l.mu.Unlock()
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-l.quit:
				return
			case <-tick.C:
			}
		}
	}()
	return l
}

func (l *incChangesLoop) pass(ctx context.Context, conn *pgx.Conn) error {
	start := time.Now()
	names, forced, err := incChangesPlan(ctx, conn)
	if err != nil {
		return fmt.Errorf("refresh_changes_plan(): %w", err)
	}
	plan := time.Since(start)
	// What the plan's capture_wal read: 0 with the trigger capture, and
	// when it left the slot for a later pass (read at most once per
	// incremental_period).
	var changes int64
	var readAt *time.Time
	if err := conn.QueryRow(ctx, `SELECT CASE method WHEN 'wal' THEN coalesce(read_changes, 0) ELSE 0 END, read_at FROM pgconsistency.capture`).Scan(&changes, &readAt); err != nil {
		return err
	}
	if readAt == nil || (l.readAt != nil && readAt.Equal(*l.readAt)) || l.streamed {
		changes = 0 // not read by this plan (the stream counts its own)
	}
	l.readAt = readAt
	var keys int64
	if l.captureOnly {
		// The capture alone: the keys the plan dispatched are dropped, as
		// the refreshes would take them (a count(*) of a pending_key left
		// to grow took hundreds of ms a pass by the end of a phase).
		names = nil
		tag, err := conn.Exec(ctx, `DELETE FROM pgconsistency.pending_key`)
		if err != nil {
			return err
		}
		keys = tag.RowsAffected()
	}
	for i, name := range names {
		outcome, err := incRefreshOne(ctx, conn, name, forced[i])
		if err != nil {
			return fmt.Errorf("refresh_invariant(%s): %w", name, err)
		}
		if outcome != "succeeded" && outcome != "not_due" {
			return fmt.Errorf("refresh_invariant(%s): %s", name, outcome)
		}
		var k int64
		if err := conn.QueryRow(ctx, `SELECT coalesce(rechecked_keys, 0) FROM pgconsistency.status WHERE invariant = $1`, name).Scan(&k); err != nil {
			return err
		}
		keys += k
	}
	all := time.Since(start)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stats.passes++
	l.stats.plan += plan
	l.stats.refresh += all - plan
	l.stats.refreshes += len(names)
	l.stats.keys += keys
	l.stats.changes += changes
	return nil
}

// snapshot is what the loop did so far; wall is the time since it started.
func (l *incChangesLoop) snapshot() incLoopStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.stats
	s.wall = time.Since(l.start)
	return s
}

// stop ends the loop once the pass under way is done, and returns its
// error, if any.
func (l *incChangesLoop) stop() error {
	close(l.quit)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// incPgbenchResult is one pgbench run.
type incPgbenchResult struct {
	tps          float64
	transactions int64
}

// incPgbench runs the service's two transaction shapes, a new complete
// dataset (write_load.sql, weight 1) and a block appended to an existing
// dataset of generate.sql's (append_load.sql, weight 4), with clients and
// the given length (-T or -t), and fails on any error, a failed transaction
// included. wrap, when not empty, is the command pgbench runs under
// (cpuPin's taskset).
func incPgbench(tb testing.TB, srv *pgtest.Server, db string, scale, clients int, wrap []string, length ...string) incPgbenchResult {
	args := append([]string{"-n", "-c", strconv.Itoa(clients), "-j", strconv.Itoa(clients)}, length...)
	args = append(args,
		"-f", fixture.Path("internal/bench/write_load.sql")+"@1",
		"-f", fixture.Path("internal/bench/append_load.sql")+"@4",
		"-D", "maxq="+strconv.Itoa(scale/1000-1),
		"-h", srv.Host, "-p", strconv.Itoa(srv.Port), "-U", srv.User, db)
	argv := append(slices.Clone(wrap), pgbenchPath(tb))
	argv = append(argv, args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+srv.Password)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("pgbench: %v\n%s", err, out)
	}
	if m := regexp.MustCompile(`number of failed transactions: (\d+)`).FindSubmatch(out); m != nil && string(m[1]) != "0" {
		tb.Fatalf("pgbench: %s failed transactions:\n%s", m[1], out)
	}
	tps := regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`).FindSubmatch(out)
	done := regexp.MustCompile(`number of transactions actually processed: (\d+)`).FindSubmatch(out)
	if tps == nil || done == nil {
		tb.Fatalf("pgbench printed no tps or transaction count:\n%s", out)
	}
	var r incPgbenchResult
	r.tps, _ = strconv.ParseFloat(string(tps[1]), 64)
	r.transactions, _ = strconv.ParseInt(string(done[1]), 10, 64)
	if r.transactions == 0 {
		tb.Fatalf("pgbench processed no transaction:\n%s", out)
	}
	return r
}

// incWriters runs the writers' phases: cfg.writeRounds rounds of the three
// captures, round k starting at the k-th (so that each capture comes
// first, second and third as often, and a drift in time weighs on all
// alike). Before each phase, out of the measured time: the switch, the
// reconcile it causes, a CHECKPOINT. During the trigger and wal phases, the
// changes loop runs beside pgbench.
func incWriters(tb testing.TB, srv *pgtest.Server, db string, conn *pgx.Conn, cfg incConfig) []incWriterPhase {
	ctx := tb.Context()
	srv.Psql(tb, db, "-c", "CREATE SEQUENCE IF NOT EXISTS public.bench_write_seq")
	loopConn := srv.Conn(tb, db)
	var pin *cpuPin
	if cfg.pin {
		pin = startCPUPin(tb, loopConn)
		defer pin.stop(tb)
		pin.capture(tb, loopConn.PgConn().PID())
	}
	var phases []incWriterPhase
	for round := range cfg.writeRounds {
		for k := range incCaptures {
			capture := incCaptures[(round+k)%len(incCaptures)]
			p := incWriterPhase{round: round + 1, capture: capture, tps: map[int]float64{}, loop: map[int]incLoopStats{}}
			start := time.Now()
			incSwitchCapture(tb, conn, capture)
			if capture != "off" {
				// The reconcile the switch asks for, now rather than in the
				// phase (a full refresh of the 13).
				incRefresh(tb, conn, "reconcile", fmt.Sprintf("writers, round %d: the reconcile after the switch to the %s capture", round+1, capture))
			}
			p.switchD = time.Since(start)
			_, err := conn.Exec(ctx, `CHECKPOINT`)
			must(tb, err)
			var loop *incChangesLoop
			var stream *incStream
			if capture == "stream" {
				stream = startIncStream(tb, srv, db)
				pin.capture(tb, uint32(stream.senderPID(tb)), stream.conn.PgConn().PID())
			}
			if capture != "off" {
				loop = startChangesLoop(ctx, loopConn, cfg.loop, cfg.captureOnly, stream != nil)
			}
			for _, c := range cfg.clients {
				var before, streamBefore incLoopStats
				if loop != nil {
					before = loop.snapshot()
				}
				if stream != nil {
					streamBefore = stream.snapshot(tb)
				}
				r := incPgbench(tb, srv, db, cfg.scale, c, pin.writers(), "-T", strconv.Itoa(max(1, int(cfg.writes.Seconds()))))
				p.tps[c] = r.tps
				if loop != nil {
					p.loop[c] = loop.snapshot().sub(before)
				}
				if stream != nil {
					st := stream.snapshot(tb).sub(streamBefore)
					s := p.loop[c]
					s.changes, s.store, s.sender = st.changes, st.store, st.sender
					p.loop[c] = s
				}
			}
			if stream != nil {
				stream.stop(tb)
			}
			if loop != nil {
				if err := loop.stop(); err != nil {
					tb.Fatalf("writers, round %d, capture %s: the changes loop: %v", round+1, capture, err)
				}
				// The loop re-checked keys: the capture saw the writes.
				var keys int64
				for _, s := range p.loop {
					keys += s.keys
				}
				if keys == 0 {
					tb.Fatalf("writers, round %d, capture %s: the changes loop re-checked no key: the capture saw none of the writes", round+1, capture)
				}
			}
			phases = append(phases, p)
			logf("incremental, scale %d: writers, round %d, capture %s: %v tps; changes loop %s",
				cfg.scale, round+1, capture, p.tps, p.loopSummary(cfg.clients))
		}
	}
	return phases
}

func (p incWriterPhase) loopSummary(clients []int) string {
	if p.capture == "off" {
		return "not running"
	}
	var parts []string
	for _, c := range clients {
		s := p.loop[c]
		part := fmt.Sprintf("%d client(s): %d passes, plan %s (%.1f%%), refreshes %s (%.1f%%), %d keys, %d changes decoded",
			c, s.passes, ms(s.plan), 100*s.planShare(), ms(s.refresh), 100*s.refreshShare(), s.keys, s.changes)
		if p.capture == "stream" {
			part += fmt.Sprintf(" by the stream: stores %s (%.1f%%), walsender CPU %s (%.1f%% of a core)", ms(s.store), 100*s.storeShare(), ms(s.sender), 100*s.senderShare())
		}
		parts = append(parts, part)
	}
	return strings.Join(parts, "; ")
}

// incAfterWriters checks exactness after the writers: WAL capture, more
// writes, a pass of the changes loop (incremental) finds the expected
// counts, and a full refresh in full mode the same anomalies.
func incAfterWriters(tb testing.TB, srv *pgtest.Server, db string, conn *pgx.Conn, cfg incConfig, want map[string]int64) incPass {
	ctx := tb.Context()
	if incCaptureMethod(tb, conn) != "wal" || !incAllIn(tb, conn, "incremental") {
		incSwitchCapture(tb, conn, "wal")
		incRefresh(tb, conn, "reconcile", "the reconcile after the writers")
	}
	tx := incPgbench(tb, srv, db, cfg.scale, 2, nil, "-t", "100")
	_, err := conn.Exec(ctx, `UPDATE pgconsistency.invariant SET incremental_period = '1 millisecond'`)
	must(tb, err)
	p, states := incChangesPass(tb, conn, "incremental", "the pass of the changes loop after the writers (WAL capture)")
	_, err = conn.Exec(ctx, `UPDATE pgconsistency.invariant SET incremental_period = DEFAULT`)
	must(tb, err)
	p.keys = 2 * tx.transactions
	incCheckCounts(tb, states, want, "after the writers, WAL capture, incrementally")
	for _, inv := range fixture.CurrentInvariants {
		// Every invariant reads a table each transaction writes
		// (dataset_entries, dataset_data_blocks or dataset_statistics).
		if !slices.Contains(p.listed, inv) || states[inv].rechecked == 0 {
			tb.Fatalf("after the writers, WAL capture: %s listed %t, %d keys re-checked: the capture missed the writes",
				inv, slices.Contains(p.listed, inv), states[inv].rechecked)
		}
	}
	incremental := incSnapshot(tb, conn, time.Time{})
	incSetMode(tb, conn, "full")
	_, states = incRefresh(tb, conn, "full", "the full refresh after the writers")
	incCheckSame(tb, incremental, states, "the full refresh after the writers")
	return p
}

// incAllIn says whether the 13 dataset invariants are all in mode.
func incAllIn(tb testing.TB, conn *pgx.Conn, mode string) bool {
	var n int
	must(tb, conn.QueryRow(tb.Context(), `SELECT count(*) FROM pgconsistency.invariant WHERE name = ANY ($1) AND refresh_mode = $2`,
		fixture.CurrentInvariants, mode).Scan(&n))
	return n == len(fixture.CurrentInvariants)
}

func medianFloat(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

// medianInterval is a 95% interval of the median of xs, by bootstrap: the
// medians of 2,000 resamples of xs (with replacement), their 2.5th and
// 97.5th percentiles. The seed is fixed and xs sorted first (the rounds
// come from a map): the same values give the same interval. It says how
// far the median of a few noisy phases can be trusted (on the machine of
// BENCHMARKS.md, single phases spread by half their median).
func medianInterval(xs []float64) (lo, hi float64) {
	if len(xs) == 0 {
		return 0, 0
	}
	s := slices.Sorted(slices.Values(xs))
	rng := rand.New(rand.NewPCG(1, 2))
	const resamples = 2000
	medians := make([]float64, resamples)
	sample := make([]float64, len(s))
	for i := range medians {
		for j := range sample {
			sample[j] = s[rng.IntN(len(s))]
		}
		medians[i] = medianFloat(sample)
	}
	slices.Sort(medians)
	return medians[resamples*25/1000], medians[resamples*975/1000-1]
}

// incWriterSummary is the medians of the writers' phases at a client count.
type incWriterSummary struct {
	clients                          int
	off, trigger, wal                float64 // tps
	walRounds                        float64 // median over the rounds of each round's wal / off
	walRoundsLo, walRoundsHi         float64 // its 95% interval (medianInterval)
	triggerRounds                    float64 // the same of trigger / off
	triggerRoundsLo, triggerRoundsHi float64
	stream                           float64 // tps
	streamRounds                     float64 // the same of stream / off
	streamRoundsLo, streamRoundsHi   float64
	streamStore, streamSender        float64 // the stream's share of the wall time in stores, its walsender's CPU (median)
	walPlan, walRefresh              float64 // the changes loop's share of the wall time, wal phases
	streamPlan, streamRefresh        float64 // the same, stream phases
	triggerPlan, triggerRefresh      float64 // the same, trigger phases
}

func (r *incResult) writerSummaries() []incWriterSummary {
	var out []incWriterSummary
	for _, c := range r.cfg.clients {
		tps := map[string][]float64{}
		share := map[string][2][]float64{}
		byRound := map[int]map[string]float64{} // round -> capture -> tps
		for _, p := range r.writers {
			tps[p.capture] = append(tps[p.capture], p.tps[c])
			if byRound[p.round] == nil {
				byRound[p.round] = map[string]float64{}
			}
			byRound[p.round][p.capture] = p.tps[c]
			if p.capture != "off" {
				s := share[p.capture]
				s[0] = append(s[0], p.loop[c].planShare())
				s[1] = append(s[1], p.loop[c].refreshShare())
				share[p.capture] = s
			}
			if p.capture == "stream" {
				s := share["stream:own"]
				s[0] = append(s[0], p.loop[c].storeShare())
				s[1] = append(s[1], p.loop[c].senderShare())
				share["stream:own"] = s
			}
		}
		ratios := map[string][]float64{} // capture -> each round's capture / off
		for _, m := range byRound {
			for _, capture := range []string{"trigger", "wal", "stream"} {
				if m["off"] > 0 && m[capture] > 0 {
					ratios[capture] = append(ratios[capture], m[capture]/m["off"])
				}
			}
		}
		lo, hi := medianInterval(ratios["wal"])
		tlo, thi := medianInterval(ratios["trigger"])
		slo, shi := medianInterval(ratios["stream"])
		out = append(out, incWriterSummary{
			clients: c, off: medianFloat(tps["off"]), trigger: medianFloat(tps["trigger"]), wal: medianFloat(tps["wal"]),
			walRounds: medianFloat(ratios["wal"]), walRoundsLo: lo, walRoundsHi: hi,
			triggerRounds: medianFloat(ratios["trigger"]), triggerRoundsLo: tlo, triggerRoundsHi: thi,
			walPlan: medianFloat(share["wal"][0]), walRefresh: medianFloat(share["wal"][1]),
			triggerPlan: medianFloat(share["trigger"][0]), triggerRefresh: medianFloat(share["trigger"][1]),
			stream: medianFloat(tps["stream"]), streamRounds: medianFloat(ratios["stream"]), streamRoundsLo: slo, streamRoundsHi: shi,
			streamStore: medianFloat(share["stream:own"][0]), streamSender: medianFloat(share["stream:own"][1]),
			streamPlan: medianFloat(share["stream"][0]), streamRefresh: medianFloat(share["stream"][1]),
		})
	}
	return out
}

// writerGoals lists the writers' goals missed: with the WAL capture, read
// by SQL or by the stream, at least incGoalWAL of the throughput with the
// capture off.
func (r *incResult) writerGoals() []string {
	var failed []string
	for _, s := range r.writerSummaries() {
		goal, ok := incGoalWAL[s.clients]
		if !ok {
			continue
		}
		for _, c := range []struct {
			what string
			tps  float64
		}{{"WAL capture read by SQL", s.wal}, {"WAL capture read by the stream", s.stream}} {
			if c.tps/s.off < goal {
				failed = append(failed, fmt.Sprintf("writers, %d client(s): %s %.0f tps, %.1f%% of capture off (%.0f tps), goal ≥ %.0f%%",
					s.clients, c.what, c.tps, 100*c.tps/s.off, s.off, 100*goal))
			}
		}
	}
	return failed
}

func (r *incResult) writersMarkdown() string {
	var w strings.Builder
	c := r.cfg
	fmt.Fprintf(&w, "### Writers: capture off, trigger, wal, stream\n\n")
	fmt.Fprintf(&w, "%d rounds of four phases, capture off (all 13 in full mode: no trigger, no slot), trigger (all 13 incremental, capture triggers), wal (all 13 incremental, WAL capture: a slot, no trigger, read by the changes loop's capture_wal) and stream (the same, read by the receiver's stream, refresh::wal_stream: a replication connection, keys stored by capture_wal_stream), round k starting at the k-th (off, trigger, wal, stream | trigger, wal, stream, off | …). Before each phase, not measured: the switch, the reconcile it causes (a full refresh of the 13), a CHECKPOINT. Each phase: pgbench for %s at each of %v client(s), the service's two transaction shapes: a new complete dataset (write_load.sql, 1 in 5) and a block appended, head moved, statistics updated on an existing dataset (append_load.sql, 4 in 5). Beside the trigger, wal and stream phases, the receiver's changes loop every %s: refresh_changes_plan() (wal: capture_wal decodes the slot; stream: capture_wal leaves the slot to the stream) then refresh_invariant() of each invariant it lists (incremental_period 2 s, the default). fsync %s; wal_level = logical in every phase; replica identities for the WAL capture: %s.\n\n",
		c.writeRounds, c.writes, c.clients, c.loop, map[bool]string{true: "on", false: "off (make test: not representative)"}[c.bench], incFixesText(r.fixes))
	if c.pin {
		fmt.Fprintf(&w, "**Pinned** (-incremental.pin): in every phase the writers ran on CPU %s (pgbench, and the server's postmaster, so every server process forked meanwhile: pgbench's connections, autovacuum workers) and the capture on CPU %s (the changes loop's and the stream's connections, the stream's walsender, this benchmark's process); the server processes started before (checkpointer, WAL writer, background writer) on both. The writers had one core in every phase, the capture the other: what remains of the loss is not the CPU the capture takes them. The trigger capture runs in the writers' own transactions, on their CPU.\n\n", writersCPU, captureCPU)
	}
	if c.captureOnly {
		w.WriteString("**Capture only** (-incremental.captureonly): beside the trigger and wal phases the loop runs its plan alone (refresh_changes_plan: with the WAL capture, capture_wal decodes the slot; then the dispatch), not the refreshes it lists: what the capture itself costs the writers. The keys it dispatched are then deleted from pending_key, as the refreshes would take them: that DELETE is the refresh share.\n\n")
	}
	fmt.Fprintf(&w, "| round | capture | switch and reconcile |")
	for _, cl := range c.clients {
		fmt.Fprintf(&w, " %d client(s) | changes loop: plan / refreshes (%% of the time) |", cl)
	}
	fmt.Fprintf(&w, "\n|---:|---|---:|")
	for range c.clients {
		fmt.Fprintf(&w, "---:|---|")
	}
	fmt.Fprintf(&w, "\n")
	for _, p := range r.writers {
		fmt.Fprintf(&w, "| %d | %s | %s |", p.round, p.capture, ms(p.switchD))
		for _, cl := range c.clients {
			loop := "—"
			if s, ok := p.loop[cl]; ok {
				loop = fmt.Sprintf("%d passes: %s / %s (%.1f%% / %.1f%%), %d keys", s.passes, ms(s.plan), ms(s.refresh), 100*s.planShare(), 100*s.refreshShare(), s.keys)
				switch p.capture {
				case "wal":
					loop += fmt.Sprintf(", %d changes decoded", s.changes)
				case "stream":
					loop += fmt.Sprintf(", %d changes streamed: stores %s (%.1f%%), walsender CPU %.1f%% of a core", s.changes, ms(s.store), 100*s.storeShare(), 100*s.senderShare())
				}
			}
			fmt.Fprintf(&w, " %.0f tps | %s |", p.tps[cl], loop)
		}
		fmt.Fprintf(&w, "\n")
	}
	fmt.Fprintf(&w, "\n| clients | off (median) | trigger (median) | wal (median) | stream (median) | trigger / off | **wal / off** | **stream / off** | goal | wal / off within each round: median (95%% interval) | stream / off, the same | trigger / off, the same | changes loop during wal: plan / refreshes, %% of the time (median) | during stream; the stream's stores, its walsender's CPU | during trigger |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n")
	for _, s := range r.writerSummaries() {
		goal := "—"
		if g, ok := incGoalWAL[s.clients]; ok {
			goal = fmt.Sprintf("≥ %.0f%%: wal %s, stream %s", 100*g, map[bool]string{true: "met", false: "**missed**"}[s.wal/s.off >= g],
				map[bool]string{true: "met", false: "**missed**"}[s.stream/s.off >= g])
		}
		fmt.Fprintf(&w, "| %d | %.0f tps | %.0f tps | %.0f tps | %.0f tps | %.1f%% | **%.1f%%** | **%.1f%%** | %s | %.1f%% (%.1f–%.1f%%) | %.1f%% (%.1f–%.1f%%) | %.1f%% (%.1f–%.1f%%) | %.1f%% / %.1f%% | %.1f%% / %.1f%%; %.1f%%, %.1f%% | %.1f%% / %.1f%% |\n",
			s.clients, s.off, s.trigger, s.wal, s.stream, 100*s.trigger/s.off, 100*s.wal/s.off, 100*s.stream/s.off, goal,
			100*s.walRounds, 100*s.walRoundsLo, 100*s.walRoundsHi,
			100*s.streamRounds, 100*s.streamRoundsLo, 100*s.streamRoundsHi,
			100*s.triggerRounds, 100*s.triggerRoundsLo, 100*s.triggerRoundsHi,
			100*s.walPlan, 100*s.walRefresh, 100*s.streamPlan, 100*s.streamRefresh, 100*s.streamStore, 100*s.streamSender,
			100*s.triggerPlan, 100*s.triggerRefresh)
	}
	fmt.Fprint(&w, "\nThe interval is a bootstrap of the rounds' ratios (medianInterval): where it holds the goal, this run cannot tell whether the goal is met.\n")
	fmt.Fprintf(&w, "\nThe changes loop's share is of one core's time; the machine has %d. With the WAL capture, its plan share is mostly capture_wal decoding the slot (wal2json) and evaluating the keys: CPU the writers do not get on a machine this small. Its refresh share is the same work as with the trigger capture. With the stream, the decoding is its walsender's (CPU time read from /proc), once per change, and the keys' evaluation is in its stores (capture_wal_stream); the changes loop's plan only dispatches.\n\n", runtime.NumCPU())
	a := r.afterWriters
	fmt.Fprintf(&w, "Exactness after the writers: WAL capture, pgbench -t 100 at 2 clients, then one pass of the changes loop (refresh_changes_plan %s, %d invariants refreshed, %s in all): the expected counts, and the same anomalies (counts and keys) as a full refresh in full mode.\n\n",
		ms(a.plan), len(a.listed), ms(a.total))
	return w.String()
}

func incFixesText(fixes []string) string {
	if len(fixes) == 0 {
		return "none needed"
	}
	return "`" + strings.Join(fixes, "` `") + "`"
}

// TestMedianInterval: the interval holds the median and stays within the
// data, narrows as the same spread is sampled more often, and is a point
// when every value is the same.
func TestMedianInterval(t *testing.T) {
	t.Parallel()
	lo, hi := medianInterval([]float64{0.97, 0.97, 0.97})
	if lo != 0.97 || hi != 0.97 {
		t.Fatalf("constant values: interval %v–%v, want 0.97–0.97", lo, hi)
	}
	few := []float64{0.74, 1.25, 0.9, 1.1, 0.95, 1.02, 0.81, 1.18, 0.99}
	lo, hi = medianInterval(few)
	if m := medianFloat(few); !(lo <= m && m <= hi && lo >= 0.74 && hi <= 1.25 && lo < hi) {
		t.Fatalf("9 values, median %v: interval %v–%v", m, lo, hi)
	}
	var many []float64
	for range 20 {
		many = append(many, few...)
	}
	mlo, mhi := medianInterval(many)
	if !(mhi-mlo < (hi-lo)/2) {
		t.Fatalf("the same spread 20 times over: interval %v–%v, not narrower than half of %v–%v", mlo, mhi, lo, hi)
	}
}

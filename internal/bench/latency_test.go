//go:build integration

package bench

// How long a broken dataset takes to show, end to end, with the WAL
// capture: generate.sql at -latency.scale datasets (1M by default), every
// invariant in incremental mode with set_capture('wal'), the collector built
// from builder-config.yaml running the shipped config/collector-logs.yaml
// (Prometheus exporter for the metrics, OTLP/HTTP for the log records, a
// sink of this test's) with collection_interval 1s and its changes loop at
// its default, and a steady write load of the service's two transaction
// shapes (pgbench at -latency.tps). Then, one at a time, -latency.breakages
// committed DELETEs of a dataset's Seed block: for each, the time from the
// commit to the gauge pgconsistency_anomalies{invariant="dataset_seed_missing"}
// counting it at the collector's endpoint, and to its log record reaching
// the sink. A second phase does the same while the other twelve invariants
// reconcile (full refreshes) one after the other without pause: a reconcile
// must not hold back the keys that arrive meanwhile. With -latency.stream,
// the collector also streams the WAL capture's slot (refresh::wal_stream,
// from an overlay config given after the shipped one).
//
//	go test -tags integration -run '^$' -bench '^BenchmarkLatency$' -benchtime 1x -timeout 60m ./internal/bench \
//	    -args -latency.scale 1000000 -latency.breakages 100
//
// Goal (asserted): p99 of both, in each phase, within 5 s.

import (
	"compress/gzip"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/collector/pdata/plog/plogotlp"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

var (
	flagLatScale     = flag.Int("latency.scale", 1000000, "BenchmarkLatency: datasets, a multiple of 1000")
	flagLatBreakages = flag.Int("latency.breakages", 100, "BenchmarkLatency: datasets broken, one at a time, per phase")
	flagLatTPS       = flag.Int("latency.tps", 50, "BenchmarkLatency: rate of the steady write load (pgbench -R), transactions per second")
	flagLatStream    = flag.Bool("latency.stream", false, "BenchmarkLatency: the collector streams the WAL capture's slot (refresh::wal_stream: enabled, the same endpoint and role)")
)

// latGoal: p99 of the time from a breaking commit to the metric, and to the
// log record.
const latGoal = 5 * time.Second

// BenchmarkLatency runs the latency harness once (use -benchtime 1x).
func BenchmarkLatency(b *testing.B) {
	for b.Loop() {
		if *flagLatScale%1000 != 0 || *flagLatScale < 1000 {
			b.Fatalf("-latency.scale %d: a multiple of 1000, at least 1000", *flagLatScale)
		}
		srv := startBenchServer(b, pgtest.WithSetting("wal_level", "logical"), pgtest.WithSetting("max_slot_wal_keep_size", "8GB"))
		r := runLatency(b, srv, *flagLatScale, *flagLatBreakages, *flagLatTPS)
		fmt.Print(r.markdown())
		for _, p := range r.phases {
			for what, ds := range map[string][]time.Duration{"metric": p.metric, "log record": p.log} {
				if q := quantile(ds, 0.99); q > latGoal {
					b.Errorf("%s: p99 from the commit to the %s is %s, above the goal of %s", p.name, what, ms(q), latGoal)
				}
			}
		}
	}
}

type latPhase struct {
	name        string
	metric, log []time.Duration
	reconciles  int // reconciles of the other invariants that finished during the phase
}

type latResult struct {
	scale, tps int
	generate   time.Duration
	writes     int64 // transactions of the write load (about: from pgbench's progress)
	phases     []latPhase
}

func runLatency(b *testing.B, srv *pgtest.Server, n, breakages, tps int) *latResult {
	ctx := b.Context()
	r := &latResult{scale: n, tps: tps}
	db := srv.CreateDatabase(b, fmt.Sprintf("latency_%d", n))
	srv.PsqlFile(b, db, fixture.Path(schema))
	start := time.Now()
	srv.Psql(b, db, "-v", "scale="+strconv.Itoa(n), "-f", fixture.Path("internal/bench/generate.sql"))
	r.generate = time.Since(start)
	srv.PsqlFile(b, db, fixture.Path("sql/install.sql"))
	conn := srv.Conn(b, db)
	logf("latency, scale %d: data generated in %s", n, r.generate.Round(time.Second))
	latExec(b, conn, "CALL pgconsistency.refresh(force => true)")
	latExec(b, conn, "SELECT pgconsistency.set_refresh_mode(name, 'incremental') FROM pgconsistency.invariant")
	rows, err := conn.Query(ctx, "SELECT fix FROM pgconsistency.wal_capture_tables() WHERE fix IS NOT NULL")
	must(b, err)
	fixes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	must(b, err)
	for _, fix := range fixes {
		latExec(b, conn, fix)
	}
	latExec(b, conn, "SELECT pgconsistency.set_capture('wal')")
	latExec(b, conn, "CALL pgconsistency.refresh(force => true)") // the reconcile of the switch
	latExec(b, conn, "VACUUM ANALYZE")
	logf("latency, scale %d: WAL capture on, reconciled", n)

	// The datasets to break: roots and derivatives with a Seed at 0, not
	// broken yet.
	rows, err = conn.Query(ctx, `SELECT dataset_id FROM public.dataset_key_blocks
		WHERE event_type = 'Seed' AND sequence_number = 0 AND block_ref_name = 'head'
		ORDER BY md5(dataset_id) LIMIT $1`, 2*breakages)
	must(b, err)
	victims, err := pgx.CollectRows(rows, pgx.RowTo[string])
	must(b, err)
	if len(victims) < 2*breakages {
		b.Fatalf("only %d datasets to break", len(victims))
	}

	sink := newLogSink(b)
	metricsURL := startLatencyCollector(b, srv, db, sink.url)
	load := startWriteLoad(b, srv, db, n, tps)
	time.Sleep(5 * time.Second) // the load and the collector settle

	r.phases = append(r.phases, latBreak(b, conn, metricsURL, sink, "steady write load", victims[:breakages]))
	// While the other invariants reconcile one after the other.
	stop := make(chan struct{})
	var reconciles int
	var wg sync.WaitGroup
	wg.Go(func() {
		rc := srv.Conn(b, db)
		others := slices.DeleteFunc(slices.Clone(fixture.CurrentInvariants), func(s string) bool { return s == "dataset_seed_missing" })
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			inv := others[i%len(others)]
			if _, err := rc.Exec(context.Background(), `UPDATE pgconsistency.capture_state SET reconcile_reason = 'the latency benchmark'
				WHERE invariant = $1`, inv); err != nil {
				logf("latency: reconcile of %s: %v", inv, err)
				return
			}
			if _, err := rc.Exec(context.Background(), "SELECT pgconsistency.refresh_invariant($1, true)", inv); err != nil {
				logf("latency: reconcile of %s: %v", inv, err)
				return
			}
			reconciles++
		}
	})
	p := latBreak(b, conn, metricsURL, sink, "while the other invariants reconcile", victims[breakages:])
	close(stop)
	wg.Wait()
	p.reconciles = reconciles
	r.phases = append(r.phases, p)
	r.writes = load.stop(b)
	// Who read the slot: the stream with -latency.stream (its walsender,
	// otelcol-pgconsistency-stream, still holds the slot), the changes
	// loop's SQL otherwise.
	var readBy string
	var streaming bool
	must(b, conn.QueryRow(ctx, `SELECT c.read_by, EXISTS (SELECT 1 FROM pg_stat_replication r
		JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = c.slot_name AND r.application_name = 'otelcol-pgconsistency-stream')
		FROM pgconsistency.capture c`).Scan(&readBy, &streaming))
	if want := map[bool]string{true: "stream", false: "sql"}[*flagLatStream]; readBy != want || streaming != *flagLatStream {
		b.Fatalf("the slot was read by %q (held by the collector's stream: %t), want %q", readBy, streaming, want)
	}
	return r
}

// latBreak breaks each victim's Seed, one at a time, and measures when the
// gauge counts it and when its log record arrives.
func latBreak(b *testing.B, conn *pgx.Conn, metricsURL string, sink *logSink, name string, victims []string) latPhase {
	p := latPhase{name: name}
	base := scrapeSeedMissing(b, metricsURL)
	for i, id := range victims {
		committed := time.Now()
		latExec(b, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", id)
		committed = committed.Add(time.Since(committed) / 2) // the commit, between the call and its answer
		var metricAt, logAt time.Time
		deadline := time.Now().Add(2 * time.Minute)
		for metricAt.IsZero() || logAt.IsZero() {
			if time.Now().After(deadline) {
				b.Fatalf("%s: breakage %d (%s) not seen within 2 minutes: metric %v, log record %v", name, i+1, id, !metricAt.IsZero(), !logAt.IsZero())
			}
			if metricAt.IsZero() && scrapeSeedMissing(b, metricsURL) >= base+float64(i+1) {
				metricAt = time.Now()
			}
			if logAt.IsZero() {
				logAt = sink.arrival(id)
			}
			time.Sleep(25 * time.Millisecond)
		}
		p.metric = append(p.metric, metricAt.Sub(committed))
		p.log = append(p.log, logAt.Sub(committed))
		time.Sleep(time.Duration(200+i*37%800) * time.Millisecond) // spread the commits over the refresh cycle
	}
	logf("latency: %s: metric p50 %s p99 %s, log record p50 %s p99 %s", name,
		ms(quantile(p.metric, 0.5)), ms(quantile(p.metric, 0.99)), ms(quantile(p.log, 0.5)), ms(quantile(p.log, 0.99)))
	return p
}

// scrapeSeedMissing is the dataset_seed_missing gauge on the collector's
// /metrics page, -1 while the page does not show it.
func scrapeSeedMissing(b *testing.B, url string) float64 {
	samples, err := testkit.Scrape(url)
	must(b, err)
	for _, s := range testkit.Named(samples, "pgconsistency_anomalies") {
		if s.Labels["invariant"] == "dataset_seed_missing" {
			return s.Value
		}
	}
	return -1
}

// logSink is an OTLP/HTTP logs endpoint that notes when the first record of
// each anomaly key arrived.
type logSink struct {
	url     string
	mu      sync.Mutex
	arrived map[string]time.Time
}

func newLogSink(b *testing.B) *logSink {
	s := &logSink{arrived: map[string]time.Time{}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(b, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		now := time.Now()
		var r io.Reader = req.Body
		if req.Header.Get("Content-Encoding") == "gzip" { // the otlphttp exporter's default
			zr, err := gzip.NewReader(req.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			r = zr
		}
		body, _ := io.ReadAll(r)
		er := plogotlp.NewExportRequest()
		if err := er.UnmarshalProto(body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		rls := er.Logs().ResourceLogs()
		for i := range rls.Len() {
			sls := rls.At(i).ScopeLogs()
			for j := range sls.Len() {
				lrs := sls.At(j).LogRecords()
				for k := range lrs.Len() {
					if v, ok := lrs.At(k).Attributes().Get("pgconsistency.anomaly.key"); ok {
						if _, seen := s.arrived[v.Str()]; !seen {
							s.arrived[v.Str()] = now
						}
					}
				}
			}
		}
		s.mu.Unlock()
		out, _ := plogotlp.NewExportResponse().MarshalProto()
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(l) }()
	b.Cleanup(func() { _ = srv.Close() })
	s.url = "http://" + l.Addr().String()
	return s
}

func (s *logSink) arrival(key string) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.arrived[key]
}

// startLatencyCollector runs the built collector with the shipped
// config/collector-logs.yaml, and returns its Prometheus endpoint's URL.
func startLatencyCollector(b *testing.B, srv *pgtest.Server, db, logsURL string) string {
	bin := fixture.Path("_build/otelcol-pgconsistency")
	if _, err := os.Stat(bin); err != nil {
		b.Fatal("the collector is not built: run make build (make bench does)")
	}
	promPort := testkit.FreePort(b)
	log, err := os.Create(filepath.Join(b.TempDir(), "collector.log"))
	must(b, err)
	args := []string{"--config", fixture.Path("config/collector-logs.yaml")}
	if *flagLatStream {
		overlay := filepath.Join(b.TempDir(), "wal-stream.yaml")
		must(b, os.WriteFile(overlay, []byte("receivers:\n  pgconsistency:\n    refresh:\n      wal_stream:\n        enabled: true\n"), 0o644))
		args = append(args, "--config", overlay)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(),
		"PGCONSISTENCY_DB_ENDPOINT="+srv.Host+":"+strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER="+srv.User,
		"PGCONSISTENCY_DB_PASSWORD="+srv.Password,
		"PGCONSISTENCY_DB_NAME="+db,
		"PGCONSISTENCY_DB_TLS_INSECURE=true",
		"PGCONSISTENCY_COLLECTION_INTERVAL=1s",
		"PGCONSISTENCY_PROMETHEUS_ENDPOINT=127.0.0.1:"+strconv.Itoa(promPort),
		"PGCONSISTENCY_HEALTH_ENDPOINT=127.0.0.1:"+strconv.Itoa(testkit.FreePort(b)),
		"PGCONSISTENCY_TELEMETRY_PORT="+strconv.Itoa(testkit.FreePort(b)),
		"PGCONSISTENCY_LOGS_OTLP_ENDPOINT="+logsURL,
	)
	cmd.Stdout, cmd.Stderr = log, log
	must(b, cmd.Start())
	b.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if b.Failed() {
			out, _ := os.ReadFile(log.Name())
			lines := strings.Split(string(out), "\n")
			b.Logf("collector log (tail):\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})
	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", promPort)
	waitHTTP(b, url)
	return url
}

// writeLoadProc is pgbench running in the background at a fixed rate.
type writeLoadProc struct {
	cmd *exec.Cmd
	out *strings.Builder
}

func startWriteLoad(b *testing.B, srv *pgtest.Server, db string, n, tps int) *writeLoadProc {
	_, err := srv.Conn(b, db).Exec(b.Context(), "CREATE SEQUENCE IF NOT EXISTS public.bench_write_seq START 100000000")
	must(b, err)
	args := append(latLoadScripts(n), "-n", "-c", "1", "-R", strconv.Itoa(tps), "-T", "36000", "-P", "1",
		"-h", srv.Host, "-p", strconv.Itoa(srv.Port), "-U", srv.User, db)
	cmd := exec.Command(pgbenchPath(b), args...)
	cmd.Env = append(os.Environ(), "PGPASSWORD="+srv.Password)
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	must(b, cmd.Start())
	p := &writeLoadProc{cmd: cmd, out: out}
	b.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return p
}

// latLoadScripts: the service's two write shapes, as in the writers'
// benchmark: a new dataset 1 in 5, a block appended (head moved, statistics
// updated) 4 in 5.
func latLoadScripts(n int) []string {
	return []string{"-f", fixture.Path("internal/bench/write_load.sql") + "@1", "-f", fixture.Path("internal/bench/append_load.sql") + "@4",
		"-D", "maxq=" + strconv.Itoa(n/1000-1)}
}

var progressLine = regexp.MustCompile(`(?m)^progress: [0-9.]+ s, ([0-9.]+) tps`)

// stop ends pgbench (it prints no report when interrupted) and returns about
// how many transactions it committed: the sum of its per-second progress.
func (p *writeLoadProc) stop(b *testing.B) int64 {
	_ = p.cmd.Process.Signal(os.Interrupt)
	_ = p.cmd.Wait()
	var total float64
	for _, m := range progressLine.FindAllStringSubmatch(p.out.String(), -1) {
		v, _ := strconv.ParseFloat(m[1], 64)
		total += v
	}
	return int64(total)
}

func latExec(b *testing.B, conn *pgx.Conn, sql string, args ...any) {
	b.Helper()
	if _, err := conn.Exec(b.Context(), sql, args...); err != nil {
		b.Fatalf("%s: %v", sql, err)
	}
}

// quantile: the q-quantile of ds (nearest rank).
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func (r *latResult) markdown() string {
	var w strings.Builder
	fmt.Fprintf(&w, "\n### Latency: from a breaking commit to the metric and the log record (%d datasets)\n\n", r.scale)
	reader := "read by the changes loop's SQL"
	if *flagLatStream {
		reader = "read by the collector's stream (refresh::wal_stream, an overlay config after the shipped one)"
	}
	fmt.Fprintf(&w, "WAL capture, %s, every invariant incremental; the collector built from builder-config.yaml with config/collector-logs.yaml ", reader)
	fmt.Fprintf(&w, "(collection_interval 1s, the changes loop at its default); a write load of %d tps (pgbench -R, about %d transactions in all); "+
		"one Seed DELETE at a time, committed, then the collector's endpoint polled every 25 ms and the OTLP sink watched. Data generated in %s.\n\n",
		r.tps, r.writes, r.generate.Round(time.Second))
	w.WriteString("| phase | breakages | metric p50 | p90 | p99 | max | log record p50 | p90 | p99 | max |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, p := range r.phases {
		name := p.name
		if p.reconciles > 0 {
			name += fmt.Sprintf(" (%d reconciles)", p.reconciles)
		}
		fmt.Fprintf(&w, "| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, len(p.metric),
			ms(quantile(p.metric, 0.5)), ms(quantile(p.metric, 0.9)), ms(quantile(p.metric, 0.99)), ms(quantile(p.metric, 1)),
			ms(quantile(p.log, 0.5)), ms(quantile(p.log, 0.9)), ms(quantile(p.log, 0.99)), ms(quantile(p.log, 1)))
	}
	return w.String()
}

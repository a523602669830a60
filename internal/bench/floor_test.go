//go:build integration

package bench

// The per-invariant floor: what an incremental refresh costs beyond the
// work of its keys (its steps: the lock, the reconcile check, the index
// hint, the lifecycle, the status), which every pass of the changes loop
// pays once per invariant it lists. Measured side by side in one run
// against a released SQL kept in testdata/sql (-floor.previous), on two
// databases of one cluster with the same generated data: the 13 dataset
// invariants in incremental mode, WAL capture; each round refreshes all 13
// as the receiver's scheduler does (refresh_invariant, a transaction each,
// over one long-lived connection), once with no key pending (the floor)
// and once with -floor.keys keys pending for each; the two databases
// alternate which goes first.
//
//	go test -tags integration -run '^$' -bench '^BenchmarkRefreshFloor$' -benchtime 1x ./internal/bench
//
// TestRefreshFloor (make test) runs two rounds at 10,000 datasets and
// checks only that both releases refresh every invariant incrementally and
// re-check the keys given; its figures are logged, never asserted.

import (
	"flag"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

var (
	flagFloorScale    = flag.Int("floor.scale", 100000, "BenchmarkRefreshFloor: datasets in each database")
	flagFloorRounds   = flag.Int("floor.rounds", 30, "BenchmarkRefreshFloor: rounds (the median pass is reported)")
	flagFloorKeys     = flag.Int("floor.keys", 25, "BenchmarkRefreshFloor: keys pending for each invariant in the passes with keys")
	flagFloorPrevious = flag.String("floor.previous", "0.7.2", "BenchmarkRefreshFloor: the release to compare with (its SQL in testdata/sql/<release>)")
)

// floorConfig is one run of the floor harness.
type floorConfig struct {
	scale, rounds, keys int
	previous            string
}

// floorSide is one database of the run: one SQL release, and the times of
// its passes (the 13 refreshes of a round, summed), by keys pending.
type floorSide struct {
	release     string
	conn        *pgx.Conn
	none, keyed []time.Duration
}

func BenchmarkRefreshFloor(b *testing.B) {
	for b.Loop() {
		fmt.Print(strings.Replace(machine(b), "# pgconsistency benchmark", "# pgconsistency per-invariant floor benchmark", 1))
		srv := startBenchServer(b, incServerSettings...)
		sides := runFloor(b, srv, floorConfig{scale: *flagFloorScale, rounds: *flagFloorRounds, keys: *flagFloorKeys, previous: *flagFloorPrevious})
		fmt.Print(floorMarkdown(sides, *flagFloorScale, *flagFloorKeys))
	}
}

func TestRefreshFloor(t *testing.T) {
	srv := pgtest.Start(t, incServerSettings...)
	sides := runFloor(t, srv, floorConfig{scale: 10000, rounds: 2, keys: 25, previous: *flagFloorPrevious})
	t.Logf("figures (fsync off, not asserted):\n%s", floorMarkdown(sides, 10000, 25))
}

// runFloor builds the two databases and measures them round by round.
func runFloor(tb testing.TB, srv *pgtest.Server, cfg floorConfig) []*floorSide {
	sides := []*floorSide{
		{release: cfg.previous + " (testdata/sql/" + cfg.previous + ")"},
		{release: "this tree (sql/)"},
	}
	installs := []string{"testdata/sql/" + cfg.previous + "/install.sql", "sql/install.sql"}
	for i, side := range sides {
		db := srv.CreateDatabase(tb, fmt.Sprintf("floor_%d", i))
		srv.PsqlFile(tb, db, fixture.Path(schema))
		srv.Psql(tb, db, "-v", "scale="+strconv.Itoa(cfg.scale), "-f", fixture.Path("internal/bench/generate.sql"))
		srv.PsqlFile(tb, db, fixture.Path(installs[i]))
		side.conn = srv.Conn(tb, db)
		incSetMode(tb, side.conn, "incremental")
		incWALFixes(tb, side.conn)
		incSwitchCapture(tb, side.conn, "wal")
		incRefresh(tb, side.conn, "reconcile", side.release+": the first refresh with the WAL capture")
	}
	logf("floor: two databases of %d datasets, %s and this tree", cfg.scale, cfg.previous)
	for round := range cfg.rounds {
		order := sides
		if round%2 == 1 {
			order = []*floorSide{sides[1], sides[0]}
		}
		for _, side := range order {
			side.none = append(side.none, floorPass(tb, side, 0, round))
			side.keyed = append(side.keyed, floorPass(tb, side, cfg.keys, round))
		}
	}
	return sides
}

// floorPass refreshes the 13 invariants once each, with keys pending for
// each (the round's window of datasets, the same on both sides), and
// returns the time of the refreshes alone. Each must be incremental and
// re-check exactly those keys.
func floorPass(tb testing.TB, side *floorSide, keys, round int) time.Duration {
	ctx := tb.Context()
	var total time.Duration
	for _, inv := range fixture.CurrentInvariants {
		if keys > 0 {
			_, err := side.conn.Exec(ctx, `INSERT INTO pgconsistency.pending_key (invariant, key)
				SELECT $1, e.dataset_id FROM public.dataset_entries e ORDER BY e.dataset_id OFFSET $2 LIMIT $3`,
				inv, round*keys, keys)
			must(tb, err)
		}
		start := time.Now()
		outcome, err := incRefreshOne(ctx, side.conn, inv, true)
		total += time.Since(start)
		if err != nil || outcome != "succeeded" {
			tb.Fatalf("%s: refresh_invariant(%s): %s %v", side.release, inv, outcome, err)
		}
		var kind string
		var rechecked int
		must(tb, side.conn.QueryRow(ctx,
			`SELECT last_refresh_kind, rechecked_keys FROM pgconsistency.refresh_state WHERE invariant = $1`, inv).Scan(&kind, &rechecked))
		if kind != "incremental" || rechecked != keys {
			tb.Fatalf("%s: %s: a %s refresh that re-checked %d keys, want an incremental one of %d", side.release, inv, kind, rechecked, keys)
		}
	}
	return total
}

func floorMarkdown(sides []*floorSide, scale, keys int) string {
	var w strings.Builder
	n := len(fixture.CurrentInvariants)
	prev, cur := sides[0], sides[1]
	fmt.Fprintf(&w, "\n## The per-invariant floor, %d datasets, %d rounds\n\n", scale, len(cur.none))
	fmt.Fprintf(&w, "A pass: the %d dataset invariants refreshed incrementally (WAL capture), a transaction each; median over the rounds, the releases alternated.\n\n", n)
	fmt.Fprintf(&w, "| SQL | pass, no key pending | per invariant | pass, %d keys each | per invariant |\n|---|---:|---:|---:|---:|\n", keys)
	for _, s := range sides {
		none, keyed := median(s.none), median(s.keyed)
		fmt.Fprintf(&w, "| %s | %s | %.2f ms | %s | %.2f ms |\n", s.release, ms(none), perMS(none, n), ms(keyed), perMS(keyed, n))
	}
	fmt.Fprintf(&w, "| this tree / %s | %.0f%% | | %.0f%% | |\n\n", strings.Fields(prev.release)[0],
		100*ratio(median(cur.none), median(prev.none)), 100*ratio(median(cur.keyed), median(prev.keyed)))
	return w.String()
}

func perMS(d time.Duration, n int) float64 { return float64(d.Microseconds()) / 1000 / float64(n) }

//go:build integration || e2e

package benchkit

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// ScrapeResult is what one run of the receiver's BenchmarkScrape reported.
type ScrapeResult struct {
	Invariants  int     // invariants in the scrape
	NsPerOp     float64 // mean
	P50, P99    float64 // single scrapes, ms
	BytesPerOp  float64
	AllocsPerOp float64
}

// BuildScrapeBenchmark compiles the receiver's test binary once, for
// RunScrapeBenchmark.
func BuildScrapeBenchmark(tb testing.TB) string {
	tb.Helper()
	bin := filepath.Join(tb.TempDir(), "receiver.test")
	cmd := exec.Command("go", "test", "-tags", "integration", "-c", "-o", bin, "./receiver/pgconsistencyreceiver/")
	cmd.Dir = fixture.Root()
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("building the receiver's test binary for BenchmarkScrape: %v\n%s", err, out)
	}
	return bin
}

var scrapeLine = regexp.MustCompile(`(?m)^BenchmarkScrape\S*\s+\d+\s+(.*)$`)

// RunScrapeBenchmark runs BenchmarkScrape of the binary bin against the
// database dsn for benchtime, and fails unless the scrape reported exactly
// invariants invariants.
func RunScrapeBenchmark(tb testing.TB, bin, dsn, benchtime string, invariants int) ScrapeResult {
	tb.Helper()
	cmd := exec.Command(bin, "-test.run", "^$", "-test.bench", "^BenchmarkScrape$", "-test.benchmem",
		"-test.benchtime", benchtime, "-test.count", "1")
	cmd.Env = append(os.Environ(), "PGCONSISTENCY_BENCH_DSN="+dsn)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tb.Fatalf("BenchmarkScrape: %v\n%s", err, out)
	}
	m := scrapeLine.FindStringSubmatch(string(out))
	if m == nil {
		tb.Fatalf("no BenchmarkScrape line in:\n%s", out)
	}
	vals := map[string]float64{}
	f := strings.Fields(m[1])
	for i := 0; i+1 < len(f); i += 2 {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil {
			tb.Fatalf("BenchmarkScrape: %q: %v", m[0], err)
		}
		vals[f[i+1]] = v
	}
	r := ScrapeResult{
		Invariants: int(vals["invariants"]), NsPerOp: vals["ns/op"], P50: vals["ms-p50"], P99: vals["ms-p99"],
		BytesPerOp: vals["B/op"], AllocsPerOp: vals["allocs/op"],
	}
	if r.Invariants != invariants {
		tb.Fatalf("BenchmarkScrape reported %d invariants, want %d", r.Invariants, invariants)
	}
	return r
}

// RegisterExtraInvariants registers n cheap invariants in schema (created
// if missing) of database db: one materialized view each over a two-row
// table, so 2 anomalies each, named <schema>_1 … <schema>_n. Existing ones
// are kept, so it can be called again with a larger n. It then refreshes
// what is due, which is the new ones.
func RegisterExtraInvariants(tb testing.TB, srv *pgtest.Server, db, schema string, n int) {
	tb.Helper()
	srv.Psql(tb, db, "-v", "ON_ERROR_STOP=1", "-c", `
		CREATE SCHEMA IF NOT EXISTS `+schema+`;
		CREATE TABLE IF NOT EXISTS `+schema+`.t (key text PRIMARY KEY);
		INSERT INTO `+schema+`.t VALUES ('a'), ('b') ON CONFLICT DO NOTHING;
		DO $$
		BEGIN
			FOR i IN 1..`+strconv.Itoa(n)+` LOOP
				IF to_regclass(format('`+schema+`.inv_%s', i)) IS NULL THEN
					EXECUTE format('CREATE MATERIALIZED VIEW `+schema+`.inv_%s AS SELECT key FROM `+schema+`.t WITH NO DATA', i);
					EXECUTE format('CREATE UNIQUE INDEX ON `+schema+`.inv_%s (key)', i);
					PERFORM pgconsistency.register_invariant(format('`+schema+`_%s', i), '`+schema+`', format('inv_%s', i), 'info');
				END IF;
			END LOOP;
		END $$;`)
	srv.Psql(tb, db, "-c", "CALL pgconsistency.refresh()")
}

//go:build integration

// Package bench is the harness of `make bench`: it generates application data
// in the service's schema of today (testdata/schema.sql) at given
// scales in a throwaway PostgreSQL cluster, installs pgconsistency with its
// thirteen dataset invariants, and measures, side by side in one run:
//
//   - the full refresh of the dataset invariants against the scan bound (the
//     time to read every table they involve once), and per invariant its
//     refresh time, plan and the scan bound of the tables it reads;
//   - the receiver's scrape (BenchmarkScrape of the receiver package, run
//     against the generated database) with the dataset invariants alone,
//     then 100 and 1,000 invariants;
//   - the alternative: prometheus-postgres-exporter running the detection
//     queries (the views' definitions) as custom queries on every scrape of
//     its /metrics;
//   - the write throughput of a pgbench load on the application tables
//     without and during refreshes;
//   - RSS and CPU of the collector binary scraping the database.
//
// It prints Markdown tables (the ones in BENCHMARKS.md) and fails when a
// measurement is wrong, e.g. an anomaly count other than the injected one.
//
//	go test -tags integration -run '^$' -bench '^BenchmarkSuite$' -benchtime 1x -timeout 60m ./internal/bench \
//	    -args -scales 100000,1000000
package bench

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgconsistency/pgconsistency/internal/benchkit"
	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

var (
	flagScales    = flag.String("scales", "100000,1000000", "comma-separated numbers of datasets to generate, each a multiple of 1000")
	flagWrites    = flag.Duration("writes", 30*time.Second, "duration of each phase of the write load")
	flagCollector = flag.Duration("collector", 2*time.Minute, "how long the collector scrapes at each scale")
	flagScrape    = flag.String("scrapetime", "3s", "-benchtime of BenchmarkScrape")
	flagClients   = flag.String("clients", "1,2", "comma-separated pgbench client counts of the write load")
)

// tables are the application tables the dataset invariants read.
var tables = []string{
	"dataset_entries", "dataset_references", "dataset_statistics", "dataset_key_blocks",
	"dataset_data_blocks", "dataset_dependencies", "accounts",
}

// schema is the application schema generate.sql fills.
const schema = "testdata/schema.sql"

// expectedAnomalies is what generate.sql injects at scale n: one dataset in
// 1,000 for each dataset invariant, each an anomaly of its own invariant
// only.
func expectedAnomalies(n int) map[string]int64 {
	want := map[string]int64{}
	for _, inv := range fixture.CurrentInvariants {
		want[inv] = int64(n / 1000)
	}
	return want
}

// BenchmarkSuite runs the whole harness once (use -benchtime 1x).
func BenchmarkSuite(b *testing.B) {
	for b.Loop() {
		runSuite(b)
	}
}

func runSuite(b *testing.B) {
	scales := parseScales(b, "scales", *flagScales)
	scrapeBin := benchkit.BuildScrapeBenchmark(b)
	fmt.Print(machine(b))
	srv := startBenchServer(b)
	for _, n := range scales {
		r := runScale(b, srv, n, scrapeBin)
		fmt.Print(r.markdown())
	}
}

// parseScales reads the comma-separated dataset counts of flag name.
func parseScales(tb testing.TB, name, value string) []int {
	var scales []int
	for _, f := range strings.Split(value, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1000 || n%1000 != 0 {
			tb.Fatalf("-%s: %q is not a multiple of 1000", name, f)
		}
		scales = append(scales, n)
	}
	return scales
}

// startBenchServer starts the benchmarks' cluster and prints its version.
// fsync and full_page_writes back on (pgtest turns them off for tests):
// the write load must pay what it pays in production. opts come last:
// they add settings (BenchmarkIncremental: logical decoding) or override.
func startBenchServer(b *testing.B, opts ...pgtest.Option) *pgtest.Server {
	srv := pgtest.Start(b, append([]pgtest.Option{
		pgtest.WithSetting("fsync", "on"),
		pgtest.WithSetting("full_page_writes", "on"),
		pgtest.WithSetting("shared_buffers", "4GB"),
		pgtest.WithSetting("max_wal_size", "16GB"),
		pgtest.WithSetting("checkpoint_timeout", "30min"),
		pgtest.WithSetting("max_connections", "200"),
	}, opts...)...)
	fmt.Printf("PostgreSQL: %s\n\n", strings.TrimSpace(srv.Psql(b, "postgres", "-tAc", "SHOW server_version")))
	return srv
}

// result is what one scale measured.
type result struct {
	scale         int
	generate      time.Duration
	rows          map[string]int64
	bytes         map[string]int64
	scan          map[string]time.Duration // count(*), as PostgreSQL chooses (parallel workers included)
	scan1         map[string]time.Duration // count(*) on one core, as a refresh runs
	refreshFirst  time.Duration
	refreshSteady []time.Duration
	invariants    []invariantResult
	onePass       onePassResult
	scrape        []benchkit.ScrapeResult
	exporter      []time.Duration
	writes        []writeResult
	collector     collectorResult
}

type invariantResult struct {
	name      string
	anomalies int64
	refresh   float64 // seconds, the view's latest refresh (refresh_state)
	query     time.Duration
	plan      string
	relations []string
	bound     time.Duration // scan bound of the relations it reads
	textPlan  string        // EXPLAIN (ANALYZE, BUFFERS), of chainInvariants only
}

// onePassMembers are the checks internal/bench/onepass.sql computes in one
// pass over the block tables.
var onePassMembers = []string{"dataset_key_blocks_missing", "dataset_seed_missing", "dataset_seed_not_first",
	"dataset_chain_gap", "dataset_head_ref_mismatch"}

type onePassResult struct {
	pass       time.Duration // the one pass (best of 3)
	separate   time.Duration // the members' queries one by one (sum of their times in invariants())
	candidates int64         // datasets the pass gives to look at, all members
	anomalies  int64         // the members' anomalies
}

// onePass runs internal/bench/onepass.sql on one core, checks that it gives
// every anomaly of its members, and compares its time with theirs.
func onePass(b *testing.B, conn *pgx.Conn, r *result) onePassResult {
	ctx := b.Context()
	data, err := os.ReadFile(fixture.Path("internal/bench/onepass.sql"))
	must(b, err)
	query := string(data)
	var out onePassResult
	for _, inv := range r.invariants {
		if slices.Contains(onePassMembers, inv.name) {
			out.separate += inv.query
			out.anomalies += inv.anomalies
		}
	}
	_, err = conn.Exec(ctx, `SET max_parallel_workers_per_gather = 0`)
	must(b, err)
	defer conn.Exec(context.Background(), `RESET max_parallel_workers_per_gather`) //nolint:errcheck // best effort: gives the caller its connection back with the default
	out.pass = best(3, func() time.Duration { return timed(b, conn, query) })
	var missed int64
	must(b, conn.QueryRow(ctx, `
		WITH p AS (`+query+`)
		SELECT (SELECT count(*) FROM p),
		       (SELECT count(*) FROM pgconsistency.anomaly a
		         WHERE a.invariant = ANY ($1) AND a.resolved_at IS NULL
		           AND NOT EXISTS (SELECT 1 FROM p WHERE p.invariant = a.invariant AND p.key = a.key))`,
		onePassMembers).Scan(&out.candidates, &missed))
	if missed > 0 {
		b.Fatalf("the one pass misses %d anomalies of its members", missed)
	}
	logf("scale %d: one pass %s, the %d queries one by one %s", r.scale, out.pass, len(onePassMembers), out.separate)
	return out
}

// chainInvariants read the whole metadata chain (key and data blocks, the
// largest tables): their plans are printed with the time of every node.
var chainInvariants = []string{"dataset_chain_gap", "dataset_head_ref_mismatch"}

type writeResult struct {
	clients               int
	before, during, after float64 // transactions per second
	refreshes             int     // refreshes that ran during the "during" phase
}

type collectorResult struct {
	duration  time.Duration
	cpu       time.Duration
	rssKiB    int64
	hwmKiB    int64
	scrapesUp bool
}

func (r *result) scanTotal() time.Duration { return sum(r.scan) }

func (r *result) scanTotal1() time.Duration { return sum(r.scan1) }

func sum(m map[string]time.Duration) time.Duration {
	var t time.Duration
	for _, d := range m {
		t += d
	}
	return t
}

func runScale(b *testing.B, srv *pgtest.Server, n int, scrapeBin string) *result {
	r := &result{scale: n, rows: map[string]int64{}, bytes: map[string]int64{}, scan: map[string]time.Duration{}, scan1: map[string]time.Duration{}}
	db := srv.CreateDatabase(b, fmt.Sprintf("bench_%d", n))
	srv.PsqlFile(b, db, fixture.Path(schema))
	start := time.Now()
	srv.Psql(b, db, "-v", "scale="+strconv.Itoa(n), "-f", fixture.Path("internal/bench/generate.sql"))
	r.generate = time.Since(start)
	srv.PsqlFile(b, db, fixture.Path("sql/install.sql"))
	logf("scale %d: data generated in %s", n, r.generate.Round(time.Second))

	ctx := b.Context()
	conn := srv.Conn(b, db)
	for _, t := range tables {
		var rows, size int64
		must(b, conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM public.`+t+`), pg_catalog.pg_total_relation_size('public.`+t+`')`).Scan(&rows, &size))
		r.rows[t], r.bytes[t] = rows, size
	}
	// The scan bound: each table read once, warm (the best of three), as
	// PostgreSQL reads it fastest.
	for _, t := range tables {
		r.scan[t] = best(3, func() time.Duration { return timed(b, conn, `SELECT count(*) FROM public.`+t) })
	}
	// The same on one core: refreshes run without parallel workers.
	_, err := conn.Exec(ctx, `SET max_parallel_workers_per_gather = 0`)
	must(b, err)
	for _, t := range tables {
		r.scan1[t] = best(3, func() time.Duration { return timed(b, conn, `SELECT count(*) FROM public.`+t) })
	}
	_, err = conn.Exec(ctx, `RESET max_parallel_workers_per_gather`)
	must(b, err)

	// The first refresh writes every anomaly; the following ones are the
	// steady state (the same anomalies: the lifecycle writes nothing).
	r.refreshFirst = timed(b, conn, `CALL pgconsistency.refresh(force => true)`)
	for range 3 {
		r.refreshSteady = append(r.refreshSteady, timed(b, conn, `CALL pgconsistency.refresh(force => true)`))
	}
	logf("scale %d: refresh %s (first %s), scan bound %s", n, median(r.refreshSteady), r.refreshFirst, r.scanTotal())
	r.invariants = invariants(b, conn, r)
	r.onePass = onePass(b, conn, r)

	r.scrape = scrapes(b, srv, db, conn, scrapeBin)
	r.exporter = exporterScrapes(b, srv, db, conn, n)
	for _, f := range strings.Split(*flagClients, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || c < 1 {
			b.Fatalf("-clients: %q is not a positive number", f)
		}
		r.writes = append(r.writes, writeLoad(b, srv, db, n, c))
	}
	r.collector = collectorCost(b, srv, db)
	return r
}

// invariants checks every dataset invariant's count against the injected
// anomalies and explains its query.
func invariants(b *testing.B, conn *pgx.Conn, r *result) []invariantResult {
	ctx := b.Context()
	rows, err := conn.Query(ctx, `
		SELECT s.invariant, s.anomalies, s.snapshot_duration_seconds, s.last_error,
		       coalesce(i.query, pg_catalog.pg_get_viewdef(pg_catalog.format('%I.%I', i.view_schema, i.view_name)::regclass)),
		       i.settings::text
		  FROM pgconsistency.status s JOIN pgconsistency.invariant i ON i.name = s.invariant
		 ORDER BY s.invariant`)
	must(b, err)
	type row struct {
		invariantResult
		lastError *string
		def       string
		settings  string
	}
	var all []row
	for rows.Next() {
		var x row
		must(b, rows.Scan(&x.name, &x.anomalies, &x.refresh, &x.lastError, &x.def, &x.settings))
		all = append(all, x)
	}
	must(b, rows.Err())
	want := expectedAnomalies(r.scale)
	if len(all) != len(want) {
		b.Fatalf("%d invariants registered, want the %d dataset invariants", len(all), len(want))
	}
	var out []invariantResult
	for _, x := range all {
		if x.lastError != nil {
			b.Fatalf("%s: refresh failed: %s", x.name, *x.lastError)
		}
		if w, ok := want[x.name]; !ok || x.anomalies != w {
			b.Fatalf("%s: %d anomalies, want the %d injected", x.name, x.anomalies, w)
		}
		// The query under the refresh's own settings.
		tx, err := conn.Begin(ctx)
		must(b, err)
		_, err = tx.Exec(ctx, `SELECT pgconsistency._apply_refresh_settings($1::jsonb)`, x.settings)
		must(b, err)
		query := strings.TrimSuffix(strings.TrimSpace(x.def), ";")
		var plan []map[string]any
		must(b, tx.QueryRow(ctx, `EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF, FORMAT JSON) `+query).Scan(&plan))
		if slices.Contains(chainInvariants, x.name) {
			// With the time of every node: where the chain checks spend it.
			rows, err := tx.Query(ctx, `EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) `+query)
			must(b, err)
			lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
			must(b, err)
			x.textPlan = strings.Join(lines, "\n")
		}
		must(b, tx.Rollback(ctx))
		x.query = time.Duration(plan[0]["Execution Time"].(float64) * float64(time.Millisecond))
		var nodes []string
		walkPlan(plan[0]["Plan"].(map[string]any), &nodes, &x.relations)
		x.plan = strings.Join(nodes, " › ")
		for _, rel := range x.relations {
			x.bound += r.scan1[rel]
		}
		out = append(out, x.invariantResult)
	}
	return out
}

// walkPlan lists the join/aggregate/scan nodes of a plan (depth first) and
// the tables it reads, once each.
func walkPlan(node map[string]any, nodes, relations *[]string) {
	name := node["Node Type"].(string)
	if j, ok := node["Join Type"].(string); ok && j != "Inner" {
		name = strings.Replace(name, " Join", " "+j+" Join", 1)
	}
	if s, ok := node["Strategy"].(string); ok && name == "Aggregate" {
		name = s + " Aggregate"
	}
	if m, ok := node["Sort Method"].(string); ok {
		name += fmt.Sprintf(" [%s, %.0f MB %s]", m, node["Sort Space Used"].(float64)/1024, strings.ToLower(node["Sort Space Type"].(string)))
	}
	if idx, ok := node["Index Name"].(string); ok {
		name += " (" + idx + ")"
	} else if rel, ok := node["Relation Name"].(string); ok {
		name += " (" + rel + ")"
	}
	*nodes = append(*nodes, name)
	if rel, ok := node["Relation Name"].(string); ok && !slices.Contains(*relations, rel) {
		*relations = append(*relations, rel)
	}
	children, _ := node["Plans"].([]any)
	for _, c := range children {
		walkPlan(c.(map[string]any), nodes, relations)
	}
}

// scrapes runs the receiver's BenchmarkScrape against db with the dataset
// invariants alone, then 100 and 1,000 registered invariants.
func scrapes(b *testing.B, srv *pgtest.Server, db string, conn *pgx.Conn, bin string) []benchkit.ScrapeResult {
	ctx := b.Context()
	var out []benchkit.ScrapeResult
	for _, total := range []int{len(fixture.CurrentInvariants), 100, 1000} {
		if extra := total - len(fixture.CurrentInvariants); extra > 0 {
			benchkit.RegisterExtraInvariants(b, srv, db, "bench_extra", extra)
		}
		var registered int
		must(b, conn.QueryRow(ctx, `SELECT count(*) FROM pgconsistency.status`).Scan(&registered))
		if registered != total {
			b.Fatalf("%d invariants in the status view, want %d", registered, total)
		}
		s := benchkit.RunScrapeBenchmark(b, bin, srv.DSN(db), *flagScrape, total)
		out = append(out, s)
		logf("scrape with %d invariants: %.3f ms p50", total, s.P50)
	}
	_, err := conn.Exec(ctx, `DELETE FROM pgconsistency.invariant WHERE name LIKE 'bench\_extra\_%'; DROP SCHEMA bench_extra CASCADE`)
	must(b, err)
	return out
}

// exporterScrapes runs prometheus-postgres-exporter with the detection
// queries of the dataset invariants (the views' definitions) as custom
// queries and times scrapes of its /metrics, checking the counts it reports.
func exporterScrapes(b *testing.B, srv *pgtest.Server, db string, conn *pgx.Conn, n int) []time.Duration {
	bin, err := exec.LookPath("prometheus-postgres-exporter")
	if err != nil {
		b.Fatal("prometheus-postgres-exporter is not installed: run make bench (it installs it) or apt-get install prometheus-postgres-exporter")
	}
	ctx := b.Context()
	var queries strings.Builder
	rows, err := conn.Query(ctx, `SELECT i.name, coalesce(i.query, pg_catalog.pg_get_viewdef(pg_catalog.format('%I.%I', i.view_schema, i.view_name)::regclass))
	                                FROM pgconsistency.invariant i ORDER BY i.name`)
	must(b, err)
	for rows.Next() {
		var name, def string
		must(b, rows.Scan(&name, &def))
		def = strings.TrimSuffix(strings.TrimSpace(def), ";")
		fmt.Fprintf(&queries, "direct_%s:\n  query: |\n    SELECT count(*) AS anomalies FROM (\n%s\n    ) q\n  metrics:\n    - anomalies:\n        usage: GAUGE\n        description: anomalies of %s\n",
			name, indent(def, "      "), name)
	}
	must(b, rows.Err())
	dir := b.TempDir()
	qfile := filepath.Join(dir, "queries.yaml")
	must(b, os.WriteFile(qfile, []byte(queries.String()), 0o600))
	port := testkit.FreePort(b)
	log, err := os.Create(filepath.Join(dir, "exporter.log"))
	must(b, err)
	cmd := exec.Command(bin, "--web.listen-address=127.0.0.1:"+strconv.Itoa(port), "--extend.query-path="+qfile,
		"--disable-default-metrics", "--disable-settings-metrics", "--no-collector.database", "--no-collector.bgwriter")
	dsn := srv.DSN(db)
	if strings.Contains(dsn, "?") {
		dsn += "&sslmode=disable"
	} else {
		dsn += "?sslmode=disable"
	}
	cmd.Env = append(os.Environ(), "DATA_SOURCE_NAME="+dsn)
	cmd.Stdout, cmd.Stderr = log, log
	must(b, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()

	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", port)
	waitHTTP(b, url)
	count := 3
	if n <= 100000 {
		count = 7
	}
	var times []time.Duration
	client := &http.Client{Timeout: 10 * time.Minute}
	for i := 0; i < count; i++ {
		start := time.Now()
		resp, err := client.Get(url)
		must(b, err)
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		must(b, err)
		times = append(times, time.Since(start))
		want := expectedAnomalies(n)
		got := 0
		sc := bufio.NewScanner(strings.NewReader(string(body)))
		for sc.Scan() {
			line := sc.Text()
			name, ok := strings.CutPrefix(line, "direct_")
			if !ok {
				continue
			}
			name, _, _ = strings.Cut(strings.Fields(name)[0], "{")
			name, ok = strings.CutSuffix(name, "_anomalies")
			if w, known := want[name]; ok && known {
				f := strings.Fields(line)
				if v, _ := strconv.ParseFloat(f[len(f)-1], 64); v == float64(w) {
					got++
				}
			}
		}
		if got != len(want) {
			logText, _ := os.ReadFile(log.Name())
			b.Fatalf("the exporter reported the injected counts for %d of %d invariants:\n%s\nexporter log:\n%s", got, len(want), body, logText)
		}
	}
	logf("exporter scrape: %s median", median(times))
	return times
}

// writeLoad runs the pgbench script write_load.sql with the given number of
// clients three times: before, during back-to-back forced refreshes, and
// after.
func writeLoad(b *testing.B, srv *pgtest.Server, db string, n, clients int) writeResult {
	srv.Psql(b, db, "-c", "CREATE SEQUENCE IF NOT EXISTS public.bench_write_seq")
	pgbench := func() float64 {
		cmd := exec.Command(pgbenchPath(b), "-n", "-c", strconv.Itoa(clients), "-j", strconv.Itoa(clients), "-T", strconv.Itoa(int(flagWrites.Seconds())),
			"-f", fixture.Path("internal/bench/write_load.sql"), "-h", srv.Host, "-p", strconv.Itoa(srv.Port), "-U", srv.User, db)
		cmd.Env = append(os.Environ(), "PGPASSWORD="+srv.Password)
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("pgbench: %v\n%s", err, out)
		}
		m := regexp.MustCompile(`tps = ([0-9.]+) \(without initial connection time\)`).FindStringSubmatch(string(out))
		if m == nil {
			b.Fatalf("pgbench printed no tps:\n%s", out)
		}
		tps, _ := strconv.ParseFloat(m[1], 64)
		return tps
	}
	before := pgbench()
	ctx, cancel := context.WithCancel(b.Context())
	var wg sync.WaitGroup
	var count atomic.Int64
	conn := srv.Conn(b, db)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := conn.Exec(ctx, `CALL pgconsistency.refresh(force => true)`); err != nil {
				if ctx.Err() == nil {
					b.Errorf("refresh during the write load: %v", err)
				}
				return
			}
			count.Add(1)
		}
	}()
	during := pgbench()
	cancel()
	wg.Wait()
	after := pgbench()
	// The writes added complete datasets only: the counts stay the injected
	// ones, in the refreshes that ran during the writes and in one after them.
	conn2 := srv.Conn(b, db)
	checkCounts(b, conn2, n, "after the refreshes during the write load")
	_, err := conn2.Exec(b.Context(), `CALL pgconsistency.refresh(force => true)`)
	must(b, err)
	checkCounts(b, conn2, n, "after the write load")
	logf("writes, %d clients: %.0f tps before, %.0f during %d refreshes, %.0f after", clients, before, during, count.Load(), after)
	return writeResult{clients: clients, before: before, during: during, after: after, refreshes: int(count.Load())}
}

// checkCounts fails unless every dataset invariant's latest refresh
// succeeded and found exactly the injected anomalies.
func checkCounts(b testing.TB, conn *pgx.Conn, n int, when string) {
	if problems := statusProblems(readStatus(b, conn), expectedAnomalies(n)); len(problems) > 0 {
		b.Fatalf("%s:\n%s", when, strings.Join(problems, "\n"))
	}
}

// statusRow is one invariant's row of pgconsistency.status.
type statusRow struct {
	lastStatus string // "never" before the first refresh
	lastError  string
	anomalies  int64
	duration   float64 // seconds, the latest refresh (last_duration_seconds)
}

// readStatus reads pgconsistency.status, by invariant.
func readStatus(tb testing.TB, conn *pgx.Conn) map[string]statusRow {
	rows, err := conn.Query(tb.Context(), `
		SELECT invariant, coalesce(last_run_outcome, 'never'), coalesce(last_error, ''), anomalies,
		       coalesce(last_duration_seconds, 0)
		  FROM pgconsistency.status`)
	must(tb, err)
	status := map[string]statusRow{}
	for rows.Next() {
		var name string
		var s statusRow
		must(tb, rows.Scan(&name, &s.lastStatus, &s.lastError, &s.anomalies, &s.duration))
		status[name] = s
	}
	must(tb, rows.Err())
	return status
}

// statusProblems lists, sorted, every invariant whose latest refresh did
// not succeed or whose count is not the one wanted, and every invariant
// registered or wanted but not both.
func statusProblems(status map[string]statusRow, want map[string]int64) []string {
	var problems []string
	for name, s := range status {
		if s.lastStatus != "succeeded" || s.lastError != "" {
			problems = append(problems, fmt.Sprintf("%s: refresh %s: %s", name, s.lastStatus, s.lastError))
		}
		if w, ok := want[name]; !ok || s.anomalies != w {
			problems = append(problems, fmt.Sprintf("%s: %d anomalies, want %d", name, s.anomalies, w))
		}
	}
	for name := range want {
		if _, ok := status[name]; !ok {
			problems = append(problems, name+": not registered")
		}
	}
	slices.Sort(problems)
	return problems
}

func pgbenchPath(b testing.TB) string {
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pgbench")
	if len(matches) == 0 {
		b.Fatal("pgbench not found (Debian: postgresql-15 or postgresql-contrib)")
	}
	slices.Sort(matches)
	return matches[len(matches)-1]
}

// collectorCost runs the distribution with the shipped Prometheus exporter
// configuration, a 1 s collection interval, scraped every 5 s, and reads
// its CPU time and memory from /proc.
func collectorCost(b *testing.B, srv *pgtest.Server, db string) collectorResult {
	bin := fixture.Path("_build/otelcol-pgconsistency")
	if _, err := os.Stat(bin); err != nil {
		b.Fatal("the collector is not built: run make build (make bench does)")
	}
	promPort, healthPort, telemetryPort := testkit.FreePort(b), testkit.FreePort(b), testkit.FreePort(b)
	dir := b.TempDir()
	log, err := os.Create(filepath.Join(dir, "collector.log"))
	must(b, err)
	cmd := exec.Command(bin, "--config", fixture.Path("config/collector-prometheus.yaml"))
	cmd.Env = append(os.Environ(),
		"PGCONSISTENCY_DB_ENDPOINT="+srv.Host+":"+strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER="+srv.User,
		"PGCONSISTENCY_DB_PASSWORD="+srv.Password,
		"PGCONSISTENCY_DB_NAME="+db,
		"PGCONSISTENCY_DB_TLS_INSECURE=true",
		"PGCONSISTENCY_COLLECTION_INTERVAL=1s",
		"PGCONSISTENCY_PROMETHEUS_ENDPOINT=127.0.0.1:"+strconv.Itoa(promPort),
		"PGCONSISTENCY_HEALTH_ENDPOINT=127.0.0.1:"+strconv.Itoa(healthPort),
		"PGCONSISTENCY_TELEMETRY_PORT="+strconv.Itoa(telemetryPort),
	)
	cmd.Stdout, cmd.Stderr = log, log
	must(b, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	url := fmt.Sprintf("http://127.0.0.1:%d/metrics", promPort)
	waitHTTP(b, url)
	time.Sleep(5 * time.Second) // warmed up: pool connected, first scrapes done
	cpu0 := benchkit.CPU(b, cmd.Process.Pid)
	start := time.Now()
	var r collectorResult
	for time.Since(start) < *flagCollector {
		time.Sleep(5 * time.Second)
		samples, err := testkit.Scrape(url)
		must(b, err)
		up := testkit.Named(samples, "pgconsistency_up")
		if len(up) == 0 {
			logText, _ := os.ReadFile(log.Name())
			b.Fatalf("the collector exports no pgconsistency_up:\n%s", logText)
		}
		r.scrapesUp = slices.ContainsFunc(up, func(s testkit.Sample) bool { return s.Value == 1 })
	}
	r.duration = time.Since(start)
	r.cpu = benchkit.CPU(b, cmd.Process.Pid) - cpu0
	r.rssKiB, r.hwmKiB = benchkit.Memory(b, cmd.Process.Pid)
	if !r.scrapesUp {
		b.Fatal("the collector reported pgconsistency_up 0")
	}
	logf("collector: %s CPU in %s, RSS %d MiB", r.cpu, r.duration.Round(time.Second), r.rssKiB/1024)
	return r
}

func (r *result) markdown() string {
	var w strings.Builder
	steady := median(r.refreshSteady)
	bound := r.scanTotal()
	fmt.Fprintf(&w, "## %d datasets\n\n", r.scale)
	fmt.Fprintf(&w, "Data generated in %s (today's schema, %s); %d anomalies injected per invariant.\n\n", r.generate.Round(time.Second), schema, r.scale/1000)
	bound1 := r.scanTotal1()
	fmt.Fprintf(&w, "| table | rows | size (with indexes) | count(*) | count(*) on one core |\n|---|---:|---:|---:|---:|\n")
	for _, t := range tables {
		fmt.Fprintf(&w, "| %s | %d | %d MiB | %s | %s |\n", t, r.rows[t], r.bytes[t]>>20, ms(r.scan[t]), ms(r.scan1[t]))
	}
	fmt.Fprintf(&w, "| **scan bound** (sum) | | | **%s** | **%s** |\n\n", ms(bound), ms(bound1))

	fmt.Fprintf(&w, "| refresh of the %d dataset invariants | time | ratio to the scan bound | on one core |\n|---|---:|---:|---:|\n", len(r.invariants))
	fmt.Fprintf(&w, "| first (writes the anomalies) | %s | %.1f× | %.1f× |\n", ms(r.refreshFirst), ratio(r.refreshFirst, bound), ratio(r.refreshFirst, bound1))
	fmt.Fprintf(&w, "| steady state (median of %d: %s) | **%s** | **%.1f×** | **%.1f×** |\n\n", len(r.refreshSteady), list(r.refreshSteady), ms(steady), ratio(steady, bound), ratio(steady, bound1))

	var sumBound time.Duration
	fmt.Fprintf(&w, "| invariant | anomalies | refresh | query | its tables' scan bound, one core | ratio | plan |\n|---|---:|---:|---:|---:|---:|---|\n")
	for _, inv := range r.invariants {
		sumBound += inv.bound
		d := time.Duration(inv.refresh * float64(time.Second))
		fmt.Fprintf(&w, "| %s | %d | %s | %s | %s | %.1f× | %s |\n", inv.name, inv.anomalies, ms(d), ms(inv.query), ms(inv.bound), ratio(d, inv.bound), inv.plan)
	}
	fmt.Fprintf(&w, "\nThe %d queries read %s of tables in all (each invariant its own tables once, on one core): %.1f× the one-core scan bound before any work is done.\n\n",
		len(r.invariants), ms(sumBound), ratio(sumBound, bound1))

	p := r.onePass
	fmt.Fprintf(&w, "| one pass over the block tables (internal/bench/onepass.sql), one core | time | datasets to look at / anomalies |\n|---|---:|---:|\n")
	fmt.Fprintf(&w, "| the %d checks' queries one by one (%s) | %s | %d |\n", len(onePassMembers), strings.Join(onePassMembers, ", "), ms(p.separate), p.anomalies)
	fmt.Fprintf(&w, "| one aggregate per dataset giving the datasets each check must look at | %s (%.2f×) | %d |\n\n", ms(p.pass), ratio(p.pass, p.separate), p.candidates)

	for _, inv := range r.invariants {
		if inv.textPlan != "" {
			fmt.Fprintf(&w, "Plan of %s (EXPLAIN (ANALYZE, BUFFERS), under the refresh's settings; timing every node adds to the total):\n\n```\n%s\n```\n\n", inv.name, inv.textPlan)
		}
	}

	fmt.Fprintf(&w, "| scrape (BenchmarkScrape) | ns/op | median | p99 | B/op | allocs/op |\n|---|---:|---:|---:|---:|---:|\n")
	for _, s := range r.scrape {
		fmt.Fprintf(&w, "| %d invariants | %.0f | %.3f ms | %.3f ms | %.0f | %.0f |\n", s.Invariants, s.NsPerOp, s.P50, s.P99, s.BytesPerOp, s.AllocsPerOp)
	}
	ex := median(r.exporter)
	fmt.Fprintf(&w, "\n| the alternative | median scrape | ratio to our scrape (%d invariants) |\n|---|---:|---:|\n", r.scrape[0].Invariants)
	fmt.Fprintf(&w, "| prometheus-postgres-exporter, the %d queries as custom queries (%d scrapes: %s) | %s | %.0f× |\n\n",
		len(r.invariants), len(r.exporter), list(r.exporter), ms(ex), float64(ex)/(r.scrape[0].P50*float64(time.Millisecond)))

	fmt.Fprintf(&w, "| write load (pgbench, %s per phase) | before | during back-to-back refreshes | after | during / mean(before, after) |\n|---|---:|---:|---:|---:|\n", *flagWrites)
	for _, x := range r.writes {
		fmt.Fprintf(&w, "| %d client(s) | %.0f tps | %.0f tps (%d refreshes) | %.0f tps | **%.0f%%** |\n",
			x.clients, x.before, x.during, x.refreshes, x.after, 200*x.during/(x.before+x.after))
	}
	fmt.Fprintln(&w)

	c := r.collector
	fmt.Fprintf(&w, "| collector (1 s interval, %s) | value |\n|---|---:|\n", c.duration.Round(time.Second))
	fmt.Fprintf(&w, "| CPU | %s (%.2f%% of one core) |\n| RSS at the end | %d MiB |\n| peak RSS | %d MiB |\n\n",
		c.cpu, 100*c.cpu.Seconds()/c.duration.Seconds(), c.rssKiB/1024, c.hwmKiB/1024)
	return w.String()
}

func machine(b *testing.B) string {
	cpu := "unknown"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		if m := regexp.MustCompile(`(?m)^model name\s*:\s*(.*)$`).FindSubmatch(data); m != nil {
			cpu = string(m[1])
		}
	}
	mem := ""
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		if m := regexp.MustCompile(`(?m)^MemTotal:\s*(\d+)`).FindSubmatch(data); m != nil {
			kib, _ := strconv.ParseInt(string(m[1]), 10, 64)
			mem = fmt.Sprintf("%d GiB", kib>>20)
		}
	}
	return fmt.Sprintf("# pgconsistency benchmark, %s\n\nMachine: %d cores (%s), %s RAM, %s/%s, %s.\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), runtime.NumCPU(), cpu, mem, runtime.GOOS, runtime.GOARCH, runtime.Version())
}

// helpers

func timed(b testing.TB, conn *pgx.Conn, sql string) time.Duration {
	start := time.Now()
	if _, err := conn.Exec(b.Context(), sql); err != nil {
		b.Fatalf("%s: %v", sql, err)
	}
	return time.Since(start)
}

func best(n int, f func() time.Duration) time.Duration {
	d := time.Duration(math.MaxInt64)
	for range n {
		d = min(d, f())
	}
	return d
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

func ms(d time.Duration) string {
	if d >= 10*time.Second {
		return fmt.Sprintf("%.1f s", d.Seconds())
	}
	return fmt.Sprintf("%.0f ms", float64(d.Microseconds())/1000)
}

func list(ds []time.Duration) string {
	var parts []string
	for _, d := range ds {
		parts = append(parts, ms(d))
	}
	return strings.Join(parts, ", ")
}

func indent(s, prefix string) string {
	lines := strings.Split(s, "\n")
	for i := range lines {
		lines[i] = prefix + lines[i]
	}
	return strings.Join(lines, "\n")
}

func waitHTTP(b *testing.B, url string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = errors.New(resp.Status)
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s did not answer: %v", url, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func must(b testing.TB, err error) {
	b.Helper()
	if err != nil {
		b.Fatal(err)
	}
}

// logf prints progress to stderr, apart from the tables on stdout.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

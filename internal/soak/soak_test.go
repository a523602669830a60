//go:build e2e

// Package soak holds the load and soak runs of the collector distribution
// (`make soak`) and a short soak that runs with `make test`.
//
// Each run starts a throwaway PostgreSQL cluster (internal/pgtest), fixture
// databases (internal/fixture) and the real _build/otelcol-pgconsistency with
// a generated configuration: pgconsistency receivers, the prometheus exporter,
// and the collector's own metrics on a pull endpoint. Memory and CPU are read
// from /proc, connections from pg_stat_activity (application_name
// otelcol-pgconsistency), scrapes from the collector's own
// otelcol_receiver_accepted_metric_points (data points; otelcol_scraper_scraped_metric_points
// counts metrics).
//
//	go test -tags e2e -run '^$' -bench '^Benchmark(Load|Soak)$' -benchtime 1x -timeout 60m ./internal/soak \
//	    -args -load.duration 60s -soak.duration 10m -soak.interval 100ms
package soak

import (
	"flag"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pgconsistency/pgconsistency/internal/benchkit"
	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

var (
	flagLoadDuration = flag.Duration("load.duration", 60*time.Second, "how long BenchmarkLoad runs each collector (1,000 invariants; 20 databases)")
	flagSoakDuration = flag.Duration("soak.duration", 10*time.Minute, "how long BenchmarkSoak scrapes")
	flagSoakInterval = flag.Duration("soak.interval", 100*time.Millisecond, "collection_interval of BenchmarkSoak")
	flagSoakSample   = flag.Duration("soak.sample", 10*time.Second, "how often BenchmarkSoak samples RSS, connections and scrapes")
	flagScrapeTime   = flag.String("scrapetime", "3s", "-benchtime of the receiver's BenchmarkScrape with 1,000 invariants")
)

// soakParams are the knobs of one soak.
type soakParams struct {
	duration    time.Duration // of the whole soak, warm-up included
	interval    time.Duration // collection_interval
	sample      time.Duration // sampling period
	warmup      time.Duration // RSS and connections after it are the baseline
	minScrapes  float64       // fraction of duration/interval that must be scraped
	rssFraction float64       // allowed RSS growth over the baseline, as a fraction…
	rssSlackKiB int64         // …or in KiB, whichever is larger
}

// TestSoakShort is a soak short enough for make test: 20 s at a 50 ms
// interval (about 400 scrapes) with a server restart in the middle. Its
// bounds are generous for a loaded machine, yet a connection leaked per
// scrape (hundreds of connections), a pool that does not recover after the
// restart, or memory growing by tens of MiB would fail it.
func TestSoakShort(t *testing.T) {
	r := runSoak(t, soakParams{
		duration:    20 * time.Second,
		interval:    50 * time.Millisecond,
		sample:      time.Second,
		warmup:      5 * time.Second,
		minScrapes:  0.5,
		rssFraction: 0.2,
		rssSlackKiB: 10 << 10,
	})
	t.Logf("\n%s", r.markdown())
}

// BenchmarkSoak is the long soak of make soak (use -benchtime 1x):
// -soak.duration at -soak.interval, a server restart in the middle.
func BenchmarkSoak(b *testing.B) {
	for b.Loop() {
		warmup := min(time.Minute, *flagSoakDuration/4)
		r := runSoak(b, soakParams{
			duration:    *flagSoakDuration,
			interval:    *flagSoakInterval,
			sample:      *flagSoakSample,
			warmup:      warmup,
			minScrapes:  0.9,
			rssFraction: 0.2,
			rssSlackKiB: 10 << 10,
		})
		fmt.Print(r.markdown())
	}
}

// soakSample is one sampling of the running collector.
type soakSample struct {
	at      time.Duration // since the first scrape was up
	rssKiB  int64
	conns   int
	scrapes float64 // scrapes done since the first one that was up
}

type soakResult struct {
	p                     soakParams
	elapsed               time.Duration
	pointsPerScrape       float64
	samples               []soakSample
	warm                  soakSample // the baseline, after the warm-up
	restartAt             time.Duration
	restartDown, recovery time.Duration // stop+start of the server; from start until up = 1 with the baseline connections
	cpu                   time.Duration
	hwmKiB                int64

	// Failed scrapes (errored points) until the warm-up, the restart, the
	// recovery and the end: counted, not asserted, since a scrape may exceed
	// its timeout (0.9 × interval) on a loaded machine.
	erroredWarm, erroredBeforeRestart, erroredAfterRecovery, erroredPoints float64
}

func runSoak(tb testing.TB, p soakParams) *soakResult {
	srv := pgtest.Start(tb)
	db := fixture.NewDatabase(tb, srv, fixture.Invariants...)
	srv.Psql(tb, db, "-c", "CALL pgconsistency.refresh()")

	c := startCollector(tb, srv, []receiverConfig{{id: "pgconsistency", database: db}}, p.interval)
	waitFor(tb, time.Minute, "pgconsistency_up 1", func() (bool, string) { return upIs(tb, c, 1) })
	checkAnomalies(tb, scrapeSamples(tb, c.metrics), db)

	// Points per successful scrape: what the exporter shows of one scrape.
	var points float64
	for _, s := range scrapeSamples(tb, c.metrics) {
		if strings.HasPrefix(s.Name, "pgconsistency_") {
			points++
		}
	}
	r := &soakResult{p: p, pointsPerScrape: points}
	tel0 := scrapeSamples(tb, c.telemetry)
	accepted0 := testkit.Total(tel0, "otelcol_receiver_accepted_metric_points")
	errored0 := testkit.Total(tel0, "otelcol_scraper_errored_metric_points")
	start := time.Now()
	cpu0 := benchkit.CPU(tb, c.pid())

	take := func() soakSample {
		tel := scrapeSamples(tb, c.telemetry)
		s := soakSample{at: time.Since(start), conns: sumConns(connections(tb, srv))}
		s.rssKiB, _ = benchkit.Memory(tb, c.pid())
		s.scrapes = (testkit.Total(tel, "otelcol_receiver_accepted_metric_points") - accepted0) / points
		if s.conns > 2 {
			tb.Fatalf("at %s: %d connections with application_name %s, want at most 2 (the pool's max): a connection leak\n%s",
				s.at.Round(time.Second), s.conns, appName, c.logTail())
		}
		r.samples = append(r.samples, s)
		return s
	}
	erroredSince := func() float64 {
		return testkit.Total(scrapeSamples(tb, c.telemetry), "otelcol_scraper_errored_metric_points") - errored0
	}

	warmed, restarted := false, false
	for next := p.sample; ; next += p.sample {
		if d := time.Until(start.Add(next)); d > 0 {
			time.Sleep(d) // pacing of the sampling, not an assertion
		}
		s := take()
		if !warmed && s.at >= p.warmup {
			warmed, r.warm = true, s
			if s.conns < 1 {
				tb.Fatalf("after the warm-up: no connection with application_name %s, want 1 or 2", appName)
			}
			r.erroredWarm = erroredSince()
		}
		if warmed && !restarted && s.at >= p.duration/2 {
			restarted = true
			r.restartAt = s.at
			t0 := time.Now()
			r.erroredBeforeRestart = erroredSince()
			srv.Stop(tb)
			srv.StartAgain(tb)
			r.restartDown = time.Since(t0)
			r.recovery = r.restartDown + waitFor(tb, 2*time.Minute, "up = 1 and the warm-up connection count after the server restart", func() (bool, string) {
				if ok, why := upIs(tb, c, 1); !ok {
					return false, why
				}
				if n := sumConns(connections(tb, srv)); n != r.warm.conns {
					return false, fmt.Sprintf("%d connections, %d after the warm-up", n, r.warm.conns)
				}
				return true, ""
			})
			r.erroredAfterRecovery = erroredSince()
			logf("server restarted at %s: down %s, collector back after %s", s.at.Round(time.Second), r.restartDown.Round(time.Millisecond), r.recovery.Round(time.Millisecond))
		}
		if s.at >= p.duration {
			break
		}
	}
	last := r.samples[len(r.samples)-1]
	r.elapsed = last.at
	r.cpu = benchkit.CPU(tb, c.pid()) - cpu0
	_, r.hwmKiB = benchkit.Memory(tb, c.pid())
	r.erroredPoints = erroredSince()

	// A single scrape may time out on a loaded machine: up must be 1 again
	// within a few intervals, not necessarily on the last one.
	waitFor(tb, 30*time.Second, "pgconsistency_up 1 at the end", func() (bool, string) { return upIs(tb, c, 1) })
	checkAnomalies(tb, scrapeSamples(tb, c.metrics), db)
	if last.conns != r.warm.conns {
		tb.Errorf("at the end: %d connections with application_name %s, %d after the warm-up: the count must stay stable", last.conns, appName, r.warm.conns)
	}
	limit := max(int64(float64(r.warm.rssKiB)*(1+p.rssFraction)), r.warm.rssKiB+p.rssSlackKiB)
	if last.rssKiB > limit {
		tb.Errorf("RSS grew from %s after the warm-up to %s at the end, over the bound of %s (+%.0f%% or +%s): memory leak?",
			mib(r.warm.rssKiB), mib(last.rssKiB), mib(limit), 100*p.rssFraction, mib(p.rssSlackKiB))
	}
	expected := r.elapsed.Seconds() / p.interval.Seconds()
	if last.scrapes < p.minScrapes*expected {
		tb.Errorf("%.0f scrapes in %s at %s, want at least %.0f%% of %.0f", last.scrapes, r.elapsed.Round(time.Second), p.interval, 100*p.minScrapes, expected)
	}

	c.stop(tb)
	waitFor(tb, time.Minute, "the collector's connections to close after it stopped", func() (bool, string) {
		n := sumConns(connections(tb, srv))
		return n == 0, fmt.Sprintf("%d connections with application_name %s left", n, appName)
	})
	return r
}

// upIs reports whether every pgconsistency_up sample of the exporter is want.
func upIs(tb testing.TB, c *collector, want float64) (bool, string) {
	up := testkit.Named(scrapeSamples(tb, c.metrics), "pgconsistency_up")
	if len(up) == 0 {
		return false, "no pgconsistency_up sample yet"
	}
	for _, s := range up {
		if s.Value != want {
			return false, fmt.Sprintf("pgconsistency_up %v for database %s", s.Value, s.Labels["postgresql_database_name"])
		}
	}
	return true, ""
}

// checkAnomalies requires the exporter to show the eight dataset invariants of
// db with the counts of their anomaly fixtures.
func checkAnomalies(tb testing.TB, samples []testkit.Sample, db string) {
	tb.Helper()
	got := map[string]float64{}
	for _, s := range testkit.Named(samples, "pgconsistency_anomalies") {
		if s.Labels["postgresql_database_name"] == db {
			got[s.Labels["invariant"]] = s.Value
		}
	}
	for _, inv := range fixture.Invariants {
		v, ok := got[inv]
		if !ok {
			tb.Fatalf("the exporter has no pgconsistency_anomalies{invariant=%q} for database %s", inv, db)
		}
		if want := float64(len(fixture.Breakage[inv])); v != want {
			tb.Fatalf("pgconsistency_anomalies{invariant=%q} = %v for database %s, want %v", inv, v, db, want)
		}
	}
}

func (r *soakResult) markdown() string {
	var w strings.Builder
	last := r.samples[len(r.samples)-1]
	maxRSS, maxConns := int64(0), 0
	for _, s := range r.samples {
		maxRSS, maxConns = max(maxRSS, s.rssKiB), max(maxConns, s.conns)
	}
	expected := r.elapsed.Seconds() / r.p.interval.Seconds()
	fmt.Fprintf(&w, "| soak: %s at a %s interval, 8 invariants | value |\n|---|---:|\n", r.elapsed.Round(time.Second), r.p.interval)
	fmt.Fprintf(&w, "| scrapes (otelcol_receiver_accepted_metric_points ÷ %.0f points per scrape) | %.0f (%.0f%% of %.0f) |\n", r.pointsPerScrape, last.scrapes, 100*last.scrapes/expected, expected)
	fmt.Fprintf(&w, "| server restart at %s: stop+start / until up = 1 with the same connections | %s / %s |\n",
		r.restartAt.Round(time.Second), r.restartDown.Round(time.Millisecond), r.recovery.Round(time.Millisecond))
	fmt.Fprintf(&w, "| failed scrapes (errored points) until the warm-up / the restart / the recovery / the end | %.0f / %.0f / %.0f / %.0f |\n",
		r.erroredWarm, r.erroredBeforeRestart, r.erroredAfterRecovery, r.erroredPoints)
	fmt.Fprintf(&w, "| connections after the warm-up / max / at the end | %d / %d / %d |\n", r.warm.conns, maxConns, last.conns)
	fmt.Fprintf(&w, "| RSS after the warm-up (%s) / max sampled / at the end | %s / %s / %s (%+.1f%%) |\n",
		r.warm.at.Round(time.Second), mib(r.warm.rssKiB), mib(maxRSS), mib(last.rssKiB), 100*float64(last.rssKiB-r.warm.rssKiB)/float64(r.warm.rssKiB))
	fmt.Fprintf(&w, "| peak RSS (VmHWM) | %s |\n", mib(r.hwmKiB))
	fmt.Fprintf(&w, "| CPU | %s (%.1f%% of one core) |\n\n", r.cpu.Round(10*time.Millisecond), 100*r.cpu.Seconds()/r.elapsed.Seconds())

	// The trend: about a dozen rows, whatever the number of samples.
	step := max(1, len(r.samples)/12)
	fmt.Fprintf(&w, "| time | RSS | connections | scrapes |\n|---:|---:|---:|---:|\n")
	for i, s := range r.samples {
		if i%step == 0 || i == len(r.samples)-1 {
			fmt.Fprintf(&w, "| %s | %s | %d | %.0f |\n", s.at.Round(time.Second), mib(s.rssKiB), s.conns, s.scrapes)
		}
	}
	fmt.Fprintln(&w)
	return w.String()
}

// BenchmarkLoad measures the collector (use -benchtime 1x) with one receiver
// reading 1,000 registered invariants, and with 20 receivers for 20
// databases of one cluster, each for -load.duration at a 1 s interval.
func BenchmarkLoad(b *testing.B) {
	for b.Loop() {
		scrapeBin := benchkit.BuildScrapeBenchmark(b)
		srv := pgtest.Start(b)
		fmt.Printf("PostgreSQL %s; %d cores.\n\n", strings.TrimSpace(srv.Psql(b, "postgres", "-tAc", "SHOW server_version")), runtime.NumCPU())
		many := loadManyInvariants(b, srv, scrapeBin)
		dbs := loadManyDatabases(b, srv)
		fmt.Print(loadMarkdown(many, dbs))
	}
}

type loadResult struct {
	what            string
	duration        time.Duration
	cpu             time.Duration
	rssKiB, hwmKiB  int64
	series          int     // pgconsistency_anomalies series in the exporter
	conns           int     // the receivers' connections at the end
	pointsPerSecond float64 // scraped by the receivers
	exportBytes     int     // size of the exporter's /metrics
	exportTime      time.Duration
	scrapeP50       float64 // BenchmarkScrape, ms
	scrapeP99       float64
	scrapeAllocs    float64
}

const extraInvariants = 1000 - 8

func loadManyInvariants(b *testing.B, srv *pgtest.Server, scrapeBin string) loadResult {
	if len(fixture.Invariants) != 8 {
		b.Fatalf("%d dataset invariants, this benchmark adds %d to reach 1,000", len(fixture.Invariants), extraInvariants)
	}
	db := fixture.NewDatabase(b, srv, fixture.Invariants...)
	// Cheap extra invariants, registered and refreshed like any other; each
	// has 2 anomalies.
	benchkit.RegisterExtraInvariants(b, srv, db, "load_extra", extraInvariants)
	out := strings.Fields(srv.Psql(b, db, "-tAc", "SELECT count(*), count(*) FILTER (WHERE last_error IS NOT NULL OR refreshed_at IS NULL) FROM pgconsistency.status", "-F", " "))
	if len(out) != 2 || out[0] != "1000" || out[1] != "0" {
		b.Fatalf("status view: %v (invariants, not refreshed or failed), want 1000 refreshed invariants", out)
	}
	logf("1,000 invariants registered and refreshed")

	r := loadResult{what: "1 receiver, 1,000 invariants"}
	sr := benchkit.RunScrapeBenchmark(b, scrapeBin, srv.DSN(db), *flagScrapeTime, 1000)
	r.scrapeP50, r.scrapeP99, r.scrapeAllocs = sr.P50, sr.P99, sr.AllocsPerOp
	c := startCollector(b, srv, []receiverConfig{{id: "pgconsistency", database: db}}, time.Second)
	measureCollector(b, srv, c, &r)

	samples := scrapeSamples(b, c.metrics)
	checkAnomalies(b, samples, db)
	anomalies := testkit.Named(samples, "pgconsistency_anomalies")
	r.series = len(anomalies)
	if r.series != 1000 {
		b.Fatalf("the exporter has %d pgconsistency_anomalies series, want 1000 (one per registered invariant)", r.series)
	}
	for _, s := range anomalies {
		if strings.HasPrefix(s.Labels["invariant"], "load_extra_") && s.Value != 2 {
			b.Fatalf("pgconsistency_anomalies{invariant=%q} = %v, want 2 (the rows of load_extra.t)", s.Labels["invariant"], s.Value)
		}
	}
	if ok, why := upIs(b, c, 1); !ok {
		b.Fatal(why)
	}
	c.stop(b)
	return r
}

func loadManyDatabases(b *testing.B, srv *pgtest.Server) loadResult {
	const n = 20
	// Odd databases get the dataset_head_ref_missing fixture, even ones do
	// not: each database's series must carry its own count.
	var receivers []receiverConfig
	want := map[string]float64{}
	for i := 1; i <= n; i++ {
		fixtures := fixture.Invariants
		if i%2 == 0 {
			fixtures = slices.DeleteFunc(slices.Clone(fixtures), func(s string) bool { return s == "dataset_head_ref_missing" })
		}
		db := fixture.NewDatabase(b, srv, fixtures...)
		srv.Psql(b, db, "-c", "CALL pgconsistency.refresh()")
		receivers = append(receivers, receiverConfig{id: fmt.Sprintf("pgconsistency/db%02d", i), database: db})
		want[db] = 0
		if i%2 == 1 {
			want[db] = float64(len(fixture.Breakage["dataset_head_ref_missing"]))
		}
	}
	logf("%d fixture databases ready", n)

	r := loadResult{what: "20 receivers, 20 databases × 8 invariants"}
	c := startCollector(b, srv, receivers, time.Second)
	waitFor(b, time.Minute, "pgconsistency_up 1 for all 20 databases", func() (bool, string) {
		up := testkit.Named(scrapeSamples(b, c.metrics), "pgconsistency_up")
		if len(up) != n {
			return false, fmt.Sprintf("%d pgconsistency_up series", len(up))
		}
		return upIs(b, c, 1)
	})
	measureCollector(b, srv, c, &r)

	samples := scrapeSamples(b, c.metrics)
	got := map[string]float64{}
	for _, s := range testkit.Named(samples, "pgconsistency_anomalies") {
		r.series++
		if s.Labels["invariant"] == "dataset_head_ref_missing" {
			got[s.Labels["postgresql_database_name"]] = s.Value
		}
	}
	if len(got) != n {
		b.Fatalf("dataset_head_ref_missing for %d distinct postgresql_database_name values, want %d: %v", len(got), n, got)
	}
	for db, w := range want {
		if v, ok := got[db]; !ok || v != w {
			b.Fatalf("pgconsistency_anomalies{invariant=\"dataset_head_ref_missing\", postgresql_database_name=%q} = %v (present: %v), want %v", db, v, ok, w)
		}
	}
	if r.series != n*8 {
		b.Fatalf("%d pgconsistency_anomalies series, want %d", r.series, n*8)
	}
	perDB := connections(b, srv)
	if r.conns > 2*n {
		b.Fatalf("%d connections with application_name %s, want at most %d (2 per receiver)", r.conns, appName, 2*n)
	}
	for db := range want {
		if perDB[db] < 1 || perDB[db] > 2 {
			b.Fatalf("database %s: %d receiver connections, want 1 or 2", db, perDB[db])
		}
	}
	c.stop(b)
	return r
}

// measureCollector lets the collector run for -load.duration after a short
// warm-up and records its CPU, memory, scraped points, connections and one
// export.
func measureCollector(b *testing.B, srv *pgtest.Server, c *collector, r *loadResult) {
	waitFor(b, time.Minute, "pgconsistency_up 1", func() (bool, string) { return upIs(b, c, 1) })
	time.Sleep(5 * time.Second) // warm-up before measuring: pools connected, first exports done
	cpu0 := benchkit.CPU(b, c.pid())
	points0 := testkit.Total(scrapeSamples(b, c.telemetry), "otelcol_receiver_accepted_metric_points")
	start := time.Now()
	time.Sleep(*flagLoadDuration) // the measured run
	r.duration = time.Since(start)
	tel := scrapeSamples(b, c.telemetry)
	r.cpu = benchkit.CPU(b, c.pid()) - cpu0
	r.rssKiB, r.hwmKiB = benchkit.Memory(b, c.pid())
	r.pointsPerSecond = (testkit.Total(tel, "otelcol_receiver_accepted_metric_points") - points0) / r.duration.Seconds()
	if e := testkit.Total(tel, "otelcol_scraper_errored_metric_points"); e != 0 {
		b.Fatalf("%v scrape errors (points) during the load run, want none\n%s", e, c.logTail())
	}
	r.conns = sumConns(connections(b, srv))
	t0 := time.Now()
	body, err := get(c.metrics)
	must(b, err)
	r.exportTime, r.exportBytes = time.Since(t0), len(body)
	logf("%s: CPU %s in %s, RSS %s", r.what, r.cpu, r.duration.Round(time.Second), mib(r.rssKiB))
}

func loadMarkdown(rs ...loadResult) string {
	var w strings.Builder
	fmt.Fprintf(&w, "| collector, 1 s interval, %s measured | CPU (of one core) | RSS at the end | peak RSS | points accepted/s | connections | GET /metrics of the exporter |\n|---|---:|---:|---:|---:|---:|---:|\n", *flagLoadDuration)
	for _, r := range rs {
		fmt.Fprintf(&w, "| %s | %s (%.2f%%) | %s | %s | %.0f | %d | %d KiB in %d ms |\n",
			r.what, r.cpu.Round(10*time.Millisecond), 100*r.cpu.Seconds()/r.duration.Seconds(), mib(r.rssKiB), mib(r.hwmKiB),
			r.pointsPerSecond, r.conns, r.exportBytes>>10, r.exportTime.Milliseconds())
	}
	fmt.Fprintf(&w, "\n| receiver scrape with 1,000 invariants (BenchmarkScrape, -benchtime %s) | median | p99 | allocs/op |\n|---|---:|---:|---:|\n", *flagScrapeTime)
	fmt.Fprintf(&w, "| status query + metrics built | %.3f ms | %.3f ms | %.0f |\n\n", rs[0].scrapeP50, rs[0].scrapeP99, rs[0].scrapeAllocs)
	return w.String()
}

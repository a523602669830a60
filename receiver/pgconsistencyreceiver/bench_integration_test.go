//go:build integration

package pgconsistencyreceiver

import (
	"net/url"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.opentelemetry.io/collector/config/configopaque"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// envBenchDSN names the database BenchmarkScrape scrapes, as a postgres:// URL
// of a database with pgconsistency installed. make bench sets it to its
// generated databases; unset, the benchmark starts a cluster with the
// fixtures of testdata/.
const envBenchDSN = "PGCONSISTENCY_BENCH_DSN"

// BenchmarkScrape measures one scrape as the collector runs it: the status
// query over a pooled connection and the metrics built from its rows. Beside
// ns/op and allocations it reports the median and 99th percentile of single
// scrapes, and the number of invariants the scrape reported.
func BenchmarkScrape(b *testing.B) {
	cfg := benchConfig(b)
	s := newScraper(cfg, receivertest.NewNopSettings(metadata.Type), newPgxClient)
	if err := s.start(b.Context(), nil); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = s.shutdown(b.Context()) }()
	// One scrape outside the measurement: connects the pool, checks the data.
	md, err := s.scrape(b.Context())
	if err != nil {
		b.Fatal(err)
	}
	invariants := 0
	for i := 0; i < md.ResourceMetrics().At(0).ScopeMetrics().At(0).Metrics().Len(); i++ {
		m := md.ResourceMetrics().At(0).ScopeMetrics().At(0).Metrics().At(i)
		if m.Name() == "pgconsistency.anomalies" {
			invariants = m.Gauge().DataPoints().Len()
		}
	}
	if invariants == 0 {
		b.Fatal("the scrape reported no invariant")
	}

	durations := make([]time.Duration, 0, 1024)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		if _, err := s.scrape(b.Context()); err != nil {
			b.Fatal(err)
		}
		durations = append(durations, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(durations)
	b.ReportMetric(float64(durations[len(durations)/2].Microseconds())/1000, "ms-p50")
	b.ReportMetric(float64(durations[len(durations)*99/100].Microseconds())/1000, "ms-p99")
	b.ReportMetric(float64(invariants), "invariants")
}

func benchConfig(b *testing.B) *Config {
	dsn := os.Getenv(envBenchDSN)
	if dsn == "" {
		srv := pgtest.Start(b)
		db := fixture.NewDatabase(b, srv, fixture.Invariants...)
		srv.Psql(b, db, "-c", "CALL pgconsistency.refresh()")
		return serverConfig(srv, db)
	}
	u, err := url.Parse(dsn)
	if err != nil || u.User == nil || u.Port() == "" {
		b.Fatalf("%s must be postgres://user:password@host:port/database", envBenchDSN)
	}
	cfg := createDefaultConfig()
	cfg.Endpoint = u.Host
	cfg.Username = u.User.Username()
	password, _ := u.User.Password()
	cfg.Password = configopaque.String(password)
	cfg.Database = u.Path[1:]
	cfg.TLS.Insecure = true
	if _, err := strconv.Atoi(u.Port()); err != nil {
		b.Fatalf("%s: bad port %q", envBenchDSN, u.Port())
	}
	return cfg
}

// BenchmarkStatusShapes measures the status query of each release shape the
// receiver knows, newest first, on the same database and connection: what
// each release's columns cost a scrape (0.6.0 added the deploy marker value
// and where the new anomalies came from). Run with -count to alternate them.
func BenchmarkStatusShapes(b *testing.B) {
	cfg := benchConfig(b)
	c, err := newPgxClient(b.Context(), cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer c.close()
	pc := c.(*pgxClient)
	conn, err := pc.pool.Acquire(b.Context())
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Release()
	for _, sh := range []struct {
		name  string
		shape statusShape
	}{{"0.6.0", shape060}, {"0.5.0", shape050}} {
		b.Run(sh.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				rows, _, err := pc.readStatusOn(b.Context(), conn, statusQueries[sh.shape])
				if err != nil || len(rows) == 0 {
					b.Fatalf("%d rows: %v", len(rows), err)
				}
			}
		})
	}
}

//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/receiver/receivertest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// perDatabase is what the newest scrape said, by postgresql.database.name:
// pgconsistency.up and the pgconsistency.anomalies of each invariant.
type perDatabase map[string]struct {
	up        float64
	anomalies map[string]float64
	resource  map[string]any
}

func lastPerDatabase(sink *consumertest.MetricsSink) perDatabase {
	all := sink.AllMetrics()
	out := perDatabase{}
	if len(all) == 0 {
		return out
	}
	md := all[len(all)-1]
	for i := 0; i < md.ResourceMetrics().Len(); i++ {
		rm := md.ResourceMetrics().At(i)
		db := out[""]
		db.anomalies = map[string]float64{}
		db.resource = rm.Resource().Attributes().AsRaw()
		name, _ := rm.Resource().Attributes().Get("postgresql.database.name")
		ms := rm.ScopeMetrics().At(0).Metrics()
		for k := 0; k < ms.Len(); k++ {
			m := ms.At(k)
			dps := m.Gauge().DataPoints()
			for d := 0; d < dps.Len(); d++ {
				dp := dps.At(d)
				v := dp.DoubleValue()
				if dp.ValueType() == pmetric.NumberDataPointValueTypeInt {
					v = float64(dp.IntValue())
				}
				switch m.Name() {
				case "pgconsistency.up":
					db.up = v
				case "pgconsistency.anomalies":
					inv, _ := dp.Attributes().Get("invariant")
					db.anomalies[inv.Str()] = v
				}
			}
		}
		out[name.Str()] = db
	}
	return out
}

// multiReceiver starts a metrics receiver configured by opts, logging to an
// observer at info level.
func multiReceiver(t *testing.T, srv *pgtest.Server, opts func(*Config)) (*consumertest.MetricsSink, *observer.ObservedLogs) {
	t.Helper()
	cfg := serverConfig(srv, "")
	// A timeout that holds on a loaded machine (the package's other tests
	// run their own clusters at the same time).
	cfg.CollectionInterval = 500 * time.Millisecond
	cfg.Timeout = 450 * time.Millisecond
	opts(cfg)
	require.NoError(t, cfg.Validate())
	core, logs := observer.New(zapcore.InfoLevel)
	set := receivertest.NewNopSettings(metadata.Type)
	set.Logger = zap.New(core)
	sink := new(consumertest.MetricsSink)
	rcv, err := NewFactory().CreateMetrics(t.Context(), set, cfg, sink)
	require.NoError(t, err)
	require.NoError(t, rcv.Start(t.Context(), nil))
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	return sink, logs
}

func waitDatabases(t *testing.T, sink *consumertest.MetricsSink, what string, check func(perDatabase) error) perDatabase {
	t.Helper()
	var last error
	var got perDatabase
	ok := assert.Eventually(t, func() bool {
		got = lastPerDatabase(sink)
		last = check(got)
		return last == nil
	}, 60*time.Second, 50*time.Millisecond)
	require.True(t, ok, "%s: %v", what, last)
	return got
}

// exactly checks that the newest scrape has exactly the databases of want,
// each with up = 1 and its dataset_head_ref_missing count.
func exactly(want map[string]float64) func(perDatabase) error {
	return func(got perDatabase) error {
		if names := slices.Sorted(maps.Keys(got)); !slices.Equal(names, slices.Sorted(maps.Keys(want))) {
			return fmt.Errorf("databases %v, want %v", names, slices.Sorted(maps.Keys(want)))
		}
		for name, n := range want {
			if got[name].up != 1 {
				return fmt.Errorf("%s: pgconsistency.up = %v", name, got[name].up)
			}
			if v := got[name].anomalies["dataset_head_ref_missing"]; v != n {
				return fmt.Errorf("%s: dataset_head_ref_missing = %v, want %v", name, v, n)
			}
		}
		return nil
	}
}

// newPgconsistencyDatabase is a fixture database with dataset_head_ref_missing
// broken (3 anomalies) when broken, clean otherwise, refreshed once.
func newPgconsistencyDatabase(t *testing.T, srv *pgtest.Server, broken bool) string {
	t.Helper()
	var fixtures []string
	if broken {
		fixtures = []string{"dataset_head_ref_missing"}
	}
	db := fixture.NewDatabase(t, srv, fixtures...)
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	return db
}

// TestIntegrationDatabases: one receiver with "databases" reports each
// listed database under its own resource, with its own counts and up; a
// database that does not exist, or lacks pgconsistency, is up = 0 with an
// error that says what to do, and the others are unaffected.
func TestIntegrationDatabases(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	broken := newPgconsistencyDatabase(t, srv, true)
	clean := newPgconsistencyDatabase(t, srv, false)
	empty := srv.CreateDatabase(t, "")

	sink, logs := multiReceiver(t, srv, func(cfg *Config) {
		cfg.Databases = []string{broken, clean, empty, "missing"}
	})
	got := waitDatabases(t, sink, "four databases", func(got perDatabase) error {
		if len(got) != 4 {
			return fmt.Errorf("%d databases", len(got))
		}
		for name, up := range map[string]float64{broken: 1, clean: 1, empty: 0, "missing": 0} {
			if got[name].up != up {
				return fmt.Errorf("%s: up = %v, want %v", name, got[name].up, up)
			}
		}
		return nil
	})
	assert.EqualValues(t, 3, got[broken].anomalies["dataset_head_ref_missing"])
	assert.EqualValues(t, 0, got[clean].anomalies["dataset_head_ref_missing"])
	assert.Len(t, got[clean].anomalies, len(fixture.Invariants), "every invariant, zeros included")
	assert.Empty(t, got[empty].anomalies)
	assert.Equal(t, map[string]any{
		"postgresql.database.name": clean,
		"server.address":           srv.Host,
		"server.port":              int64(srv.Port),
	}, got[clean].resource)

	// The scrape error names each failing database and the fix.
	require.Eventually(t, func() bool {
		return len(logs.FilterMessageSnippet("Error scraping metrics").All()) > 0
	}, 10*time.Second, 50*time.Millisecond)
	var text strings.Builder
	for _, e := range logs.FilterMessageSnippet("Error scraping metrics").All() {
		for k, v := range e.ContextMap() {
			fmt.Fprintf(&text, "%s=%v\n", k, v)
		}
	}
	assert.Contains(t, text.String(), `database "missing"`)
	assert.Contains(t, text.String(), "create the database and install pgconsistency in it")
	assert.Contains(t, text.String(), fmt.Sprintf(`database %q`, empty))
	assert.Contains(t, text.String(), "install it with `psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql`")
}

// TestIntegrationDiscovery: with discovery, the receiver watches the
// databases that have pgconsistency (not postgres, not an empty one), picks
// up one created later, lets one dropped go with one info line and no
// error, and keeps within max_connections; beyond it, databases are refused
// with one warning.
func TestIntegrationDiscovery(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	broken := newPgconsistencyDatabase(t, srv, true)
	clean := newPgconsistencyDatabase(t, srv, false)
	srv.CreateDatabase(t, "") // no pgconsistency: never watched

	t.Run("follows the server", func(t *testing.T) {
		conns := srv.WatchSessions(t, "otelcol-pgconsistency")
		const maxConnections = 7 // discovery 1 + 3 databases × (scrape 1 + changes loop 1)
		sink, logs := multiReceiver(t, srv, func(cfg *Config) {
			cfg.Discovery.Enabled = true
			cfg.Discovery.Interval = time.Second
			cfg.MaxConnections = maxConnections
			// It asserts no error line: the timeout of the tests that do
			// (a scrape that connects while DROP DATABASE runs waits for
			// it; with 450 ms it timed out in two CI runs on 2026-12-06).
			cfg.CollectionInterval = quietInterval
			cfg.Timeout = quietTimeout
		})
		waitDatabases(t, sink, "the two databases with pgconsistency", exactly(map[string]float64{broken: 3, clean: 0}))

		later := newPgconsistencyDatabase(t, srv, true)
		waitDatabases(t, sink, "the database created later", exactly(map[string]float64{broken: 3, clean: 0, later: 3}))

		// Dropped while watched: FORCE ends the receiver's connection to it.
		dropped := time.Now()
		srv.Psql(t, "", "-c", "DROP DATABASE "+pgx.Identifier{later}.Sanitize()+" WITH (FORCE)")
		waitDatabases(t, sink, "after the drop", exactly(map[string]float64{broken: 3, clean: 0}))
		time.Sleep(3 * time.Second) // several scrapes and discoveries more
		waitDatabases(t, sink, "still after the drop", exactly(map[string]float64{broken: 3, clean: 0}))

		gone := 0
		for _, e := range logs.All() {
			if e.Level >= zapcore.WarnLevel {
				// The names say which database failed (a CI run once had a
				// read time out here, its database not known).
				t.Errorf("a %s line at %s: %s %v (broken %s, clean %s, later %s, dropped at %s)", e.Level, e.Time.Format("15:04:05.000"),
					e.Message, e.ContextMap(), broken, clean, later, dropped.Format("15:04:05.000"))
			}
			if e.ContextMap()["database"] == later && strings.Contains(e.Message, "no longer") {
				gone++
			}
		}
		assert.Equal(t, 1, gone, "one line says the dropped database is no longer watched")
		found := logs.FilterMessageSnippet("database with pgconsistency found").All()
		assert.Len(t, found, 3, "one line per database found")
		assert.LessOrEqual(t, conns.Max(), maxConnections, "sessions of the receiver in pg_stat_activity")
		assert.GreaterOrEqual(t, conns.Max(), 2, "the sampler saw the receiver's connections")
	})

	t.Run("refuses beyond max_connections", func(t *testing.T) {
		sink, logs := multiReceiver(t, srv, func(cfg *Config) {
			cfg.Discovery.Enabled = true
			cfg.Discovery.Interval = 500 * time.Millisecond
			cfg.MaxConnections = 3 // discovery 1 + 1 database (scrape 1 + changes loop 1)
		})
		// Databases are probed in name order: the first one is watched.
		first := min(broken, clean)
		waitDatabases(t, sink, "one database", func(got perDatabase) error {
			if len(got) != 1 || got[first].up != 1 {
				return fmt.Errorf("got %v, want only %s", slices.Collect(maps.Keys(got)), first)
			}
			return nil
		})
		time.Sleep(2 * time.Second) // several discoveries
		refused := logs.FilterMessageSnippet("not watched: max_connections is reached").All()
		require.Len(t, refused, 1, "refused databases are logged once, not at every discovery")
		assert.Equal(t, []any{max(broken, clean)}, refused[0].ContextMap()["databases"])
		assert.EqualValues(t, 3, refused[0].ContextMap()["max_connections"])
	})
}

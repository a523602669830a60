//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/receiver/receivertest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// walCaptureDatabase is a database of today's schema with clean data, every
// invariant in incremental mode and the WAL capture on (as useWALCapture in
// internal/sqltest/incremental_test.go does it).
func walCaptureDatabase(t *testing.T, srv *pgtest.Server) (string, *pgx.Conn) {
	t.Helper()
	db := fixture.NewCurrentDatabase(t, srv)
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "SELECT pgconsistency.set_refresh_mode(name, 'incremental') FROM pgconsistency.invariant")
	require.NoError(t, err)
	rows, err := conn.Query(t.Context(), "SELECT fix FROM pgconsistency.wal_capture_tables() WHERE fix IS NOT NULL")
	require.NoError(t, err)
	fixes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	for _, fix := range fixes {
		_, err := conn.Exec(t.Context(), fix)
		require.NoError(t, err, fix)
	}
	_, err = conn.Exec(t.Context(), "SELECT pgconsistency.set_capture('wal')")
	require.NoError(t, err)
	return db, conn
}

// TestIntegrationChangesLoopWALCapture: with the WAL capture, the receiver's
// changes loop alone (no scheduler, no pg_cron, no manual refresh) turns a
// committed DELETE into pgconsistency.anomalies within seconds, directly and
// through a transaction-pooling PgBouncer, and with the receiver's stream
// (refresh::wal_stream, straight to the server while the rest goes through
// PgBouncer, as docs/sql.md says to set it up); the capture metrics say the
// WAL capture is in use and what its slot keeps.
func TestIntegrationChangesLoopWALCapture(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t, pgtest.WithSetting("wal_level", "logical"), pgtest.WithSetting("max_slot_wal_keep_size", "1GB"))
	for _, via := range []string{"direct", "pgbouncer", "pgbouncer+wal_stream"} {
		t.Run(via, func(t *testing.T) {
			db, conn := walCaptureDatabase(t, srv)
			var incremental float64
			require.NoError(t, conn.QueryRow(t.Context(),
				"SELECT count(*) FROM pgconsistency.status WHERE enabled AND refresh_mode = 'incremental'").Scan(&incremental))
			require.Positive(t, incremental)

			core, logs := observer.New(zapcore.InfoLevel)
			set := receivertest.NewNopSettings(metadata.Type)
			set.Logger = zap.New(core)
			cfg := serverConfig(srv, db)
			if via != "direct" {
				// Pool size 2 for the receiver's 3 connections (4 with
				// the stream's keys): its transactions share server
				// connections.
				b := srv.StartPgBouncer(t, db, pgtest.WithPoolSize(2))
				cfg.Endpoint = b.Host + ":" + strconv.Itoa(b.Port)
			}
			if via == "pgbouncer+wal_stream" {
				cfg.Refresh.WALStream = WALStreamConfig{Enabled: true, Endpoint: srv.Host + ":" + strconv.Itoa(srv.Port)}
			}
			cfg.CollectionInterval = quietInterval
			cfg.Timeout = quietTimeout
			cfg.Refresh.PollInterval = 0
			cfg.Refresh.ChangesInterval = 200 * time.Millisecond
			sink := new(consumertest.MetricsSink)
			rcv, err := NewFactory().CreateMetrics(t.Context(), set, cfg, sink)
			require.NoError(t, err)
			require.NoError(t, rcv.Start(t.Context(), nil))
			t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })

			// The first refresh of each invariant after its switch to
			// incremental mode is a reconcile, which the changes loop runs.
			snap := waitFor(t, sink, "the WAL capture's metrics and a first snapshot", func(s snapshot) error {
				if v, ok := s.get("pgconsistency.capture.invariants", "/wal"); !ok || v != incremental {
					return fmt.Errorf("capture.invariants{wal} = %v (present %v), want %v", v, ok, incremental)
				}
				if v, ok := s.get("pgconsistency.capture.invariants", "/trigger"); !ok || v != 0 {
					return fmt.Errorf("capture.invariants{trigger} = %v (present %v), want 0", v, ok)
				}
				for _, m := range []string{"pgconsistency.capture.wal.retained", "pgconsistency.capture.wal.lag"} {
					if _, ok := s.get(m, ""); !ok {
						return fmt.Errorf("no %s", m)
					}
				}
				if ts, _ := s.get("pgconsistency.snapshot.timestamp", "dataset_seed_missing"); ts == 0 {
					return fmt.Errorf("dataset_seed_missing never refreshed")
				}
				if v, ok := s.get("pgconsistency.anomalies", "dataset_seed_missing"); !ok || v != 0 {
					return fmt.Errorf("anomalies{dataset_seed_missing} = %v (present %v), want 0", v, ok)
				}
				return nil
			})
			bound, _ := snap.get("pgconsistency.capture.wal.bound", "")
			assert.Equal(t, float64(1<<30), bound, "max_slot_wal_keep_size = 1GB")
			retained, _ := snap.get("pgconsistency.capture.wal.retained", "")
			lag, _ := snap.get("pgconsistency.capture.wal.lag", "")
			assert.Positive(t, retained, "the slot keeps the WAL since its restart_lsn")
			assert.Less(t, retained, float64(64<<20), "the changes loop reads the slot")
			assert.GreaterOrEqual(t, lag, 0.0)
			t.Logf("slot: retained %.0f bytes, lag %.0f bytes, bound %.0f bytes", retained, lag, bound)

			_, err = conn.Exec(t.Context(),
				"DELETE FROM public.dataset_key_blocks WHERE dataset_id = fixture.dataset_id(1) AND event_type = 'Seed'")
			require.NoError(t, err)
			committed := time.Now()
			snap = waitFor(t, sink, "the deleted Seed in the metric", func(s snapshot) error {
				if v, _ := s.get("pgconsistency.anomalies", "dataset_seed_missing"); v != 1 {
					return fmt.Errorf("anomalies{dataset_seed_missing} = %v, want 1", v)
				}
				return nil
			})
			took := time.Since(committed)
			t.Logf("%s: DELETE committed → pgconsistency.anomalies{dataset_seed_missing} = 1 in %s", via, took.Round(time.Millisecond))
			assert.Less(t, took, 10*time.Second, "within seconds")
			newCount, _ := snap.get("pgconsistency.anomalies.new", "dataset_seed_missing")
			assert.Equal(t, 1.0, newCount)
			mode, _ := snap.get("pgconsistency.refresh.mode", "dataset_seed_missing/incremental")
			assert.Equal(t, 1.0, mode)

			var refreshedBy string
			require.NoError(t, conn.QueryRow(t.Context(), `SELECT string_agg(DISTINCT application_name, ',') FROM pg_stat_activity
				WHERE datname = current_database() AND application_name LIKE 'otelcol-pgconsistency%'`).Scan(&refreshedBy))
			if via == "direct" {
				assert.Contains(t, refreshedBy, changesAppName, "the changes loop's own connection")
			}
			var readBy *string
			var streamed bool
			require.NoError(t, conn.QueryRow(t.Context(), `SELECT (SELECT read_by FROM pgconsistency.capture),
				EXISTS (SELECT 1 FROM pg_stat_replication WHERE application_name = $1)`, streamAppName).Scan(&readBy, &streamed))
			if via == "pgbouncer+wal_stream" {
				assert.Equal(t, "stream", *readBy, "the keys were stored by the stream")
				assert.True(t, streamed, "the stream's replication connection")
			} else {
				assert.Equal(t, "sql", *readBy, "the keys were read by the changes loop's SQL")
				assert.False(t, streamed)
			}
			assert.NotContains(t, refreshedBy, "otelcol-pgconsistency-refresh", "no scheduler")
			assert.Zero(t, logs.FilterLevelExact(zapcore.ErrorLevel).Len(), "errors: %v", logs.FilterLevelExact(zapcore.ErrorLevel).All())
		})
	}
}

// TestIntegrationChangesLoopWhereItCannotRun: with SQL older than 0.7.0, and
// as a role without pgconsistency_refresher, the changes loop says once, at
// info, what to do; no error, no connection held; the scrape goes on.
func TestIntegrationChangesLoopWhereItCannotRun(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	for name, tc := range map[string]struct {
		setup func(t *testing.T) (string, func(*Config))
		want  string
	}{
		"SQL 0.6.0": {
			setup: func(t *testing.T) (string, func(*Config)) { return releaseDatabase(t, srv, "0.6.0"), func(*Config) {} },
			want:  "older than 0.7.0",
		},
		"reader role": {
			setup: func(t *testing.T) (string, func(*Config)) {
				db := rolesDatabase(t, srv)
				_, as := loginRole(t, srv, db, srv.Conn(t, db), "pgconsistency_reader")
				return db, as
			},
			want: "GRANT pgconsistency_refresher TO",
		},
	} {
		t.Run(name, func(t *testing.T) {
			db, as := tc.setup(t)
			core, logs := observer.New(zapcore.InfoLevel)
			set := receivertest.NewNopSettings(metadata.Type)
			set.Logger = zap.New(core)
			cfg := serverConfig(srv, db)
			as(cfg)
			cfg.CollectionInterval = quietInterval
			cfg.Timeout = quietTimeout
			cfg.Refresh.ChangesInterval = 100 * time.Millisecond
			sink := new(consumertest.MetricsSink)
			rcv, err := NewFactory().CreateMetrics(t.Context(), set, cfg, sink)
			require.NoError(t, err)
			require.NoError(t, rcv.Start(t.Context(), nil))
			t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })

			waitFor(t, sink, "scrapes", func(s snapshot) error {
				if up, _ := s.get("pgconsistency.up", ""); up != 1 {
					return fmt.Errorf("pgconsistency.up = %v", up)
				}
				return nil
			})
			time.Sleep(1500 * time.Millisecond) // 15 intervals of the changes loop
			said := logs.FilterMessageSnippet(tc.want).All()
			require.Len(t, said, 1, "said once: %v", logs.All())
			assert.Equal(t, zapcore.InfoLevel, said[0].Level)
			assert.Zero(t, logs.FilterLevelExact(zapcore.ErrorLevel).Len(), "errors: %v", logs.FilterLevelExact(zapcore.ErrorLevel).All())
			var held int
			require.NoError(t, srv.Conn(t, db).QueryRow(t.Context(),
				"SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", changesAppName).Scan(&held))
			assert.Zero(t, held, "no connection held while it cannot run")
		})
	}
}

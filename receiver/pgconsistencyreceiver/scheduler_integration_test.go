//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"fmt"
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

// refreshLog makes the database record the start of every refresh, so a test
// can count them: a trigger on pgconsistency.refresh_state.
func refreshLog(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	_, err := conn.Exec(t.Context(), `
		CREATE TABLE public.test_refresh_log (invariant text NOT NULL, started_at timestamptz NOT NULL);
		CREATE FUNCTION public.test_log_refresh() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF TG_OP = 'INSERT' OR NEW.last_started_at IS DISTINCT FROM OLD.last_started_at THEN
				INSERT INTO public.test_refresh_log VALUES (NEW.invariant, NEW.last_started_at);
			END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER test_log_refresh AFTER INSERT OR UPDATE ON pgconsistency.refresh_state
			FOR EACH ROW EXECUTE FUNCTION public.test_log_refresh();`)
	require.NoError(t, err)
}

// refreshStarts returns the logged refresh starts of each invariant, in order.
func refreshStarts(t *testing.T, conn *pgx.Conn) map[string][]time.Time {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT invariant, started_at FROM public.test_refresh_log ORDER BY started_at")
	require.NoError(t, err)
	out := map[string][]time.Time{}
	for rows.Next() {
		var inv string
		var at time.Time
		require.NoError(t, rows.Scan(&inv, &at))
		out[inv] = append(out[inv], at)
	}
	require.NoError(t, rows.Err())
	return out
}

func withSchedule(d time.Duration) func(*Config) {
	return func(c *Config) { c.Refresh.PollInterval = d }
}

// TestIntegrationTwoSchedulersRefreshOncePerPeriod: two receivers with a
// refresh schedule on one database refresh each invariant once per period.
func TestIntegrationTwoSchedulersRefreshOncePerPeriod(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	refreshLog(t, conn)
	const period = 3 * time.Second
	_, err := conn.Exec(t.Context(), "UPDATE pgconsistency.invariant SET refresh_period = $1::interval", period.String())
	require.NoError(t, err)

	begin := time.Now()
	startReceiver(t, srv, db, withSchedule(200*time.Millisecond))
	startReceiver(t, srv, db, withSchedule(200*time.Millisecond))
	time.Sleep(4 * period)
	window := time.Since(begin)

	starts := refreshStarts(t, conn)
	// The due check allows min(30 s, period/10) of slack: two refreshes of
	// one invariant are never closer than 0.9 periods.
	minGap := period - period/10
	maxPerInvariant := int(window/minGap) + 1
	for _, inv := range fixture.Invariants {
		got := starts[inv]
		closest := window
		for i := 1; i < len(got); i++ {
			closest = min(closest, got[i].Sub(got[i-1]))
		}
		t.Logf("%s: %d refreshes in %s by two schedulers, closest two %s apart (period %s)",
			inv, len(got), window.Round(time.Millisecond), closest.Round(time.Millisecond), period)
		require.GreaterOrEqual(t, len(got), 3, "%s refreshed %d times in %s", inv, len(got), window)
		assert.LessOrEqual(t, len(got), maxPerInvariant, inv)
		for i := 1; i < len(got); i++ {
			assert.GreaterOrEqual(t, got[i].Sub(got[i-1]), minGap,
				"%s refreshed twice within one period: %s then %s", inv, got[i-1], got[i])
		}
	}
}

// TestIntegrationLongRefreshDoesNotStopScrapes: while the scheduler runs a
// refresh far longer than the collection interval, scrapes go on and report
// the previous snapshot.
func TestIntegrationLongRefreshDoesNotStopScrapes(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_seed_missing")
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), `SELECT pgconsistency.define_invariant('slow_check',
		$q$ SELECT 'k'::text AS key FROM pg_catalog.pg_sleep(6) $q$, 'info')`)
	require.NoError(t, err)

	sink, _ := startReceiver(t, srv, db, withSchedule(time.Minute))
	// While slow_check sleeps, scrapes every 250 ms must keep coming.
	require.Eventually(t, func() bool {
		var n int
		err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = 'otelcol-pgconsistency-refresh' AND query LIKE '%refresh_invariant%' AND state = 'active'`).Scan(&n)
		return err == nil && n == 1
	}, 10*time.Second, 50*time.Millisecond, "the scheduler's refresh is running")
	before := len(sink.AllMetrics())
	time.Sleep(2 * time.Second)
	during := len(sink.AllMetrics()) - before
	assert.GreaterOrEqual(t, during, 4, "scrapes while the refresh runs (2 s at 250 ms)")
	snap, ok := lastSnapshot(sink)
	require.True(t, ok)
	up, _ := snap.get("pgconsistency.up", "")
	assert.Equal(t, 1.0, up)
	seeds, _ := snap.get("pgconsistency.anomalies", "dataset_seed_missing")
	assert.Equal(t, 3.0, seeds, "the previous snapshot")
	never, _ := snap.get("pgconsistency.refresh.outcome", "slow_check/never")
	assert.Equal(t, 1.0, never, "slow_check is still running its first refresh")
}

// TestIntegrationDeployMarker: a change of the deploy marker leads to exactly
// one refresh of every invariant, once the stabilization delay has passed.
func TestIntegrationDeployMarker(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	refreshLog(t, conn)
	_, err := conn.Exec(t.Context(), `CREATE TABLE public.schema_migrations (version bigint PRIMARY KEY);
		INSERT INTO public.schema_migrations VALUES (20261101000000)`)
	require.NoError(t, err)
	const delay = 2 * time.Second

	sink, _ := startReceiver(t, srv, db, withSchedule(200*time.Millisecond), func(c *Config) {
		c.Refresh.DeployMarker.Query = "SELECT max(version) FROM public.schema_migrations"
		c.Refresh.DeployMarker.Delay = delay
	})
	// The first pass refreshes everything (never refreshed) and records the
	// marker's value as the baseline: no request for it.
	require.Eventually(t, func() bool { return len(refreshStarts(t, conn)) == len(fixture.Invariants) }, 20*time.Second, 100*time.Millisecond)
	time.Sleep(time.Second)
	baseline := refreshStarts(t, conn)

	_, err = conn.Exec(t.Context(), "INSERT INTO public.schema_migrations VALUES (20261123000000)")
	require.NoError(t, err)
	changed := time.Now()
	snap := waitFor(t, sink, "pending request", func(s snapshot) error {
		if v, _ := s.get("pgconsistency.refresh.requests.pending", ""); v != 1 {
			return fmt.Errorf("pending requests %v", v)
		}
		if v, ok := s.get("pgconsistency.deploy_marker.timestamp", ""); !ok || v == 0 {
			return fmt.Errorf("no deploy marker timestamp")
		}
		return nil
	})
	ts, _ := snap.get("pgconsistency.deploy_marker.timestamp", "")
	assert.InDelta(t, float64(changed.Unix()), ts, 5)

	// Wait well past the delay, then count.
	time.Sleep(delay + 3*time.Second)
	after := refreshStarts(t, conn)
	for _, inv := range fixture.Invariants {
		require.Len(t, after[inv], len(baseline[inv])+1, "%s: exactly one refresh after the marker changed", inv)
		at := after[inv][len(after[inv])-1]
		assert.True(t, at.After(changed.Add(delay-500*time.Millisecond)), "%s refreshed at %s, before the delay (change at %s)", inv, at, changed)
	}
	snap = waitFor(t, sink, "request done", func(s snapshot) error {
		if v, _ := s.get("pgconsistency.refresh.requests.pending", ""); v != 0 {
			return fmt.Errorf("pending requests %v", v)
		}
		return nil
	})
	_ = snap
}

// TestIntegrationRefreshOutcomeMetrics: the scheduler applies each
// invariant's statement_timeout, and the outcomes (timed out, skipped,
// succeeded) reach pgconsistency.refresh.outcome.
func TestIntegrationRefreshOutcomeMetrics(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), `SELECT pgconsistency.define_invariant('slow_check',
		$q$ SELECT 'k'::text AS key FROM pg_catalog.pg_sleep(5) $q$, 'info');
		UPDATE pgconsistency.invariant SET statement_timeout = '300 milliseconds' WHERE name = 'slow_check';
		UPDATE pgconsistency.refresh_state SET last_started_at = last_started_at - interval '1 hour'
		 WHERE invariant = 'dataset_seed_missing'`)
	require.NoError(t, err)
	// Another session is refreshing dataset_seed_missing.
	tx, err := srv.Conn(t, db).Begin(t.Context())
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(t.Context()) }()
	_, err = tx.Exec(t.Context(), "SELECT pg_advisory_xact_lock(hashtext('pgconsistency'), hashtext('dataset_seed_missing'))")
	require.NoError(t, err)

	sink, _ := startReceiver(t, srv, db, withSchedule(time.Minute))
	snap := waitFor(t, sink, "outcomes", func(s snapshot) error {
		for key, want := range map[string]float64{
			"slow_check/timed_out":               1,
			"slow_check/failed":                  0,
			"dataset_seed_missing/skipped":       1,
			"dataset_seed_missing/succeeded":     0,
			"dataset_head_ref_missing/succeeded": 1,
		} {
			if got, ok := s.get("pgconsistency.refresh.outcome", key); !ok || got != want {
				return fmt.Errorf("refresh.outcome{%s} = %v (present %v), want %v", key, got, ok, want)
			}
		}
		return nil
	})
	failures, _ := snap.get("pgconsistency.refresh.failures", "slow_check")
	assert.Equal(t, 1.0, failures)
	failures, _ = snap.get("pgconsistency.refresh.failures", "dataset_seed_missing")
	assert.Equal(t, 0.0, failures, "a skip is not a failure")
}

// TestIntegrationSchedulerExpiresAcknowledgements: the receiver's scheduler
// runs the same refresh loop as CALL pgconsistency.refresh(), expiry of
// acknowledgements included: an acknowledgement past its "until" stops
// hiding its anomaly within a pass, although no invariant is due.
func TestIntegrationSchedulerExpiresAcknowledgements(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_seed_missing")
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), `SELECT pgconsistency.acknowledge('dataset_seed_missing', $1, 'known, fixed by tomorrow',
		until => clock_timestamp() + interval '2 seconds')`, fixture.DatasetID(13))
	require.NoError(t, err)
	refreshLog(t, conn)

	sink, _ := startReceiver(t, srv, db, withSchedule(200*time.Millisecond))
	acknowledged := map[string]int{"dataset_seed_missing": 2}
	waitFor(t, sink, "the acknowledged anomaly is not counted", expectCounts(acknowledged))
	start := time.Now()
	waitFor(t, sink, "the expired acknowledgement counts again", expectCounts(map[string]int{"dataset_seed_missing": 3}))
	t.Logf("the acknowledgement expired and the anomaly counted again %s later", time.Since(start).Round(time.Millisecond))
	assert.Empty(t, refreshStarts(t, conn), "no invariant was due: the expiry, not a refresh, brought it back")
}

// TestIntegrationSchedulerOnAStandby: pointed at a hot standby, the
// scheduler (deploy marker included) refreshes nothing, says why at info
// level, and logs no error: a standby cannot write, and the primary's
// refreshes replicate to it.
func TestIntegrationSchedulerOnAStandby(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	_, err := srv.Conn(t, db).Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	standby := srv.StartStandby(t)

	core, logs := observer.New(zapcore.InfoLevel)
	set := receivertest.NewNopSettings(metadata.Type)
	set.Logger = zap.New(core)
	cfg := serverConfig(standby, db)
	cfg.CollectionInterval = quietInterval
	cfg.Timeout = quietTimeout
	cfg.Refresh.PollInterval = 200 * time.Millisecond
	cfg.Refresh.DeployMarker.Query = "SELECT 'v1'"
	rcv, err := NewFactory().CreateMetrics(t.Context(), set, cfg, consumertest.NewNop())
	require.NoError(t, err)
	require.NoError(t, rcv.Start(t.Context(), nil))
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })

	require.Eventually(t, func() bool {
		return logs.FilterMessageSnippet("nothing refreshed: this server is a standby").Len() >= 3
	}, 30*time.Second, 50*time.Millisecond, "three passes on the standby")
	assert.Zero(t, logs.FilterLevelExact(zapcore.ErrorLevel).Len(), "errors: %v", logs.FilterLevelExact(zapcore.ErrorLevel).All())
}

// TestIntegrationReconcileHealed: an invariant in incremental mode whose
// capture missed a write (its captured keys deleted). The reconcile the
// scheduler runs finds the anomaly the incremental refreshes had missed; its
// WARNING reaches the collector's log at warn level, with the invariant, the
// count, the DETAIL and the HINT, and pgconsistency.reconcile.healed says 1
// until the next reconcile, 0 for the other invariants.
func TestIntegrationReconcileHealed(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_seed_missing")
	conn := srv.Conn(t, db)
	for _, q := range []string{
		"CALL pgconsistency.refresh()",
		"SELECT pgconsistency.set_refresh_mode('dataset_seed_missing', 'incremental')",
		// the first refresh in incremental mode is a reconcile; nothing
		// changed since the full refresh, so it heals nothing
		"SELECT pgconsistency.refresh_invariant('dataset_seed_missing')",
	} {
		_, err := conn.Exec(t.Context(), q)
		require.NoError(t, err, q)
	}
	var kind string
	var healed int64
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT last_refresh_kind, healed_anomalies
		FROM pgconsistency.status WHERE invariant = 'dataset_seed_missing'`).Scan(&kind, &healed))
	require.Equal(t, "reconcile", kind)
	require.Zero(t, healed)

	// A write the capture misses: dataset 2 loses its Seed, and its
	// captured key is gone before any refresh sees it. Then a reconcile is
	// due, and the invariant's refresh too.
	tx, err := conn.Begin(t.Context())
	require.NoError(t, err)
	for _, q := range []string{
		"DELETE FROM public.dataset_key_blocks WHERE dataset_id = '" + fixture.DatasetID(2) + "' AND event_type IN ('Seed', 'SetDataSchema')",
		"DELETE FROM pgconsistency.captured_key",
		"UPDATE pgconsistency.capture_state SET reconcile_reason = 'a test lost a captured key' WHERE invariant = 'dataset_seed_missing'",
		"UPDATE pgconsistency.refresh_state SET last_started_at = last_started_at - interval '1 hour' WHERE invariant = 'dataset_seed_missing'",
	} {
		_, err := tx.Exec(t.Context(), q)
		require.NoError(t, err, q)
	}
	require.NoError(t, tx.Commit(t.Context()))

	core, logs := observer.New(zapcore.InfoLevel)
	set := receivertest.NewNopSettings(metadata.Type)
	set.Logger = zap.New(core)
	cfg := serverConfig(srv, db)
	cfg.CollectionInterval = quietInterval
	cfg.Timeout = quietTimeout
	cfg.Refresh.PollInterval = 200 * time.Millisecond
	sink := new(consumertest.MetricsSink)
	rcv, err := NewFactory().CreateMetrics(t.Context(), set, cfg, sink)
	require.NoError(t, err)
	require.NoError(t, rcv.Start(t.Context(), nil))
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })

	snap := waitFor(t, sink, "the healed anomaly", func(s snapshot) error {
		if v, _ := s.get("pgconsistency.reconcile.healed", "dataset_seed_missing"); v != 1 {
			return fmt.Errorf("reconcile.healed{dataset_seed_missing} = %v, want 1", v)
		}
		return nil
	})
	n, _ := snap.get("pgconsistency.anomalies", "dataset_seed_missing")
	assert.Equal(t, 4.0, n, "the reconcile corrected the snapshot")
	for _, inv := range fixture.Invariants {
		mode := "full"
		if inv == "dataset_seed_missing" {
			mode = "incremental"
		} else {
			v, ok := snap.get("pgconsistency.reconcile.healed", inv)
			assert.True(t, ok && v == 0, "reconcile.healed{%s} = %v (present %v), want 0", inv, v, ok)
		}
		v, _ := snap.get("pgconsistency.refresh.mode", inv+"/"+mode)
		assert.Equal(t, 1.0, v, "refresh.mode{%s/%s}", inv, mode)
	}

	require.Eventually(t, func() bool {
		return logs.FilterMessageSnippet("the reconcile of dataset_seed_missing found 1 anomalies").Len() > 0
	}, 10*time.Second, 50*time.Millisecond, "the reconcile's WARNING in the log")
	entries := logs.FilterMessageSnippet("the reconcile of dataset_seed_missing").All()
	require.Len(t, entries, 1, "one reconcile healed something")
	e := entries[0]
	assert.Equal(t, zapcore.WarnLevel, e.Level)
	assert.Contains(t, e.Message, "Reconciled because a test lost a captured key", "the DETAIL")
	assert.Contains(t, e.ContextMap()["hint"], "A write the capture did not see", "the HINT")
	assert.Zero(t, logs.FilterLevelExact(zapcore.ErrorLevel).Len(), "errors: %v", logs.FilterLevelExact(zapcore.ErrorLevel).All())
}

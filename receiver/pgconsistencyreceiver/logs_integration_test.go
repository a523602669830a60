//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/pdata/plog"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

func startLogsReceiver(t *testing.T, srv *pgtest.Server, db string, next consumer.Logs, maxRecords int) receiver.Logs {
	t.Helper()
	cfg := serverConfig(srv, db)
	cfg.CollectionInterval = 300 * time.Millisecond
	// Explicit: the derived timeout (half the interval) leaves a loaded CI
	// machine little time for the cursor's round trips.
	cfg.Timeout = 250 * time.Millisecond
	cfg.InitialDelay = 0
	cfg.Logs.MaxRecordsPerInterval = maxRecords
	set := receivertest.NewNopSettings(metadata.Type)
	set.ID = component.NewIDWithName(metadata.Type, "logs-test")
	rcv, err := NewFactory().CreateLogs(t.Context(), set, cfg, next)
	require.NoError(t, err)
	require.NoError(t, rcv.Start(t.Context(), nil))
	return rcv
}

// records flattens what the sink received: key → number of records, and the
// largest batch.
func records(sink *consumertest.LogsSink) (map[string]int, int, []plog.LogRecord) {
	byKey := map[string]int{}
	var all []plog.LogRecord
	largest := 0
	for _, ld := range sink.AllLogs() {
		largest = max(largest, ld.LogRecordCount())
		for i := 0; i < ld.ResourceLogs().Len(); i++ {
			sl := ld.ResourceLogs().At(i).ScopeLogs()
			for j := 0; j < sl.Len(); j++ {
				lrs := sl.At(j).LogRecords()
				for k := 0; k < lrs.Len(); k++ {
					key, _ := lrs.At(k).Attributes().Get("pgconsistency.anomaly.key")
					byKey[key.Str()]++
					all = append(all, lrs.At(k))
				}
			}
		}
	}
	return byKey, largest, all
}

// cursorExists polls on one connection: a connection per poll, kept until
// the test ends, ran the server out of connections (max_connections) when
// the cursor took more than 5 s to appear, so it never appeared.
func cursorExists(t *testing.T, srv *pgtest.Server, db string) func() bool {
	conn := srv.Conn(t, db)
	return func() bool {
		var n int
		err := conn.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.log_cursor WHERE consumer = 'pgconsistency/logs-test'").Scan(&n)
		return err == nil && n == 1
	}
}

// TestIntegrationLogsOnePerNewAnomaly: in a logs pipeline the receiver
// delivers exactly one record per new anomaly, none for old ones, none twice
// after a restart, never more than the cap per interval.
func TestIntegrationLogsOnePerNewAnomaly(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_head_ref_missing") // old: 1, 2, 21
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	breakHeads := func(datasets ...int) {
		for _, i := range datasets {
			_, err := conn.Exec(t.Context(), "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(i))
			require.NoError(t, err)
		}
		_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_head_ref_missing')")
		require.NoError(t, err)
	}

	sink := new(consumertest.LogsSink)
	rcv := startLogsReceiver(t, srv, db, sink, 2)
	require.Eventually(t, cursorExists(t, srv, db), 10*time.Second, 50*time.Millisecond)
	breakHeads(3, 4, 5, 6, 7)
	require.Eventually(t, func() bool { return sink.LogRecordCount() >= 5 }, 20*time.Second, 50*time.Millisecond)
	time.Sleep(time.Second) // more intervals: nothing more may come
	byKey, largest, all := records(sink)
	assert.Equal(t, map[string]int{
		fixture.DatasetID(3): 1, fixture.DatasetID(4): 1, fixture.DatasetID(5): 1, fixture.DatasetID(6): 1, fixture.DatasetID(7): 1,
	}, byKey, "one record per new anomaly, none for the old ones (1, 2, 21)")
	assert.LessOrEqual(t, largest, 2, "the cap per interval")
	assert.GreaterOrEqual(t, len(sink.AllLogs()), 3, "5 records at 2 per interval")

	lr := all[0]
	assert.Equal(t, plog.SeverityNumberError, lr.SeverityNumber())
	assert.Equal(t, "critical", lr.SeverityText())
	inv, _ := lr.Attributes().Get("pgconsistency.invariant")
	assert.Equal(t, "dataset_head_ref_missing", inv.Str())
	details, ok := lr.Attributes().Get("pgconsistency.anomaly.details")
	require.True(t, ok)
	assert.Contains(t, details.Map().AsRaw(), "dataset_name")
	assert.Contains(t, lr.Body().Str(), "new anomaly in invariant dataset_head_ref_missing: did:odf:")
	res := sink.AllLogs()[0].ResourceLogs().At(0).Resource().Attributes().AsRaw()
	assert.Equal(t, db, res["postgresql.database.name"])

	// Restart: a new receiver with the same id continues after the cursor.
	require.NoError(t, rcv.Shutdown(context.Background()))
	breakHeads(8, 9)
	sink2 := new(consumertest.LogsSink)
	rcv2 := startLogsReceiver(t, srv, db, sink2, 2)
	t.Cleanup(func() { require.NoError(t, rcv2.Shutdown(context.Background())) })
	require.Eventually(t, func() bool { return sink2.LogRecordCount() >= 2 }, 20*time.Second, 50*time.Millisecond)
	time.Sleep(time.Second)
	byKey, _, _ = records(sink2)
	assert.Equal(t, map[string]int{fixture.DatasetID(8): 1, fixture.DatasetID(9): 1}, byKey, "no duplicate after the restart")
}

// flakyLogs refuses the first batches, as a pipeline under backpressure would.
type flakyLogs struct {
	consumertest.LogsSink
	refusals atomic.Int32
}

func (f *flakyLogs) ConsumeLogs(ctx context.Context, ld plog.Logs) error {
	if f.refusals.Add(-1) >= 0 {
		return errors.New("queue full")
	}
	return f.LogsSink.ConsumeLogs(ctx, ld)
}

// TestIntegrationLogsRefusedBatchIsNotLost: a batch the pipeline refuses is
// delivered at a later interval, once.
func TestIntegrationLogsRefusedBatchIsNotLost(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	_, err := conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	sink := &flakyLogs{}
	sink.refusals.Store(3)
	rcv := startLogsReceiver(t, srv, db, sink, 10)
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	require.Eventually(t, cursorExists(t, srv, db), 10*time.Second, 50*time.Millisecond)
	_, err = conn.Exec(t.Context(), "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1", fixture.DatasetID(12))
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_key_blocks_missing')")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return sink.LogRecordCount() >= 1 }, 20*time.Second, 50*time.Millisecond)
	time.Sleep(time.Second)
	byKey, _, _ := records(&sink.LogsSink)
	assert.Equal(t, map[string]int{fixture.DatasetID(12): 1}, byKey)
	assert.Less(t, sink.refusals.Load(), int32(0), "the first attempts were refused")
}

// TestIntegrationLogsDeployAndCause: on SQL 0.6.0 each record carries the
// deployment its anomaly appeared after and, where the audit pack records
// the invariant's tables, the change that caused it; else "no cause
// recorded".
func TestIntegrationLogsDeployAndCause(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	srv.PsqlFile(t, db, fixture.Path("sql/audit.sql"))
	conn := srv.Conn(t, db)
	exec := func(sql string, args ...any) {
		t.Helper()
		_, err := conn.Exec(t.Context(), sql, args...)
		require.NoError(t, err, sql)
	}
	// Only dataset_references is audited: dataset_statistics_missing reads
	// no audited table.
	exec("SELECT pgconsistency.enable_audit('public.dataset_references', 'dataset_id')")
	exec("SELECT pgconsistency.observe_deploy_marker('v1')")
	exec("CALL pgconsistency.refresh()")

	sink := new(consumertest.LogsSink)
	rcv := startLogsReceiver(t, srv, db, sink, 100)
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	require.Eventually(t, cursorExists(t, srv, db), 10*time.Second, 50*time.Millisecond)

	exec("SELECT pgconsistency.observe_deploy_marker('v2', '0 seconds')")
	exec("SELECT pg_catalog.set_config('application_name', 'migrator', false)")
	exec("DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(3))
	exec("DELETE FROM public.dataset_statistics WHERE dataset_id = $1", fixture.DatasetID(4))
	var deletedAt time.Time
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT max(changed_at) FROM pgconsistency.audit_log WHERE operation = 'DELETE'").Scan(&deletedAt))
	exec("SELECT pg_catalog.set_config('application_name', '', false)")
	exec("CALL pgconsistency.refresh()")

	require.Eventually(t, func() bool { return sink.LogRecordCount() >= 2 }, 20*time.Second, 50*time.Millisecond)
	_, _, all := records(sink)
	byInvariant := map[string]map[string]any{}
	for _, lr := range all {
		inv, _ := lr.Attributes().Get("pgconsistency.invariant")
		byInvariant[inv.Str()] = lr.Attributes().AsRaw()
	}
	require.Contains(t, byInvariant, "dataset_head_ref_missing")
	require.Contains(t, byInvariant, "dataset_statistics_missing")

	ref := byInvariant["dataset_head_ref_missing"]
	assert.Equal(t, "v2", ref["pgconsistency.deploy.marker"])
	assert.Equal(t, true, ref["pgconsistency.deploy.since_previous_refresh"])
	assert.Contains(t, ref["pgconsistency.deploy"], "after deployment v2 (")
	assert.Equal(t, "deploy marker changed from v1 to v2", ref["pgconsistency.refresh.reason"])
	assert.Equal(t, "DELETE", ref["pgconsistency.cause.operation"])
	assert.Equal(t, "public.dataset_references", ref["pgconsistency.cause.table"])
	assert.Equal(t, "migrator", ref["pgconsistency.cause.application_name"])
	assert.Equal(t, deletedAt.UTC().Format(time.RFC3339Nano), ref["pgconsistency.cause.changed_at"])
	assert.Contains(t, ref["pgconsistency.cause"], `DELETE on public.dataset_references at `)
	assert.Contains(t, ref["pgconsistency.cause.restore"], "SELECT pgconsistency.audit_restore(")
	assert.Contains(t, ref, "pgconsistency.cause.txid")

	stats := byInvariant["dataset_statistics_missing"]
	assert.Equal(t, "v2", stats["pgconsistency.deploy.marker"], "no audit pack on its table: the deploy all the same")
	assert.Equal(t, "no cause recorded", stats["pgconsistency.cause"])
	assert.NotContains(t, stats, "pgconsistency.cause.operation")
}

// TestIntegrationLogsOlderRelease: on SQL 0.5.0, which has no
// new_anomalies_with_origin_for_log, the records come as before, without
// the deployment and the cause.
func TestIntegrationLogsOlderRelease(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := releaseDatabase(t, srv, "0.5.0")
	conn := srv.Conn(t, db)
	sink := new(consumertest.LogsSink)
	rcv := startLogsReceiver(t, srv, db, sink, 100)
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	require.Eventually(t, cursorExists(t, srv, db), 10*time.Second, 50*time.Millisecond)
	_, err := conn.Exec(t.Context(), "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(3))
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	require.NoError(t, err)
	require.Eventually(t, func() bool { return sink.LogRecordCount() >= 1 }, 20*time.Second, 50*time.Millisecond)
	byKey, _, all := records(sink)
	assert.Equal(t, map[string]int{fixture.DatasetID(3): 1}, byKey)
	attrs := all[0].Attributes().AsRaw()
	assert.NotContains(t, attrs, "pgconsistency.deploy")
	assert.NotContains(t, attrs, "pgconsistency.cause")
}

// eventRecords are the records of one event name the sink received.
func eventRecords(sink *consumertest.LogsSink, event string) []plog.LogRecord {
	_, _, all := records(sink)
	var out []plog.LogRecord
	for _, lr := range all {
		if lr.EventName() == event {
			out = append(out, lr)
		}
	}
	return out
}

// TestIntegrationLogsRefreshFinished: on SQL 0.6.0 a requested refresh
// (after a deploy) that finished is one record, once, with what it found per
// invariant; a refused batch comes again.
func TestIntegrationLogsRefreshFinished(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	exec := func(sql string, args ...any) {
		t.Helper()
		_, err := conn.Exec(t.Context(), sql, args...)
		require.NoError(t, err, sql)
	}
	exec("SELECT pgconsistency.observe_deploy_marker('v1')")
	exec("CALL pgconsistency.refresh()")
	var enabled int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.invariant WHERE enabled").Scan(&enabled))

	sink := &flakyLogs{}
	rcv := startLogsReceiver(t, srv, db, sink, 100)
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	require.Eventually(t, func() bool {
		var started bool
		err := conn.QueryRow(t.Context(), `SELECT last_request_id IS NOT NULL FROM pgconsistency.log_cursor
			WHERE consumer = 'pgconsistency/logs-test'`).Scan(&started)
		return err == nil && started
	}, 10*time.Second, 50*time.Millisecond, "the request cursor")

	// A breaking deploy.
	exec("SELECT pgconsistency.observe_deploy_marker('v2', '0 seconds')")
	var deployedAt time.Time
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT changed_at FROM pgconsistency.deployment WHERE marker = 'v2'").Scan(&deployedAt))
	exec("DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(5))
	exec("CALL pgconsistency.refresh()")
	require.Eventually(t, func() bool {
		return len(eventRecords(&sink.LogsSink, "pgconsistency.refresh.finished")) >= 1
	}, 20*time.Second, 50*time.Millisecond)

	// A clean one; the pipeline refuses the first batches (its record is
	// the only one: no anomaly appears).
	exec("SELECT pgconsistency.observe_deploy_marker('v3', '0 seconds')")
	sink.refusals.Store(2)
	exec("CALL pgconsistency.refresh()")
	require.Eventually(t, func() bool {
		return len(eventRecords(&sink.LogsSink, "pgconsistency.refresh.finished")) >= 2
	}, 20*time.Second, 50*time.Millisecond)
	time.Sleep(time.Second) // more intervals: nothing more may come
	assert.Less(t, sink.refusals.Load(), int32(0), "the first attempts at the clean deploy's record were refused")
	finished := eventRecords(&sink.LogsSink, "pgconsistency.refresh.finished")
	require.Len(t, finished, 2, "one record per request, once")
	assert.Len(t, eventRecords(&sink.LogsSink, "pgconsistency.anomaly.new"), 1, "the anomaly's record, once")

	broken := finished[0]
	assert.Equal(t, plog.SeverityNumberWarn, broken.SeverityNumber())
	assert.Contains(t, broken.Body().Str(), "requested refresh finished (deploy marker changed from v1 to v2): after deployment v2 (")
	assert.Contains(t, broken.Body().Str(), fmt.Sprintf(") 1 new anomaly: dataset_seed_missing 1; %d of %d invariants clean", enabled-1, enabled))
	attrs := broken.Attributes().AsRaw()
	assert.Equal(t, "deploy marker changed from v1 to v2", attrs["pgconsistency.refresh.reason"])
	assert.Equal(t, "v2", attrs["pgconsistency.deploy.marker"])
	assert.Equal(t, deployedAt.UTC().Format(time.RFC3339Nano), attrs["pgconsistency.deploy.deployed_at"])
	assert.IsType(t, int64(0), attrs["pgconsistency.refresh.request_id"])
	assert.Contains(t, attrs, "pgconsistency.refresh.claimed_at")
	assert.Contains(t, attrs, "pgconsistency.refresh.finished_at")
	assert.EqualValues(t, 1, attrs["pgconsistency.anomalies.new"])
	invariants, ok := attrs["pgconsistency.invariants"].(map[string]any)
	require.True(t, ok, "pgconsistency.invariants is a map")
	assert.Len(t, invariants, enabled, "every enabled invariant, 0 included")
	assert.EqualValues(t, 1, invariants["dataset_seed_missing"])
	assert.EqualValues(t, 0, invariants["dataset_head_ref_missing"])
	assert.Equal(t, []any{"dataset_seed_missing"}, attrs["pgconsistency.invariants.not_clean"])
	assert.Equal(t, []any{}, attrs["pgconsistency.invariants.not_refreshed"])

	clean := finished[1]
	assert.Equal(t, plog.SeverityNumberInfo, clean.SeverityNumber())
	assert.Contains(t, clean.Body().Str(), fmt.Sprintf("the deployment was clean: 0 new anomalies in %d invariants", enabled))
	attrs = clean.Attributes().AsRaw()
	assert.Equal(t, "v3", attrs["pgconsistency.deploy.marker"])
	assert.EqualValues(t, 0, attrs["pgconsistency.anomalies.new"])
	assert.Equal(t, []any{}, attrs["pgconsistency.invariants.not_clean"])
	assert.Greater(t, clean.Timestamp(), broken.Timestamp(), "timestamp: when the refresh finished")
}

// TestIntegrationLogsRefreshFinishedWithinTheCap: the records of finished
// requests count in logs::max_records_per_interval, after the new anomalies.
func TestIntegrationLogsRefreshFinishedWithinTheCap(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	exec := func(sql string, args ...any) {
		t.Helper()
		_, err := conn.Exec(t.Context(), sql, args...)
		require.NoError(t, err, sql)
	}
	exec("SELECT pgconsistency.observe_deploy_marker('v1')")
	exec("CALL pgconsistency.refresh()")
	sink := new(consumertest.LogsSink)
	rcv := startLogsReceiver(t, srv, db, sink, 1)
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })
	require.Eventually(t, cursorExists(t, srv, db), 10*time.Second, 50*time.Millisecond)

	exec("SELECT pgconsistency.observe_deploy_marker('v2', '0 seconds')")
	for _, i := range []int{5, 6} {
		exec("DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(i))
	}
	exec("CALL pgconsistency.refresh()")
	require.Eventually(t, func() bool { return sink.LogRecordCount() >= 3 }, 20*time.Second, 50*time.Millisecond)
	time.Sleep(time.Second)
	_, largest, all := records(sink)
	assert.Equal(t, 1, largest, "the cap per interval")
	require.Len(t, all, 3)
	assert.Equal(t, "pgconsistency.refresh.finished", all[2].EventName(), "after the new anomalies")
	n, _ := all[2].Attributes().Get("pgconsistency.anomalies.new")
	assert.EqualValues(t, 2, n.Int())
}

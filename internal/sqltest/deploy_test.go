//go:build integration

// Tests of "which deploy broke it" (0.6.0): new anomalies attributed to the
// deployment they appeared after and to the audited change that caused
// them; the per-deploy summary.
package sqltest_test

import (
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestDeploy covers anomaly_origin, deployment_summary and what the refresh
// records on each new anomaly.
func TestDeploy(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"DeployAndCauseOfANewAnomaly", testDeployAndCause},
		{"NoCauseWithoutTheAuditPack", testDeployNoCauseWithoutAudit},
		{"NoDeploySinceTheLastCleanRefresh", testDeployNoDeploySinceLastCleanRefresh},
		{"DeployBeforeAFailedRefresh", testDeployBeforeAFailedRefresh},
	})
}

// origin is a row of pgconsistency.anomaly_origin.
type origin struct {
	New                          bool
	DeployMarker                 *string
	DeployedAt                   *time.Time
	DeployedSincePreviousRefresh *bool
	RefreshReason                *string
	Deploy                       string
	CauseAuditID                 *int64
	CauseOperation               *string
	CauseTable                   *string
	CauseTxid                    *int64
	CauseChangedAt               *time.Time
	CauseDBUser                  *string
	CauseApplicationName         *string
	Cause                        string
	Restore                      *string
}

func anomalyOrigin(t *testing.T, conn *pgx.Conn, invariant, key string) origin {
	t.Helper()
	var o origin
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT new, deploy_marker, deployed_at, deployed_since_previous_refresh,
		refresh_reason, deploy, cause_audit_id, cause_operation, cause_table, cause_txid, cause_changed_at, cause_db_user,
		cause_application_name, cause, restore
		FROM pgconsistency.anomaly_origin WHERE invariant = $1 AND key = $2`, invariant, key).Scan(
		&o.New, &o.DeployMarker, &o.DeployedAt, &o.DeployedSincePreviousRefresh, &o.RefreshReason, &o.Deploy,
		&o.CauseAuditID, &o.CauseOperation, &o.CauseTable, &o.CauseTxid, &o.CauseChangedAt, &o.CauseDBUser,
		&o.CauseApplicationName, &o.Cause, &o.Restore))
	return o
}

// newOrigin is where the latest refresh's new anomalies came from, as the
// status view says (what the receiver's metrics and the alert carry).
type newOrigin struct {
	DeployMarker                 *string
	DeployedAt                   *time.Time
	DeployedSincePreviousRefresh *bool
	Causes                       *int64
	CauseAuditID                 *int64
	CauseOperation               *string
	CauseTable                   *string
	CauseTxid                    *int64
	CauseChangedAt               *time.Time
	CauseDBUser                  *string
	CauseApplicationName         *string
}

func statusOrigin(t *testing.T, conn *pgx.Conn, invariant string) newOrigin {
	t.Helper()
	var o newOrigin
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT new_deploy_marker, new_deployed_at,
		new_deployed_since_previous_refresh, new_causes, new_cause_audit_id, new_cause_operation, new_cause_table,
		new_cause_txid, new_cause_changed_at, new_cause_db_user, new_cause_application_name
		FROM pgconsistency.status WHERE invariant = $1`, invariant).Scan(
		&o.DeployMarker, &o.DeployedAt, &o.DeployedSincePreviousRefresh, &o.Causes, &o.CauseAuditID,
		&o.CauseOperation, &o.CauseTable, &o.CauseTxid, &o.CauseChangedAt, &o.CauseDBUser, &o.CauseApplicationName))
	return o
}

// deploySummary reads deployment_summary for one invariant: marker → new anomalies.
func deploySummary(t *testing.T, conn *pgx.Conn, invariant string) map[string]int64 {
	t.Helper()
	rows, err := conn.Query(t.Context(), `SELECT deploy_marker, new_anomalies FROM pgconsistency.deployment_summary
		WHERE invariant = $1`, invariant)
	require.NoError(t, err)
	out := map[string]int64{}
	for rows.Next() {
		var m string
		var n int64
		require.NoError(t, rows.Scan(&m, &n))
		out[m] = n
	}
	require.NoError(t, rows.Err())
	return out
}

func testDeployAndCause(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.enable_dataset_audit()")
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v1')")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	const inv = "dataset_seed_missing"
	require.EqualValues(t, 0, status(t, conn)[inv].Anomalies)

	// The deploy: the marker changes (a request due at once), then the
	// migration tool removes a dataset's Seed.
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v2', '0 seconds')")
	key := fixture.DatasetID(5)
	migrator := auditConnAs(t, s.DSN(db), "migrator")
	var txid int64
	tx, err := migrator.Begin(t.Context())
	require.NoError(t, err)
	_, err = tx.Exec(t.Context(), "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", key)
	require.NoError(t, err)
	require.NoError(t, tx.QueryRow(t.Context(), "SELECT txid_current()").Scan(&txid))
	require.NoError(t, tx.Commit(t.Context()))
	var auditID int64
	var deletedAt time.Time
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT id, changed_at FROM pgconsistency.audit_log
		WHERE row_key = $1 AND operation = 'DELETE' AND table_name = 'dataset_key_blocks'`, key).Scan(&auditID, &deletedAt))

	exec(t, conn, "CALL pgconsistency.refresh()") // the requested refresh
	require.EqualValues(t, 1, status(t, conn)[inv].NewAnomalies)
	o := anomalyOrigin(t, conn, inv, key)
	assert.True(t, o.New)
	assert.Equal(t, ptr("v2"), o.DeployMarker)
	assert.Equal(t, ptr(true), o.DeployedSincePreviousRefresh)
	assert.Equal(t, ptr("deploy marker changed from v1 to v2"), o.RefreshReason)
	assert.Contains(t, o.Deploy, "after deployment v2")
	assert.Equal(t, ptr(auditID), o.CauseAuditID)
	assert.Equal(t, ptr("DELETE"), o.CauseOperation)
	assert.Equal(t, ptr("public.dataset_key_blocks"), o.CauseTable)
	assert.Equal(t, ptr(txid), o.CauseTxid)
	require.NotNil(t, o.CauseChangedAt)
	assert.True(t, deletedAt.Equal(*o.CauseChangedAt), "the DELETE's time")
	assert.Equal(t, ptr("migrator"), o.CauseApplicationName)
	assert.Contains(t, o.Cause, "DELETE on public.dataset_key_blocks")
	assert.Contains(t, o.Cause, "'migrator'")
	assert.Equal(t, ptr("SELECT pgconsistency.audit_restore("+strconv.FormatInt(auditID, 10)+")"), o.Restore)

	// The status says the same for the invariant: the alert's deploy and cause.
	n := statusOrigin(t, conn, inv)
	assert.Equal(t, ptr("v2"), n.DeployMarker)
	assert.Equal(t, o.DeployedAt, n.DeployedAt)
	assert.Equal(t, ptr(true), n.DeployedSincePreviousRefresh)
	assert.Equal(t, ptr(int64(1)), n.Causes)
	assert.Equal(t, ptr(auditID), n.CauseAuditID)
	assert.Equal(t, ptr("DELETE"), n.CauseOperation)
	assert.Equal(t, ptr("public.dataset_key_blocks"), n.CauseTable)
	assert.Equal(t, ptr(txid), n.CauseTxid)
	require.NotNil(t, n.CauseChangedAt)
	assert.True(t, deletedAt.Equal(*n.CauseChangedAt), "the DELETE's time")
	assert.Equal(t, ptr("migrator"), n.CauseApplicationName)
	assert.NotNil(t, n.CauseDBUser)
	assert.Equal(t, newOrigin{}, statusOrigin(t, conn, "dataset_head_ref_missing"), "no new anomalies, no origin")

	assert.Equal(t, map[string]int64{"v1": 0, "v2": 1}, deploySummary(t, conn, inv))
	assert.Equal(t, map[string]int64{"v1": 0, "v2": 0}, deploySummary(t, conn, "dataset_head_ref_missing"))

	// The restore step of the runbook fixes it.
	exec(t, conn, *o.Restore)
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	assert.EqualValues(t, 0, status(t, conn)[inv].Anomalies)
	assert.Equal(t, map[string]int64{"v1": 0, "v2": 1}, deploySummary(t, conn, inv), "resolved anomalies still count")
	assert.Equal(t, newOrigin{}, statusOrigin(t, conn, inv), "the latest refresh found nothing new")
}

func testDeployNoCauseWithoutAudit(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s) // no audit pack
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('2026-12-01')")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('2026-12-02', '0 seconds')")
	exec(t, conn, "SELECT pgconsistency.request_refresh(delay => '0 seconds', reason => 'deploy 1.4.2')")
	key := fixture.DatasetID(6)
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", key)
	exec(t, conn, "CALL pgconsistency.refresh()")
	o := anomalyOrigin(t, conn, "dataset_seed_missing", key)
	assert.Equal(t, ptr("2026-12-02"), o.DeployMarker)
	assert.Equal(t, ptr("deploy 1.4.2"), o.RefreshReason, "the request's reason, merged into the marker's")
	assert.Nil(t, o.CauseAuditID)
	assert.Equal(t, "no cause recorded", o.Cause)
	assert.Nil(t, o.Restore)
	n := statusOrigin(t, conn, "dataset_seed_missing")
	assert.Equal(t, ptr("2026-12-02"), n.DeployMarker)
	assert.Equal(t, ptr(true), n.DeployedSincePreviousRefresh)
	assert.Nil(t, n.Causes, "no audit pack: no cause looked for")
	assert.Nil(t, n.CauseChangedAt)
}

func testDeployNoDeploySinceLastCleanRefresh(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s) // the audit pack, but nothing audited
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v7')")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	key := fixture.DatasetID(7)
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", key)
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	o := anomalyOrigin(t, conn, "dataset_seed_missing", key)
	assert.Equal(t, ptr("v7"), o.DeployMarker, "the deployment it appeared after")
	assert.Equal(t, ptr(false), o.DeployedSincePreviousRefresh)
	assert.Nil(t, o.RefreshReason, "no request led to that refresh")
	assert.Contains(t, o.Deploy, "no deployment since the last clean refresh")
	assert.Equal(t, "no cause recorded", o.Cause)
	n := statusOrigin(t, conn, "dataset_seed_missing")
	assert.Equal(t, ptr("v7"), n.DeployMarker)
	assert.Equal(t, ptr(false), n.DeployedSincePreviousRefresh)
	assert.Equal(t, ptr(int64(0)), n.Causes, "the pack looked, and found no audited change")
}

// A deploy, then a refresh that fails, then the refresh that finds the
// anomaly: the deploy came after the last clean refresh, though before the
// previous refresh (the failed one).
func testDeployBeforeAFailedRefresh(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	const inv = "dataset_seed_missing"
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v8')")
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v9', '1 hour')")

	locker := s.Conn(t, db)
	exec(t, locker, "BEGIN")
	exec(t, locker, "LOCK TABLE public.dataset_key_blocks IN ACCESS EXCLUSIVE MODE")
	exec(t, conn, "UPDATE pgconsistency.invariant SET lock_timeout = '50 milliseconds' WHERE name = $1", inv)
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	require.Equal(t, ptr("timed_out"), status(t, conn)[inv].LastRunOutcome)
	exec(t, locker, "ROLLBACK")

	key := fixture.DatasetID(8)
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", key)
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	o := anomalyOrigin(t, conn, inv, key)
	assert.Equal(t, ptr("v9"), o.DeployMarker)
	assert.Equal(t, ptr(true), o.DeployedSincePreviousRefresh, "v9 came after the last clean refresh")
	assert.Contains(t, o.Deploy, "after deployment v9")
	assert.Equal(t, ptr(true), statusOrigin(t, conn, inv).DeployedSincePreviousRefresh)
}

// TestDeployRefreshFinishedLog covers finished_requests_for_log and
// advance_request_log_cursor: one record per requested refresh once every
// enabled invariant ran, with the anomalies it found per invariant.
func TestDeployRefreshFinishedLog(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"CleanAndBreakingDeploys", testFinishedRequestsCleanAndBreaking},
		{"SupersededRequest", testFinishedRequestsSuperseded},
	})
}

// finishedRequest is a row of finished_requests_for_log.
type finishedRequest struct {
	RequestID    int64
	Reason       *string
	Requests     int32
	ClaimedAt    time.Time
	FinishedAt   time.Time
	Superseded   bool
	DeploymentID *int64
	DeployMarker *string
	DeployedAt   *time.Time
	NewAnomalies int64
	Invariants   map[string]requestInvariant
	NotRefreshed []string
	NotClean     []string
}

type requestInvariant struct {
	NewAnomalies int64   `json:"new_anomalies"`
	Outcome      *string `json:"outcome"`
}

func finishedRequests(t *testing.T, conn *pgx.Conn, consumer string) []finishedRequest {
	t.Helper()
	rows, err := conn.Query(t.Context(), `SELECT request_id, reason, requests, claimed_at, finished_at, superseded,
		deployment_id, deploy_marker, deployed_at, new_anomalies, invariants, not_refreshed, not_clean
		FROM pgconsistency.finished_requests_for_log($1, 10)`, consumer)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[finishedRequest])
	require.NoError(t, err)
	return out
}

func enabledInvariants(t *testing.T, conn *pgx.Conn) []string {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT name FROM pgconsistency.invariant WHERE enabled ORDER BY name")
	require.NoError(t, err)
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return names
}

// requestInvariants: the invariants column of a request that refreshed
// every one of names with outcome, with the new anomalies of want
// (invariant → new anomalies; 0 for the others).
func requestInvariants(names []string, outcome *string, want map[string]int64) map[string]requestInvariant {
	out := map[string]requestInvariant{}
	for _, n := range names {
		out[n] = requestInvariant{NewAnomalies: want[n], Outcome: outcome}
	}
	return out
}

func testFinishedRequestsCleanAndBreaking(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	names := enabledInvariants(t, conn)
	require.NotEmpty(t, names)
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v1')")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	const a, b = "consumer-a", "consumer-b"
	assert.Empty(t, finishedRequests(t, conn, a), "a new consumer starts at the current end")

	// A clean deploy: claimed, then not reported until every invariant ran.
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v2', '0 seconds')")
	exec(t, conn, "SELECT count(*) FROM pgconsistency.refresh_plan()") // claims the request
	for i, name := range names {
		assert.Empty(t, finishedRequests(t, conn, a), "reported after %d of %d invariants ran", i, len(names))
		exec(t, conn, "SELECT pgconsistency.refresh_invariant($1, true)", name)
	}
	got := finishedRequests(t, conn, a)
	require.Len(t, got, 1)
	r := got[0]
	assert.Equal(t, ptr("deploy marker changed from v1 to v2"), r.Reason)
	assert.Equal(t, ptr("v2"), r.DeployMarker)
	require.NotNil(t, r.DeployedAt)
	assert.False(t, r.DeployedAt.After(r.ClaimedAt))
	assert.True(t, r.FinishedAt.After(r.ClaimedAt))
	assert.False(t, r.Superseded)
	assert.Zero(t, r.NewAnomalies, "the deployment was clean")
	assert.Equal(t, requestInvariants(names, ptr("succeeded"), nil), r.Invariants, "every enabled invariant, 0 included")
	assert.Empty(t, r.NotRefreshed)
	assert.Empty(t, r.NotClean)
	assert.Equal(t, got, finishedRequests(t, conn, a), "not delivered until the cursor moves")
	exec(t, conn, "SELECT pgconsistency.advance_request_log_cursor($1, $2)", a, r.RequestID)
	assert.Empty(t, finishedRequests(t, conn, a), "delivered once")

	// A consumer seen for the first time now: the clean deploy is not news.
	assert.Empty(t, finishedRequests(t, conn, b))

	// A breaking deploy: the migration removes a Seed.
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v3', '0 seconds')")
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(5))
	exec(t, conn, "CALL pgconsistency.refresh()")
	for _, consumer := range []string{a, b} {
		got = finishedRequests(t, conn, consumer)
		require.Len(t, got, 1, consumer)
		r = got[0]
		assert.Equal(t, ptr("v3"), r.DeployMarker, consumer)
		assert.EqualValues(t, 1, r.NewAnomalies, consumer)
		assert.Equal(t, requestInvariants(names, ptr("succeeded"), map[string]int64{"dataset_seed_missing": 1}), r.Invariants, consumer)
		assert.Equal(t, []string{"dataset_seed_missing"}, r.NotClean, consumer)
		assert.Empty(t, r.NotRefreshed, consumer)
		exec(t, conn, "SELECT pgconsistency.advance_request_log_cursor($1, $2)", consumer, r.RequestID)
		assert.Empty(t, finishedRequests(t, conn, consumer), consumer)
	}

	// A later run (the schedule) does not report the request again.
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	assert.Empty(t, finishedRequests(t, conn, a))

	// Cheap at any size: the anomalies a request found are counted through
	// the index on first_seen_at, never by a scan of pgconsistency.anomaly.
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v4', '0 seconds')")
	exec(t, conn, "CALL pgconsistency.refresh()")
	// a large history: 50000 resolved anomalies of long ago
	exec(t, conn, `INSERT INTO pgconsistency.anomaly (invariant, key, seq, first_seen_at, last_seen_at, resolved_at)
		SELECT 'dataset_head_ref_missing', 'old-' || g, -g, now() - interval '10 days', now() - interval '9 days', now() - interval '9 days'
		  FROM generate_series(1, 50000) g`)
	exec(t, conn, "ANALYZE pgconsistency.anomaly")
	tx, err := conn.Begin(t.Context())
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(t.Context()) }()
	// (the backend's counts not yet flushed are in the view too: a difference)
	seqScans := func() (n int64) {
		require.NoError(t, tx.QueryRow(t.Context(), `SELECT seq_scan FROM pg_stat_xact_user_tables
			WHERE relid = 'pgconsistency.anomaly'::regclass`).Scan(&n))
		return n
	}
	before := seqScans()
	var n int64
	require.NoError(t, tx.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.finished_requests_for_log($1, 10)", a).Scan(&n))
	require.EqualValues(t, 1, n)
	assert.Equal(t, before, seqScans(), "scans of pgconsistency.anomaly by finished_requests_for_log")
}

// testFinishedRequestsSuperseded: a request whose refresh stopped half-way
// (the scheduler died) is reported once the next one is claimed, with the
// invariants it did not reach as not refreshed.
func testFinishedRequestsSuperseded(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	names := enabledInvariants(t, conn)
	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v1')")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	const consumer = "consumer-superseded"
	assert.Empty(t, finishedRequests(t, conn, consumer))

	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v2', '0 seconds')")
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(6))
	exec(t, conn, "SELECT count(*) FROM pgconsistency.refresh_plan()")
	exec(t, conn, "SELECT pgconsistency.refresh_invariant('dataset_seed_missing', true)")
	exec(t, conn, "SELECT pgconsistency.refresh_invariant('dataset_head_ref_missing', true)")
	assert.Empty(t, finishedRequests(t, conn, consumer), "half-way")

	exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v3', '0 seconds')")
	exec(t, conn, "CALL pgconsistency.refresh()")
	got := finishedRequests(t, conn, consumer)
	require.Len(t, got, 2)
	v2, v3 := got[0], got[1]
	assert.Equal(t, ptr("v2"), v2.DeployMarker)
	assert.True(t, v2.Superseded)
	assert.EqualValues(t, 1, v2.NewAnomalies)
	// Its run of dataset_head_ref_missing found nothing and v3's run
	// overwrote it in refresh_state: unknown, so not refreshed (not clean).
	// Its run of dataset_seed_missing is known from the anomaly it found.
	var notReached []string
	for _, n := range names {
		if n != "dataset_seed_missing" {
			notReached = append(notReached, n)
		}
	}
	assert.Equal(t, notReached, v2.NotRefreshed, "the invariants its refresh did not reach (or not known to)")
	assert.Equal(t, names, v2.NotClean)
	assert.Equal(t, requestInvariant{NewAnomalies: 1, Outcome: ptr("succeeded")}, v2.Invariants["dataset_seed_missing"])
	assert.Equal(t, requestInvariant{NewAnomalies: 0, Outcome: nil}, v2.Invariants[notReached[0]])
	assert.Len(t, v2.Invariants, len(names))
	assert.Equal(t, v3.ClaimedAt, v2.FinishedAt, "no run of its own left in refresh_state: it ended when v3 was claimed")

	assert.Equal(t, ptr("v3"), v3.DeployMarker)
	assert.False(t, v3.Superseded)
	assert.Zero(t, v3.NewAnomalies, "the anomaly is v2's")
	assert.Empty(t, v3.NotClean)

	exec(t, conn, "SELECT pgconsistency.advance_request_log_cursor($1, $2)", consumer, v2.RequestID)
	got = finishedRequests(t, conn, consumer)
	require.Len(t, got, 1, "the rest after a partial delivery")
	assert.Equal(t, v3.RequestID, got[0].RequestID)
}

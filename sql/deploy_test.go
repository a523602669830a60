// Tests of "which deploy broke it" (0.6.0): new anomalies attributed to the
// deployment they appeared after and to the audited change that caused
// them; the per-deploy summary.
package sql_test

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
	assert.Contains(t, o.Deploy, "after deploy v2")
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
	assert.Contains(t, o.Deploy, "no deploy since the last clean refresh")
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
	assert.Contains(t, o.Deploy, "after deploy v9")
	assert.Equal(t, ptr(true), statusOrigin(t, conn, inv).DeployedSincePreviousRefresh)
}

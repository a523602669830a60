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

	assert.Equal(t, map[string]int64{"v1": 0, "v2": 1}, deploySummary(t, conn, inv))
	assert.Equal(t, map[string]int64{"v1": 0, "v2": 0}, deploySummary(t, conn, "dataset_head_ref_missing"))

	// The restore step of the runbook fixes it.
	exec(t, conn, *o.Restore)
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	assert.EqualValues(t, 0, status(t, conn)[inv].Anomalies)
	assert.Equal(t, map[string]int64{"v1": 0, "v2": 1}, deploySummary(t, conn, inv), "resolved anomalies still count")
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
}

//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// deployCollectorConfig is merged over the shipped
// config/collector-remotewrite.yaml: the receiver's scheduler runs the
// refreshes and watches a migrations table as the deploy marker, and new
// anomalies go as log records over OTLP/HTTP to the test's sink.
const deployCollectorConfig = `
receivers:
  pgconsistency:
    refresh:
      poll_interval: 1s
      deploy_marker:
        query: SELECT max(version) FROM public.schema_migrations
        delay: 5s
exporters:
  otlphttp/logs:
    endpoint: ${env:PGCONSISTENCY_LOGS_OTLP_ENDPOINT}
    sending_queue: {enabled: false} # as config/collector-logs.yaml: nothing acknowledged before delivery
service:
  pipelines:
    logs:
      receivers: [pgconsistency]
      processors: [memory_limiter]
      exporters: [otlphttp/logs]
`

// TestDeploy: which deploy broke it, with the built collector. A clean
// database with the audit pack on the dataset tables and a migrations table
// as the deploy marker; a migration (a row inserted: v1 → v2) followed by a
// DELETE of a dataset's Seed by a session with application_name 'migrator';
// the post-deploy refresh the receiver requests and runs. The new anomaly
// (anomaly_origin), its log record and the PgConsistencyNewAnomalies alert
// of the shipped rules in a real Prometheus name the deploy and the cause
// (migrator, the DELETE's time; the anomaly and its record the transaction
// and the restore step too); the per-deploy
// summary shows 1 for that deploy and 0 for the previous one.
func TestDeploy(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	srv.PsqlFile(t, db, fixture.Path("sql/audit.sql"))
	conn := srv.Conn(t, db)
	for _, q := range []string{
		"SELECT pgconsistency.enable_dataset_audit()",
		"CREATE TABLE public.schema_migrations (version text PRIMARY KEY)",
		"INSERT INTO public.schema_migrations VALUES ('v1')",
		"CALL pgconsistency.refresh(force => true)",
	} {
		_, err := conn.Exec(t.Context(), q)
		require.NoError(t, err, q)
	}
	const inv = "dataset_seed_missing"
	var anomalies int64
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT sum(anomalies) FROM pgconsistency.status").Scan(&anomalies))
	require.EqualValues(t, 0, anomalies, "a clean database")

	dir := t.TempDir()
	prom := startPrometheusWith(t, "global:\n  evaluation_interval: 1s\nrule_files: ["+testRules(t, dir)+"]\n")
	watch := watchAlerts(t, prom)
	sink, logsEndpoint := startLogSink(t)
	extra := filepath.Join(dir, "deploy.yaml")
	require.NoError(t, os.WriteFile(extra, []byte(deployCollectorConfig), 0o644))
	env := []string{
		"PGCONSISTENCY_DB_ENDPOINT=127.0.0.1:" + strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER=" + srv.User,
		"PGCONSISTENCY_DB_PASSWORD=" + srv.Password,
		"PGCONSISTENCY_DB_NAME=" + db,
		"PGCONSISTENCY_DB_TLS_INSECURE=true",
		"PGCONSISTENCY_COLLECTION_INTERVAL=1s",
		"PGCONSISTENCY_REMOTE_WRITE_URL=" + prom.url("/api/v1/write"),
		"PGCONSISTENCY_WAL_DIR=" + filepath.Join(dir, "wal"),
		"PGCONSISTENCY_HEALTH_ENDPOINT=127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
		"PGCONSISTENCY_TELEMETRY_PORT=" + strconv.Itoa(testkit.FreePort(t)),
		"PGCONSISTENCY_LOGS_OTLP_ENDPOINT=" + logsEndpoint,
	}
	startProcess(t, "collector", env, fixture.Path("_build/otelcol-pgconsistency"),
		"--config", fixture.Path("config/collector-remotewrite.yaml"), "--config", extra)

	marker := func() string {
		var v string
		_ = conn.QueryRow(t.Context(), "SELECT coalesce(value, '') FROM pgconsistency.deploy_marker").Scan(&v)
		return v
	}
	require.Eventually(t, func() bool { return marker() == "v1" }, 60*time.Second, 100*time.Millisecond,
		"the receiver did not record the deploy marker v1")

	// The deploy: the migration tool records its migration, the receiver
	// sees the marker change (a refresh requested 5 s later), and the
	// migration removes a dataset's Seed.
	cfg, err := pgx.ParseConfig(srv.DSN(db))
	require.NoError(t, err)
	cfg.RuntimeParams["application_name"] = "migrator"
	migrator, err := pgx.ConnectConfig(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { migrator.Close(context.Background()) })
	_, err = migrator.Exec(t.Context(), "INSERT INTO public.schema_migrations VALUES ('v2')")
	require.NoError(t, err)
	deployed := time.Now()
	require.Eventually(t, func() bool { return marker() == "v2" }, 30*time.Second, 50*time.Millisecond,
		"the receiver did not see the deploy marker change")
	key := fixture.DatasetID(5)
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
	restore := "SELECT pgconsistency.audit_restore(" + strconv.FormatInt(auditID, 10) + ")"

	t.Run("the new anomaly: deploy and cause", func(t *testing.T) {
		var (
			isNew                                    bool
			deployMarker, reason, deploy, appName    *string
			operation, table, dbUser, cause, restStr *string
			sinceRefresh                             *bool
			causeTxid                                *int64
			causeAt                                  *time.Time
		)
		require.Eventually(t, func() bool {
			return conn.QueryRow(t.Context(), `SELECT new, deploy_marker, deployed_since_previous_refresh, refresh_reason,
				deploy, cause_operation, cause_table, cause_txid, cause_changed_at, cause_db_user, cause_application_name,
				cause, restore FROM pgconsistency.anomaly_origin WHERE invariant = $1 AND key = $2`, inv, key).Scan(
				&isNew, &deployMarker, &sinceRefresh, &reason, &deploy, &operation, &table, &causeTxid, &causeAt,
				&dbUser, &appName, &cause, &restStr) == nil
		}, 60*time.Second, 250*time.Millisecond, "the post-deploy refresh did not find the anomaly")
		t.Logf("anomaly found %s after the deploy: %s; %s", time.Since(deployed).Round(100*time.Millisecond), *deploy, *cause)
		assert.True(t, isNew)
		assert.Equal(t, ptr("v2"), deployMarker)
		assert.Equal(t, ptr(true), sinceRefresh)
		assert.Equal(t, ptr("deploy marker changed from v1 to v2"), reason, "found by the requested post-deploy refresh")
		assert.Contains(t, *deploy, "after deployment v2")
		assert.Equal(t, ptr("DELETE"), operation)
		assert.Equal(t, ptr("public.dataset_key_blocks"), table)
		assert.Equal(t, ptr(txid), causeTxid)
		if assert.NotNil(t, causeAt) {
			assert.True(t, deletedAt.Equal(*causeAt), "the DELETE's time: %s, want %s", *causeAt, deletedAt)
		}
		assert.Equal(t, ptr(srv.User), dbUser)
		assert.Equal(t, ptr("migrator"), appName)
		assert.Contains(t, *cause, "'migrator'")
		assert.Equal(t, ptr(restore), restStr)
	})

	t.Run("its log record", func(t *testing.T) {
		var attrs map[string]any
		require.Eventually(t, func() bool {
			var ok bool
			attrs, ok = sink.attributes(inv, key)
			return ok
		}, 30*time.Second, 250*time.Millisecond, "no log record of the new anomaly: %v", sink.snapshot())
		assert.Equal(t, "v2", attrs["pgconsistency.deploy.marker"])
		assert.Equal(t, true, attrs["pgconsistency.deploy.since_previous_refresh"])
		assert.Contains(t, attrs["pgconsistency.deploy"], "after deployment v2")
		assert.Equal(t, "deploy marker changed from v1 to v2", attrs["pgconsistency.refresh.reason"])
		assert.Equal(t, "DELETE", attrs["pgconsistency.cause.operation"])
		assert.Equal(t, "public.dataset_key_blocks", attrs["pgconsistency.cause.table"])
		assert.Equal(t, txid, attrs["pgconsistency.cause.txid"])
		assert.Equal(t, auditID, attrs["pgconsistency.cause.audit_id"])
		assert.Equal(t, deletedAt.UTC().Format(time.RFC3339Nano), attrs["pgconsistency.cause.changed_at"], "the DELETE's time")
		assert.Equal(t, srv.User, attrs["pgconsistency.cause.db_user"])
		assert.Equal(t, "migrator", attrs["pgconsistency.cause.application_name"])
		assert.Equal(t, restore, attrs["pgconsistency.cause.restore"])
		assert.Contains(t, attrs["pgconsistency.cause"], `application_name "migrator"`)
		t.Logf("log record: pgconsistency.deploy=%q pgconsistency.cause=%q", attrs["pgconsistency.deploy"], attrs["pgconsistency.cause"])
	})

	t.Run("the record of the finished post-deploy refresh", func(t *testing.T) {
		var got []finishedLog
		require.Eventually(t, func() bool {
			got = sink.finishedRecords()
			for _, f := range got {
				if f.attrs["pgconsistency.deploy.marker"] == "v2" {
					return true
				}
			}
			return false
		}, 30*time.Second, 250*time.Millisecond, "no record of the finished post-deploy refresh: %v", got)
		var v2 []finishedLog
		for _, f := range got {
			if f.attrs["pgconsistency.deploy.marker"] == "v2" {
				v2 = append(v2, f)
			}
		}
		require.Len(t, v2, 1, "one record per finished request")
		f := v2[0]
		assert.Equal(t, "deploy marker changed from v1 to v2", f.attrs["pgconsistency.refresh.reason"])
		assert.Equal(t, int64(1), f.attrs["pgconsistency.anomalies.new"])
		perInvariant, ok := f.attrs["pgconsistency.invariants"].(map[string]any)
		require.True(t, ok, "pgconsistency.invariants: %v", f.attrs["pgconsistency.invariants"])
		var enabled int
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.invariant WHERE enabled").Scan(&enabled))
		assert.Len(t, perInvariant, enabled, "every enabled invariant, 0 included")
		for name, n := range perInvariant {
			want := int64(0)
			if name == inv {
				want = 1
			}
			assert.Equal(t, want, n, name)
		}
		assert.Equal(t, []any{inv}, f.attrs["pgconsistency.invariants.not_clean"])
		assert.Contains(t, f.body, inv+" 1")
		t.Logf("finished refresh record: %s", f.body)
	})

	t.Run("the alert names the deploy and the cause", func(t *testing.T) {
		watch.waitFor(t, "PgConsistencyNewAnomalies", inv, "firing", 60*time.Second)
		var deployAt time.Time
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT changed_at FROM pgconsistency.deployment WHERE marker = 'v2'").Scan(&deployAt))
		var deploy, cause string
		require.Eventually(t, func() bool {
			a, ok, err := prom.active("PgConsistencyNewAnomalies", inv)
			deploy, cause = a.Annotations["deploy"], a.Annotations["cause"]
			return err == nil && ok && strings.Contains(deploy, "After deployment v2 ") && strings.Contains(cause, "migrator")
		}, 30*time.Second, 250*time.Millisecond, "the annotations: deploy %q, cause %q", deploy, cause)
		assert.Contains(t, deploy, "After deployment v2 (the deploy marker changed at "+deployAt.UTC().Format("2006-01-02 15:04:05"))
		var dbUser string
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT db_user FROM pgconsistency.audit_log WHERE id = $1", auditID).Scan(&dbUser))
		assert.Contains(t, cause, "DELETE on public.dataset_key_blocks at "+deletedAt.UTC().Format("2006-01-02 15:04:05"),
			"the DELETE's time")
		assert.Contains(t, cause, "by "+dbUser+` (application_name "migrator")`)
		assert.Contains(t, cause, "SELECT * FROM pgconsistency.anomaly_origin WHERE new AND invariant = '"+inv+"';")
		t.Logf("PgConsistencyNewAnomalies{invariant=%s} annotations: deploy %q; cause %q", inv, deploy, cause)
	})

	t.Run("per-deploy summary", func(t *testing.T) {
		rows, err := conn.Query(t.Context(), `SELECT deploy_marker, new_anomalies FROM pgconsistency.deployment_summary
			WHERE invariant = $1`, inv)
		require.NoError(t, err)
		got := map[string]int64{}
		for rows.Next() {
			var m string
			var n int64
			require.NoError(t, rows.Scan(&m, &n))
			got[m] = n
		}
		require.NoError(t, rows.Err())
		assert.Equal(t, map[string]int64{"v1": 0, "v2": 1}, got)
	})
}

func ptr[T any](v T) *T { return &v }

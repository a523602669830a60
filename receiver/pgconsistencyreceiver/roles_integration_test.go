//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/config/configopaque"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// The tests of this file run the receiver as the least-privileged roles of
// sql/roles.sql, never as the superuser.

// rolesDatabase is a database with the fixtures, pgconsistency and sql/roles.sql.
func rolesDatabase(t *testing.T, srv *pgtest.Server, fixtures ...string) string {
	t.Helper()
	db := fixture.NewDatabase(t, srv, fixtures...)
	srv.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	return db
}

// loginRole creates a LOGIN role that is a member of the given group roles
// and nothing else, and returns a function that makes a receiver
// configuration log in as it. The role is dropped at cleanup, after the
// receivers started later are shut down.
func loginRole(t *testing.T, srv *pgtest.Server, db string, admin *pgx.Conn, groups ...string) (string, func(*Config)) {
	t.Helper()
	role, password := srv.CreateLoginRole(t, db, "otel_pgconsistency_")
	ident := pgx.Identifier{role}.Sanitize()
	for _, g := range groups {
		_, err := admin.Exec(t.Context(), "GRANT "+pgx.Identifier{g}.Sanitize()+" TO "+ident)
		require.NoError(t, err)
	}
	return role, func(c *Config) {
		c.Username = role
		c.Password = configopaque.String(password)
	}
}

// sessionUsers lists the users of the sessions named applicationName.
func sessionUsers(t *testing.T, admin *pgx.Conn, applicationName string) []string {
	t.Helper()
	rows, err := admin.Query(t.Context(), "SELECT DISTINCT usename::text FROM pg_stat_activity WHERE application_name = $1", applicationName)
	require.NoError(t, err)
	users, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return users
}

// TestIntegrationReaderRoleScrapes: logged in as a member of
// pgconsistency_reader only, the metrics receiver reports the exact counts.
func TestIntegrationReaderRoleScrapes(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := rolesDatabase(t, srv, fixture.Invariants...)
	admin := srv.Conn(t, db)
	_, err := admin.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	role, asReader := loginRole(t, srv, db, admin, "pgconsistency_reader")

	sink, _ := startReceiver(t, srv, db, asReader)
	waitFor(t, sink, "exact counts read by the reader role", expectCounts(fixture.Counts[int]()))
	assert.Equal(t, []string{role}, sessionUsers(t, admin, "otelcol-pgconsistency"), "the scrape session's user")
}

// TestIntegrationReaderRoleLogs: logged in as a member of
// pgconsistency_reader only, the logs receiver delivers one record per new
// anomaly and moves its cursor.
func TestIntegrationReaderRoleLogs(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := rolesDatabase(t, srv, "dataset_head_ref_missing") // old: 1, 2, 21
	admin := srv.Conn(t, db)
	_, err := admin.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	role, asReader := loginRole(t, srv, db, admin, "pgconsistency_reader")

	cfg := serverConfig(srv, db)
	cfg.CollectionInterval = 200 * time.Millisecond
	cfg.InitialDelay = 0
	asReader(cfg)
	set := receivertest.NewNopSettings(metadata.Type)
	set.ID = component.NewIDWithName(metadata.Type, "logs-test")
	sink := new(consumertest.LogsSink)
	rcv, err := NewFactory().CreateLogs(t.Context(), set, cfg, sink)
	require.NoError(t, err)
	require.NoError(t, rcv.Start(t.Context(), nil))
	t.Cleanup(func() { require.NoError(t, rcv.Shutdown(context.Background())) })

	require.Eventually(t, cursorExists(t, srv, db), 20*time.Second, 50*time.Millisecond,
		"the reader role's logs receiver never created its cursor")
	for _, i := range []int{3, 4} {
		_, err := admin.Exec(t.Context(), "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(i))
		require.NoError(t, err)
	}
	_, err = admin.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	require.NoError(t, err)
	var maxSeq int64
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT max(seq) FROM pgconsistency.anomaly").Scan(&maxSeq))

	require.Eventually(t, func() bool {
		var last int64
		err := admin.QueryRow(t.Context(), "SELECT last_seq FROM pgconsistency.log_cursor WHERE consumer = 'pgconsistency/logs-test'").Scan(&last)
		return err == nil && last == maxSeq
	}, 20*time.Second, 50*time.Millisecond, "the cursor never reached seq %d", maxSeq)
	byKey, _, _ := records(sink)
	assert.Equal(t, map[string]int{fixture.DatasetID(3): 1, fixture.DatasetID(4): 1}, byKey,
		"one record per new anomaly, none for the old ones")
	assert.Equal(t, []string{role}, sessionUsers(t, admin, "otelcol-pgconsistency-logs"), "the logs session's user")
}

// TestIntegrationRefresherRoleSchedules: logged in as a member of
// pgconsistency_reader and pgconsistency_refresher, which owns no view and
// cannot read the application tables, the receiver's refresh scheduler
// refreshes every invariant to the exact counts, and a deploy marker change
// requests a refresh that it then runs.
func TestIntegrationRefresherRoleSchedules(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := rolesDatabase(t, srv, fixture.Invariants...)
	admin := srv.Conn(t, db)
	role, asRefresher := loginRole(t, srv, db, admin, "pgconsistency_reader", "pgconsistency_refresher")
	// The marker query reads an application table: that one grant goes to
	// the login role, as sql/roles.sql says.
	_, err := admin.Exec(t.Context(), `CREATE TABLE public.schema_migrations (version bigint PRIMARY KEY);
		INSERT INTO public.schema_migrations VALUES (20261101000000);
		GRANT SELECT ON public.schema_migrations TO `+pgx.Identifier{role}.Sanitize())
	require.NoError(t, err)
	var readsApp bool
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT has_table_privilege($1, 'public.dataset_entries', 'SELECT')", role).Scan(&readsApp))
	require.False(t, readsApp)

	sink, _ := startReceiver(t, srv, db, asRefresher, withSchedule(200*time.Millisecond), func(c *Config) {
		c.Refresh.DeployMarker.Query = "SELECT max(version) FROM public.schema_migrations"
		c.Refresh.DeployMarker.Delay = 0
	})
	waitFor(t, sink, "exact counts refreshed by the refresher role", expectCounts(fixture.Counts[int]()))
	assert.Equal(t, []string{role}, sessionUsers(t, admin, "otelcol-pgconsistency-refresh"), "the refresh session's user")

	// The first marker value is the baseline; a new one is a deployment.
	before := map[string]time.Time{}
	rows, err := admin.Query(t.Context(), "SELECT invariant, last_started_at FROM pgconsistency.refresh_state")
	require.NoError(t, err)
	for rows.Next() {
		var inv string
		var at time.Time
		require.NoError(t, rows.Scan(&inv, &at))
		before[inv] = at
	}
	require.NoError(t, rows.Err())
	require.Len(t, before, len(fixture.Invariants))
	beforeJSON, err := json.Marshal(before)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		var seen bool
		err := admin.QueryRow(t.Context(), "SELECT EXISTS (SELECT 1 FROM pgconsistency.deploy_marker WHERE value = '20261101000000')").Scan(&seen)
		return err == nil && seen
	}, 20*time.Second, 50*time.Millisecond, "the scheduler never recorded the deploy marker")
	_, err = admin.Exec(t.Context(), "INSERT INTO public.schema_migrations VALUES (20261123000000)")
	require.NoError(t, err)

	require.Eventually(t, func() bool {
		var claimed int
		var refreshedAfter int
		err := admin.QueryRow(t.Context(), `
			SELECT (SELECT count(*) FROM pgconsistency.refresh_request WHERE claimed_at IS NOT NULL),
			       (SELECT count(*) FROM pgconsistency.refresh_state s
			         WHERE s.last_run_outcome = 'succeeded' AND s.last_started_at > ($1::jsonb ->> s.invariant)::timestamptz)`,
			string(beforeJSON)).Scan(&claimed, &refreshedAfter)
		return err == nil && claimed == 1 && refreshedAfter == len(fixture.Invariants)
	}, 30*time.Second, 100*time.Millisecond, "the requested refresh after the marker change never ran for every invariant")
	waitFor(t, sink, "counts after the requested refresh", expectCounts(fixture.Counts[int]()))
}

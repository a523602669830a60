//go:build integration

package sqltest_test

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestRoles covers least privilege: sql/roles.sql's reader and refresher
// roles, and what PUBLIC may no longer run.
func TestRoles(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"ReaderReadsStatusOnly", testReaderReadsStatusOnly},
		{"RefresherRefreshesWithoutTheApplicationTables", testRefresherRefreshes},
		{"PublicCannotExecute", testPublicCannotExecute},
	})
}

// rolesDatabase is a database with every anomaly fixture, pgconsistency and
// sql/roles.sql, applied twice: it must be re-runnable.
func rolesDatabase(t *testing.T, s *pgtest.Server) string {
	t.Helper()
	db := fixture.NewDatabase(t, s, fixture.Invariants...)
	s.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	s.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	return db
}

// loginAs creates a LOGIN role with a random name, runs grants (statements
// where ROLE stands for the role) as the superuser, and returns a connection
// to db as that role. The role is dropped at cleanup.
func loginAs(t *testing.T, s *pgtest.Server, admin *pgx.Conn, db string, grants ...string) (*pgx.Conn, string) {
	t.Helper()
	role, password := s.CreateLoginRole(t, db, "pgc_role_test_")
	ident := pgx.Identifier{role}.Sanitize()
	for _, g := range grants {
		exec(t, admin, strings.ReplaceAll(g, "ROLE", ident))
	}
	u, err := url.Parse(s.DSN(db))
	require.NoError(t, err)
	u.User = url.UserPassword(role, password)
	conn, err := pgx.Connect(t.Context(), u.String())
	require.NoError(t, err, "connecting as %s", role)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn.Close(ctx)
	})
	return conn, role
}

// denied asserts that sql fails with insufficient_privilege, naming what.
func denied(t *testing.T, conn *pgx.Conn, sql, what string) {
	t.Helper()
	_, err := conn.Exec(t.Context(), sql)
	var pgErr *pgconn.PgError
	if assert.True(t, errors.As(err, &pgErr), "%s: want permission denied, got %v", sql, err) {
		assert.Equal(t, "42501", pgErr.Code, "%s: %v", sql, err)
		assert.Contains(t, pgErr.Message, "permission denied for "+what, sql)
	}
}

func anomalyCounts(t *testing.T, conn *pgx.Conn) map[string]int64 {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT invariant, anomalies FROM pgconsistency.status")
	require.NoError(t, err)
	out := map[string]int64{}
	for rows.Next() {
		var inv string
		var n int64
		require.NoError(t, rows.Scan(&inv, &n))
		out[inv] = n
	}
	require.NoError(t, rows.Err())
	return out
}

type logRecord struct {
	Seq int64
	Key string
}

func readLog(t *testing.T, conn *pgx.Conn, consumer string) []logRecord {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT seq, key FROM pgconsistency.new_anomalies_for_log($1, 100)", consumer)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[logRecord])
	require.NoError(t, err)
	return out
}

// testReaderReadsStatusOnly: a login role in pgconsistency_reader reads the
// status (exact counts) and delivers new anomalies as logs, and can neither
// read application data (tables, anomaly views, anomaly details), nor
// refresh, nor request a refresh, nor acknowledge. Re-running install.sql
// keeps its grant on the re-created status view.
func testReaderReadsStatusOnly(t *testing.T, s *pgtest.Server) {
	db := rolesDatabase(t, s)
	admin := s.Conn(t, db)
	exec(t, admin, "CALL pgconsistency.refresh()")
	reader, _ := loginAs(t, s, admin, db, "GRANT pgconsistency_reader TO ROLE")

	got := anomalyCounts(t, reader)
	require.Len(t, got, len(fixture.Invariants))
	assert.Equal(t, fixture.Counts[int64](), got)

	denied(t, reader, "SELECT count(*) FROM public.dataset_entries", "table dataset_entries")
	denied(t, reader, "SELECT count(*) FROM pgconsistency.dataset_seed_missing", "view dataset_seed_missing")
	denied(t, reader, "SELECT count(*) FROM pgconsistency.anomaly", "table anomaly")
	denied(t, reader, "UPDATE pgconsistency.log_cursor SET last_seq = 0", "table log_cursor")
	denied(t, reader, "CALL pgconsistency.refresh()", "procedure refresh")
	denied(t, reader, "SELECT pgconsistency.refresh_invariant('dataset_seed_missing', true)", "function refresh_invariant")
	denied(t, reader, "SELECT pgconsistency.request_refresh()", "function request_refresh")
	denied(t, reader, "SELECT pgconsistency.claim_refresh_request()", "function claim_refresh_request")
	denied(t, reader, "SELECT pgconsistency.acknowledge_all('dataset_seed_missing', 'test')", "function acknowledge_all")
	denied(t, reader, "SELECT pgconsistency.define_invariant('x', 'SELECT 1::text AS key')", "function define_invariant")

	// The logs receiver's calls: a first call starts at the end, then a new
	// anomaly is delivered once the cursor is advanced past it.
	assert.Empty(t, readLog(t, reader, "roles-test"), "a new consumer starts at the current end")
	exec(t, admin, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(3))
	exec(t, admin, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	batch := readLog(t, reader, "roles-test")
	require.Len(t, batch, 1)
	assert.Equal(t, fixture.DatasetID(3), batch[0].Key)
	exec(t, reader, "SELECT pgconsistency.advance_log_cursor($1, $2)", "roles-test", batch[0].Seq)
	assert.Empty(t, readLog(t, reader, "roles-test"), "delivered once")

	// install.sql re-creates the status view; the reader keeps reading it.
	s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	want := fixture.Counts[int64]()
	want["dataset_head_ref_missing"]++
	assert.Equal(t, want, anomalyCounts(t, reader), "after install.sql ran again")

	// And the records of finished refresh requests (0.6.0), under the same
	// cursor, which another role may neither read nor move.
	finished := func() []int64 {
		rows, err := reader.Query(t.Context(), "SELECT request_id FROM pgconsistency.finished_requests_for_log($1, 10)", "roles-test")
		require.NoError(t, err)
		ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		require.NoError(t, err)
		return ids
	}
	assert.Empty(t, finished(), "starts at the current end")
	exec(t, admin, "SELECT pgconsistency.request_refresh(delay => '0 seconds')")
	exec(t, admin, "CALL pgconsistency.refresh()")
	ids := finished()
	require.Len(t, ids, 1)
	other, _ := loginAs(t, s, admin, db, "GRANT pgconsistency_reader TO ROLE")
	for _, q := range []string{
		"SELECT count(*) FROM pgconsistency.finished_requests_for_log('roles-test', 10)",
		"SELECT pgconsistency.advance_request_log_cursor('roles-test', 1000)",
	} {
		_, err := other.Exec(t.Context(), q)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, q)
		assert.Equal(t, "42501", pgErr.Code, q)
	}
	assert.Equal(t, ids, finished(), "the cursor did not move")
	exec(t, reader, "SELECT pgconsistency.advance_request_log_cursor($1, $2)", "roles-test", ids[0])
	assert.Empty(t, finished(), "delivered once")
}

// testRefresherRefreshes: a login role in pgconsistency_refresher, which owns
// nothing and has no privilege on the application tables, refreshes every
// invariant to the fixtures' exact counts, requests a refresh that the next
// CALL runs, and still cannot read application data.
func testRefresherRefreshes(t *testing.T, s *pgtest.Server) {
	db := rolesDatabase(t, s)
	admin := s.Conn(t, db)
	refresher, role := loginAs(t, s, admin, db, "GRANT pgconsistency_refresher TO ROLE")

	var owns, reads bool
	require.NoError(t, admin.QueryRow(t.Context(), `
		SELECT EXISTS (SELECT 1 FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = $1)),
		       has_table_privilege($1, 'public.dataset_entries', 'SELECT')
		    OR has_table_privilege($1, 'pgconsistency.dataset_seed_missing', 'SELECT')`, role).Scan(&owns, &reads))
	require.False(t, owns, "the refresher owns no relation")
	require.False(t, reads, "the refresher may not read the application tables nor the anomaly views")

	exec(t, refresher, "CALL pgconsistency.refresh(force => true)")
	st := status(t, admin)
	require.Len(t, st, len(fixture.Invariants))
	for inv, want := range fixture.Counts[int64]() {
		row := st[inv]
		require.NotNil(t, row.LastRunOutcome, inv)
		assert.Equal(t, "succeeded", *row.LastRunOutcome, "%s: %v", inv, row.LastError)
		assert.Equal(t, want, row.Anomalies, inv)
		assert.Equal(t, want, row.NewAnomalies, inv)
	}

	// A deploy pipeline's request, run by the next CALL even though nothing is due.
	before := startedAt(t, admin)
	var due time.Time
	require.NoError(t, refresher.QueryRow(t.Context(),
		"SELECT pgconsistency.request_refresh(delay => '0', reason => 'roles test')").Scan(&due))
	assert.EqualValues(t, 1, status(t, admin)["dataset_seed_missing"].PendingRequests)
	exec(t, refresher, "CALL pgconsistency.refresh()")
	assert.ElementsMatch(t, fixture.Invariants, refreshed(before, startedAt(t, admin)), "the request refreshed everything")
	assert.EqualValues(t, 0, status(t, admin)["dataset_seed_missing"].PendingRequests)

	// The receiver's scheduler: the same, one statement at a time.
	var outcome string
	require.NoError(t, refresher.QueryRow(t.Context(),
		"SELECT pgconsistency.refresh_invariant('dataset_seed_missing', true)").Scan(&outcome))
	assert.Equal(t, "succeeded", outcome)
	var changed bool
	require.NoError(t, refresher.QueryRow(t.Context(),
		"SELECT pgconsistency.observe_deploy_marker('v1', '1 hour')").Scan(&changed))
	assert.False(t, changed, "the first marker is the baseline")

	denied(t, refresher, "SELECT count(*) FROM public.dataset_entries", "table dataset_entries")
	denied(t, refresher, "SELECT count(*) FROM pgconsistency.dataset_seed_missing", "view dataset_seed_missing")
	denied(t, refresher, "SELECT count(*) FROM pgconsistency.anomaly", "table anomaly")
	denied(t, refresher, "DELETE FROM pgconsistency.refresh_state", "table refresh_state")
	denied(t, refresher, "SELECT pgconsistency.acknowledge_all('dataset_seed_missing', 'test')", "function acknowledge_all")
}

// testPublicCannotExecute: a role with USAGE on the schema and nothing else
// can run none of pgconsistency's functions (EXECUTE is revoked from
// PUBLIC); every SECURITY DEFINER function pins its search_path.
func testPublicCannotExecute(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_seed_missing") // no roles.sql
	admin := s.Conn(t, db)
	plain, _ := loginAs(t, s, admin, db, "GRANT USAGE ON SCHEMA pgconsistency TO ROLE")

	denied(t, plain, "SELECT pgconsistency.refresh_invariant('dataset_seed_missing', true)", "function refresh_invariant")
	denied(t, plain, "SELECT pgconsistency.request_refresh()", "function request_refresh")
	denied(t, plain, "SELECT pgconsistency.advance_log_cursor('x', 1000)", "function advance_log_cursor")
	denied(t, plain, "SELECT * FROM pgconsistency.new_anomalies_for_log('x', 10)", "function new_anomalies_for_log")
	denied(t, plain, "SELECT pgconsistency.observe_deploy_marker('v2')", "function observe_deploy_marker")
	denied(t, plain, "SELECT pgconsistency.expire_acknowledgements()", "function expire_acknowledgements")
	denied(t, plain, "CALL pgconsistency.refresh()", "procedure refresh")
	denied(t, plain, "SELECT count(*) FROM pgconsistency.status", "view status")

	rows, err := admin.Query(t.Context(), `
		SELECT p.proname FROM pg_proc p
		 WHERE p.pronamespace = 'pgconsistency'::regnamespace
		   AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))
		 ORDER BY 1`)
	require.NoError(t, err)
	public, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{"_deprecated_column", "_valid_refresh_settings", "version"}, public,
		"only the pure check of the settings constraint, the version and the status view's deprecated columns are PUBLIC")

	rows, err = admin.Query(t.Context(), `
		SELECT p.proname FROM pg_proc p
		 WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.prosecdef
		 ORDER BY 1`)
	require.NoError(t, err)
	definers, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{
		"_wal_advance_slot", "_wal_create_slot", "_wal_drop_slot", "_wal_slot_changes",
		"acknowledge", "acknowledge_all", "advance_log_cursor", "advance_request_log_cursor", "capture_wal", "capture_wal_stream",
		"claim_refresh_request",
		"expire_acknowledgements", "finished_requests_for_log", "new_anomalies_for_log", "new_anomalies_with_origin_for_log", "observe_deploy_marker",
		"refresh_changes_plan", "refresh_invariant", "refresh_plan", "request_refresh", "set_capture", "unacknowledge", "wal_stream_start",
	}, definers)
	rows, err = admin.Query(t.Context(), `
		SELECT p.proname FROM pg_proc p
		 WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.prosecdef
		   AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)`)
	require.NoError(t, err)
	unpinned, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Empty(t, unpinned, "SECURITY DEFINER functions without search_path = pg_catalog, pg_temp")
}

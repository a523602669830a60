//go:build integration

// Tests of the audit trail pack, sql/audit.sql: tracing an anomaly to the
// statement that caused it and restoring the row from the history, what is
// recorded, enabling and disabling, privileges; and a benchmark of its write
// overhead (go test -tags integration -run XXX -bench AuditOverhead ./internal/sqltest/).
package sqltest_test

import (
	"context"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestAudit covers the optional audit trail pack, sql/audit.sql.
func TestAudit(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"TraceAndRestoreALostHeadReference", testAuditTraceAndRestore},
		{"RestoreFunction", testAuditRestoreFunction},
		{"OperationsRecorded", testAuditOperationsRecorded},
		{"CascadedDeletes", testAuditCascadedDeletes},
		{"EnableDisableAndReinstall", testAuditEnableDisableAndReinstall},
		{"ApplicationRoleNeedsNoGrant", testAuditApplicationRoleNeedsNoGrant},
	})
}

// auditDatabase is a database with the clean fixture, pgconsistency and the
// audit pack, nothing audited yet.
func auditDatabase(tb testing.TB, s *pgtest.Server) string {
	tb.Helper()
	db := fixture.NewDatabase(tb, s)
	s.PsqlFile(tb, db, fixture.Path("sql/audit.sql"))
	return db
}

// auditConnAs connects to db with the given application_name.
func auditConnAs(t *testing.T, dsn, applicationName string) *pgx.Conn {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	require.NoError(t, err)
	cfg.RuntimeParams["application_name"] = applicationName
	conn, err := pgx.ConnectConfig(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

type auditRow struct {
	ID              int64
	Table           string // schema.table
	Operation       string
	RowKey          *string
	OldRowKey       *string
	OldRow          map[string]any
	NewRow          map[string]any
	Txid            int64
	ChangedAt       time.Time
	DBUser          string
	DBRole          *string
	ApplicationName *string
	ClientAddr      *string
	Statement       *string
}

// auditRows reads audit_log rows from a set of them, e.g.
// "pgconsistency.audit_history($1)", in the order it returns them.
func auditRows(t *testing.T, conn *pgx.Conn, from string, args ...any) []auditRow {
	t.Helper()
	rows, err := conn.Query(t.Context(), `SELECT id, table_schema || '.' || table_name, operation, row_key, old_row_key,
		old_row, new_row, txid, changed_at, db_user, db_role, application_name, host(client_addr), statement
		FROM `+from, args...)
	require.NoError(t, err)
	var out []auditRow
	for rows.Next() {
		var r auditRow
		require.NoError(t, rows.Scan(&r.ID, &r.Table, &r.Operation, &r.RowKey, &r.OldRowKey, &r.OldRow, &r.NewRow,
			&r.Txid, &r.ChangedAt, &r.DBUser, &r.DBRole, &r.ApplicationName, &r.ClientAddr, &r.Statement))
		out = append(out, r)
	}
	require.NoError(t, rows.Err())
	return out
}

func auditOperations(rows []auditRow) []string {
	out := make([]string, 0, len(rows))
	for _, r := range rows {
		out = append(out, r.Operation+" "+r.Table)
	}
	return out
}

func auditCount(t *testing.T, conn *pgx.Conn, query string, args ...any) int64 {
	t.Helper()
	var n int64
	require.NoError(t, conn.QueryRow(t.Context(), query, args...).Scan(&n))
	return n
}

func auditRowJSON(t *testing.T, conn *pgx.Conn, query string, args ...any) map[string]any {
	t.Helper()
	var row map[string]any
	require.NoError(t, conn.QueryRow(t.Context(), query, args...).Scan(&row))
	return row
}

// testAuditTraceAndRestore is the incident: a migration tool deletes a
// dataset's head reference; the invariant reports the dataset; its audit
// history names the statement, the time, the user and the tool, and holds the
// row, which is put back; the next refresh resolves the anomaly.
func testAuditTraceAndRestore(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.enable_dataset_audit()")
	assert.EqualValues(t, 5, auditCount(t, conn, "SELECT count(*) FROM pgconsistency.audited_table"))
	exec(t, conn, "CALL pgconsistency.refresh()")
	const inv = "dataset_head_ref_missing"
	require.EqualValues(t, 0, status(t, conn)[inv].Anomalies)

	key := fixture.DatasetID(3)
	const headRow = "SELECT to_jsonb(r) FROM public.dataset_references r WHERE r.dataset_id = $1 AND r.block_ref_name = 'head'"
	original := auditRowJSON(t, conn, headRow, key)
	var started time.Time
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT clock_timestamp()").Scan(&started))

	// The migration tool, in a transaction of its own.
	migration := auditConnAs(t, s.DSN(db), "migration-tool")
	var txid int64
	var user string
	var addr *string
	tx, err := migration.Begin(t.Context())
	require.NoError(t, err)
	_, err = tx.Exec(t.Context(), "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", key)
	require.NoError(t, err)
	require.NoError(t, tx.QueryRow(t.Context(), "SELECT txid_current(), session_user, host(inet_client_addr())").Scan(&txid, &user, &addr))
	require.NoError(t, tx.Commit(t.Context()))
	// An unrelated change to the same dataset, in a table the invariant does not read.
	exec(t, conn, "UPDATE public.dataset_statistics SET num_records = num_records + 1 WHERE dataset_id = $1", key)

	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	st := status(t, conn)[inv]
	require.EqualValues(t, 1, st.Anomalies)
	require.EqualValues(t, 1, st.NewAnomalies)
	require.Equal(t, []string{key}, viewKeys(t, conn, inv))

	// The whole history of the key: both tables, newest first.
	assert.Equal(t, []string{"UPDATE public.dataset_statistics", "DELETE public.dataset_references"},
		auditOperations(auditRows(t, conn, "pgconsistency.audit_history($1)", key)))

	// The tables of the invariant only: the delete.
	hist := auditRows(t, conn, "pgconsistency.audit_history($1, invariant => $2)", key, inv)
	require.Len(t, hist, 1)
	del := hist[0]
	assert.Equal(t, "DELETE", del.Operation)
	assert.Equal(t, "public.dataset_references", del.Table)
	assert.Equal(t, key, *del.RowKey)
	assert.Nil(t, del.OldRowKey)
	assert.Equal(t, original, del.OldRow, "the deleted row, as it was")
	assert.Nil(t, del.NewRow)
	assert.Equal(t, txid, del.Txid, "the migration's transaction")
	assert.Equal(t, user, del.DBUser)
	assert.Nil(t, del.DBRole)
	assert.Equal(t, "migration-tool", *del.ApplicationName)
	assert.Equal(t, addr, del.ClientAddr)
	assert.Contains(t, *del.Statement, "DELETE FROM public.dataset_references WHERE dataset_id = $1")
	assert.False(t, del.ChangedAt.Before(started), "changed at %v, test started at %v", del.ChangedAt, started)
	assert.WithinDuration(t, time.Now(), del.ChangedAt, time.Minute)

	// The same from the open anomalies, the query of docs/audit.md.
	const openAnomalies = `(SELECT h.* FROM pgconsistency.anomaly a
		CROSS JOIN LATERAL pgconsistency.audit_history(a.key, invariant => a.invariant) h
		WHERE a.invariant = $1 AND a.resolved_at IS NULL) x`
	assert.Equal(t, []auditRow{del}, auditRows(t, conn, openAnomalies, inv))

	// Restore the row from the history, the documented way, and refresh.
	exec(t, conn, `INSERT INTO public.dataset_references
		SELECT * FROM jsonb_populate_record(NULL::public.dataset_references,
		                                    (SELECT old_row FROM pgconsistency.audit_log WHERE id = $1))`, del.ID)
	assert.Equal(t, original, auditRowJSON(t, conn, headRow, key), "the row is back as it was")
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	st = status(t, conn)[inv]
	assert.EqualValues(t, 0, st.Anomalies)
	assert.EqualValues(t, 1, st.ResolvedAnomalies)
	assert.Empty(t, viewKeys(t, conn, inv))
	assert.Empty(t, auditRows(t, conn, openAnomalies, inv), "no open anomaly left")

	// The restore is history too.
	hist = auditRows(t, conn, "pgconsistency.audit_history($1, invariant => $2)", key, inv)
	require.Equal(t, []string{"INSERT public.dataset_references", "DELETE public.dataset_references"}, auditOperations(hist))
	assert.Equal(t, original, hist[0].NewRow)

	// since: only what happened from then on.
	assert.Equal(t, []string{"INSERT public.dataset_references"},
		auditOperations(auditRows(t, conn, "pgconsistency.audit_history($1, since => $2, invariant => $3)",
			key, hist[0].ChangedAt, inv)))

	_, err = conn.Exec(t.Context(), "SELECT * FROM pgconsistency.audit_history($1, invariant => 'no_such_invariant')", key)
	require.ErrorContains(t, err, "unknown invariant 'no_such_invariant'")
}

// testAuditRestoreFunction: audit_restore() puts back a deleted key block
// (jsonb payload, enum, timestamps), refuses what it cannot restore, and
// handles identity, generated and since-added columns.
func testAuditRestoreFunction(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.enable_dataset_audit()")
	const inv = "dataset_seed_missing"
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	require.EqualValues(t, 0, status(t, conn)[inv].Anomalies)

	key := fixture.DatasetID(1)
	const seedRow = "SELECT to_jsonb(k) FROM public.dataset_key_blocks k WHERE k.dataset_id = $1 AND k.event_type = 'Seed'"
	original := auditRowJSON(t, conn, seedRow, key)
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", key)
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	require.Equal(t, []string{key}, viewKeys(t, conn, inv))

	var id int64
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT id FROM pgconsistency.audit_history($1, invariant => $2)
		WHERE operation = 'DELETE' AND table_name = 'dataset_key_blocks'`, key, inv).Scan(&id))
	restored := auditRowJSON(t, conn, "SELECT pgconsistency.audit_restore($1)", id)
	assert.Equal(t, original, restored)
	assert.Equal(t, original, auditRowJSON(t, conn, seedRow, key))
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	assert.EqualValues(t, 0, status(t, conn)[inv].Anomalies)
	assert.EqualValues(t, 1, status(t, conn)[inv].ResolvedAnomalies)

	_, err := conn.Exec(t.Context(), "SELECT pgconsistency.audit_restore($1)", id)
	require.ErrorContains(t, err, "duplicate key value", "restoring twice")
	var insertID int64
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT max(id) FROM pgconsistency.audit_log WHERE operation = 'INSERT'").Scan(&insertID))
	_, err = conn.Exec(t.Context(), "SELECT pgconsistency.audit_restore($1)", insertID)
	require.ErrorContains(t, err, "is an INSERT, not a DELETE")
	_, err = conn.Exec(t.Context(), "SELECT pgconsistency.audit_restore(-1)")
	require.ErrorContains(t, err, "no audit_log row with id -1")

	// Identity and generated columns, and a column added after the delete.
	exec(t, conn, `CREATE TABLE public.audit_probe (
		id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		name text NOT NULL,
		name_length integer GENERATED ALWAYS AS (length(name)) STORED)`)
	exec(t, conn, "SELECT pgconsistency.enable_audit('public.audit_probe', 'id')")
	exec(t, conn, "INSERT INTO public.audit_probe (name) VALUES ('first'), ('second')")
	exec(t, conn, "DELETE FROM public.audit_probe WHERE name = 'second'")
	exec(t, conn, "ALTER TABLE public.audit_probe ADD COLUMN note text NOT NULL DEFAULT 'added later'")
	restored = auditRowJSON(t, conn, `SELECT pgconsistency.audit_restore(id) FROM pgconsistency.audit_log
		WHERE table_name = 'audit_probe' AND operation = 'DELETE'`)
	assert.Equal(t, map[string]any{"id": float64(2), "name": "second", "name_length": float64(6), "note": "added later"}, restored)
}

// testAuditOperationsRecorded: inserts, updates (a key change included),
// deletes, multi-row statements and TRUNCATE, and a table with no key.
func testAuditOperationsRecorded(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.enable_audit('public.dataset_statistics', key_column => 'dataset_id')")
	d10, d11 := fixture.DatasetID(10), fixture.DatasetID(11)

	exec(t, conn, `INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, num_records, data_size, checkpoints_size)
		VALUES ($1, 'dev', 1, 2, 3)`, d10)
	exec(t, conn, "UPDATE public.dataset_statistics SET num_records = 100 WHERE dataset_id = $1 AND block_ref_name = 'dev'", d10)
	exec(t, conn, "UPDATE public.dataset_statistics SET dataset_id = $2 WHERE dataset_id = $1 AND block_ref_name = 'dev'", d10, d11)
	exec(t, conn, "DELETE FROM public.dataset_statistics WHERE dataset_id = $1 AND block_ref_name = 'dev'", d11)

	h10 := auditRows(t, conn, "pgconsistency.audit_history($1)", d10)
	require.Equal(t, []string{"UPDATE public.dataset_statistics", "UPDATE public.dataset_statistics", "INSERT public.dataset_statistics"},
		auditOperations(h10), "the key change is in the old key's history")
	ins, upd, moved := h10[2], h10[1], h10[0]
	assert.Nil(t, ins.OldRow)
	assert.Equal(t, map[string]any{"dataset_id": d10, "block_ref_name": "dev", "last_pulled": nil,
		"num_records": float64(1), "data_size": float64(2), "checkpoints_size": float64(3)}, ins.NewRow)
	assert.Equal(t, float64(1), upd.OldRow["num_records"])
	assert.Equal(t, float64(100), upd.NewRow["num_records"])
	assert.Nil(t, upd.OldRowKey, "the key did not change")
	assert.Equal(t, d11, *moved.RowKey)
	assert.Equal(t, d10, *moved.OldRowKey)
	assert.Equal(t, d10, moved.OldRow["dataset_id"])
	assert.Equal(t, d11, moved.NewRow["dataset_id"])
	for _, r := range h10 {
		assert.Equal(t, "public.dataset_statistics", r.Table)
	}

	h11 := auditRows(t, conn, "pgconsistency.audit_history($1)", d11)
	require.Equal(t, []string{"DELETE public.dataset_statistics", "UPDATE public.dataset_statistics"}, auditOperations(h11))
	assert.Equal(t, moved.ID, h11[1].ID, "the key change is in the new key's history too")
	assert.Nil(t, h11[0].NewRow)
	assert.Equal(t, d11, h11[0].OldRow["dataset_id"])

	// One row per row changed, in one transaction.
	exec(t, conn, "UPDATE public.dataset_statistics SET data_size = data_size + 1 WHERE dataset_id = ANY($1)",
		[]string{fixture.DatasetID(1), fixture.DatasetID(2), fixture.DatasetID(3)})
	assert.EqualValues(t, 1, auditCount(t, conn, `SELECT count(DISTINCT txid) FROM pgconsistency.audit_log
		WHERE id > $1 HAVING count(*) = 3`, h11[0].ID))

	// TRUNCATE: one row, in the history of every key of the table's invariants.
	exec(t, conn, "TRUNCATE public.dataset_statistics")
	trunc := auditRows(t, conn, "pgconsistency.audit_log WHERE operation = 'TRUNCATE'")
	require.Len(t, trunc, 1)
	assert.Equal(t, "public.dataset_statistics", trunc[0].Table)
	assert.Nil(t, trunc[0].RowKey)
	assert.Nil(t, trunc[0].OldRow)
	assert.Equal(t, "TRUNCATE public.dataset_statistics", *trunc[0].Statement)
	d20 := fixture.DatasetID(20)
	assert.Equal(t, []string{"TRUNCATE public.dataset_statistics"},
		auditOperations(auditRows(t, conn, "pgconsistency.audit_history($1, invariant => 'dataset_statistics_missing')", d20)))
	assert.Empty(t, auditRows(t, conn, "pgconsistency.audit_history($1, invariant => 'dataset_head_ref_missing')", d20),
		"dataset_head_ref_missing does not read dataset_statistics")

	// A table audited without a key column: history by table and time only.
	exec(t, conn, "CREATE TABLE public.audit_notes (note text)")
	exec(t, conn, "SELECT pgconsistency.enable_audit('public.audit_notes')")
	exec(t, conn, "INSERT INTO public.audit_notes VALUES ('hello')")
	notes := auditRows(t, conn, "pgconsistency.audit_log WHERE table_name = 'audit_notes'")
	require.Len(t, notes, 1)
	assert.Nil(t, notes[0].RowKey)
	assert.Equal(t, map[string]any{"note": "hello"}, notes[0].NewRow)
}

// testAuditCascadedDeletes: rows removed by ON DELETE CASCADE are recorded,
// with the statement that caused it.
func testAuditCascadedDeletes(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.enable_dataset_audit()")
	d30 := fixture.DatasetID(30)
	exec(t, conn, "DELETE FROM public.dataset_entries WHERE dataset_id = $1", d30)
	cascade := auditRows(t, conn, "pgconsistency.audit_history($1)", d30)
	removed := map[string]int{}
	for _, r := range cascade {
		assert.Equal(t, "DELETE", r.Operation)
		assert.Equal(t, "DELETE FROM public.dataset_entries WHERE dataset_id = $1", *r.Statement)
		assert.Equal(t, cascade[0].Txid, r.Txid)
		removed[r.Table]++
	}
	assert.Equal(t, map[string]int{"public.dataset_entries": 1, "public.dataset_references": 2,
		"public.dataset_statistics": 1, "public.dataset_key_blocks": 3}, removed)
}

func auditTriggers(t *testing.T, conn *pgx.Conn, table string) int64 {
	t.Helper()
	return auditCount(t, conn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname LIKE 'pgconsistency_audit%'", table)
}

// testAuditEnableDisableAndReinstall: enabling twice keeps one set of
// triggers (one log row per change), the key column can be changed, bad
// targets are refused, re-running audit.sql keeps triggers and history, and
// disabling stops the recording but keeps the history.
func testAuditEnableDisableAndReinstall(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	const table = "public.dataset_references"
	logged := func() int64 { return auditCount(t, conn, "SELECT count(*) FROM pgconsistency.audit_log") }
	change := func(i int) {
		exec(t, conn, "UPDATE public.dataset_references SET block_hash = block_hash || 'x' WHERE dataset_id = $1 AND block_ref_name = 'head'",
			fixture.DatasetID(i))
	}

	exec(t, conn, "SELECT pgconsistency.enable_audit($1, 'dataset_id')", table)
	exec(t, conn, "SELECT pgconsistency.enable_audit($1, 'dataset_id')", table)
	assert.EqualValues(t, 2, auditTriggers(t, conn, table), "one row trigger and one TRUNCATE trigger")
	change(1)
	assert.EqualValues(t, 1, logged(), "one log row per change")

	exec(t, conn, "SELECT pgconsistency.enable_audit($1, 'block_ref_name')", table)
	assert.EqualValues(t, 2, auditTriggers(t, conn, table))
	var keyColumn string
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT key_column FROM pgconsistency.audited_table
		WHERE table_schema = 'public' AND table_name = 'dataset_references'`).Scan(&keyColumn))
	assert.Equal(t, "block_ref_name", keyColumn)
	change(2)
	assert.Len(t, auditRows(t, conn, "pgconsistency.audit_history('head')"), 1, "keyed by the new key column")

	for _, tc := range []struct{ call, want string }{
		{"SELECT pgconsistency.enable_audit('public.dataset_references', 'no_such_column')", `has no column no_such_column`},
		{"SELECT pgconsistency.enable_audit('pgconsistency.audit_log')", "cannot audit itself"},
		{"SELECT pgconsistency.enable_audit('pgconsistency.status')", "is not a table"},
		{"SELECT pgconsistency.enable_audit('public.no_such_table')", `relation "public.no_such_table" does not exist`},
	} {
		_, err := conn.Exec(t.Context(), tc.call)
		require.ErrorContains(t, err, tc.want, tc.call)
	}

	s.PsqlFile(t, db, fixture.Path("sql/audit.sql"))
	assert.EqualValues(t, 2, auditTriggers(t, conn, table), "re-running audit.sql keeps the triggers")
	assert.EqualValues(t, 2, logged(), "and the history")
	change(3)
	assert.EqualValues(t, 3, logged(), "and the recording")
	assert.EqualValues(t, 1, auditCount(t, conn, "SELECT count(*) FROM pgconsistency.audited_table"))

	exec(t, conn, "SELECT pgconsistency.disable_audit($1)", table)
	assert.EqualValues(t, 0, auditTriggers(t, conn, table))
	assert.EqualValues(t, 0, auditCount(t, conn, "SELECT count(*) FROM pgconsistency.audited_table"))
	change(4)
	exec(t, conn, "TRUNCATE public.dataset_references")
	assert.EqualValues(t, 3, logged(), "nothing recorded once disabled; the history stays")
	exec(t, conn, "SELECT pgconsistency.disable_audit($1)", table) // twice is fine
}

// testAuditApplicationRoleNeedsNoGrant: a role with DML on an audited table
// and nothing on pgconsistency writes the table, and is audited, without
// being able to read or write the log; SET ROLE is recorded.
func testAuditApplicationRoleNeedsNoGrant(t *testing.T, s *pgtest.Server) {
	db := auditDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.enable_dataset_audit()")

	role, password := s.CreateLoginRole(t, db, "pgc_audit_app_")
	ident := pgx.Identifier{role}.Sanitize()
	exec(t, conn, "GRANT SELECT, INSERT, UPDATE, DELETE ON public.dataset_references TO "+ident)
	var usage, insert bool
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT has_schema_privilege($1, 'pgconsistency', 'USAGE'),
		has_table_privilege($1, 'pgconsistency.audit_log', 'INSERT')`, role).Scan(&usage, &insert))
	require.False(t, usage, "the application role has no privilege on pgconsistency")
	require.False(t, insert)

	// Same server and options as the superuser's DSN, another user.
	u, err := url.Parse(s.DSN(db))
	require.NoError(t, err)
	u.User = url.UserPassword(role, password)
	app := auditConnAs(t, u.String(), "app-service")
	defer app.Close(context.Background()) // before the role is dropped
	key := fixture.DatasetID(7)
	_, err = app.Exec(t.Context(), "INSERT INTO public.dataset_references VALUES ($1, 'staging', 'f1620staging')", key)
	require.NoError(t, err, "the audit trigger runs as the owner of the log")
	_, err = app.Exec(t.Context(), "SELECT count(*) FROM pgconsistency.audit_log")
	require.ErrorContains(t, err, "permission denied", "the application cannot read the log")
	_, err = app.Exec(t.Context(), "DELETE FROM pgconsistency.audit_log")
	require.ErrorContains(t, err, "permission denied", "nor rewrite it")

	hist := auditRows(t, conn, "pgconsistency.audit_history($1)", key)
	require.Len(t, hist, 1)
	assert.Equal(t, "INSERT", hist[0].Operation)
	assert.Equal(t, role, hist[0].DBUser)
	assert.Nil(t, hist[0].DBRole)
	assert.Equal(t, "app-service", *hist[0].ApplicationName)
	assert.Equal(t, "f1620staging", hist[0].NewRow["block_hash"])

	// An administrator who switches to the application role.
	exec(t, conn, "SET ROLE "+ident)
	exec(t, conn, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'staging'", key)
	exec(t, conn, "RESET ROLE")
	hist = auditRows(t, conn, "pgconsistency.audit_history($1)", key)
	require.Len(t, hist, 2)
	assert.Equal(t, "DELETE", hist[0].Operation)
	assert.NotEqual(t, role, hist[0].DBUser, "the login role")
	require.NotNil(t, hist[0].DBRole)
	assert.Equal(t, role, *hist[0].DBRole, "the role it switched to")
}

// BenchmarkAuditOverhead measures what the audit trigger adds to writes of
// dataset_references, per row changed: "single-row" is an application's
// INSERT, UPDATE and DELETE of one row, each its own transaction (round trips
// and commits dominate); "bulk-990" changes 990 rows per statement (a
// migration: the trigger dominates). With the audit, it also reports the
// audit_log bytes (table, TOAST and indexes) written per row change. Run with
//
//	go test -tags integration -run XXX -bench AuditOverhead -count 5 ./internal/sqltest/
func BenchmarkAuditOverhead(b *testing.B) {
	s := pgtest.Start(b)
	db := auditDatabase(b, s)
	conn := s.Conn(b, db)
	run := func(b *testing.B, sql string, args ...any) {
		b.Helper()
		if _, err := conn.Exec(b.Context(), sql, args...); err != nil {
			b.Fatalf("%s: %v", sql, err)
		}
	}
	logSize := func(b *testing.B) int64 {
		var n int64
		if err := conn.QueryRow(b.Context(), "SELECT pg_total_relation_size('pgconsistency.audit_log')").Scan(&n); err != nil {
			b.Fatal(err)
		}
		return n
	}
	// Real-sized values: a 77-character dataset id, a 69-character hash.
	key := fixture.DatasetID(1)
	hash := "f1620" + strings.Repeat("ab", 32)
	shapes := []struct {
		name       string
		rowsPerOp  int
		statements []string
		args       []any
	}{
		{"single-row", 3, []string{
			"INSERT INTO public.dataset_references VALUES ($1, 'bench', $2)",
			"UPDATE public.dataset_references SET block_hash = md5(block_hash) WHERE dataset_id = $1 AND block_ref_name = 'bench'",
			"DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'bench'",
		}, []any{key, hash}},
		{"bulk-990", 3 * 990, []string{
			`INSERT INTO public.dataset_references
			 SELECT e.dataset_id, 'bench' || g, 'f1620' || md5(e.dataset_id || g) || md5(g || e.dataset_id)
			   FROM public.dataset_entries e, generate_series(1, 33) g`,
			"UPDATE public.dataset_references SET block_hash = md5(block_hash) WHERE block_ref_name LIKE 'bench%'",
			"DELETE FROM public.dataset_references WHERE block_ref_name LIKE 'bench%'",
		}, nil},
	}
	for _, shape := range shapes {
		for _, audited := range []bool{false, true} {
			name := shape.name + "/without"
			if audited {
				name = shape.name + "/with"
			}
			b.Run(name, func(b *testing.B) {
				if audited {
					run(b, "SELECT pgconsistency.enable_audit('public.dataset_references', 'dataset_id')")
				} else {
					run(b, "SELECT pgconsistency.disable_audit('public.dataset_references')")
				}
				run(b, "VACUUM ANALYZE public.dataset_references")
				before := logSize(b)
				for b.Loop() {
					for i, sql := range shape.statements {
						if i == 0 {
							run(b, sql, shape.args...)
						} else if shape.args != nil {
							run(b, sql, shape.args[0])
						} else {
							run(b, sql)
						}
					}
				}
				changes := float64(b.N * shape.rowsPerOp)
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/changes, "ns/row-change")
				if audited {
					b.ReportMetric(float64(logSize(b)-before)/changes, "audit-bytes/row-change")
				}
			})
		}
	}
}

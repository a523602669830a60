//go:build integration

package sqltest_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
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

// TestOperations covers the operations pack (sql/operations.sql): each
// condition is created for real, seen with its key and details, resolved,
// and seen gone at the next refresh.
func TestOperations(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"InstalledCheapAndDatasetPackUnaffected", testOperationsInstalled},
		{"ParametersSurviveReinstall", testOperationsParameters},
		{"IndexInvalid", testIndexInvalid},
		{"ConstraintNotValidated", testConstraintNotValidated},
		{"SequenceNearExhaustion", testSequenceNearExhaustion},
		{"TransactionLongRunning", testTransactionLongRunning},
		{"SessionIdleInTransaction", testSessionIdleInTransaction},
		{"LockWaitLong", testLockWaitLong},
		{"DeadlocksDetected", testDeadlocksDetected},
		{"JobQueueLatency", testJobQueueLatency},
	})
}

// operationsInvariants: the pack, with the severity each is registered with.
var operationsInvariants = map[string]string{
	"index_invalid":               "warning",
	"transaction_long_running":    "warning",
	"session_idle_in_transaction": "warning",
	"lock_wait_long":              "warning",
	"deadlocks_detected":          "warning",
	"sequence_near_exhaustion":    "critical",
	"constraint_not_validated":    "warning",
}

// pollTimeout bounds every wait for the server's state (pg_stat_activity,
// pg_locks, pg_stat_database) to show a condition; a loaded 2-core machine
// may need seconds, and a wait that runs out fails the test.
const pollTimeout = 60 * time.Second

// timestampKey is how the pack's keys write a timestamp (UTC, microseconds).
const timestampKey = `to_char(%s AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')`

func operationsDatabase(t *testing.T, s *pgtest.Server, fixtures ...string) string {
	t.Helper()
	db := fixture.NewDatabase(t, s, fixtures...)
	s.PsqlFile(t, db, fixture.Path("sql/operations.sql"))
	return db
}

// refreshOne refreshes one invariant and returns its status row, failing the
// test if the refresh did not succeed.
func refreshOne(t *testing.T, conn *pgx.Conn, invariant string) statusRow {
	t.Helper()
	exec(t, conn, "CALL pgconsistency.refresh($1)", invariant)
	st, ok := status(t, conn)[invariant]
	require.True(t, ok, "invariant %s is not registered", invariant)
	require.NotNil(t, st.LastRunOutcome, invariant)
	require.Equal(t, "succeeded", *st.LastRunOutcome, "refresh of %s: %v", invariant, st.LastError)
	return st
}

// viewRows returns the rows of an invariant's view: key → details.
func viewRows(t *testing.T, conn *pgx.Conn, invariant string) map[string]map[string]any {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT v.key, to_jsonb(v) - 'key' FROM "+
		pgx.Identifier{"pgconsistency", invariant}.Sanitize()+" v")
	require.NoError(t, err)
	out := map[string]map[string]any{}
	for rows.Next() {
		var key string
		var details map[string]any
		require.NoError(t, rows.Scan(&key, &details))
		out[key] = details
	}
	require.NoError(t, rows.Err())
	return out
}

// refreshUntil refreshes the invariant until its view holds the key, or
// fails once pollTimeout has passed. Returns the row's details and the status
// of the refresh that first showed it.
func refreshUntil(t *testing.T, conn *pgx.Conn, invariant, key string) (map[string]any, statusRow) {
	t.Helper()
	deadline := time.Now().Add(pollTimeout)
	for {
		st := refreshOne(t, conn, invariant)
		rows := viewRows(t, conn, invariant)
		if d, ok := rows[key]; ok {
			return d, st
		}
		if time.Now().After(deadline) {
			require.FailNowf(t, "anomaly not seen", "%s has no anomaly %q after %s; it has %v", invariant, key, pollTimeout, rows)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// requireResolved: the next refresh finds nothing, and counts the one
// anomaly that was open as resolved.
func requireResolved(t *testing.T, conn *pgx.Conn, invariant string) {
	t.Helper()
	st := refreshOne(t, conn, invariant)
	assert.Empty(t, viewRows(t, conn, invariant), "%s after the fix", invariant)
	assert.EqualValues(t, 0, st.Anomalies, "%s anomalies after the fix", invariant)
	assert.EqualValues(t, 1, st.ResolvedAnomalies, "%s resolved anomalies after the fix", invariant)
}

func queryString(t *testing.T, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, sql string, args ...any) string {
	t.Helper()
	var s string
	require.NoError(t, q.QueryRow(t.Context(), sql, args...).Scan(&s), sql)
	return s
}

// testOperationsInstalled: the seven invariants are registered with a
// 1-minute period and their thresholds; on the database with every dataset
// fixture they find nothing, refresh in well under a second all together,
// and the eight dataset invariants still give exactly their counts.
func testOperationsInstalled(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s, fixture.Invariants...)
	conn := s.Conn(t, db)

	rows, err := conn.Query(t.Context(), `SELECT name, severity, refresh_period::text FROM pgconsistency.invariant
		WHERE name <> ALL ($1)`, fixture.Invariants)
	require.NoError(t, err)
	got := map[string]string{}
	for rows.Next() {
		var name, severity, period string
		require.NoError(t, rows.Scan(&name, &severity, &period))
		got[name] = severity
		assert.Equal(t, "00:01:00", period, "refresh period of %s", name)
	}
	require.NoError(t, rows.Err())
	assert.Equal(t, operationsInvariants, got)

	rows, err = conn.Query(t.Context(), `SELECT invariant || '.' || name || '=' || value FROM pgconsistency.invariant_parameter ORDER BY 1`)
	require.NoError(t, err)
	params, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{
		"lock_wait_long.threshold=1 minute",
		"sequence_near_exhaustion.threshold_percent=80",
		"session_idle_in_transaction.threshold=10 minutes",
		"transaction_long_running.threshold=1 hour",
	}, params)

	// Refreshed twice: the first populates the views, the second is the
	// steady state (CONCURRENTLY), which is what runs every minute.
	var total float64
	for pass := range 2 {
		total = 0
		for inv := range operationsInvariants {
			st := refreshOne(t, conn, inv)
			assert.EqualValues(t, 0, st.Anomalies, "%s on the fixtures database", inv)
			total += *durationOf(t, conn, inv)
		}
		t.Logf("pass %d: the 7 operations invariants refreshed in %.1f ms in total (snapshot_duration_seconds)", pass+1, total*1000)
	}
	assert.Less(t, total, 1.0, "the pack must be cheap enough to refresh every minute")

	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	st := status(t, conn)
	require.Len(t, st, len(fixture.Invariants)+len(operationsInvariants))
	for _, inv := range fixture.Invariants {
		assert.Equal(t, "succeeded", *st[inv].LastRunOutcome, inv)
		assert.EqualValues(t, len(fixture.Breakage[inv]), st[inv].Anomalies, "anomalies of %s", inv)
		assert.Equal(t, ids(fixture.Breakage[inv]...), viewKeys(t, conn, inv), "keys in pgconsistency.%s", inv)
	}
}

func durationOf(t *testing.T, conn *pgx.Conn, invariant string) *float64 {
	t.Helper()
	var d *float64
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT snapshot_duration_seconds FROM pgconsistency.status WHERE invariant = $1", invariant).Scan(&d))
	require.NotNil(t, d, invariant)
	return d
}

// testOperationsParameters: thresholds, refresh periods and enabled flags
// changed by the DBA survive a re-run of operations.sql, which recreates no
// view; set_parameter refuses a value of the wrong type and an unknown name.
func testOperationsParameters(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	node, _ := relfilenode(t, conn, "pgconsistency.transaction_long_running")

	exec(t, conn, "SELECT pgconsistency.set_parameter('transaction_long_running', 'threshold', '30 minutes')")
	exec(t, conn, "SELECT pgconsistency.set_parameter('sequence_near_exhaustion', 'threshold_percent', '50')")
	exec(t, conn, "UPDATE pgconsistency.invariant SET refresh_period = '5 minutes' WHERE name = 'index_invalid'")
	exec(t, conn, "UPDATE pgconsistency.invariant SET enabled = false WHERE name = 'lock_wait_long'")

	s.PsqlFile(t, db, fixture.Path("sql/operations.sql"))

	assert.Equal(t, "30 minutes", queryString(t, conn, "SELECT pgconsistency.parameter('transaction_long_running', 'threshold')"))
	assert.Equal(t, "50", queryString(t, conn, "SELECT pgconsistency.parameter('sequence_near_exhaustion', 'threshold_percent')"))
	assert.Equal(t, "00:05:00", queryString(t, conn, "SELECT refresh_period::text FROM pgconsistency.invariant WHERE name = 'index_invalid'"))
	assert.Equal(t, "false", queryString(t, conn, "SELECT enabled::text FROM pgconsistency.invariant WHERE name = 'lock_wait_long'"))
	assert.Equal(t, "00:01:00", queryString(t, conn, "SELECT refresh_period::text FROM pgconsistency.invariant WHERE name = 'deadlocks_detected'"))
	again, populated := relfilenode(t, conn, "pgconsistency.transaction_long_running")
	assert.Equal(t, node, again, "re-running the pack keeps the views")
	assert.True(t, populated)

	for _, tc := range []struct{ call, want string }{
		{"SELECT pgconsistency.set_parameter('transaction_long_running', 'threshold', 'banana')",
			"'banana' is not a valid interval for parameter threshold of invariant transaction_long_running"},
		{"SELECT pgconsistency.set_parameter('sequence_near_exhaustion', 'threshold_percent', 'most')",
			"'most' is not a valid numeric for parameter threshold_percent of invariant sequence_near_exhaustion"},
		{"SELECT pgconsistency.set_parameter('lock_wait_long', 'treshold', '1 minute')",
			"invariant 'lock_wait_long' has no parameter 'treshold'"},
	} {
		_, err := conn.Exec(t.Context(), tc.call)
		require.ErrorContains(t, err, tc.want, tc.call)
	}
	assert.Equal(t, "30 minutes", queryString(t, conn, "SELECT pgconsistency.parameter('transaction_long_running', 'threshold')"),
		"a refused value changes nothing")

	rows, err := conn.Query(t.Context(), `
		SELECT p.proname FROM pg_proc p
		 WHERE p.pronamespace = 'pgconsistency'::regnamespace
		   AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))
		 ORDER BY 1`)
	require.NoError(t, err)
	public, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{"_deprecated_column", "_valid_refresh_settings", "version"}, public, "the pack's functions are not executable by PUBLIC")
}

// testIndexInvalid: a unique index built concurrently over duplicate values
// fails and stays behind INVALID; dropping it resolves the anomaly.
func testIndexInvalid(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	assert.EqualValues(t, 0, refreshOne(t, conn, "index_invalid").Anomalies)

	exec(t, conn, "CREATE TABLE public.ops_accounts (id int, email text)")
	exec(t, conn, "INSERT INTO public.ops_accounts VALUES (1, 'a@example.org'), (2, 'a@example.org')")
	_, err := conn.Exec(t.Context(), "CREATE UNIQUE INDEX CONCURRENTLY ops_accounts_email ON public.ops_accounts (email)")
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Equal(t, "23505", pgErr.Code, "the concurrent build fails on the duplicates: %v", err)

	d, st := refreshUntil(t, conn, "index_invalid", "public.ops_accounts_email")
	assert.EqualValues(t, 1, st.Anomalies)
	assert.EqualValues(t, 1, st.NewAnomalies)
	assert.Equal(t, "public.ops_accounts", d["table_name"])
	assert.Equal(t, true, d["is_unique"])
	assert.Contains(t, d["definition"], "CREATE UNIQUE INDEX ops_accounts_email ON public.ops_accounts USING btree (email)")

	exec(t, conn, "DROP INDEX CONCURRENTLY public.ops_accounts_email")
	requireResolved(t, conn, "index_invalid")
}

// testConstraintNotValidated: a CHECK added NOT VALID is an anomaly until
// it is validated.
func testConstraintNotValidated(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	assert.EqualValues(t, 0, refreshOne(t, conn, "constraint_not_validated").Anomalies)

	exec(t, conn, "CREATE TABLE public.ops_orders (id int, amount numeric)")
	exec(t, conn, "INSERT INTO public.ops_orders VALUES (1, 10)")
	exec(t, conn, "ALTER TABLE public.ops_orders ADD CONSTRAINT amount_positive CHECK (amount > 0) NOT VALID")

	d, st := refreshUntil(t, conn, "constraint_not_validated", "public.ops_orders.amount_positive")
	assert.EqualValues(t, 1, st.Anomalies)
	assert.Equal(t, "public.ops_orders", d["table_name"])
	assert.Equal(t, "check", d["constraint_type"])
	assert.Equal(t, "CHECK ((amount > (0)::numeric)) NOT VALID", d["definition"])

	exec(t, conn, "ALTER TABLE public.ops_orders VALIDATE CONSTRAINT amount_positive")
	requireResolved(t, conn, "constraint_not_validated")
}

// testSequenceNearExhaustion: a bigint sequence behind an integer column is
// measured against the integer limit; 90% of it is an anomaly, and widening
// the column resolves it. A sequence at 90% of its own (smallint) maximum is
// one too.
func testSequenceNearExhaustion(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "CREATE TABLE public.ops_events (id serial PRIMARY KEY, note text)")
	exec(t, conn, "ALTER SEQUENCE public.ops_events_id_seq AS bigint") // the classic trap: the column stays integer
	exec(t, conn, "INSERT INTO public.ops_events (note) VALUES ('first')")
	exec(t, conn, "CREATE SEQUENCE public.ops_small AS smallint")
	assert.EqualValues(t, 0, refreshOne(t, conn, "sequence_near_exhaustion").Anomalies, "fresh sequences are far from their limits")

	exec(t, conn, "SELECT setval('public.ops_events_id_seq', 1932735283)") // 90% of 2^31-1
	exec(t, conn, "SELECT setval('public.ops_small', 29491)")              // 90% of 32767

	d, st := refreshUntil(t, conn, "sequence_near_exhaustion", "public.ops_events_id_seq")
	assert.EqualValues(t, 2, st.Anomalies)
	assert.Equal(t, "bigint", d["sequence_type"])
	assert.Equal(t, "public.ops_events.id", d["column_name"])
	assert.Equal(t, "integer", d["column_type"])
	assert.EqualValues(t, 1932735283, d["last_value"])
	assert.EqualValues(t, 2147483647, d["limit_value"], "an integer column exhausts at the integer limit")
	assert.Equal(t, "type integer of column public.ops_events.id", d["limited_by"])
	assert.EqualValues(t, 90, d["used_percent"])

	small := viewRows(t, conn, "sequence_near_exhaustion")["public.ops_small"]
	require.NotNil(t, small, "the smallint sequence at 90%")
	assert.EqualValues(t, 32767, small["limit_value"])
	assert.Equal(t, "maximum of the sequence", small["limited_by"])
	assert.Nil(t, small["column_name"])

	// Below the threshold after raising it: the smallint one (90.00%) goes.
	exec(t, conn, "SELECT pgconsistency.set_parameter('sequence_near_exhaustion', 'threshold_percent', '95')")
	st = refreshOne(t, conn, "sequence_near_exhaustion")
	assert.EqualValues(t, 0, st.Anomalies, "90%% is under a 95%% threshold")
	exec(t, conn, "SELECT pgconsistency.set_parameter('sequence_near_exhaustion', 'threshold_percent', '80')")
	_, st = refreshUntil(t, conn, "sequence_near_exhaustion", "public.ops_events_id_seq")
	assert.EqualValues(t, 2, st.Anomalies)

	exec(t, conn, "DROP SEQUENCE public.ops_small")
	exec(t, conn, "ALTER TABLE public.ops_events ALTER COLUMN id TYPE bigint")
	st = refreshOne(t, conn, "sequence_near_exhaustion")
	assert.Empty(t, viewRows(t, conn, "sequence_near_exhaustion"), "a bigint column on a bigint sequence is at 0%")
	assert.EqualValues(t, 0, st.Anomalies)
	assert.EqualValues(t, 2, st.ResolvedAnomalies)
}

// openTransaction begins a transaction on a new connection and runs sql in
// it; returns the transaction and the key the pack gives it (pid and start:
// now() is the transaction's start).
func openTransaction(t *testing.T, s *pgtest.Server, db, sql string) (pgx.Tx, string) {
	t.Helper()
	other := s.Conn(t, db)
	exec(t, other, "SET application_name = 'ops-test-holder'")
	tx, err := other.Begin(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	key := queryString(t, tx, "SELECT pg_backend_pid()::text || ':' || "+fmt.Sprintf(timestampKey, "now()"))
	exec(t, tx.Conn(), sql) // the session's last query
	return tx, key
}

// testTransactionLongRunning: a transaction held open by a second connection
// past a 1-second threshold; committing it resolves the anomaly.
func testTransactionLongRunning(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.set_parameter('transaction_long_running', 'threshold', '1 second')")
	assert.EqualValues(t, 0, refreshOne(t, conn, "transaction_long_running").Anomalies, "no transaction open")

	tx, key := openTransaction(t, s, db, "SELECT txid_current()")
	d, st := refreshUntil(t, conn, "transaction_long_running", key)
	assert.EqualValues(t, 1, st.Anomalies, "the refreshing session itself is not reported")
	assert.Equal(t, "ops-test-holder", d["application_name"])
	assert.Equal(t, "idle in transaction", d["state"])
	assert.Equal(t, "SELECT txid_current()", d["query"])
	assert.Equal(t, "client backend", d["backend_type"])

	require.NoError(t, tx.Commit(t.Context()))
	requireResolved(t, conn, "transaction_long_running")
}

// testSessionIdleInTransaction: a session that began a transaction, ran a
// statement and went quiet; ending the transaction resolves it.
func testSessionIdleInTransaction(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.set_parameter('session_idle_in_transaction', 'threshold', '1 second')")
	assert.EqualValues(t, 0, refreshOne(t, conn, "session_idle_in_transaction").Anomalies)

	tx, key := openTransaction(t, s, db, "SELECT 1")
	d, st := refreshUntil(t, conn, "session_idle_in_transaction", key)
	assert.EqualValues(t, 1, st.Anomalies)
	assert.Equal(t, "idle in transaction", d["state"])
	assert.Equal(t, "ops-test-holder", d["application_name"])
	assert.Equal(t, "SELECT 1", d["last_query"])
	assert.NotNil(t, d["idle_since"])

	require.NoError(t, tx.Rollback(t.Context()))
	requireResolved(t, conn, "session_idle_in_transaction")
}

// testLockWaitLong: session A holds a table lock, session B waits for it
// past a 1-second threshold; the anomaly names A as the blocker. A's commit
// ends the wait and resolves it.
func testLockWaitLong(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "CREATE TABLE public.ops_locked (id int)")
	exec(t, conn, "SELECT pgconsistency.set_parameter('lock_wait_long', 'threshold', '1 second')")
	assert.EqualValues(t, 0, refreshOne(t, conn, "lock_wait_long").Anomalies)

	holder, holderKey := openTransaction(t, s, db, "LOCK TABLE public.ops_locked IN ACCESS EXCLUSIVE MODE")
	holderPid, _, _ := strings.Cut(holderKey, ":")

	waiter := s.Conn(t, db)
	exec(t, waiter, "SET application_name = 'ops-test-waiter'")
	waiterPid := queryString(t, waiter, "SELECT pg_backend_pid()::text")
	done := make(chan error, 1)
	// Cancelled at cleanup (before the connection is closed) if the test
	// fails while the waiter still waits.
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go func() {
		_, err := waiter.Exec(ctx, "SELECT count(*) FROM public.ops_locked")
		done <- err
	}()

	// pg_locks shows the wait once the waiter's query has reached the server.
	var waitStart string
	deadline := time.Now().Add(pollTimeout)
	for {
		err := conn.QueryRow(t.Context(), `SELECT `+fmt.Sprintf(timestampKey, "waitstart")+` FROM pg_locks
			WHERE pid = $1 AND NOT granted AND waitstart IS NOT NULL`, mustAtoi(t, waiterPid)).Scan(&waitStart)
		if err == nil {
			break
		}
		require.ErrorIs(t, err, pgx.ErrNoRows)
		require.True(t, time.Now().Before(deadline), "session %s never waited for the lock", waiterPid)
		time.Sleep(100 * time.Millisecond)
	}
	d, st := refreshUntil(t, conn, "lock_wait_long", waiterPid+":"+waitStart)
	assert.EqualValues(t, 1, st.Anomalies)
	assert.Equal(t, []any{float64(mustAtoi(t, holderPid))}, d["blocking_pids"], "the blocking pid is in the details")
	assert.Equal(t, holderPid+" ops-test-holder (idle in transaction): LOCK TABLE public.ops_locked IN ACCESS EXCLUSIVE MODE", d["blocking_sessions"])
	assert.Equal(t, "public.ops_locked", d["table_name"])
	assert.Equal(t, "relation", d["locktype"])
	assert.Equal(t, "AccessShareLock", d["mode"])
	assert.Equal(t, "Lock", d["wait_event_type"])
	assert.Equal(t, "ops-test-waiter", d["application_name"])
	assert.Equal(t, "SELECT count(*) FROM public.ops_locked", d["query"])

	require.NoError(t, holder.Commit(t.Context()))
	select {
	case err := <-done:
		require.NoError(t, err, "the waiter gets its lock once the holder commits")
	case <-time.After(pollTimeout):
		require.FailNow(t, "the waiter still waits after the holder committed")
	}
	requireResolved(t, conn, "lock_wait_long")
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	var n int
	_, err := fmt.Sscan(s, &n)
	require.NoError(t, err, s)
	return n
}

// testDeadlocksDetected: two connections lock two rows in opposite orders;
// PostgreSQL aborts one with a deadlock (40P01). The next refreshes show one
// anomaly with the count, and the one after that (no new deadlock) resolves it.
func testDeadlocksDetected(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "CREATE TABLE public.ops_pair (id int PRIMARY KEY, v int)")
	exec(t, conn, "INSERT INTO public.ops_pair VALUES (1, 0), (2, 0)")
	st := refreshOne(t, conn, "deadlocks_detected")
	assert.EqualValues(t, 0, st.Anomalies, "the first refresh only records the baseline")
	var baseline int64
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT deadlocks FROM pgconsistency.deadlock_baseline WHERE datname = current_database()").Scan(&baseline))

	first, second := s.Conn(t, db), s.Conn(t, db)
	tx1, err := first.Begin(t.Context())
	require.NoError(t, err)
	tx2, err := second.Begin(t.Context())
	require.NoError(t, err)
	_, err = tx1.Exec(t.Context(), "UPDATE public.ops_pair SET v = 1 WHERE id = 1")
	require.NoError(t, err)
	_, err = tx2.Exec(t.Context(), "UPDATE public.ops_pair SET v = 2 WHERE id = 2")
	require.NoError(t, err)
	results := make(chan error, 2)
	go func() {
		_, err := tx1.Exec(context.Background(), "UPDATE public.ops_pair SET v = 1 WHERE id = 2")
		results <- err
	}()
	go func() {
		_, err := tx2.Exec(context.Background(), "UPDATE public.ops_pair SET v = 2 WHERE id = 1")
		results <- err
	}()
	var deadlocks, succeeded int
	for range 2 {
		select {
		case err := <-results:
			var pgErr *pgconn.PgError
			switch {
			case err == nil:
				succeeded++
			case errors.As(err, &pgErr) && pgErr.Code == "40P01":
				deadlocks++
			default:
				require.NoError(t, err)
			}
		case <-time.After(pollTimeout):
			require.FailNow(t, "the two transactions neither deadlocked nor finished")
		}
	}
	require.Equal(t, [2]int{1, 1}, [2]int{deadlocks, succeeded}, "one victim, one survivor")
	require.NoError(t, tx1.Rollback(t.Context()))
	require.NoError(t, tx2.Rollback(t.Context()))

	// The victim's backend reports the deadlock to the statistics a moment
	// later (at most ~10 s): refresh until it is seen.
	d, st := refreshUntil(t, conn, "deadlocks_detected", db)
	assert.EqualValues(t, 1, st.Anomalies)
	assert.EqualValues(t, 1, st.NewAnomalies)
	assert.EqualValues(t, 1, d["new_deadlocks"])
	assert.EqualValues(t, baseline+1, d["total_deadlocks"])

	requireResolved(t, conn, "deadlocks_detected")

	// A statistics reset lowers the counter: no anomaly, a new baseline.
	exec(t, conn, "SELECT pg_stat_reset()")
	st = refreshOne(t, conn, "deadlocks_detected")
	assert.EqualValues(t, 0, st.Anomalies, "after pg_stat_reset()")
	assert.EqualValues(t, 0, st.NewAnomalies, "after pg_stat_reset()")
	assert.Equal(t, "0", queryString(t, conn, "SELECT deadlocks::text FROM pgconsistency.deadlock_baseline WHERE datname = current_database()"))
}

// testJobQueueLatency: define_job_queue_latency over a sample queue table;
// only pending jobs older than the threshold are anomalies, and marking the
// overdue one done resolves it.
func testJobQueueLatency(t *testing.T, s *pgtest.Server) {
	db := operationsDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, `CREATE TABLE public.ops_jobs (
		id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		created_at timestamptz NOT NULL DEFAULT now(),
		status     text NOT NULL DEFAULT 'pending')`)
	exec(t, conn, `INSERT INTO public.ops_jobs (created_at, status) VALUES
		(now() - interval '1 hour', 'pending'),  -- 1: overdue
		(now() - interval '1 hour', 'done'),     -- 2: old but done
		(now(), 'pending')                       -- 3: pending, recent`)

	for _, tc := range []struct{ call, want string }{
		{`SELECT pgconsistency.define_job_queue_latency('ops_jobs_latency', 'public.ops_jobs', 'job_id', 'created_at', $$status = 'pending'$$)`,
			"table public.ops_jobs has no column job_id (id_column)"},
		{`SELECT pgconsistency.define_job_queue_latency('ops_jobs_latency', 'public.ops_jobs', 'id', 'status', $$status = 'pending'$$)`,
			"column public.ops_jobs.status is text, expected a timestamp"},
		{`SELECT pgconsistency.define_job_queue_latency('ops_jobs_latency', 'public.ops_jobs', 'id', 'created_at', '  ')`,
			"pending_condition is empty"},
	} {
		_, err := conn.Exec(t.Context(), tc.call)
		require.ErrorContains(t, err, tc.want, tc.call)
	}

	exec(t, conn, `SELECT pgconsistency.define_job_queue_latency('ops_jobs_latency', 'public.ops_jobs', 'id', 'created_at',
		$$status = 'pending'$$, threshold => '10 minutes')`)
	assert.Equal(t, "00:10:00", queryString(t, conn, "SELECT pgconsistency.parameter('ops_jobs_latency', 'threshold')"))
	assert.Equal(t, "00:01:00", queryString(t, conn, "SELECT refresh_period::text FROM pgconsistency.invariant WHERE name = 'ops_jobs_latency'"))

	d, st := refreshUntil(t, conn, "ops_jobs_latency", "1")
	assert.EqualValues(t, 1, st.Anomalies, "only job 1 is pending and overdue")
	assert.Equal(t, []string{"1"}, slices.Sorted(maps.Keys(viewRows(t, conn, "ops_jobs_latency"))))
	assert.Equal(t, "public.ops_jobs", d["job_table"])
	assert.NotNil(t, d["created_at"])

	exec(t, conn, "UPDATE public.ops_jobs SET status = 'done' WHERE id = 1")
	requireResolved(t, conn, "ops_jobs_latency")
}

//go:build integration

package sqltest_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestOrchestration covers when refreshes run: periods, force, requests after
// deployments, the pg_cron schedule, and the guardrails.
func TestOrchestration(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"RefreshOnlyWhatIsDue", testRefreshOnlyWhatIsDue},
		{"RefreshRequests", testRefreshRequests},
		{"LockTimeout", testLockTimeout},
		{"StatementTimeout", testStatementTimeout},
		{"RefreshSettings", testRefreshSettings},
		{"IncrementalWithoutJIT", testIncrementalWithoutJIT},
		{"PgCronSchedule", testPgCronSchedule},
		{"StandbySkips", testStandbySkips},
	})
}

func startedAt(t *testing.T, conn *pgx.Conn) map[string]time.Time {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT invariant, last_started_at FROM pgconsistency.refresh_state")
	require.NoError(t, err)
	out := map[string]time.Time{}
	for rows.Next() {
		var inv string
		var at time.Time
		require.NoError(t, rows.Scan(&inv, &at))
		out[inv] = at
	}
	require.NoError(t, rows.Err())
	return out
}

// refreshed lists the invariants whose last start changed between two reads.
func refreshed(before, after map[string]time.Time) []string {
	var out []string
	for _, inv := range fixture.Invariants {
		if !after[inv].Equal(before[inv]) {
			out = append(out, inv)
		}
	}
	return out
}

// age pretends the latest refresh of the invariants started d earlier.
func age(t *testing.T, conn *pgx.Conn, d string, invariants ...string) {
	t.Helper()
	exec(t, conn, "UPDATE pgconsistency.refresh_state SET last_started_at = last_started_at - $1::interval WHERE invariant = ANY($2)",
		d, invariants)
}

func testRefreshOnlyWhatIsDue(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "UPDATE pgconsistency.invariant SET refresh_period = '1 minute' WHERE name = 'dataset_seed_missing'")
	exec(t, conn, "UPDATE pgconsistency.invariant SET refresh_period = '6 hours' WHERE name = 'dataset_key_blocks_missing'")

	before := startedAt(t, conn)
	exec(t, conn, "CALL pgconsistency.refresh()")
	first := startedAt(t, conn)
	assert.ElementsMatch(t, fixture.Invariants, refreshed(before, first), "never refreshed: all due")

	exec(t, conn, "CALL pgconsistency.refresh()")
	assert.Empty(t, refreshed(first, startedAt(t, conn)), "just refreshed: nothing due")

	// 35 minutes later: the default 30-minute and the 1-minute periods have
	// passed, the 6-hour one has not.
	age(t, conn, "35 minutes", fixture.Invariants...)
	aged := startedAt(t, conn)
	exec(t, conn, "CALL pgconsistency.refresh()")
	got := refreshed(aged, startedAt(t, conn))
	assert.Len(t, got, len(fixture.Invariants)-1)
	assert.NotContains(t, got, "dataset_key_blocks_missing")

	// 29 min 40 s after a 30-minute period started: within the 30 s slack, due.
	age(t, conn, "29 minutes 40 seconds", "dataset_head_ref_missing")
	// 29 minutes: not due.
	age(t, conn, "29 minutes", "dataset_statistics_missing")
	aged = startedAt(t, conn)
	exec(t, conn, "CALL pgconsistency.refresh()")
	assert.Equal(t, []string{"dataset_head_ref_missing"}, refreshed(aged, startedAt(t, conn)))

	// A name, or force, refreshes regardless of the period.
	aged = startedAt(t, conn)
	exec(t, conn, "CALL pgconsistency.refresh('dataset_key_blocks_missing')")
	assert.Equal(t, []string{"dataset_key_blocks_missing"}, refreshed(aged, startedAt(t, conn)))
	aged = startedAt(t, conn)
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	assert.ElementsMatch(t, fixture.Invariants, refreshed(aged, startedAt(t, conn)))
	aged = startedAt(t, conn)
	exec(t, conn, "CALL pgconsistency.refresh('dataset_key_blocks_missing', force => false)")
	assert.Empty(t, refreshed(aged, startedAt(t, conn)), "force => false with a name: only if due")
}

type request struct {
	Requests  int
	DueAt     time.Time
	ClaimedAt *time.Time
}

func requests(t *testing.T, conn *pgx.Conn) []request {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT requests, due_at, claimed_at FROM pgconsistency.refresh_request ORDER BY id")
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (request, error) {
		var q request
		err := r.Scan(&q.Requests, &q.DueAt, &q.ClaimedAt)
		return q, err
	})
	require.NoError(t, err)
	return out
}

func testRefreshRequests(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn, notices := connWithNotices(t, s, db)
	exec(t, conn, "CALL pgconsistency.refresh()")
	base := startedAt(t, conn)

	var due1, due2 time.Time
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT pgconsistency.request_refresh(delay => '10 minutes', reason => 'deploy v1')").Scan(&due1))
	assert.EqualValues(t, 1, status(t, conn)["dataset_seed_missing"].PendingRequests)

	exec(t, conn, "CALL pgconsistency.refresh()")
	assert.Empty(t, refreshed(base, startedAt(t, conn)), "the request is not due yet")

	// A second request during the delay: the deployment has not settled,
	// the wait starts again; still one request.
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT pgconsistency.request_refresh(delay => '10 minutes')").Scan(&due2))
	assert.True(t, due2.After(due1), "pushed back: %s then %s", due1, due2)
	reqs := requests(t, conn)
	require.Len(t, reqs, 1)
	assert.Equal(t, 2, reqs[0].Requests)

	// The delay passes.
	exec(t, conn, "UPDATE pgconsistency.refresh_request SET due_at = now() - interval '1 second' WHERE claimed_at IS NULL")
	exec(t, conn, "CALL pgconsistency.refresh()")
	after := startedAt(t, conn)
	assert.ElementsMatch(t, fixture.Invariants, refreshed(base, after), "a due request refreshes everything, due or not")
	assert.Contains(t, strings.Join(notices(), "\n"), "running the requested refresh of every invariant (2 request(s)")
	reqs = requests(t, conn)
	require.Len(t, reqs, 1)
	require.NotNil(t, reqs[0].ClaimedAt)
	assert.EqualValues(t, 0, status(t, conn)["dataset_seed_missing"].PendingRequests)

	exec(t, conn, "CALL pgconsistency.refresh()")
	assert.Empty(t, refreshed(after, startedAt(t, conn)), "a request runs once")

	_, err := conn.Exec(t.Context(), "SELECT pgconsistency.request_refresh(delay => '-1 minute')")
	require.ErrorContains(t, err, "delay must be zero or more")
}

func testLockTimeout(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn, notices := connWithNotices(t, s, db)
	exec(t, conn, "UPDATE pgconsistency.invariant SET lock_timeout = '200 milliseconds' WHERE name = 'dataset_seed_missing'")
	exec(t, conn, "CALL pgconsistency.refresh()")

	// A migration holds the table the invariant reads.
	other := s.Conn(t, db)
	tx, err := other.Begin(t.Context())
	require.NoError(t, err)
	_, err = tx.Exec(t.Context(), "LOCK TABLE public.dataset_key_blocks IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)

	exec(t, conn, "CALL pgconsistency.refresh('dataset_seed_missing')")
	require.NoError(t, tx.Rollback(t.Context()))
	st := status(t, conn)["dataset_seed_missing"]
	assert.Equal(t, "timed_out", *st.LastRunOutcome)
	assert.Equal(t, "timed_out", st.LastOutcome)
	assert.Contains(t, *st.LastError, "canceling statement due to lock timeout")
	assert.Contains(t, *st.LastError, "lock_timeout (00:00:00.2)")
	assert.EqualValues(t, 1, st.ConsecutiveFailures)
	assert.NotNil(t, st.RefreshedAt, "the previous snapshot stays")
	assert.Contains(t, strings.Join(notices(), "\n"), "WARNING: pgconsistency: refresh of dataset_seed_missing timed out")

	exec(t, conn, "CALL pgconsistency.refresh('dataset_seed_missing')")
	st = status(t, conn)["dataset_seed_missing"]
	assert.Equal(t, "succeeded", st.LastOutcome, "the lock is gone")
	assert.EqualValues(t, 0, st.ConsecutiveFailures)
}

func testStatementTimeout(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, `SELECT pgconsistency.define_invariant('slow_check',
		$q$ SELECT 'k'::text AS key FROM pg_catalog.pg_sleep(2) $q$, 'info')`)
	exec(t, conn, "UPDATE pgconsistency.invariant SET statement_timeout = '300 milliseconds' WHERE name = 'slow_check'")

	// What the receiver's scheduler does: each refresh a statement of its
	// own, under the invariant's statement_timeout.
	var timeout string
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT (extract(epoch FROM statement_timeout) * 1000)::bigint::text FROM pgconsistency.invariant WHERE name = 'slow_check'").Scan(&timeout))
	exec(t, conn, "SELECT set_config('statement_timeout', $1, false)", timeout)
	exec(t, conn, "CALL pgconsistency.refresh('slow_check')")
	exec(t, conn, "RESET statement_timeout")

	st := status(t, conn)["slow_check"]
	assert.Equal(t, "timed_out", st.LastOutcome)
	assert.Contains(t, *st.LastError, "canceling statement due to statement timeout")
	assert.Contains(t, *st.LastError, "statement_timeout in force (300ms")
	assert.Contains(t, *st.LastError, "statement_timeout is 00:00:00.3")
	assert.Contains(t, *st.LastError, "UPDATE pgconsistency.invariant SET statement_timeout")
	assert.Nil(t, st.RefreshedAt)

	// A cancel that is not a timeout is not swallowed: it stops the refresh.
	canceled := s.Conn(t, db)
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, err := canceled.Exec(ctx, "CALL pgconsistency.refresh('slow_check')")
	require.Error(t, err)
	assert.EqualValues(t, 1, status(t, conn)["slow_check"].ConsecutiveFailures, "a user's cancel is not recorded as a timeout")

	// The same in German: a timeout is told from a cancel by the limit that
	// was armed, not by the message, which follows lc_messages.
	german := s.Conn(t, db)
	if _, err := german.Exec(t.Context(), "SET lc_messages = 'de_DE.UTF-8'"); err != nil {
		t.Fatalf("the de_DE.UTF-8 locale is missing (%v): run scripts/install-deps.sh as root (make test does), which generates it", err)
	}
	exec(t, german, "SELECT set_config('statement_timeout', $1, false)", timeout)
	_, err = german.Exec(t.Context(), "CALL pgconsistency.refresh('slow_check')")
	require.NoError(t, err, "a timeout under lc_messages = de_DE is recorded, not raised")
	st = status(t, conn)["slow_check"]
	assert.Equal(t, "timed_out", st.LastOutcome)
	assert.Contains(t, *st.LastError, "Zeitüberschreitung", "the server's own (German) message is kept")
	assert.Contains(t, *st.LastError, "statement_timeout in force (300ms")
	assert.EqualValues(t, 2, st.ConsecutiveFailures)
	ctx, cancel = context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	exec(t, german, "RESET statement_timeout")
	_, err = german.Exec(ctx, "CALL pgconsistency.refresh('slow_check')")
	require.Error(t, err, "a cancel under lc_messages = de_DE stops the refresh")
	assert.EqualValues(t, 2, status(t, conn)["slow_check"].ConsecutiveFailures)
}

func testPgCronSchedule(t *testing.T, s *pgtest.Server) {
	require.True(t, s.HasPgCron(), "pg_cron is not installed: run make test as root (it installs postgresql-15-cron)")
	db := fixture.NewDatabase(t, s)
	cronDB := s.Conn(t, "postgres")
	// Twice: the jobs are updated in place, not duplicated.
	s.Psql(t, "postgres", "-v", "database="+db, "-f", fixture.Path("sql/pg_cron.sql"))
	s.Psql(t, "postgres", "-v", "database="+db, "-f", fixture.Path("sql/pg_cron.sql"))
	t.Cleanup(func() {
		_, err := cronDB.Exec(context.Background(), "SELECT cron.unschedule(jobname) FROM cron.job WHERE jobname LIKE 'pgconsistency-%'")
		assert.NoError(t, err)
	})

	rows, err := cronDB.Query(t.Context(), "SELECT jobname, schedule, command, database FROM cron.job WHERE jobname LIKE 'pgconsistency-%' ORDER BY jobname")
	require.NoError(t, err)
	jobs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) ([4]string, error) {
		var j [4]string
		err := r.Scan(&j[0], &j[1], &j[2], &j[3])
		return j, err
	})
	require.NoError(t, err)
	assert.Equal(t, [][4]string{
		{"pgconsistency-cleanup", "17 3 * * *", `DELETE FROM cron.job_run_details
       WHERE end_time < now() - interval '7 days'
         AND jobid IN (SELECT jobid FROM cron.job WHERE jobname LIKE 'pgconsistency-%')`, "postgres"},
		{"pgconsistency-refresh-" + db, "* * * * *", "CALL pgconsistency.refresh()", db},
	}, jobs)

	// The cleanup deletes the old history of pgconsistency's jobs only:
	// another team's job keeps its history, however old.
	exec(t, cronDB, "SELECT cron.schedule('other-team-report', '0 4 * * *', 'SELECT 1')")
	t.Cleanup(func() { _, _ = cronDB.Exec(context.Background(), "SELECT cron.unschedule('other-team-report')") })
	exec(t, cronDB, `INSERT INTO cron.job_run_details (jobid, runid, job_pid, database, username, command, status, return_message, start_time, end_time)
		SELECT j.jobid, nextval('cron.runid_seq'), 1, 'postgres', 'postgres', j.command, 'succeeded', 'SELECT 1', now() - d, now() - d
		  FROM cron.job j, (VALUES (interval '30 days'), (interval '1 day')) AS ages(d)
		 WHERE j.jobname IN ('other-team-report', 'pgconsistency-refresh-' || $1)`, db)
	var cleanup string
	require.NoError(t, cronDB.QueryRow(t.Context(), "SELECT command FROM cron.job WHERE jobname = 'pgconsistency-cleanup'").Scan(&cleanup))
	exec(t, cronDB, cleanup)
	left := map[string]int{}
	rows, err = cronDB.Query(t.Context(), `SELECT j.jobname, count(*) FROM cron.job_run_details d JOIN cron.job j USING (jobid)
		WHERE j.jobname IN ('other-team-report', 'pgconsistency-refresh-' || $1) GROUP BY 1`, db)
	require.NoError(t, err)
	for rows.Next() {
		var name string
		var n int
		require.NoError(t, rows.Scan(&name, &n))
		left[name] = n
	}
	require.NoError(t, rows.Err())
	assert.Equal(t, map[string]int{"other-team-report": 2, "pgconsistency-refresh-" + db: 1}, left,
		"the 30-day-old run of pgconsistency's job is deleted, the other team's runs are kept")
	exec(t, cronDB, "DELETE FROM cron.job_run_details")

	// The job really refreshes: a request due in 2 s is run once, by the
	// job's next run (pg_cron 1.4 runs jobs at the start of each minute).
	conn := s.Conn(t, db)
	exec(t, conn, "CALL pgconsistency.refresh()")
	before := startedAt(t, conn)
	var due time.Time
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency.request_refresh(delay => '2 seconds', reason => 'pg_cron test')").Scan(&due))
	var reqs []request
	require.Eventually(t, func() bool {
		reqs = requests(t, conn)
		return len(reqs) == 1 && reqs[0].ClaimedAt != nil
	}, 150*time.Second, time.Second, "the pg_cron job did not run the request")
	assert.False(t, reqs[0].ClaimedAt.Before(due), "claimed at %s, due at %s: not before the delay", reqs[0].ClaimedAt, due)
	// The job commits the claim first, then refreshes: wait for the run that
	// claimed it to end (on a loaded machine that takes a while) before looking.
	var runs int
	var status string
	require.Eventually(t, func() bool {
		err := cronDB.QueryRow(t.Context(), `SELECT count(*) FILTER (WHERE d.status = 'succeeded'),
			coalesce(string_agg(DISTINCT d.status, ','), '') FROM cron.job_run_details d JOIN cron.job j USING (jobid)
			WHERE j.jobname = $1 AND d.status <> 'running' AND d.end_time >= $2`, "pgconsistency-refresh-"+db, *reqs[0].ClaimedAt).Scan(&runs, &status)
		return err == nil && status != ""
	}, 150*time.Second, time.Second, "no run of the pg_cron job ended")
	after := startedAt(t, conn)
	assert.ElementsMatch(t, fixture.Invariants, refreshed(before, after))
	assert.GreaterOrEqual(t, runs, 1, "statuses of the ended runs: %s", status)
}

func testStandbySkips(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	exec(t, s.Conn(t, db), "CALL pgconsistency.refresh()")
	standby := s.StartStandby(t)
	conn, notices := connWithNotices(t, standby, db)
	var st statusRow
	require.Eventually(t, func() bool {
		st = status(t, conn)["dataset_seed_missing"]
		return st.LastRunOutcome != nil
	}, 30*time.Second, 100*time.Millisecond, "the primary's refresh state replicates")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	assert.Contains(t, strings.Join(notices(), "\n"),
		"NOTICE: pgconsistency: nothing refreshed: this server is a standby; refreshes run on the primary and replicate here")
	assert.Equal(t, st, status(t, conn)["dataset_seed_missing"], "nothing changed, nothing failed")
}

// testIncrementalWithoutJIT: the query of an incremental refresh runs with
// JIT off (compiling it cost more than checking a few keys), unless the
// invariant's incremental settings turn it on; a full refresh, the
// reconcile included, keeps the server's JIT setting.
func testIncrementalWithoutJIT(t *testing.T, s *pgtest.Server) {
	db := fixture.NewCurrentDatabase(t, s)
	conn := s.Conn(t, db)
	var serverJIT string
	require.NoError(t, conn.QueryRow(t.Context(), "SHOW jit").Scan(&serverJIT))
	require.Equal(t, "on", serverJIT, "the test needs the server's JIT on to tell the two apart")
	exec(t, conn, `SELECT pgconsistency.define_invariant('jit_probe',
		$q$ SELECT a.id::text AS key, pg_catalog.current_setting('jit') AS jit FROM public.accounts a $q$,
		'info', keys => '{"public.accounts": "r.id::text"}')`)
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode('jit_probe', 'incremental')")
	jitOf := func(kind, account string) string {
		t.Helper()
		exec(t, conn, "CALL pgconsistency.refresh('jit_probe')")
		var gotKind, jit string
		require.NoError(t, conn.QueryRow(t.Context(), `SELECT s.last_refresh_kind, a.details ->> 'jit'
			  FROM pgconsistency.status s, pgconsistency.anomaly a
			 WHERE s.invariant = 'jit_probe' AND a.invariant = 'jit_probe' AND a.key = $1 AND a.resolved_at IS NULL`,
			account).Scan(&gotKind, &jit))
		require.Equal(t, kind, gotKind)
		return jit
	}
	account := func(id string) string {
		exec(t, conn, `INSERT INTO public.accounts (id, account_name, email, display_name, account_type, registered_at, provider, provider_identity_key)
			VALUES ($1::text, $1::text, $1::text || '@example.com', $1::text, 'user', now(), 'password', $1::text)`, id)
		return id
	}
	first := account("did:odf:fed01jit-1")
	assert.Equal(t, "on", jitOf("reconcile", first), "the reconcile (a full refresh): the server's JIT")
	assert.Equal(t, "off", jitOf("incremental", account("did:odf:fed01jit-2")), "an incremental refresh")
	exec(t, conn, `UPDATE pgconsistency.invariant SET settings = '{"incremental": {"jit": "on"}}' WHERE name = 'jit_probe'`)
	assert.Equal(t, "on", jitOf("incremental", account("did:odf:fed01jit-3")), "incremental settings with JIT on")
	var sessionJIT string
	require.NoError(t, conn.QueryRow(t.Context(), "SHOW jit").Scan(&sessionJIT))
	assert.Equal(t, "on", sessionJIT, "the setting does not outlive the refresh")
}

// testRefreshSettings: every refresh runs without parallel workers and with
// the invariant's own planner settings, only inside its own transaction;
// settings outside the allowed planner and memory ones are refused, and a bad
// value fails that invariant's refresh only.
func testRefreshSettings(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_seed_missing")
	conn := s.Conn(t, db)
	// The view records the settings its refresh ran with.
	exec(t, conn, `SELECT pgconsistency.define_invariant('settings_probe',
		$q$ SELECT pg_catalog.current_setting('enable_hashjoin') || '/' ||
		           pg_catalog.current_setting('max_parallel_workers_per_gather') || '/' ||
		           pg_catalog.current_setting('work_mem') AS key $q$,
		'info', settings => '{"enable_hashjoin": "off", "work_mem": "8MB"}')`)
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	var key string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT key FROM pgconsistency.settings_probe").Scan(&key))
	assert.Equal(t, "off/0/8MB", key)
	var syncCommit string
	require.NoError(t, conn.QueryRow(t.Context(), "SHOW synchronous_commit").Scan(&syncCommit))
	assert.Equal(t, "on", syncCommit)
	var sessionHashJoin string
	require.NoError(t, conn.QueryRow(t.Context(), "SHOW enable_hashjoin").Scan(&sessionHashJoin))
	assert.Equal(t, "on", sessionHashJoin, "the settings must not outlive the refresh")
	assert.EqualValues(t, 3, status(t, conn)["dataset_seed_missing"].Anomalies)

	// Re-defining without settings keeps them; the shipped pack sets its own.
	exec(t, conn, `SELECT pgconsistency.define_invariant('settings_probe',
		$q$ SELECT pg_catalog.current_setting('enable_hashjoin') AS key $q$, 'info')`)
	var settings string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT settings::text FROM pgconsistency.invariant WHERE name = 'settings_probe'").Scan(&settings))
	assert.Equal(t, `{"work_mem": "8MB", "enable_hashjoin": "off"}`, settings)
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT settings::text FROM pgconsistency.invariant WHERE name = 'dataset_head_ref_missing'").Scan(&settings))
	assert.Equal(t, `{"incremental": {"enable_hashjoin": "off", "enable_mergejoin": "off"}, "enable_hashjoin": "off"}`, settings)

	// Anything but planner and memory settings is refused, for full and
	// for incremental refreshes.
	for _, bad := range []string{`{"search_path": "public"}`, `{"role": "postgres"}`, `{"session_authorization": "x"}`,
		`{"statement_timeout": "0"}`, `["enable_hashjoin"]`, `{"enable_hashjoin": {"x": 1}}`,
		`{"incremental": {"search_path": "public"}}`, `{"incremental": "off"}`, `{"incremental": {"incremental": {}}}`} {
		_, err := conn.Exec(t.Context(), "UPDATE pgconsistency.invariant SET settings = $1::jsonb WHERE name = 'settings_probe'", bad)
		require.Error(t, err, bad)
		assert.Contains(t, err.Error(), "invariant_settings_valid", bad)
	}

	// A bad value is refused when written (0.7.0), with PostgreSQL's
	// message, not at every refresh; the settings stay as they were.
	for _, bad := range []string{`{"work_mem": "lots"}`, `{"work_mem": "64MB; DROP TABLE accounts"}`,
		`{"incremental": {"enable_hashjoin": "maybe"}}`} {
		_, err := conn.Exec(t.Context(), "UPDATE pgconsistency.invariant SET settings = $1::jsonb WHERE name = 'settings_probe'", bad)
		require.Error(t, err, bad)
		assert.Contains(t, err.Error(), "an invariant's refresh setting", bad)
		assert.Regexp(t, `invalid value for parameter|requires a Boolean value`, err.Error(), bad)
	}
	_, err := conn.Exec(t.Context(), `SELECT pgconsistency.define_invariant('settings_probe2', $q$ SELECT 'k'::text AS key $q$,
		'info', settings => '{"work_mem": "64MB; DROP TABLE accounts"}')`)
	require.ErrorContains(t, err, `invalid value for parameter "work_mem": "64MB; DROP TABLE accounts"`, "define_invariant refuses it too")
	var after string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT settings::text FROM pgconsistency.invariant WHERE name = 'settings_probe'").Scan(&after))
	assert.Equal(t, `{"work_mem": "8MB", "enable_hashjoin": "off"}`, after, "the settings before the refused ones")
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	st := status(t, conn)
	assert.Equal(t, "succeeded", st["settings_probe"].LastOutcome)
}

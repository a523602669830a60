//go:build integration

// Tests of the SQL in sql/, run as SQL against a real PostgreSQL:
// the framework (refresh, skip, failure isolation, status) and the dataset
// invariant pack over the fixtures of testdata/.
package sqltest_test

import (
	"context"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// sqlTest is one test of this package; the tests of one top-level test share
// a cluster, and each works in databases of its own.
type sqlTest struct {
	name string
	test func(*testing.T, *pgtest.Server)
}

// runOnOneCluster runs tests one after the other on a cluster of their own.
// The top-level tests of this package each have their own cluster, so they
// run in parallel (go test's -parallel at a time): much of their time is
// spent waiting (sleeps of slow invariants, pg_cron's next minute).
func runOnOneCluster(t *testing.T, tests []sqlTest) {
	t.Parallel()
	s := pgtest.Start(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.test(t, s) })
	}
}

// TestSQL covers the framework and the dataset invariant pack.
func TestSQL(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"InvariantFixtures", testInvariantFixtures},
		{"RefreshIsConcurrentAfterTheFirst", testRefreshIsConcurrentAfterTheFirst},
		{"ConcurrentRefreshSkips", testConcurrentRefreshSkips},
		{"FailingInvariantDoesNotStopTheOthers", testFailingInvariantDoesNotStopTheOthers},
		{"NewAndResolvedAnomalies", testNewAndResolvedAnomalies},
		{"InstallIsIdempotent", testInstallIsIdempotent},
		{"StatusReadsStoredCountsOnly", testStatusReadsStoredCountsOnly},
		{"InvariantPlansAreSinglePass", testInvariantPlansAreSinglePass},
		{"RegisterRejectsUnusableViews", testRegisterRejectsUnusableViews},
		{"NamesAreRejectedOrQuoted", testNamesAreRejectedOrQuoted},
		{"EveryObjectHasAComment", testEveryObjectHasAComment},
	})
}

type statusRow struct {
	Invariant           string
	Anomalies           int64
	NewAnomalies        int64
	ResolvedAnomalies   int64
	LastRunOutcome      *string
	LastError           *string
	ConsecutiveFailures int64
	Skips               int64
	RefreshedAt         *time.Time
	LastOutcome         string
	PendingRequests     int64
}

func status(t *testing.T, conn *pgx.Conn) map[string]statusRow {
	t.Helper()
	rows, err := conn.Query(t.Context(), `SELECT invariant, anomalies, new_anomalies, resolved_anomalies,
		last_run_outcome, last_error, consecutive_failures, skips, refreshed_at, last_outcome, pending_requests
		FROM pgconsistency.status`)
	require.NoError(t, err)
	out := map[string]statusRow{}
	for rows.Next() {
		var r statusRow
		require.NoError(t, rows.Scan(&r.Invariant, &r.Anomalies, &r.NewAnomalies, &r.ResolvedAnomalies,
			&r.LastRunOutcome, &r.LastError, &r.ConsecutiveFailures, &r.Skips, &r.RefreshedAt, &r.LastOutcome, &r.PendingRequests))
		out[r.Invariant] = r
	}
	require.NoError(t, rows.Err())
	return out
}

func exec(t *testing.T, conn *pgx.Conn, sql string, args ...any) {
	t.Helper()
	_, err := conn.Exec(t.Context(), sql, args...)
	require.NoError(t, err, sql)
}

func viewKeys(t *testing.T, conn *pgx.Conn, invariant string) []string {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT key FROM "+pgx.Identifier{"pgconsistency", invariant}.Sanitize()+" ORDER BY key")
	require.NoError(t, err)
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return keys
}

func ids(numbers ...int) []string {
	out := make([]string, 0, len(numbers))
	for _, n := range numbers {
		out = append(out, fixture.DatasetID(n))
	}
	slices.Sort(out)
	return out
}

// testInvariantFixtures: the clean fixture gives 0 everywhere; each anomaly
// fixture gives exactly its broken datasets in its invariant and 0 in the
// other seven; all fixtures together give every count at once.
func testInvariantFixtures(t *testing.T, s *pgtest.Server) {
	cases := []struct {
		name     string
		fixtures []string
	}{{name: "clean"}}
	for _, inv := range fixture.Invariants {
		cases = append(cases, struct {
			name     string
			fixtures []string
		}{name: inv, fixtures: []string{inv}})
	}
	cases = append(cases, struct {
		name     string
		fixtures []string
	}{name: "all", fixtures: fixture.Invariants})

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			db := fixture.NewDatabase(t, s, tc.fixtures...)
			conn := s.Conn(t, db)
			exec(t, conn, "CALL pgconsistency.refresh()")
			st := status(t, conn)
			require.Len(t, st, len(fixture.Invariants))
			for _, inv := range fixture.Invariants {
				var want []int
				if slices.Contains(tc.fixtures, inv) {
					want = fixture.Breakage[inv]
				}
				row := st[inv]
				require.NotNil(t, row.LastRunOutcome, inv)
				assert.Equal(t, "succeeded", *row.LastRunOutcome, inv)
				assert.EqualValues(t, len(want), row.Anomalies, "anomalies of %s", inv)
				assert.EqualValues(t, len(want), row.NewAnomalies, "new anomalies of %s (first refresh)", inv)
				assert.Equal(t, ids(want...), viewKeys(t, conn, inv), "keys in pgconsistency.%s", inv)
			}
		})
	}
}

func relfilenode(t *testing.T, conn *pgx.Conn, view string) (node uint32, populated bool) {
	t.Helper()
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT relfilenode, relispopulated FROM pg_class WHERE oid = $1::regclass", view).Scan(&node, &populated))
	return node, populated
}

func viewOID(t *testing.T, conn *pgx.Conn, view string) (oid uint32) {
	t.Helper()
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT $1::regclass::oid", view).Scan(&oid))
	return oid
}

// testRefreshIsConcurrentAfterTheFirst: a materialized view of
// register_invariant is created unpopulated by its owner; the first refresh
// fills it (a plain REFRESH, which writes a new relfilenode), every later one
// is CONCURRENTLY (which keeps the relfilenode, and its readers read on).
func testRefreshIsConcurrentAfterTheFirst(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_seed_missing")
	conn := s.Conn(t, db)
	const view = "public.seedless"
	exec(t, conn, `CREATE MATERIALIZED VIEW public.seedless AS
		SELECT k.dataset_id::text AS key, count(*) AS key_blocks FROM public.dataset_key_blocks k
		 GROUP BY k.dataset_id HAVING NOT bool_or(k.event_type = 'Seed') WITH NO DATA`)
	exec(t, conn, "CREATE UNIQUE INDEX ON public.seedless (key)")
	exec(t, conn, "SELECT pgconsistency.register_invariant('seedless', 'public', 'seedless', 'critical', 'no Seed')")

	created, populated := relfilenode(t, conn, view)
	require.False(t, populated)

	exec(t, conn, "CALL pgconsistency.refresh('seedless')")
	first, populated := relfilenode(t, conn, view)
	require.True(t, populated)
	require.NotEqual(t, created, first, "first refresh is a plain REFRESH")

	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(1))
	exec(t, conn, "CALL pgconsistency.refresh('seedless')")
	second, _ := relfilenode(t, conn, view)
	assert.Equal(t, first, second, "later refreshes are CONCURRENTLY: same relfilenode")
	rows, err := conn.Query(t.Context(), "SELECT key FROM public.seedless ORDER BY key")
	require.NoError(t, err)
	keys, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, ids(1, 13, 14, 24), keys)
	st := status(t, conn)["seedless"]
	assert.EqualValues(t, 4, st.Anomalies)
	assert.EqualValues(t, 1, st.NewAnomalies)
}

func connWithNotices(t *testing.T, s *pgtest.Server, db string) (*pgx.Conn, func() []string) {
	t.Helper()
	cfg, err := pgx.ParseConfig(s.DSN(db))
	require.NoError(t, err)
	var mu sync.Mutex
	var notices []string
	cfg.OnNotice = func(_ *pgconn.PgConn, n *pgconn.Notice) {
		mu.Lock()
		defer mu.Unlock()
		notices = append(notices, n.Severity+": "+n.Message)
	}
	conn, err := pgx.ConnectConfig(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn, func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(notices)
	}
}

// holdRefreshLock takes the lock a refresh of the invariant takes, in a
// transaction on conn that lasts until the end of the (sub)test.
func holdRefreshLock(t *testing.T, conn *pgx.Conn, invariant string) {
	t.Helper()
	tx, err := conn.Begin(t.Context())
	require.NoError(t, err)
	t.Cleanup(func() { _ = tx.Rollback(context.Background()) })
	_, err = tx.Exec(t.Context(), "SELECT pg_advisory_xact_lock(hashtext('pgconsistency'), hashtext($1))", invariant)
	require.NoError(t, err)
}

// testConcurrentRefreshSkips: a refresh that finds another one running skips
// at once with a notice (not an error) instead of queueing behind it.
func testConcurrentRefreshSkips(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_seed_missing")
	first := s.Conn(t, db)
	exec(t, first, "CALL pgconsistency.refresh()")
	second, notices := connWithNotices(t, s, db)
	// If the second refresh waited instead of skipping, it would hit this
	// timeout and the test would fail with an error; no timing is asserted.
	exec(t, second, "SET statement_timeout = '20s'")

	t.Run("while another session holds the lock", func(t *testing.T) {
		holdRefreshLock(t, first, "dataset_seed_missing")

		exec(t, second, "CALL pgconsistency.refresh('dataset_seed_missing')")
		require.Contains(t, strings.Join(notices(), "\n"),
			"NOTICE: pgconsistency: refresh of dataset_seed_missing skipped: another session is refreshing it right now")
		st := status(t, second)["dataset_seed_missing"]
		assert.EqualValues(t, 1, st.Skips, "the skip is recorded")
		assert.Equal(t, "skipped", st.LastOutcome)
		assert.Equal(t, "succeeded", *st.LastRunOutcome, "a skip is not a failure")
		assert.EqualValues(t, 0, st.ConsecutiveFailures)
	})

	t.Run("while another refresh is running", func(t *testing.T) {
		tx, err := first.Begin(t.Context())
		require.NoError(t, err)
		var outcome string
		require.NoError(t, tx.QueryRow(t.Context(),
			"SELECT pgconsistency.refresh_invariant('dataset_seed_missing')").Scan(&outcome))
		require.Equal(t, "succeeded", outcome)
		// The running refresh holds the lock and the state row until it commits.
		exec(t, second, "CALL pgconsistency.refresh('dataset_seed_missing')")
		require.NoError(t, tx.Commit(t.Context()))
		assert.Len(t, slices.DeleteFunc(notices(), func(n string) bool { return !strings.Contains(n, "skipped") }), 2)
	})

	t.Run("the other invariants are refreshed meanwhile", func(t *testing.T) {
		holdRefreshLock(t, first, "dataset_seed_missing")
		before := status(t, second)
		exec(t, second, "CALL pgconsistency.refresh(force => true)")
		after := status(t, second)
		for _, inv := range fixture.Invariants {
			if inv == "dataset_seed_missing" {
				assert.Equal(t, before[inv].RefreshedAt, after[inv].RefreshedAt, inv)
				continue
			}
			assert.True(t, after[inv].RefreshedAt.After(*before[inv].RefreshedAt), inv)
		}
	})
}

// testFailingInvariantDoesNotStopTheOthers: an invariant whose query fails,
// and one whose view was dropped, record their errors; the rest refresh.
func testFailingInvariantDoesNotStopTheOthers(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_head_ref_missing")
	conn, notices := connWithNotices(t, s, db)
	exec(t, conn, `SELECT pgconsistency.define_invariant(
		name => 'always_broken', severity => 'info', description => 'fails on every refresh',
		query => $q$ SELECT (1 / (count(*) - count(*)))::text AS key FROM public.dataset_entries $q$)`)
	exec(t, conn, `SELECT pgconsistency.define_invariant(
		name => 'twice', severity => 'info', description => 'returns a key twice',
		query => $q$ SELECT 'k'::text AS key FROM public.dataset_entries e LIMIT 2 $q$)`)
	exec(t, conn, `SELECT pgconsistency.define_invariant(
		name => 'null_key', severity => 'info', description => 'returns a NULL key',
		query => $q$ SELECT NULL::text AS key FROM public.dataset_entries e LIMIT 1 $q$)`)
	// A view of register_invariant, dropped by its owner.
	exec(t, conn, "CREATE MATERIALIZED VIEW public.gone AS SELECT dataset_id::text AS key FROM public.dataset_entries WHERE false WITH NO DATA")
	exec(t, conn, "CREATE UNIQUE INDEX ON public.gone (key)")
	exec(t, conn, "SELECT pgconsistency.register_invariant('gone', 'public', 'gone')")
	exec(t, conn, "DROP MATERIALIZED VIEW public.gone")
	// The view of a pack's invariant only shows its anomalies: without it,
	// the invariant refreshes on.
	exec(t, conn, "DROP VIEW pgconsistency.dataset_seed_missing")

	for attempt := int64(1); attempt <= 2; attempt++ {
		exec(t, conn, "CALL pgconsistency.refresh(force => true)")
		st := status(t, conn)
		require.Len(t, st, len(fixture.Invariants)+4)

		broken := st["always_broken"]
		assert.Equal(t, "failed", *broken.LastRunOutcome)
		assert.Contains(t, *broken.LastError, "division by zero")
		assert.Equal(t, attempt, broken.ConsecutiveFailures)
		assert.Nil(t, broken.RefreshedAt, "never succeeded")

		twice := st["twice"]
		assert.Equal(t, "failed", *twice.LastRunOutcome)
		assert.Contains(t, *twice.LastError, "its query returned the same key more than once (Key (key)=(k) already exists.)")
		assert.Contains(t, *twice.LastError, "GROUP BY the key")
		nullKey := st["null_key"]
		assert.Equal(t, "failed", *nullKey.LastRunOutcome)
		assert.Contains(t, *nullKey.LastError, "its query returned a row whose key is NULL")

		missing := st["gone"]
		assert.Equal(t, "failed", *missing.LastRunOutcome)
		assert.Contains(t, *missing.LastError, "materialized view public.gone does not exist")
		assert.Contains(t, *missing.LastError, "run register_invariant again")
		assert.Equal(t, attempt, missing.ConsecutiveFailures)

		seed := st["dataset_seed_missing"]
		assert.Equal(t, "succeeded", *seed.LastRunOutcome)
		assert.EqualValues(t, 0, seed.Anomalies)

		ok := st["dataset_head_ref_missing"]
		assert.Equal(t, "succeeded", *ok.LastRunOutcome)
		assert.EqualValues(t, 3, ok.Anomalies)
	}
	assert.Contains(t, strings.Join(notices(), "\n"), "WARNING: pgconsistency: refresh of always_broken failed: division by zero")

	// Re-running the installer brings the dropped view back.
	s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(1))
	exec(t, conn, "CALL pgconsistency.refresh('dataset_seed_missing')")
	assert.Equal(t, ids(1), viewKeys(t, conn, "dataset_seed_missing"))
}

// testNewAndResolvedAnomalies: a new anomaly counts as new even when another
// one was fixed in the same refresh and the total stays the same.
func testNewAndResolvedAnomalies(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	const inv = "dataset_head_ref_missing"
	refresh := func() statusRow {
		exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
		return status(t, conn)[inv]
	}
	dropHead := func(i int) {
		exec(t, conn, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(i))
	}

	r := refresh()
	assert.Equal(t, [3]int64{0, 0, 0}, [3]int64{r.Anomalies, r.NewAnomalies, r.ResolvedAnomalies})

	dropHead(1)
	r = refresh()
	assert.Equal(t, [3]int64{1, 1, 0}, [3]int64{r.Anomalies, r.NewAnomalies, r.ResolvedAnomalies}, "dataset 1 broke")

	r = refresh()
	assert.Equal(t, [3]int64{1, 0, 0}, [3]int64{r.Anomalies, r.NewAnomalies, r.ResolvedAnomalies}, "nothing changed")

	dropHead(2)
	exec(t, conn, "INSERT INTO public.dataset_references VALUES ($1, 'head', 'f1620fixed')", fixture.DatasetID(1))
	r = refresh()
	assert.Equal(t, [3]int64{1, 1, 1}, [3]int64{r.Anomalies, r.NewAnomalies, r.ResolvedAnomalies},
		"dataset 1 fixed, dataset 2 broke: same total, one new")

	dropHead(1)
	r = refresh()
	assert.Equal(t, [3]int64{2, 1, 0}, [3]int64{r.Anomalies, r.NewAnomalies, r.ResolvedAnomalies}, "dataset 1 broke again: new again")
}

// testInstallIsIdempotent: re-running sql/install.sql keeps the views, the
// anomalies and the refresh state, and takes no lock on them; a changed
// query replaces its view, and the anomalies stay.
func testInstallIsIdempotent(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_key_blocks_missing")
	conn := s.Conn(t, db)
	exec(t, conn, "CALL pgconsistency.refresh()")
	before := status(t, conn)
	view := viewOID(t, conn, "pgconsistency.dataset_key_blocks_missing")

	s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	after := status(t, conn)
	assert.Equal(t, view, viewOID(t, conn, "pgconsistency.dataset_key_blocks_missing"), "the view is kept")
	assert.Equal(t, before, after)

	exec(t, conn, `SELECT pgconsistency.define_invariant('dataset_key_blocks_missing',
		$q$ SELECT e.dataset_id::text AS key FROM public.dataset_entries e
		     WHERE NOT EXISTS (SELECT 1 FROM public.dataset_key_blocks k WHERE k.dataset_id = e.dataset_id) $q$,
		'critical', 'changed query')`)
	assert.NotEqual(t, view, viewOID(t, conn, "pgconsistency.dataset_key_blocks_missing"), "fewer columns: a new view")
	assert.Equal(t, ids(11, 12, 23), viewKeys(t, conn, "dataset_key_blocks_missing"),
		"the view shows the open anomalies before the next refresh")
	exec(t, conn, "CALL pgconsistency.refresh('dataset_key_blocks_missing')")
	assert.Equal(t, ids(11, 12, 23), viewKeys(t, conn, "dataset_key_blocks_missing"))
	assert.EqualValues(t, 0, status(t, conn)["dataset_key_blocks_missing"].NewAnomalies,
		"the open anomalies survive the replacement: not new again")
}

// testStatusReadsStoredCountsOnly: the status view never touches the anomaly
// views or the application tables, so a scrape stays cheap at any size.
func testStatusReadsStoredCountsOnly(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	plan := explain(t, conn, "SELECT * FROM pgconsistency.status")
	relations := regexp.MustCompile(`\bon (\w+)`).FindAllStringSubmatch(plan, -1)
	require.NotEmpty(t, relations, plan)
	for _, m := range relations {
		// cap: the capture's row (0.7.0) and its slot, read from shared
		// memory by pg_get_replication_slots(), whatever the WAL holds.
		assert.Contains(t, []string{"invariant", "refresh_state", "refresh_request", "refresh_request_one_pending", "deploy_marker",
			"cap", "capture", "pg_get_replication_slots"}, m[1],
			"status reads only the registry, the state, the pending request, the deploy marker and the capture's slot:\n%s", plan)
	}
}

func explain(t *testing.T, conn *pgx.Conn, query string) string {
	t.Helper()
	rows, err := conn.Query(t.Context(), "EXPLAIN (COSTS OFF) "+query)
	require.NoError(t, err)
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return strings.Join(lines, "\n")
}

// testInvariantPlansAreSinglePass: each invariant query reads each table it
// uses once, with no per-row subplans (correlated subqueries).
func testInvariantPlansAreSinglePass(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	scan := regexp.MustCompile(`Scan on (\w+)`)
	for _, inv := range fixture.Invariants {
		var def string
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT pg_get_viewdef($1::regclass)", "pgconsistency."+inv).Scan(&def))
		plan := explain(t, conn, strings.TrimSuffix(strings.TrimSpace(def), ";"))
		assert.NotContains(t, plan, "SubPlan", "%s:\n%s", inv, plan)
		seen := map[string]int{}
		for _, m := range scan.FindAllStringSubmatch(plan, -1) {
			seen[m[1]]++
		}
		for table, n := range seen {
			assert.Equal(t, 1, n, "%s scans %s %d times:\n%s", inv, table, n, plan)
		}
	}
}

// testRegisterRejectsUnusableViews: a view that REFRESH CONCURRENTLY could not
// handle is refused at registration, with a message that says what to fix.
func testRegisterRejectsUnusableViews(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	exec(t, conn, "CREATE MATERIALIZED VIEW public.no_key AS SELECT dataset_id FROM public.dataset_entries WITH NO DATA")
	exec(t, conn, "CREATE MATERIALIZED VIEW public.no_index AS SELECT dataset_id::text AS key FROM public.dataset_entries WITH NO DATA")
	exec(t, conn, "CREATE MATERIALIZED VIEW public.good AS SELECT dataset_id::text AS key FROM public.dataset_entries WHERE false WITH NO DATA")
	exec(t, conn, "CREATE UNIQUE INDEX ON public.good (key)")

	for _, tc := range []struct{ call, want string }{
		{"SELECT pgconsistency.register_invariant('x', 'public', 'nothing_here')", "public.nothing_here is not a materialized view"},
		{"SELECT pgconsistency.register_invariant('x', 'public', 'no_key')", `has no text column "key"`},
		{"SELECT pgconsistency.register_invariant('x', 'public', 'no_index')", "has no unique index on (key)"},
		{"SELECT pgconsistency.register_invariant('x', 'public', 'good', 'fatal')", "expected critical, warning or info"},
		{"SELECT pgconsistency.define_invariant('Bad Name', 'SELECT 1')", "invalid invariant name"},
		{"SELECT pgconsistency.define_invariant('status', 'SELECT 1')", "collides with pgconsistency.status"},
		{"CALL pgconsistency.refresh('no_such_invariant')", "unknown invariant 'no_such_invariant'"},
	} {
		_, err := conn.Exec(t.Context(), tc.call)
		require.ErrorContains(t, err, tc.want, tc.call)
	}

	// A registered view of one's own is refreshed like the pack's, with no
	// change to the receiver: it is one more row in the status view.
	exec(t, conn, "SELECT pgconsistency.register_invariant('custom_check', 'public', 'good', 'info', 'custom')")
	exec(t, conn, "CALL pgconsistency.refresh()")
	st := status(t, conn)
	require.Contains(t, st, "custom_check")
	assert.Equal(t, "succeeded", *st["custom_check"].LastRunOutcome)
	assert.Len(t, st, len(fixture.Invariants)+1)
}

// testNamesAreRejectedOrQuoted: names that try SQL injection are either
// refused by the registry (invariant names) or quoted as identifiers
// (schemas and views of registered views): nothing they contain runs.
func testNamesAreRejectedOrQuoted(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	for _, name := range []string{
		"x; DROP TABLE public.dataset_entries; --",
		`x"; DROP TABLE public.dataset_entries; --`,
		"Upper", "with space", "1starts_with_digit", strings.Repeat("a", 64),
	} {
		_, err := conn.Exec(t.Context(), "SELECT pgconsistency.define_invariant($1, 'SELECT 1::text AS key')", name)
		require.ErrorContains(t, err, "invalid invariant name", name)
	}

	const schema, view = `odd schema; DROP TABLE public.dataset_entries; --`, `view"; DROP TABLE public.dataset_entries; --`
	ident := pgx.Identifier{schema, view}.Sanitize()
	exec(t, conn, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	exec(t, conn, "CREATE MATERIALIZED VIEW "+ident+" AS SELECT dataset_id::text AS key FROM public.dataset_entries WHERE kind = 'derivative' WITH NO DATA")
	exec(t, conn, "CREATE UNIQUE INDEX ON "+ident+" (key)")
	exec(t, conn, "SELECT pgconsistency.register_invariant('odd_one', $1, $2, 'info', 'derivatives')", schema, view)
	exec(t, conn, "CALL pgconsistency.refresh('odd_one')")
	exec(t, conn, "CALL pgconsistency.refresh('odd_one')") // the concurrent refresh too
	st := status(t, conn)["odd_one"]
	require.NotNil(t, st.LastRunOutcome)
	assert.Equal(t, "succeeded", *st.LastRunOutcome)
	assert.EqualValues(t, 10, st.Anomalies)
	var n int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM public.dataset_entries").Scan(&n))
	assert.Equal(t, 30, n, "nothing was dropped")
}

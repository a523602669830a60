//go:build integration

package sqltest_test

import (
	"context"
	osexec "os/exec"
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

// TestProductionConditions covers what production brings to the SQL:
// installs on every deploy while refreshes run and the collector reads,
// refreshes running at the same time, housekeeping, and role boundaries.
func TestProductionConditions(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"InstallDuringARefresh", testInstallDuringARefresh},
		{"LogExactlyOnceUnderConcurrentRefreshes", testLogExactlyOnceUnderConcurrentRefreshes},
		{"RetentionOfResolvedAnomalies", testRetentionOfResolvedAnomalies},
		{"AcknowledgementExpiryUsesAnIndex", testAcknowledgementExpiryUsesAnIndex},
		{"LogDetailsAndCursorsByRole", testLogDetailsAndCursorsByRole},
		{"MassIncidentLifecycleNeverNestsLoops", testMassIncidentLifecycle},
	})
}

// statusReader reads pgconsistency.status every 100 ms, as a collector would,
// and records how long each read took and which failed.
type statusReader struct {
	mu       sync.Mutex
	reads    int
	failures []string
	slowest  time.Duration
	stop     chan struct{}
	done     chan struct{}
}

func startStatusReader(t *testing.T, s *pgtest.Server, db string) *statusReader {
	t.Helper()
	conn := s.Conn(t, db)
	r := &statusReader{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-r.stop:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			start := time.Now()
			var n int
			err := conn.QueryRow(ctx, "SELECT count(*) FROM pgconsistency.status").Scan(&n)
			took := time.Since(start)
			cancel()
			r.mu.Lock()
			r.reads++
			r.slowest = max(r.slowest, took)
			if err != nil {
				r.failures = append(r.failures, err.Error())
			}
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *statusReader) finish() (reads int, failures []string, slowest time.Duration) {
	close(r.stop)
	<-r.done
	return r.reads, r.failures, r.slowest
}

// psqlFile runs a SQL file with psql as the superuser, as a deploy would,
// and returns its output and error instead of failing the test.
func psqlFile(t *testing.T, s *pgtest.Server, db, path string, vars ...string) (string, error) {
	t.Helper()
	args := []string{"-X", "-v", "ON_ERROR_STOP=1", "-d", s.DSN(db)}
	for _, v := range vars {
		args = append(args, "-v", v)
	}
	out, err := osexec.Command("psql", append(args, "-f", path)...).CombinedOutput()
	return string(out), err
}

// slowRefresh starts a refresh of invariant "slow" (10 s) in a session of its
// own and returns a channel closed when it has ended.
func slowRefresh(t *testing.T, s *pgtest.Server, db string) <-chan struct{} {
	t.Helper()
	conn := s.Conn(t, db)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_, err := conn.Exec(context.Background(), "CALL pgconsistency.refresh('slow')")
		assert.NoError(t, err, "the slow refresh")
	}()
	// Wait until it is inside the REFRESH of its view.
	admin := s.Conn(t, db)
	require.Eventually(t, func() bool {
		var n int
		err := admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND query LIKE 'CALL pgconsistency.refresh(''slow'')%' AND wait_event = 'PgSleep'`).Scan(&n)
		return err == nil && n == 1
	}, 10*time.Second, 20*time.Millisecond, "the slow refresh did not start")
	return done
}

// testInstallDuringARefresh: re-running install.sql and the packs while a
// 10-second refresh runs and the status is read every 100 ms finishes within
// 5 s, and no read fails or waits over a second. A changed install that
// cannot get its lock fails within its lock_wait, with a message that says
// to re-run it, and does not hold the readers up either.
func testInstallDuringARefresh(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, fixture.Invariants...)
	admin := s.Conn(t, db)
	s.PsqlFile(t, db, fixture.Path("sql/operations.sql"))
	s.PsqlFile(t, db, fixture.Path("sql/audit.sql"))
	s.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	exec(t, admin, "SELECT pgconsistency.enable_dataset_audit()")
	exec(t, admin, `SELECT pgconsistency.define_invariant('slow',
		$q$ SELECT 'k'::text AS key FROM pg_catalog.pg_sleep(10) $q$, 'info')`)
	exec(t, admin, "CALL pgconsistency.refresh(force => true)")
	var statusOID uint32
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT 'pgconsistency.status'::regclass::oid").Scan(&statusOID))

	t.Run("unchanged", func(t *testing.T) {
		reader := startStatusReader(t, s, db)
		refreshDone := slowRefresh(t, s, db)
		start := time.Now()
		for _, f := range []string{"sql/install.sql", "sql/operations.sql", "sql/audit.sql", "sql/roles.sql"} {
			out, err := psqlFile(t, s, db, fixture.Path(f))
			require.NoError(t, err, "%s during a refresh: %s", f, out)
		}
		took := time.Since(start)
		select {
		case <-refreshDone:
			t.Fatal("the refresh ended before the installs did: the test proves nothing")
		default:
		}
		<-refreshDone
		reads, failures, slowest := reader.finish()
		t.Logf("install.sql, operations.sql, audit.sql and roles.sql during a 10 s refresh: %s; %d status reads, slowest %s",
			took.Round(time.Millisecond), reads, slowest.Round(time.Millisecond))
		assert.Less(t, took, 5*time.Second, "the installs waited behind the refresh")
		assert.Empty(t, failures, "status reads failed")
		assert.Less(t, slowest, time.Second, "a status read waited behind the install")
		assert.GreaterOrEqual(t, reads, 50)
		var oid uint32
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT 'pgconsistency.status'::regclass::oid").Scan(&oid))
		assert.Equal(t, statusOID, oid, "an unchanged status view is not re-created")
		assert.Equal(t, "succeeded", status(t, admin)["slow"].LastOutcome)
	})

	t.Run("changed, lock not available", func(t *testing.T) {
		// A change the install must make (an upgrade adds the constraint
		// back) needs an ACCESS EXCLUSIVE lock on the registry, which the
		// running refresh holds a share of.
		exec(t, admin, "ALTER TABLE pgconsistency.invariant DROP CONSTRAINT invariant_settings_valid")
		reader := startStatusReader(t, s, db)
		refreshDone := slowRefresh(t, s, db)
		start := time.Now()
		out, err := psqlFile(t, s, db, fixture.Path("sql/install.sql"), "lock_wait=2s")
		took := time.Since(start)
		require.Error(t, err, "the install cannot have its lock: %s", out)
		assert.Contains(t, out, "pgconsistency: install stopped: another session held a lock it needs for ALTER TABLE pgconsistency.invariant ADD CONSTRAINT")
		assert.Contains(t, out, "nothing was changed")
		assert.Contains(t, out, "Re-run install.sql")
		assert.Less(t, took, 4*time.Second, "lock_wait=2s bounds the install")
		<-refreshDone
		reads, failures, slowest := reader.finish()
		t.Logf("changed install during a refresh: failed after %s; %d status reads, slowest %s",
			took.Round(time.Millisecond), reads, slowest.Round(time.Millisecond))
		assert.Empty(t, failures)
		assert.Less(t, slowest, time.Second, "a status read waited behind the waiting install")

		// Re-run once the refresh is over: it makes the change.
		s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
		var n int
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT count(*) FROM pg_constraint WHERE conname = 'invariant_settings_valid'").Scan(&n))
		assert.Equal(t, 1, n)
	})
}

// testLogExactlyOnceUnderConcurrentRefreshes: two refreshes at once, the one
// that takes its seqs first commits last. A log consumer reading in between
// must still receive every new anomaly, exactly once.
func testLogExactlyOnceUnderConcurrentRefreshes(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_head_ref_missing", "dataset_statistics_missing")
	admin := s.Conn(t, db)
	assert.Empty(t, logBatch(t, admin, "consumer", 100), "the consumer starts at the end")

	// A: takes its seqs, does not commit yet.
	first := s.Conn(t, db)
	txA, err := first.Begin(t.Context())
	require.NoError(t, err)
	var outcome string
	require.NoError(t, txA.QueryRow(t.Context(), "SELECT pgconsistency.refresh_invariant('dataset_head_ref_missing')").Scan(&outcome))
	require.Equal(t, "succeeded", outcome)

	// B: another invariant, in another session, commits as soon as it can.
	second := s.Conn(t, db)
	var pidB int
	require.NoError(t, second.QueryRow(t.Context(), "SELECT pg_backend_pid()").Scan(&pidB))
	bDone := make(chan error, 1)
	go func() {
		bDone <- pgx.BeginFunc(context.Background(), second, func(tx pgx.Tx) error {
			return tx.QueryRow(context.Background(), "SELECT pgconsistency.refresh_invariant('dataset_statistics_missing')").Scan(new(string))
		})
	}()
	// B has either committed (seqs after A's: what loses records when the
	// consumer reads now) or is waiting for A.
	require.Eventually(t, func() bool {
		if len(bDone) > 0 {
			return true
		}
		var waiting bool
		err := admin.QueryRow(t.Context(), "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pidB).Scan(&waiting)
		return err == nil && waiting
	}, 10*time.Second, 10*time.Millisecond)

	var delivered []string
	read := func() {
		batch := logBatch(t, admin, "consumer", 100)
		for _, r := range batch {
			delivered = append(delivered, r.Invariant+"/"+r.Key)
		}
		if len(batch) > 0 {
			exec(t, admin, "SELECT pgconsistency.advance_log_cursor('consumer', $1)", batch[len(batch)-1].Seq)
		}
	}
	read() // while A is open
	require.NoError(t, txA.Commit(t.Context()))
	require.NoError(t, <-bDone)
	read()
	read()

	var want []string
	for inv, broken := range map[string][]int{"dataset_head_ref_missing": fixture.Breakage["dataset_head_ref_missing"],
		"dataset_statistics_missing": fixture.Breakage["dataset_statistics_missing"]} {
		for _, i := range broken {
			want = append(want, inv+"/"+fixture.DatasetID(i))
		}
	}
	assert.ElementsMatch(t, want, delivered, "each new anomaly delivered exactly once")
}

// testRetentionOfResolvedAnomalies: a refresh deletes its invariant's
// anomalies resolved longer ago than resolved_retention, but none that a log
// consumer has not read yet, and nothing open.
func testRetentionOfResolvedAnomalies(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_head_ref_missing") // 1, 2, 21
	conn := s.Conn(t, db)
	var retention string
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT resolved_retention::text FROM pgconsistency.invariant WHERE name = 'dataset_head_ref_missing'").Scan(&retention))
	assert.Equal(t, "30 days", retention, "the documented default")

	exec(t, conn, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	// A consumer that has read nothing since before dataset 3 broke.
	assert.Empty(t, logBatch(t, conn, "slow-consumer", 10))
	exec(t, conn, "DELETE FROM public.dataset_references WHERE dataset_id = $1", fixture.DatasetID(3))
	exec(t, conn, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	// Datasets 1 and 3 are fixed: both resolved.
	for _, i := range []int{1, 3} {
		exec(t, conn, `INSERT INTO public.dataset_references (dataset_id, block_ref_name, block_hash)
			VALUES ($1, 'head', 'fixed')`, fixture.DatasetID(i))
	}
	exec(t, conn, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	exec(t, conn, `UPDATE pgconsistency.anomaly SET resolved_at = resolved_at - interval '3 days'
		WHERE invariant = 'dataset_head_ref_missing' AND resolved_at IS NOT NULL`)
	exec(t, conn, "UPDATE pgconsistency.invariant SET resolved_retention = '2 days' WHERE name = 'dataset_head_ref_missing'")
	exec(t, conn, "CALL pgconsistency.refresh('dataset_head_ref_missing')")

	keys := func() []string {
		rows, err := conn.Query(t.Context(), `SELECT key || CASE WHEN resolved_at IS NULL THEN ' open' ELSE ' resolved' END
			FROM pgconsistency.anomaly WHERE invariant = 'dataset_head_ref_missing' ORDER BY key`)
		require.NoError(t, err)
		out, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		return out
	}
	assert.Equal(t, []string{
		fixture.DatasetID(2) + " open",
		fixture.DatasetID(3) + " resolved", // kept: slow-consumer has not read it
		fixture.DatasetID(21) + " open",
	}, keys(), "dataset 1's resolved anomaly is past retention and read by every consumer: deleted")

	batch := logBatch(t, conn, "slow-consumer", 10)
	require.Len(t, batch, 1)
	exec(t, conn, "SELECT pgconsistency.advance_log_cursor('slow-consumer', $1)", batch[0].Seq)
	exec(t, conn, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	assert.Equal(t, []string{fixture.DatasetID(2) + " open", fixture.DatasetID(21) + " open"}, keys(),
		"once read, it goes too")
	assert.EqualValues(t, 2, status(t, conn)["dataset_head_ref_missing"].Anomalies)
}

// testAcknowledgementExpiryUsesAnIndex: the expiry, run by every refresh loop
// (every minute), reads the acknowledgements with an "until" only.
func testAcknowledgementExpiryUsesAnIndex(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	tx, err := conn.Begin(t.Context())
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(t.Context()) }()
	_, err = tx.Exec(t.Context(), "SET LOCAL enable_seqscan = off")
	require.NoError(t, err)
	rows, err := tx.Query(t.Context(), `EXPLAIN UPDATE pgconsistency.anomaly a
		SET acknowledged_at = NULL WHERE a.acknowledged_until <= now()`)
	require.NoError(t, err)
	plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Contains(t, strings.Join(plan, "\n"), "anomaly_acknowledged_until", "the expiry's plan:\n%s", strings.Join(plan, "\n"))
}

// testLogDetailsAndCursorsByRole: the reader role gets no anomaly details
// (they copy application rows) unless granted them on purpose, and a role
// moves only the log cursors it created.
func testLogDetailsAndCursorsByRole(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_head_ref_missing")
	s.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	admin := s.Conn(t, db)
	reader, readerRole := loginAs(t, s, admin, db, "GRANT pgconsistency_reader TO ROLE")
	other, _ := loginAs(t, s, admin, db, "GRANT pgconsistency_reader TO ROLE")

	details := func(conn *pgx.Conn) []*string {
		rows, err := conn.Query(t.Context(), "SELECT details::text FROM pgconsistency.new_anomalies_for_log('reader-logs', 100)")
		require.NoError(t, err)
		out, err := pgx.CollectRows(rows, pgx.RowTo[*string])
		require.NoError(t, err)
		return out
	}
	assert.Empty(t, details(reader), "a new cursor starts at the end")
	exec(t, admin, "CALL pgconsistency.refresh()")
	got := details(reader)
	require.Len(t, got, 3)
	for _, d := range got {
		assert.Nil(t, d, "details withheld from the reader role")
	}
	exec(t, admin, "GRANT SELECT (details) ON pgconsistency.anomaly TO "+pgx.Identifier{readerRole}.Sanitize())
	got = details(reader)
	require.Len(t, got, 3)
	for _, d := range got {
		require.NotNil(t, d, "details granted on purpose")
		assert.Contains(t, *d, "dataset_name")
	}

	// Another role may neither move nor read this cursor.
	for _, q := range []string{
		"SELECT pgconsistency.advance_log_cursor('reader-logs', 1000)",
		"SELECT count(*) FROM pgconsistency.new_anomalies_for_log('reader-logs', 100)",
	} {
		_, err := other.Exec(t.Context(), q)
		var pgErr *pgconn.PgError
		require.ErrorAs(t, err, &pgErr, q)
		assert.Equal(t, "42501", pgErr.Code, q)
		assert.Contains(t, pgErr.Message, "belongs to role "+readerRole)
	}
	assert.Len(t, details(reader), 3, "the cursor did not move")
	// Its owner moves it.
	exec(t, reader, "SELECT pgconsistency.advance_log_cursor('reader-logs', (SELECT max(seq) FROM pgconsistency.new_anomalies_for_log('reader-logs', 100)))")
	assert.Empty(t, details(reader))
}

// testMassIncidentLifecycle: after a mass incident (here half the datasets
// lose their statistics rows), the refresh that follows the one that found
// it joins thousands of open anomalies whose statistics are stale
// (pgconsistency.anomaly not analysed since). Under the invariant's own
// settings (enable_hashjoin off for dataset_statistics_missing) the
// lifecycle step was planned as nested loops over the view's rows —
// quadratic: at 200,000 datasets that refresh never finished. The plans of
// the refresh, captured with auto_explain as NOTICEs, must hold no nested
// loop over pgconsistency.anomaly.
func testMassIncidentLifecycle(t *testing.T, s *pgtest.Server) {
	db := s.CreateDatabase(t, "")
	s.PsqlFile(t, db, fixture.Path("testdata/legacy/schema.sql"))
	s.Psql(t, db, "-c", `
		INSERT INTO public.dataset_entries (dataset_id, owner_id, owner_name, dataset_name, created_at, kind)
		SELECT 'd' || i, 'o', 'o', 'n' || i, now(), 'root' FROM generate_series(1, 4000) i;
		INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, num_records, data_size, checkpoints_size)
		SELECT 'd' || i, 'head', 0, 0, 0 FROM generate_series(1, 4000) i;
		ANALYZE`)
	s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	conn, notices := connWithNotices(t, s, db)
	exec(t, conn, "CALL pgconsistency.refresh('dataset_statistics_missing')")
	exec(t, conn, "VACUUM ANALYZE pgconsistency.anomaly") // statistics of a calm day: no open anomaly
	exec(t, conn, "DELETE FROM public.dataset_statistics WHERE substr(dataset_id, 2)::int % 2 = 0")
	exec(t, conn, "CALL pgconsistency.refresh('dataset_statistics_missing')") // finds the 2,000

	exec(t, conn, "LOAD 'auto_explain'")
	exec(t, conn, "SET auto_explain.log_min_duration = 0")
	exec(t, conn, "SET auto_explain.log_nested_statements = on")
	exec(t, conn, "SET auto_explain.log_level = notice")
	exec(t, conn, "CALL pgconsistency.refresh('dataset_statistics_missing')")
	exec(t, conn, "RESET auto_explain.log_min_duration")
	st := status(t, conn)["dataset_statistics_missing"]
	require.Equal(t, "succeeded", st.LastOutcome, "%v", st.LastError)
	require.EqualValues(t, 2000, st.Anomalies)

	var lifecycle []string
	for _, n := range notices() {
		if strings.Contains(n, "Update on anomaly") {
			lifecycle = append(lifecycle, n)
		}
	}
	require.NotEmpty(t, lifecycle, "auto_explain showed the lifecycle step's plan")
	for _, plan := range lifecycle {
		assert.NotContains(t, plan, "Nested Loop", "the lifecycle step's plan:\n%s", plan)
	}
}

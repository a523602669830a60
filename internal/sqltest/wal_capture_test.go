//go:build integration

package sqltest_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	osexec "os/exec"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestWALCaptureRefusals: set_capture('wal') refuses, with the fix in its
// hint, what would make the capture lose keys or fill the disk, and the
// application's writes to a table it refused keep working.
func TestWALCaptureRefusals(t *testing.T) {
	t.Parallel()
	t.Run("WalLevel", func(t *testing.T) {
		s := pgtest.Start(t) // wal_level = replica, PostgreSQL's default
		conn := s.Conn(t, fixture.NewCurrentDatabase(t, s))
		err := setCapture(t, conn, "wal")
		require.ErrorContains(t, err, "the WAL capture needs wal_level = logical; this server has wal_level = replica")
		require.Contains(t, hint(err), "ALTER SYSTEM SET wal_level = logical")
		require.Contains(t, hint(err), "rds.logical_replication = 1")
		requireCapture(t, conn, "trigger")
	})

	s := pgtest.Start(t, pgtest.WithSetting("wal_level", "logical")) // max_slot_wal_keep_size = -1, the default
	t.Run("UnboundedSlot", func(t *testing.T) {
		conn := s.Conn(t, fixture.NewCurrentDatabase(t, s))
		err := setCapture(t, conn, "wal")
		require.ErrorContains(t, err, "max_slot_wal_keep_size = -1")
		require.Contains(t, hint(err), "ALTER SYSTEM SET max_slot_wal_keep_size")
		requireCapture(t, conn, "trigger")
	})
	exec(t, s.Conn(t, "postgres"), "ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'")
	exec(t, s.Conn(t, "postgres"), "SELECT pg_reload_conf()")

	t.Run("RoleWithoutReplication", func(t *testing.T) {
		// The slot functions belong to a role without REPLICATION (an
		// install by such a role, roles.sql not run).
		db := fixture.NewCurrentDatabase(t, s)
		conn := s.Conn(t, db)
		role, _ := s.CreateLoginRole(t, db, "norepl")
		exec(t, conn, "ALTER FUNCTION pgconsistency._wal_slot_changes(text, pg_lsn, integer, text) OWNER TO "+role)
		var problem, fix string
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT problem, fix FROM pgconsistency._wal_capture_problem()").Scan(&problem, &fix))
		require.Contains(t, problem, role+", the owner of pgconsistency's slot functions, which has neither REPLICATION nor SUPERUSER")
		require.Contains(t, fix, "Run sql/roles.sql as a superuser")
		require.Contains(t, fix, "GRANT rds_replication TO pgconsistency_capture")
		require.Contains(t, fix, "ALTER ROLE "+role+" REPLICATION")
		exec(t, conn, "ALTER FUNCTION pgconsistency._wal_slot_changes(text, pg_lsn, integer, text) OWNER TO CURRENT_USER")
	})

	t.Run("TableWithoutReplicaIdentity", func(t *testing.T) {
		db := fixture.NewCurrentDatabase(t, s)
		conn := s.Conn(t, db)
		incremental(t, conn)
		err := setCapture(t, conn, "wal")
		require.ErrorContains(t, err, "the WAL does not hold the key columns of the rows deleted from public.dataset_dependencies")
		require.Contains(t, hint(err), "ALTER TABLE public.dataset_dependencies REPLICA IDENTITY USING INDEX idx_dataset_dependencies;")
		require.Contains(t, hint(err), "ALTER TABLE public.dataset_references REPLICA IDENTITY USING INDEX idx_dataset_references;")
		requireCapture(t, conn, "trigger")
		var slots int
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pg_replication_slots").Scan(&slots))
		require.Zero(t, slots, "a refused set_capture leaves no slot behind")
		// The application's own writes to the refused table work: nothing
		// was published.
		exec(t, conn, "DELETE FROM public.dataset_dependencies WHERE downstream_dataset_id = fixture.dataset_id(21)")
		exec(t, conn, "UPDATE public.dataset_dependencies SET upstream_dataset_id = upstream_dataset_id WHERE downstream_dataset_id = fixture.dataset_id(22)")
		// No unique index to use: FULL.
		exec(t, conn, "DROP INDEX public.idx_dataset_dependencies")
		err = setCapture(t, conn, "wal")
		require.Contains(t, hint(err), "ALTER TABLE public.dataset_dependencies REPLICA IDENTITY FULL;")
	})
}

// TestWALCapture: the WAL capture through the faults that lose a
// capture's keys in practice. Each ends with the counts of every invariant
// equal to its query run whole, and what a fault made the capture miss
// healed by a reconcile and reported.
func TestWALCapture(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t, walCapture...)
	runWAL := func(name string, test func(*testing.T, *pgtest.Server, string, *pgx.Conn)) {
		t.Run(name, func(t *testing.T) {
			db, conn := walDatabase(t, s)
			test(t, s, db, conn)
		})
	}
	runWAL("KeysAndRefresh", testWALKeysAndRefresh)
	runWAL("KeyExpressions", testWALKeyExpressions)
	runWAL("ReadKilledBeforeTheKeysAreStored", testWALReadKilled)
	runWAL("SlotDropped", testWALSlotDropped)
	runWAL("Truncate", testWALTruncate)
	runWAL("ReplicaIdentityLost", testWALReplicaIdentityLost)
	runWAL("ApplicationWritesWork", testWALApplicationWrites)
	runWAL("BackToTriggers", testWALBackToTriggers)
	// Last: they stop the server.
	runWAL("PostgreSQLRestarted", testWALRestart)
}

// TestWALCaptureFailover: a standby promoted after the primary is gone has
// neither the slot nor the capture's unlogged keys; the capture creates the
// slot again and every invariant reconciles.
func TestWALCaptureFailover(t *testing.T) {
	t.Parallel()
	primary := pgtest.Start(t, walCapture...)
	db, conn := walDatabase(t, primary)
	breakSeed(t, conn, 4)
	refreshAll(t, conn)
	requireExact(t, conn)
	standby := primary.StartStandby(t)
	breakSeed(t, conn, 5) // committed on the primary, never read by its capture
	var lsn string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pg_current_wal_lsn()::text").Scan(&lsn))
	sconn := standby.Conn(t, db)
	require.Eventually(t, func() bool {
		var caught bool
		return sconn.QueryRow(t.Context(), "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", lsn).Scan(&caught) == nil && caught
	}, 30*time.Second, 20*time.Millisecond, "the standby replays the primary's WAL")
	primary.Stop(t)
	standby.Promote(t)
	nconn := standby.Conn(t, db)
	require.Eventually(t, func() bool {
		var recovery bool
		return nconn.QueryRow(t.Context(), "SELECT pg_is_in_recovery()").Scan(&recovery) == nil && !recovery
	}, 30*time.Second, 20*time.Millisecond)
	refreshAll(t, nconn)
	requireExact(t, nconn)
	requireSlotLost(t, nconn, "was missing (dropped, or this server was promoted from a standby")
	requireHealed(t, nconn, "dataset_seed_missing")
	// And it captures from then on.
	breakSeed(t, nconn, 6)
	refreshAll(t, nconn)
	requireExact(t, nconn)
	requireKind(t, nconn, "dataset_seed_missing", "incremental")
}

// TestWALCaptureSlotInvalidated: the capture stops reading (the collector
// is down, pg_cron is off) while the writes go on: the slot keeps WAL up to
// max_slot_wal_keep_size and no further, PostgreSQL invalidates it, and the
// next read creates it again and reconciles.
func TestWALCaptureSlotInvalidated(t *testing.T) {
	t.Parallel()
	const bound = 32 << 20
	s := pgtest.Start(t, pgtest.WithSetting("wal_level", "logical"), pgtest.WithSetting("max_slot_wal_keep_size", "32MB"),
		pgtest.WithSetting("max_wal_size", "32MB"), pgtest.WithSetting("min_wal_size", "32MB"))
	_, conn := walDatabase(t, s)
	breakSeed(t, conn, 7) // in the WAL, never read
	exec(t, conn, "CREATE TABLE public.filler (id bigint, pad text)")
	var status string
	var walBytes, maxWAL int64
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pg_size_bytes(current_setting('max_wal_size'))").Scan(&maxWAL))
	for i := range 40 {
		exec(t, conn, "INSERT INTO public.filler SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g")
		exec(t, conn, "SELECT pg_switch_wal()")
		exec(t, conn, "CHECKPOINT")
		require.NoError(t, conn.QueryRow(t.Context(),
			"SELECT coalesce(s.wal_status, 'missing'), (SELECT sum(size) FROM pg_ls_waldir()) FROM pg_replication_slots s").Scan(&status, &walBytes))
		// What the slot keeps is bounded: the WAL directory never holds more
		// than the bound beyond what the checkpoints keep anyway.
		require.LessOrEqual(t, walBytes, int64(bound)+maxWAL+3*16<<20, "WAL kept after %d rounds of writes", i+1)
		if status == "lost" {
			break
		}
	}
	require.Equal(t, "lost", status, "the slot is invalidated once it falls behind max_slot_wal_keep_size")
	refreshAll(t, conn)
	requireExact(t, conn)
	requireSlotLost(t, conn, "was invalidated: it fell more than max_slot_wal_keep_size (32MB) behind")
	requireHealed(t, conn, "dataset_seed_missing")
	breakSeed(t, conn, 8)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
}

func testWALKeysAndRefresh(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	// Nothing in the writers' transactions: no capture trigger.
	var triggers int
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgconsistency\\_capture\\_%'").Scan(&triggers))
	require.Zero(t, triggers)
	st := walStatus(t, conn)
	require.Equal(t, "wal", st.capture)
	require.Equal(t, "reserved", st.slotStatus)
	require.EqualValues(t, 1<<30, st.boundBytes)

	breakSeed(t, conn, 1)
	exec(t, conn, "DELETE FROM public.dataset_statistics WHERE dataset_id = fixture.dataset_id(2)")
	// Read by the plan of the changes: only the invariants whose tables
	// were written are listed, once their incremental_period (2 s) has
	// passed since their latest refresh (walDatabase's, just now).
	changesPlan := func() []string {
		rows, err := conn.Query(t.Context(), "SELECT name FROM pgconsistency.refresh_changes_plan()")
		require.NoError(t, err)
		changed, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		return changed
	}
	readAt := func() (at time.Time) {
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT read_at FROM pgconsistency.capture").Scan(&at))
		return at
	}
	before := readAt()
	require.Empty(t, changesPlan(), "within incremental_period of their latest refresh")
	// Nor was the slot read: at most once per the shortest
	// incremental_period (walDatabase's refresh read it just now).
	require.Equal(t, before, readAt(), "the changes loop read the slot within incremental_period of the previous read")
	exec(t, conn, "UPDATE pgconsistency.invariant SET incremental_period = '1 millisecond'")
	time.Sleep(5 * time.Millisecond)
	changed := changesPlan()
	require.True(t, readAt().After(before), "the slot read once incremental_period passed")
	require.Contains(t, changed, "dataset_seed_missing")
	require.Contains(t, changed, "dataset_statistics_missing")
	require.NotContains(t, changed, "derivative_dependencies_missing", "none of its tables was written")
	for _, name := range changed {
		exec(t, conn, "SELECT pgconsistency.refresh_invariant($1)", name)
	}
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	require.EqualValues(t, 1, status(t, conn)["dataset_seed_missing"].Anomalies)
	require.EqualValues(t, 1, status(t, conn)["dataset_statistics_missing"].Anomalies)
	st = walStatus(t, conn)
	require.NotNil(t, st.lagBytes)
	require.NotNil(t, st.retainedBytes)

	// A refresh that started 0.5 s after the read whose keys it took (the
	// plan, the refreshes listed before it) is due again at the next read,
	// 2 s after that one, although only 1.5 s passed since it started: not
	// one pass of the changes loop later, with its keys one read behind.
	exec(t, conn, "UPDATE pgconsistency.invariant SET incremental_period = '2 seconds'")
	exec(t, conn, "UPDATE pgconsistency.refresh_state SET last_started_at = clock_timestamp() - interval '1500 milliseconds'")
	exec(t, conn, "UPDATE pgconsistency.capture SET read_at = clock_timestamp() - interval '2 seconds'")
	breakSeed(t, conn, 3)
	changed = changesPlan()
	require.True(t, readAt().After(before), "read: 2 s since the previous read")
	require.Contains(t, changed, "dataset_seed_missing", "due at the read that follows the one its refresh took")
	for _, name := range changed {
		exec(t, conn, "SELECT pgconsistency.refresh_invariant($1)", name)
	}
	require.EqualValues(t, 2, status(t, conn)["dataset_seed_missing"].Anomalies)
	requireExact(t, conn)
}

// testWALKeyExpressions: the decoded rows are cut to the columns a key
// expression reads, found by name: a key of two columns, one of them
// quoted, and an expression that reads the row whole, through inserts,
// a key moved by an UPDATE (its old and its new key) and deletes (the old
// row from the replica identity). The snapshots must hold exactly the keys
// of the queries.
func testWALKeyExpressions(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	exec(t, conn, `CREATE TABLE public."Odd Rows" ("Tenant" text NOT NULL, id integer NOT NULL, note text, PRIMARY KEY ("Tenant", id))`)
	exec(t, conn, `CREATE TABLE public.whole_rows (id integer PRIMARY KEY, v text)`)
	exec(t, conn, `ALTER TABLE public.whole_rows REPLICA IDENTITY FULL`)
	exec(t, conn, `INSERT INTO public."Odd Rows" VALUES ('a', 1, 'ok'), ('a', 2, 'bad'), ('b', 1, 'bad'), ('b', 2, 'ok')`)
	exec(t, conn, `INSERT INTO public.whole_rows VALUES (1, 'ok'), (2, 'bad'), (3, 'bad')`)
	// A text column alone is taken as its JSON string: escapes undone.
	exec(t, conn, `CREATE TABLE public.text_keys (k varchar(20) PRIMARY KEY, v text)`)
	exec(t, conn, `INSERT INTO public.text_keys VALUES ('a"b', 'ok'), (E'c\\d', 'ok'), ('é ü', 'ok'), (E'tab\there', 'bad')`)
	// A key column after a dropped column and a generated one, and an old
	// row that holds only the replica identity's column: the read takes
	// the key by its place in a whole row, by its name elsewhere.
	exec(t, conn, `CREATE TABLE public.shifted_keys (gone integer, g text GENERATED ALWAYS AS ('x') STORED, id integer PRIMARY KEY, k text NOT NULL, v text)`)
	exec(t, conn, `ALTER TABLE public.shifted_keys DROP COLUMN gone`)
	exec(t, conn, `CREATE UNIQUE INDEX shifted_keys_k ON public.shifted_keys (k)`)
	exec(t, conn, `ALTER TABLE public.shifted_keys REPLICA IDENTITY USING INDEX shifted_keys_k`)
	exec(t, conn, `INSERT INTO public.shifted_keys (id, k, v) VALUES (1, 'p', 'ok'), (2, 'q', 'bad'), (3, 's', 'ok')`)
	exec(t, conn, `SELECT pgconsistency.define_invariant('odd_rows_bad',
		$q$SELECT o."Tenant" || '/' || o.id AS key FROM public."Odd Rows" o WHERE o.note = 'bad'$q$,
		keys => '{"public.\"Odd Rows\"": "r.\"Tenant\" || ''/'' || r.id"}')`)
	exec(t, conn, `SELECT pgconsistency.define_invariant('whole_rows_bad',
		$q$SELECT w.id::text AS key FROM public.whole_rows w WHERE w.v = 'bad'$q$,
		keys => '{"public.whole_rows": "(r).id::text"}')`)
	exec(t, conn, `SELECT pgconsistency.define_invariant('text_keys_bad',
		$q$SELECT k.k::text AS key FROM public.text_keys k WHERE k.v = 'bad'$q$,
		keys => '{"public.text_keys": "r.k::text"}')`)
	exec(t, conn, `SELECT pgconsistency.define_invariant('shifted_keys_bad',
		$q$SELECT s.k AS key FROM public.shifted_keys s WHERE s.v = 'bad'$q$,
		keys => '{"public.shifted_keys": "r.k"}')`)
	for _, name := range []string{"odd_rows_bad", "whole_rows_bad", "text_keys_bad", "shifted_keys_bad"} {
		exec(t, conn, "SELECT pgconsistency.set_refresh_mode($1, 'incremental')", name)
	}
	var fixes int
	require.NoError(t, conn.QueryRow(t.Context(),
		`SELECT count(fix) FROM pgconsistency.wal_capture_tables() WHERE relation IN ('public."Odd Rows"', 'public.whole_rows')`).Scan(&fixes))
	require.Zero(t, fixes, "both tables' replica identities hold their key columns")
	refreshAll(t, conn)
	exec(t, conn, "UPDATE pgconsistency.invariant SET incremental_period = '1 millisecond'")

	exec(t, conn, `INSERT INTO public."Odd Rows" VALUES ('c', 1, 'bad')`)
	exec(t, conn, `UPDATE public."Odd Rows" SET note = 'bad' WHERE "Tenant" = 'a' AND id = 1`)
	exec(t, conn, `UPDATE public."Odd Rows" SET "Tenant" = 'd' WHERE "Tenant" = 'b' AND id = 1`) // b/1 goes, d/1 comes
	exec(t, conn, `DELETE FROM public."Odd Rows" WHERE "Tenant" = 'a' AND id = 2`)
	exec(t, conn, `UPDATE public.whole_rows SET id = 4 WHERE id = 3`) // 3 goes, 4 comes
	exec(t, conn, `DELETE FROM public.whole_rows WHERE id = 2`)
	exec(t, conn, `UPDATE public.whole_rows SET v = 'bad' WHERE id = 1`)
	exec(t, conn, `UPDATE public.text_keys SET v = 'bad' WHERE v = 'ok'`)
	exec(t, conn, `DELETE FROM public.text_keys WHERE k = E'tab\there'`)
	exec(t, conn, `UPDATE public.shifted_keys SET v = 'bad' WHERE k = 'p'`)
	exec(t, conn, `DELETE FROM public.shifted_keys WHERE k = 'q'`) // the old row: k alone
	var statement string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency._wal_read_statement()").Scan(&statement))
	require.Contains(t, statement, `CASE WHEN tuple.columns -> 2 ->> 'name' = 'k'`, "k's place: the dropped column left out, the generated one counted")
	time.Sleep(5 * time.Millisecond)
	rows, err := conn.Query(t.Context(), "SELECT name FROM pgconsistency.refresh_changes_plan()")
	require.NoError(t, err)
	changed, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Subset(t, changed, []string{"odd_rows_bad", "whole_rows_bad", "text_keys_bad", "shifted_keys_bad"})
	for _, name := range changed {
		exec(t, conn, "SELECT pgconsistency.refresh_invariant($1)", name)
	}
	requireKind(t, conn, "odd_rows_bad", "incremental")
	requireKind(t, conn, "whole_rows_bad", "incremental")
	require.Equal(t, []string{"a/1", "c/1", "d/1"}, viewKeys(t, conn, "odd_rows_bad"))
	require.Equal(t, []string{"1", "4"}, viewKeys(t, conn, "whole_rows_bad"))
	requireKind(t, conn, "text_keys_bad", "incremental")
	require.ElementsMatch(t, []string{"a\"b", "c\\d", "é ü"}, viewKeys(t, conn, "text_keys_bad"))
	requireKind(t, conn, "shifted_keys_bad", "incremental")
	require.Equal(t, []string{"p"}, viewKeys(t, conn, "shifted_keys_bad"))
}

func testWALReadKilled(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	breakSeed(t, conn, 1)
	_, storedBefore := slotPosition(t, conn)
	// The read decodes the changes, then waits to store their keys: killed
	// there, it must neither store them nor let the slot move past them.
	locker := s.Conn(t, db)
	tx, err := locker.Begin(t.Context())
	require.NoError(t, err)
	_, err = tx.Exec(t.Context(), "LOCK TABLE pgconsistency.captured_key IN ACCESS EXCLUSIVE MODE")
	require.NoError(t, err)
	reader := s.Conn(t, db)
	var pid int
	require.NoError(t, reader.QueryRow(t.Context(), "SELECT pg_backend_pid()").Scan(&pid))
	done := make(chan error, 1)
	go func() {
		_, err := reader.Exec(context.Background(), "SELECT pgconsistency.capture_wal()")
		done <- err
	}()
	require.Eventually(t, func() bool {
		var waiting bool
		return conn.QueryRow(t.Context(), "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid).Scan(&waiting) == nil && waiting
	}, 30*time.Second, 10*time.Millisecond, "the read waits to store its keys")
	exec(t, conn, "SELECT pg_terminate_backend($1)", pid)
	require.Error(t, <-done)
	// Gone, with its locks: a read that finds another one running skips
	// (the keys wait for the next), which is not what this test is about.
	require.Eventually(t, func() bool {
		var n int
		return conn.QueryRow(t.Context(), "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid).Scan(&n) == nil && n == 0
	}, 30*time.Second, 10*time.Millisecond)
	require.NoError(t, tx.Rollback(t.Context()))
	slot, stored := slotPosition(t, conn)
	require.Equal(t, storedBefore, stored, "a read killed before its keys were stored stores no position")
	var behind bool
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT $1::pg_lsn <= $2::pg_lsn", slot, stored).Scan(&behind))
	require.True(t, behind, "the slot (%s) never moves past the keys stored (%s)", slot, stored)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	require.EqualValues(t, 1, status(t, conn)["dataset_seed_missing"].Anomalies)
}

func testWALSlotDropped(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	breakSeed(t, conn, 2) // in the slot that goes
	exec(t, conn, "SELECT pg_drop_replication_slot(slot_name) FROM pgconsistency.capture")
	breakSeed(t, conn, 3) // while there is no slot
	refreshAll(t, conn)
	requireExact(t, conn)
	requireSlotLost(t, conn, "was missing")
	requireHealed(t, conn, "dataset_seed_missing")
	require.EqualValues(t, 2, status(t, conn)["dataset_seed_missing"].Anomalies)
	breakSeed(t, conn, 9)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
}

func testWALTruncate(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	exec(t, conn, "TRUNCATE public.dataset_dependencies")
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "derivative_dependencies_missing", "reconcile")
	requireHealed(t, conn, "derivative_dependencies_missing")
	requireKind(t, conn, "dataset_seed_missing", "incremental") // it reads no truncated table
}

// testWALReplicaIdentityLost: a captured table whose replica identity no
// longer holds the key columns (changed after set_capture) makes the
// invariants that read it reconcile at each refresh, saying which
// statement restores it; the others stay incremental.
func testWALReplicaIdentityLost(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	exec(t, conn, "ALTER TABLE public.dataset_dependencies REPLICA IDENTITY NOTHING")
	var reason *string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency._reconcile_reason('derivative_dependencies_missing')").Scan(&reason))
	require.NotNil(t, reason)
	require.Contains(t, *reason, "the WAL does not hold the key columns of the rows deleted from public.dataset_dependencies (run ALTER TABLE public.dataset_dependencies REPLICA IDENTITY")
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency._reconcile_reason('dataset_seed_missing')").Scan(&reason))
	require.Nil(t, reason, "dataset_seed_missing reads no dataset_dependencies")
	breakSeed(t, conn, 4)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "derivative_dependencies_missing", "reconcile")
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	rows, err := conn.Query(t.Context(), "SELECT fix FROM pgconsistency.wal_capture_tables() WHERE fix IS NOT NULL")
	require.NoError(t, err)
	fixes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Len(t, fixes, 1)
	exec(t, conn, fixes[0])
	refreshAll(t, conn)
	requireKind(t, conn, "derivative_dependencies_missing", "incremental")
}

// testWALApplicationWrites: with the WAL capture on, every write of the
// application to every captured table works (a table published without a
// replica identity would refuse UPDATE and DELETE; this capture publishes
// nothing).
func testWALApplicationWrites(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	rows, err := conn.Query(t.Context(), "SELECT relation FROM pgconsistency.wal_capture_tables()")
	require.NoError(t, err)
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Len(t, tables, 7)
	for _, table := range tables {
		col := map[string]string{"public.accounts": "id", "public.dataset_dependencies": "downstream_dataset_id"}[table]
		if col == "" {
			col = "dataset_id"
		}
		_, err := conn.Exec(t.Context(), fmt.Sprintf("UPDATE %s SET %s = %s WHERE %s IN (SELECT %s FROM %s LIMIT 1)", table, col, col, col, col, table))
		require.NoError(t, err, "UPDATE %s", table)
	}
	exec(t, conn, "DELETE FROM public.dataset_dependencies WHERE downstream_dataset_id = fixture.dataset_id(25)")
	exec(t, conn, "DELETE FROM public.dataset_statistics WHERE dataset_id = fixture.dataset_id(10)")
	exec(t, conn, "DELETE FROM public.dataset_references WHERE dataset_id = fixture.dataset_id(10)")
	refreshAll(t, conn)
	requireExact(t, conn)
	require.EqualValues(t, 1, status(t, conn)["derivative_dependencies_missing"].Anomalies)
}

func testWALBackToTriggers(t *testing.T, _ *pgtest.Server, _ string, conn *pgx.Conn) {
	require.NoError(t, setCapture(t, conn, "trigger"))
	requireCapture(t, conn, "trigger")
	var slots, triggers int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()").Scan(&slots))
	require.Zero(t, slots, "the slot goes with the WAL capture")
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgconsistency\\_capture\\_%'").Scan(&triggers))
	require.Positive(t, triggers)
	breakSeed(t, conn, 1)
	refreshAll(t, conn) // the reconcile of the change of capture
	breakSeed(t, conn, 2)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
}

func testWALRestart(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	// A clean restart between the write and the read: the slot keeps the
	// changes, the next refresh is incremental and exact.
	breakSeed(t, conn, 1)
	s.Stop(t)
	s.StartAgain(t)
	conn = s.Conn(t, db)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	// A crash: the capture's unlogged tables are emptied; every invariant
	// reconciles, exact.
	breakSeed(t, conn, 2)
	exec(t, conn, "SELECT pgconsistency.capture_wal()") // the keys are read, then lost with the crash
	s.StopImmediate(t)
	s.StartAgain(t)
	conn = s.Conn(t, db)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "reconcile")
	require.EqualValues(t, 2, status(t, conn)["dataset_seed_missing"].Anomalies)
}

// walDatabase: a database of today's schema with clean data, every dataset
// invariant in incremental mode under the WAL capture, reconciled once.
func walDatabase(t *testing.T, s *pgtest.Server) (string, *pgx.Conn) {
	t.Helper()
	db := fixture.NewCurrentDatabase(t, s)
	conn := s.Conn(t, db)
	incremental(t, conn)
	useWALCapture(t, conn)
	refreshAll(t, conn)
	requireExact(t, conn)
	for name, st := range status(t, conn) {
		require.Zero(t, st.Anomalies, name)
	}
	return db, conn
}

func incremental(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode(name, 'incremental') FROM pgconsistency.invariant")
}

func setCapture(t *testing.T, conn *pgx.Conn, method string) error {
	t.Helper()
	_, err := conn.Exec(t.Context(), "SELECT pgconsistency.set_capture($1)", method)
	return err
}

func requireCapture(t *testing.T, conn *pgx.Conn, method string) {
	t.Helper()
	var got string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT method FROM pgconsistency.capture").Scan(&got))
	require.Equal(t, method, got)
}

func breakSeed(t *testing.T, conn *pgx.Conn, dataset int) {
	t.Helper()
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = fixture.dataset_id($1) AND event_type = 'Seed'", dataset)
}

// requireExact: every invariant's count is what its query, run whole,
// returns now (what a full refresh would store).
func requireExact(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT name, query FROM pgconsistency.invariant ORDER BY name")
	require.NoError(t, err)
	type inv struct{ name, query string }
	invs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (inv, error) {
		var i inv
		return i, r.Scan(&i.name, &i.query)
	})
	require.NoError(t, err)
	st := status(t, conn)
	var diffs []string
	for _, i := range invs {
		var want int64
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM ("+i.query+") q").Scan(&want))
		if st[i.name].Anomalies != want {
			diffs = append(diffs, fmt.Sprintf("%s: %d in the snapshot, %d by its query", i.name, st[i.name].Anomalies, want))
		}
	}
	require.Empty(t, diffs)
}

func requireKind(t *testing.T, conn *pgx.Conn, invariant, kind string) {
	t.Helper()
	var got string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT last_refresh_kind FROM pgconsistency.status WHERE invariant = $1", invariant).Scan(&got))
	require.Equal(t, kind, got, invariant)
}

func requireHealed(t *testing.T, conn *pgx.Conn, invariant string) {
	t.Helper()
	var healed int64
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT healed_anomalies FROM pgconsistency.status WHERE invariant = $1", invariant).Scan(&healed))
	require.Positive(t, healed, "the reconcile of %s reports what the capture missed", invariant)
}

func requireSlotLost(t *testing.T, conn *pgx.Conn, reason string) {
	t.Helper()
	st := walStatus(t, conn)
	require.NotNil(t, st.slotLostReason)
	require.Contains(t, *st.slotLostReason, reason)
	require.Equal(t, "reserved", st.slotStatus, "created again")
}

type walStatusRow struct {
	capture, slotStatus     string
	retainedBytes, lagBytes *int64
	boundBytes              int64
	slotLostReason          *string
}

func walStatus(t *testing.T, conn *pgx.Conn) walStatusRow {
	t.Helper()
	var r walStatusRow
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT capture, capture_slot_status, capture_wal_retained_bytes,
		capture_wal_lag_bytes, capture_wal_bound_bytes, capture_slot_lost_reason
		FROM pgconsistency.status WHERE invariant = 'dataset_seed_missing'`).Scan(
		&r.capture, &r.slotStatus, &r.retainedBytes, &r.lagBytes, &r.boundBytes, &r.slotLostReason))
	return r
}

// slotPosition: where the slot is (confirmed_flush_lsn), and up to where
// the capture stored the keys (capture.wal_position).
func slotPosition(t *testing.T, conn *pgx.Conn) (slot, stored string) {
	t.Helper()
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT s.confirmed_flush_lsn::text, c.wal_position::text
		FROM pgconsistency.capture c JOIN pg_replication_slots s ON s.slot_name = c.slot_name`).Scan(&slot, &stored))
	return slot, stored
}

// hint is the HINT of a PostgreSQL error, "" for any other error.
func hint(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Hint
	}
	return ""
}

// TestWALCaptureRole: pgconsistency installed by an owner that is not a
// superuser and has no REPLICATION. The WAL capture is refused, naming that
// role and sql/roles.sql; once roles.sql (run by a superuser) created
// pgconsistency_capture and gave it the slot functions, the capture works,
// though neither the owner nor the collector's refresher has REPLICATION
// nor may call the slot functions themselves; a later install.sql by the
// owner (an upgrade) keeps it so.
func TestWALCaptureRole(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t, walCapture...)
	db := s.CreateDatabase(t, "")
	s.PsqlFile(t, db, fixture.Path("testdata/schema.sql"))
	s.PsqlFile(t, db, fixture.Path("testdata/fixtures/clean.sql"))
	admin := s.Conn(t, db)
	owner, password := s.CreateLoginRole(t, db, "pgc_owner_")
	ownerIdent := pgx.Identifier{owner}.Sanitize()
	exec(t, admin, "GRANT CREATE ON DATABASE "+pgx.Identifier{db}.Sanitize()+" TO "+ownerIdent)
	// The application's owner installs pgconsistency, as is common.
	rows, err := admin.Query(t.Context(), `SELECT format('ALTER TABLE %s OWNER TO %I', oid::regclass, $1::text)
		FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')`, owner)
	require.NoError(t, err)
	alters, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	for _, alter := range alters {
		exec(t, admin, alter)
	}
	u, err := url.Parse(s.DSN(db))
	require.NoError(t, err)
	u.User = url.UserPassword(owner, password)
	installAsOwner := func() {
		out, err := osexec.Command("psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", u.String(), "-f", fixture.Path("sql/install.sql")).CombinedOutput()
		require.NoError(t, err, "install.sql as %s: %s", owner, out)
	}
	installAsOwner()
	ownerConn, err := pgx.Connect(t.Context(), u.String())
	require.NoError(t, err)
	t.Cleanup(func() { _ = ownerConn.Close(context.Background()) })
	exec(t, ownerConn, "SELECT pgconsistency.set_refresh_mode(name, 'incremental') FROM pgconsistency.invariant")
	rows, err = ownerConn.Query(t.Context(), "SELECT fix FROM pgconsistency.wal_capture_tables() WHERE fix IS NOT NULL")
	require.NoError(t, err)
	fixes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	for _, fix := range fixes {
		exec(t, ownerConn, fix)
	}

	// Refused, naming the role and the fix.
	err = setCapture(t, ownerConn, "wal")
	require.ErrorContains(t, err, owner+", the owner of pgconsistency's slot functions, which has neither REPLICATION nor SUPERUSER")
	var pgErr *pgconn.PgError
	require.ErrorAs(t, err, &pgErr)
	require.Contains(t, pgErr.Hint, "Run sql/roles.sql as a superuser: it creates the role pgconsistency_capture (NOLOGIN REPLICATION)")
	requireCapture(t, ownerConn, "trigger")

	s.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	var login, replication bool
	require.NoError(t, admin.QueryRow(t.Context(),
		"SELECT rolcanlogin, rolreplication FROM pg_roles WHERE rolname = 'pgconsistency_capture'").Scan(&login, &replication))
	require.False(t, login, "pgconsistency_capture cannot log in")
	require.True(t, replication, "pgconsistency_capture has REPLICATION")
	requireSlotFunctionsOwner := func() {
		t.Helper()
		var owners []string
		rows, err := admin.Query(t.Context(), `SELECT DISTINCT proowner::regrole::text FROM pg_proc
			WHERE pronamespace = 'pgconsistency'::regnamespace
			  AND proname IN ('_wal_create_slot', '_wal_drop_slot', '_wal_advance_slot', '_wal_slot_changes')`)
		require.NoError(t, err)
		owners, err = pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		require.Equal(t, []string{"pgconsistency_capture"}, owners)
	}
	requireSlotFunctionsOwner()
	// The capture role without REPLICATION: the fix names it.
	exec(t, admin, "ALTER ROLE pgconsistency_capture NOREPLICATION")
	err = setCapture(t, ownerConn, "wal")
	require.ErrorContains(t, err, "pgconsistency_capture, the owner of pgconsistency's slot functions, which has neither REPLICATION nor SUPERUSER")
	require.ErrorAs(t, err, &pgErr)
	require.Contains(t, pgErr.Hint, "ALTER ROLE pgconsistency_capture REPLICATION;")
	exec(t, admin, "ALTER ROLE pgconsistency_capture REPLICATION")
	require.NoError(t, setCapture(t, ownerConn, "wal"))
	refreshAll(t, ownerConn)

	// Neither the owner nor the refresher has REPLICATION, nor may call
	// the slot functions or PostgreSQL's directly.
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT rolreplication FROM pg_roles WHERE rolname = $1", owner).Scan(&replication))
	require.False(t, replication, "the schema's owner has no REPLICATION")
	_, err = ownerConn.Exec(t.Context(), "SELECT pg_create_logical_replication_slot('pgc_owner_slot', 'wal2json')")
	require.ErrorContains(t, err, "must be superuser or replication role to use replication slots")
	refresher, _ := loginAs(t, s, admin, db, "GRANT pgconsistency_refresher TO ROLE")
	denied(t, refresher, "SELECT * FROM pgconsistency._wal_slot_changes('pgconsistency_x', NULL, NULL, 'public.accounts')", "function _wal_slot_changes")
	_, err = refresher.Exec(t.Context(), "SELECT pg_logical_slot_peek_changes('pgconsistency_x', NULL, NULL)")
	require.ErrorContains(t, err, "must be superuser or replication role to use replication slots")

	// The refresher runs the changes loop: the capture reads the slot as
	// pgconsistency_capture.
	exec(t, admin, "UPDATE pgconsistency.invariant SET incremental_period = '1 millisecond'")
	refreshChanges := func() {
		t.Helper()
		rows, err := refresher.Query(t.Context(), "SELECT name FROM pgconsistency.refresh_changes_plan()")
		require.NoError(t, err)
		changed, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		require.Contains(t, changed, "dataset_seed_missing")
		for _, name := range changed {
			exec(t, refresher, "SELECT pgconsistency.refresh_invariant($1)", name)
		}
	}
	breakSeed(t, admin, 1)
	time.Sleep(5 * time.Millisecond)
	refreshChanges()
	requireKind(t, admin, "dataset_seed_missing", "incremental")
	require.EqualValues(t, 1, status(t, admin)["dataset_seed_missing"].Anomalies)

	// An upgrade by the owner keeps the slot functions with the capture role.
	installAsOwner()
	requireSlotFunctionsOwner()
	breakSeed(t, admin, 2)
	time.Sleep(5 * time.Millisecond)
	refreshChanges()
	require.EqualValues(t, 2, status(t, admin)["dataset_seed_missing"].Anomalies)
	requireExact(t, admin)
}

//go:build integration

package sqltest_test

import (
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestReadColumns (0.7.5): define_invariant records the columns each
// invariant reads of each table, and an UPDATE gives an invariant in
// incremental mode the keys of the rows whose values of those columns
// changed, and no others: with the capture triggers, and with the WAL
// capture where the WAL holds those columns of the old row (the replica
// identity's columns, or the whole row under REPLICA IDENTITY FULL). A key
// captured without columns (before 0.7.5, an INSERT, a DELETE) goes to
// every invariant of its source. Each ends with the counts of every
// invariant equal to its query run whole.
func TestReadColumns(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t, walCapture...)
	t.Run("Triggers", func(t *testing.T) { testReadColumns(t, s, "trigger", false) })
	t.Run("WALReplicaIdentityIndex", func(t *testing.T) { testReadColumns(t, s, "wal", false) })
	t.Run("WALReplicaIdentityFull", func(t *testing.T) { testReadColumns(t, s, "wal", true) })
}

func testReadColumns(t *testing.T, s *pgtest.Server, capture string, full bool) {
	db := fixture.NewCurrentDatabase(t, s)
	conn := s.Conn(t, db)
	// An invariant that reads the statistics' rows whole: every column.
	exec(t, conn, `SELECT pgconsistency.define_invariant('statistics_negative',
		$q$SELECT s.dataset_id::text AS key, pg_catalog.to_jsonb(s) ->> 'num_records' AS num_records
		     FROM public.dataset_statistics s WHERE s.num_records < 0$q$,
		keys => '{"public.dataset_statistics": "r.dataset_id"}')`) // a source of its own
	readColumns := func(invariant, relation string) *string {
		var cols *string
		require.NoError(t, conn.QueryRow(t.Context(), `SELECT read_columns::text FROM pgconsistency.invariant_key_source
			WHERE invariant = $1 AND relation = $2`, invariant, relation).Scan(&cols))
		return cols
	}
	for _, c := range []struct{ invariant, relation, want string }{
		{"dataset_statistics_missing", "public.dataset_statistics", "{dataset_id}"},
		{"dataset_statistics_missing", "public.dataset_entries", "{dataset_id,dataset_name,owner_name}"},
		{"dataset_head_ref_mismatch", "public.dataset_references", "{block_hash_bin,block_ref_name,dataset_id}"},
		{"dataset_seed_missing", "public.dataset_entries", "{dataset_id}"},
		{"dataset_owner_missing", "public.accounts", "{id}"},
	} {
		got := readColumns(c.invariant, c.relation)
		require.NotNil(t, got, "%s, %s", c.invariant, c.relation)
		require.Equal(t, c.want, *got, "%s, %s", c.invariant, c.relation)
	}
	require.Nil(t, readColumns("statistics_negative", "public.dataset_statistics"), "a query that reads the row whole reads every column")

	incremental(t, conn)
	if capture == "wal" {
		if full {
			for _, table := range []string{"public.dataset_statistics", "public.dataset_references", "public.dataset_entries"} {
				exec(t, conn, "ALTER TABLE "+table+" REPLICA IDENTITY FULL")
			}
		}
		useWALCapture(t, conn) // the others: their unique index on (dataset_id, block_ref_name), or their primary key
	}
	refreshAll(t, conn)
	requireExact(t, conn)
	exec(t, conn, "UPDATE pgconsistency.invariant SET incremental_period = '1 millisecond'")

	ds := func(i int) string { return fixture.DatasetID(i) }
	exec(t, conn, "UPDATE public.dataset_statistics SET num_records = num_records + 1 WHERE dataset_id = $1", ds(1))
	exec(t, conn, "UPDATE public.dataset_references SET block_hash_bin = sha256('elsewhere') WHERE dataset_id = $1 AND block_ref_name = 'head'", ds(2))
	exec(t, conn, "UPDATE public.dataset_entries SET dataset_name = dataset_name || '.renamed' WHERE dataset_id = $1", ds(3))
	exec(t, conn, "UPDATE public.dataset_statistics SET block_ref_name = block_ref_name WHERE dataset_id = $1", ds(4)) // no value changes
	// A key as 0.7.4 captured it: no columns.
	exec(t, conn, `INSERT INTO pgconsistency.captured_key (source, key)
		SELECT c.id, $1 FROM pgconsistency.capture_source c
		 WHERE c.relation = 'public.dataset_statistics' AND c.key_expression = 'r.dataset_id::text'`, ds(5))

	// The entries' rename: the invariants that read dataset_name (for the
	// details of an anomaly). With the WAL capture and the primary key as
	// replica identity, dataset_name is not in the old row: it counts as
	// changed, which gives the same keys.
	renamed := []string{"dataset_head_ref_missing", "dataset_key_blocks_missing", "dataset_owner_missing", "dataset_root_has_upstream",
		"dataset_statistics_missing", "derivative_dependencies_missing"}
	want := map[string][]string{}
	for _, inv := range renamed {
		want[inv] = append(want[inv], ds(3))
	}
	want["dataset_head_ref_mismatch"] = append(want["dataset_head_ref_mismatch"], ds(2))
	want["statistics_negative"] = []string{ds(1), ds(4)} // every column: each updated row
	for _, inv := range []string{"dataset_statistics_missing", "dataset_statistics_duplicated", "dataset_ref_name_unknown"} {
		want[inv] = append(want[inv], ds(5))
	}
	for inv := range want {
		slices.Sort(want[inv])
		want[inv] = slices.Compact(want[inv])
	}

	time.Sleep(5 * time.Millisecond)
	rows, err := conn.Query(t.Context(), "SELECT name FROM pgconsistency.refresh_changes_plan()")
	require.NoError(t, err)
	listed, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	rows, err = conn.Query(t.Context(), "SELECT invariant, key FROM pgconsistency.pending_key ORDER BY 1, 2")
	require.NoError(t, err)
	got := map[string][]string{}
	for rows.Next() {
		var inv, key string
		require.NoError(t, rows.Scan(&inv, &key))
		got[inv] = append(got[inv], key)
	}
	require.NoError(t, rows.Err())
	require.Equal(t, want, got, "the keys each invariant re-checks")
	require.ElementsMatch(t, slices.Collect(maps.Keys(want)), listed, "the invariants the changes loop lists")
	for _, name := range listed {
		exec(t, conn, "SELECT pgconsistency.refresh_invariant($1)", name)
		requireKind(t, conn, name, "incremental")
	}
	requireExact(t, conn)
	require.EqualValues(t, 1, status(t, conn)["dataset_head_ref_mismatch"].Anomalies)
	if capture != "wal" {
		return
	}
	// The read statement is kept between reads, headed by the oids of the
	// tables it was built for, and built again once _install_capture ran.
	cached := func() *string {
		var stmt *string
		require.NoError(t, conn.QueryRow(t.Context(), "SELECT read_statement FROM pgconsistency.capture").Scan(&stmt))
		return stmt
	}
	stmt := cached()
	require.NotNil(t, stmt, "the statement of the latest read")
	require.True(t, strings.HasPrefix(*stmt, "/* relations: "), "headed by its tables' oids: %.40s", *stmt)
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode('dataset_owner_missing', 'full')")
	require.Nil(t, cached(), "emptied by set_refresh_mode (_install_capture)")
	exec(t, conn, "SELECT pgconsistency.capture_wal()")
	stmt = cached()
	require.NotNil(t, stmt, "built again at the next read")
	head := func(stmt string) string { h, _, _ := strings.Cut(stmt, "*/"); return h }
	// A table created again (a migration that rewrites it) has another
	// oid: the next read builds the statement again.
	old := head(*stmt)
	exec(t, conn, `BEGIN;
		CREATE TABLE public.accounts_new (LIKE public.accounts INCLUDING ALL);
		INSERT INTO public.accounts_new SELECT * FROM public.accounts;
		DROP TABLE public.accounts;
		ALTER TABLE public.accounts_new RENAME TO accounts;
		COMMIT`)
	exec(t, conn, "SELECT pgconsistency.capture_wal()")
	stmt = cached()
	require.NotNil(t, stmt)
	require.NotEqual(t, old, head(*stmt), "the statement of the table before")
	// A read that keeps the statement builds nothing again: the TOAST rows
	// of pgconsistency.capture (the statement is some 27 kB) stay the same;
	// built again, it is written again.
	var toast string
	require.NoError(t, conn.QueryRow(t.Context(),
		`SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'pgconsistency.capture'::regclass`).Scan(&toast))
	toastRows := func() string {
		var rows *string
		require.NoError(t, conn.QueryRow(t.Context(),
			`SELECT string_agg(chunk_id::text || ':' || chunk_seq || ':' || xmin::text, ' ' ORDER BY chunk_id, chunk_seq) FROM `+toast).Scan(&rows))
		require.NotNil(t, rows, "the statement is TOASTed: else the checks below prove nothing")
		return *rows
	}
	before := toastRows()
	exec(t, conn, "UPDATE pgconsistency.capture SET read_statement = NULL")
	exec(t, conn, "SELECT pgconsistency.capture_wal()")
	rebuilt := toastRows()
	require.NotEqual(t, before, rebuilt, "a statement built again is written")
	exec(t, conn, "SELECT pgconsistency.capture_wal()")
	require.Equal(t, rebuilt, toastRows(), "a kept statement is not built again at every read")
	// Every run of install.sql empties it (_install_capture): another
	// release's statement is never run by this one.
	out, err := psqlFile(t, s, db, fixture.Path("sql/install.sql"))
	require.NoError(t, err, out)
	require.Nil(t, cached(), "emptied by install.sql")
	exec(t, conn, "SELECT pgconsistency.capture_wal()")
	require.NotNil(t, cached(), "built again at the next read")
}

// TestReadColumnsColumnRenamed: the capture triggers compare an UPDATE on
// the columns the invariants read, by name. A migration that renames one
// or drops one must not make the application's UPDATE fail: the trigger
// takes every updated row's keys instead, until the invariants are defined
// again.
func TestReadColumnsColumnRenamed(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t)
	db := fixture.NewCurrentDatabase(t, s)
	conn := s.Conn(t, db)
	incremental(t, conn)
	refreshAll(t, conn)
	// sourceKeys: the keys captured for a dataset from dataset_entries,
	// none of them with the columns compared.
	sourceKeys := func(key string) int {
		t.Helper()
		var keys, tagged int
		require.NoError(t, conn.QueryRow(t.Context(), `SELECT count(*), count(k.read_columns) FROM pgconsistency.captured_key k
			JOIN pgconsistency.capture_source c ON c.id = k.source
			WHERE c.relation = 'public.dataset_entries' AND k.key = $1`, key).Scan(&keys, &tagged))
		require.Zero(t, tagged, "no columns compared")
		return keys
	}
	exec(t, conn, "ALTER TABLE public.dataset_entries RENAME COLUMN dataset_name TO name")
	exec(t, conn, "UPDATE public.dataset_entries SET kind = kind WHERE dataset_id = $1", fixture.DatasetID(6))
	require.Equal(t, 1, sourceKeys(fixture.DatasetID(6)), "the updated entry's key, for every invariant of the source")
	var keys int
	exec(t, conn, "ALTER TABLE public.dataset_entries RENAME COLUMN name TO dataset_name")
	exec(t, conn, "UPDATE public.dataset_entries SET kind = kind WHERE dataset_id = $1", fixture.DatasetID(7))
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT count(*) FROM pgconsistency.captured_key k WHERE k.key = $1`,
		fixture.DatasetID(7)).Scan(&keys))
	require.Zero(t, keys, "the columns back: an UPDATE that changed nothing read gives no key")
	// Dropped, then added again under its name (at another place): not the
	// column compared either.
	exec(t, conn, "ALTER TABLE public.dataset_entries DROP COLUMN dataset_name")
	exec(t, conn, "UPDATE public.dataset_entries SET kind = kind WHERE dataset_id = $1", fixture.DatasetID(8))
	require.Equal(t, 1, sourceKeys(fixture.DatasetID(8)), "dropped: the updated entry's key")
	exec(t, conn, "ALTER TABLE public.dataset_entries ADD COLUMN dataset_name character varying(100)")
	exec(t, conn, "UPDATE public.dataset_entries SET kind = kind WHERE dataset_id = $1", fixture.DatasetID(9))
	require.Equal(t, 1, sourceKeys(fixture.DatasetID(9)), "added again: the updated entry's key")
}

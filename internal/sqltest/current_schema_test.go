//go:build integration

package sqltest_test

import (
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestCurrentSchema covers the dataset pack on the service's schema of today
// (testdata/schema.sql): all thirteen invariants against fixtures that each
// break known datasets, the incident's whole shape, and the older schema,
// where the invariants whose tables are missing are skipped with a NOTICE.
func TestCurrentSchema(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"InvariantFixtures", testCurrentInvariantFixtures},
		{"Incident", testCurrentIncident},
		{"HeadRefMismatchDetails", testHeadRefMismatchDetails},
		{"RefNameUnknownEitherSideOfHead", testRefNameUnknownNames},
		{"OlderSchemaSkipsWhatItCannotHave", testOlderSchemaSkips},
		{"MigrationAddsTheMissingInvariant", testMigrationAddsInvariant},
		{"MigrationRewritesATableTheInvariantsRead", testMigrationRewritesATable},
	})
}

// anomalyKeys returns the keys of every registered invariant's view.
func anomalyKeys(t *testing.T, conn *pgx.Conn) map[string][]string {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT name FROM pgconsistency.invariant ORDER BY name")
	require.NoError(t, err)
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	out := map[string][]string{}
	for _, n := range names {
		out[n] = viewKeys(t, conn, n)
	}
	return out
}

// expectedKeys turns dataset numbers by invariant into the keys every one
// of the invariants must hold.
func expectedKeys(invariants []string, broken ...map[string][]int) map[string][]string {
	out := map[string][]string{}
	for _, inv := range invariants {
		var nums []int
		for _, b := range broken {
			nums = append(nums, b[inv]...)
		}
		slices.Sort(nums)
		nums = slices.Compact(nums)
		out[inv] = ids(nums...) // empty, not nil, when none: as the views are read
	}
	return out
}

func refreshAll(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	for inv, st := range status(t, conn) {
		require.Equal(t, "succeeded", st.LastOutcome, "%s: %v", inv, st.LastError)
	}
}

// testCurrentInvariantFixtures: clean data gives 0 everywhere; each fixture
// gives exactly its broken datasets in its invariant, and in the other
// invariants only the datasets that are there by definition too
// (fixture.CurrentAlsoIn: a head ref renamed "HEAD" is also an unknown ref
// name; a dataset that lost every key block, or its Seed and SetDataSchema,
// but kept its data blocks also has a chain gap); all fixtures together give
// the union.
func testCurrentInvariantFixtures(t *testing.T, s *pgtest.Server) {
	cases := [][]string{nil}
	for _, inv := range fixture.CurrentInvariants {
		cases = append(cases, []string{inv})
	}
	cases = append(cases, fixture.CurrentInvariants)
	for _, fixtures := range cases {
		name := strings.Join(fixtures, "+")
		if fixtures == nil {
			name = "clean"
		} else if len(fixtures) > 1 {
			name = "all"
		}
		t.Run(name, func(t *testing.T) {
			db := fixture.NewCurrentDatabase(t, s, fixtures...)
			conn := s.Conn(t, db)
			refreshAll(t, conn)
			var broken []map[string][]int
			for _, f := range fixtures {
				broken = append(broken, map[string][]int{f: fixture.CurrentBreakage[f]}, fixture.CurrentAlsoIn[f])
			}
			want := expectedKeys(fixture.CurrentInvariants, broken...)
			got := anomalyKeys(t, conn)
			assert.ElementsMatch(t, fixture.CurrentInvariants, slices.Collect(maps.Keys(got)), "the registered invariants")
			for _, inv := range fixture.CurrentInvariants {
				assert.Equal(t, want[inv], got[inv], "%s with fixtures %s", inv, name)
				assert.EqualValues(t, len(want[inv]), status(t, conn)[inv].Anomalies, "%s: status", inv)
			}
		})
	}
}

// testCurrentIncident: the incident's whole shape on today's schema — a
// chain that lost Seed and SetDataSchema but kept AddPushSource and its data
// blocks is both dataset_seed_missing and dataset_chain_gap (the pack of
// 0.1.0 saw only the first); the details say where the chain breaks.
func testCurrentIncident(t *testing.T, s *pgtest.Server) {
	db := fixture.NewCurrentDatabase(t, s, "incident")
	conn := s.Conn(t, db)
	refreshAll(t, conn)
	want := expectedKeys(fixture.CurrentInvariants, fixture.IncidentExpected)
	got := anomalyKeys(t, conn)
	for _, inv := range fixture.CurrentInvariants {
		assert.Equal(t, want[inv], got[inv], inv)
	}
	// The details of a gap: the first missing number, the highest, the count.
	for _, key := range got["dataset_chain_gap"] {
		var firstMissing, firstRepeated *int64
		var maxSeq, blocks int64
		require.NoError(t, conn.QueryRow(t.Context(), `SELECT first_missing_sequence_number, first_repeated_sequence_number,
			max_sequence_number, blocks FROM pgconsistency.dataset_chain_gap WHERE key = $1`, key).
			Scan(&firstMissing, &firstRepeated, &maxSeq, &blocks))
		var actual []int64
		rows, err := conn.Query(t.Context(), `SELECT sequence_number FROM public.dataset_key_blocks WHERE dataset_id = $1 AND block_ref_name = 'head'
			UNION ALL SELECT sequence_number FROM public.dataset_data_blocks WHERE dataset_id = $1 AND block_ref_name = 'head' ORDER BY 1`, key)
		require.NoError(t, err)
		actual, err = pgx.CollectRows(rows, pgx.RowTo[int64])
		require.NoError(t, err)
		require.NotEmpty(t, actual)
		assert.Equal(t, int64(len(actual)), blocks, key)
		assert.Equal(t, actual[len(actual)-1], maxSeq, key)
		require.NotNil(t, firstMissing, "%s: a lost block is a missing number (blocks %v)", key, actual)
		assert.False(t, slices.Contains(actual, *firstMissing), "%s: %d is missing from %v", key, *firstMissing, actual)
		for n := int64(0); n < *firstMissing; n++ {
			assert.True(t, slices.Contains(actual, n), "%s: %d is not the first missing of %v", key, *firstMissing, actual)
		}
		assert.Nil(t, firstRepeated, key)
	}
}

// testOlderSchemaSkips: on the older schema (no data blocks, no accounts)
// the pack installs the invariants it can have, and says in a NOTICE which
// it skipped and why.
func testOlderSchemaSkips(t *testing.T, s *pgtest.Server) {
	db := s.CreateDatabase(t, "")
	s.PsqlFile(t, db, fixture.Path("testdata/legacy/schema.sql"))
	s.PsqlFile(t, db, fixture.Path("testdata/legacy/fixtures/clean.sql"))
	out, err := psqlFile(t, s, db, fixture.Path("sql/install.sql"))
	require.NoError(t, err, out)
	for inv, missing := range map[string]string{
		"dataset_chain_gap":         "public.dataset_data_blocks",
		"dataset_head_ref_mismatch": "public.dataset_data_blocks",
		"dataset_ref_name_unknown":  "public.dataset_data_blocks",
		"dataset_owner_missing":     "public.accounts",
	} {
		assert.Contains(t, out, "NOTICE:  pgconsistency: invariant "+inv+" not installed: it reads "+missing+", which this database does not have", inv)
	}
	assert.Contains(t, out, "HINT:  Run install.sql again after the migration that creates it.")
	conn := s.Conn(t, db)
	refreshAll(t, conn)
	got := anomalyKeys(t, conn)
	assert.ElementsMatch(t, fixture.Invariants, slices.Collect(maps.Keys(got)), "the invariants of the older schema")
	for inv, keys := range got {
		assert.Empty(t, keys, "%s on clean data", inv)
	}
}

// testMigrationAddsInvariant: a database whose accounts table comes with a
// later migration gets dataset_owner_missing from the install.sql that runs
// after that migration; the other invariants keep their snapshots.
func testMigrationAddsInvariant(t *testing.T, s *pgtest.Server) {
	db := s.CreateDatabase(t, "")
	s.PsqlFile(t, db, fixture.Path("testdata/schema.sql"))
	s.PsqlFile(t, db, fixture.Path("testdata/fixtures/clean.sql"))
	conn := s.Conn(t, db)
	exec(t, conn, "ALTER TABLE public.accounts RENAME TO accounts_later")
	out, err := psqlFile(t, s, db, fixture.Path("sql/install.sql"))
	require.NoError(t, err, out)
	assert.Contains(t, out, "invariant dataset_owner_missing not installed: it reads public.accounts")
	refreshAll(t, conn)
	before := status(t, conn)
	assert.NotContains(t, before, "dataset_owner_missing")

	// The migration; one dataset's owner is not among the accounts.
	exec(t, conn, "ALTER TABLE public.accounts_later RENAME TO accounts")
	exec(t, conn, "UPDATE public.dataset_entries SET owner_id = 'did:odf:fed01gone' WHERE dataset_id = $1", fixture.DatasetID(7))
	out, err = psqlFile(t, s, db, fixture.Path("sql/install.sql"))
	require.NoError(t, err, out)
	assert.NotContains(t, out, "not installed")
	exec(t, conn, "CALL pgconsistency.refresh()")
	after := status(t, conn)
	require.Contains(t, after, "dataset_owner_missing")
	assert.EqualValues(t, 1, after["dataset_owner_missing"].Anomalies)
	assert.Equal(t, ids(7), viewKeys(t, conn, "dataset_owner_missing"))
	assert.Equal(t, before["dataset_chain_gap"].RefreshedAt, after["dataset_chain_gap"].RefreshedAt,
		"an invariant that was there keeps its snapshot (not due, not refreshed)")
}

// testHeadRefMismatchDetails: the details of a mismatch say, in the hex form
// the service writes, what the reference holds and what the highest block
// is, and which block the reference points at (NULL: none of the dataset's).
func testHeadRefMismatchDetails(t *testing.T, s *pgtest.Server) {
	db := fixture.NewCurrentDatabase(t, s, "dataset_head_ref_mismatch")
	conn := s.Conn(t, db)
	refreshAll(t, conn)
	type details struct {
		RefHash, LastHash string
		LastSeq           int64
		RefSeq            *int64
		WantRef, WantLast string
		HeadSeq           int64
	}
	get := func(i int) details {
		var d details
		require.NoError(t, conn.QueryRow(t.Context(), `
			SELECT m.head_ref_hash, m.last_block_hash, m.last_sequence_number, m.head_ref_sequence_number,
			       (SELECT r.block_hash_hex FROM public.dataset_references r WHERE r.dataset_id = m.key AND r.block_ref_name = 'head'),
			       'f1620' || encode(fixture.block_hash_bin($2, fixture.head_seq($2) + 1), 'hex'),
			       fixture.head_seq($2)
			  FROM pgconsistency.dataset_head_ref_mismatch m WHERE m.key = $1`, fixture.DatasetID(i), i).
			Scan(&d.RefHash, &d.LastHash, &d.LastSeq, &d.RefSeq, &d.WantRef, &d.WantLast, &d.HeadSeq))
		return d
	}
	// 20: block N+1 appended, the head still on block N.
	d := get(20)
	assert.Equal(t, d.WantRef, d.RefHash, "the reference's hash, as block_hash_hex")
	assert.Equal(t, d.WantLast, d.LastHash)
	assert.Equal(t, d.HeadSeq+1, d.LastSeq)
	require.NotNil(t, d.RefSeq)
	assert.Equal(t, d.HeadSeq, *d.RefSeq, "the reference points at the block before the last")
	// 28: the head holds a hash none of its blocks has.
	d = get(28)
	assert.Equal(t, d.WantRef, d.RefHash)
	assert.Nil(t, d.RefSeq, "no block of the dataset has the reference's hash")
}

// testRefNameUnknownNames: dataset_ref_name_unknown finds a ref name other
// than head in each table it reads, sorting before head or after it, in a
// full refresh and in an incremental one. (Written while trying its
// condition as two ranges around 'head', which the planner did not use in
// the benchmark: BENCHMARKS.md, 0.7.6.)
func testRefNameUnknownNames(t *testing.T, s *pgtest.Server) {
	const inv = "dataset_ref_name_unknown"
	db := fixture.NewCurrentDatabase(t, s, inv)
	conn := s.Conn(t, db)
	refreshAll(t, conn)
	want := viewKeys(t, conn, inv)
	// Clean datasets that have data blocks, eight of them.
	rows, err := conn.Query(t.Context(), `SELECT e.dataset_id FROM public.dataset_entries e
		WHERE EXISTS (SELECT 1 FROM public.dataset_data_blocks d WHERE d.dataset_id = e.dataset_id)
		  AND e.dataset_id <> ALL ($1) ORDER BY 1 LIMIT 8`, want)
	require.NoError(t, err)
	clean, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Len(t, clean, 8)
	rename := func(id, table, name string) {
		t.Helper()
		// One row of the dataset (the highest-numbered block of a chain).
		where := "dataset_id = $1 AND block_ref_name = 'head'"
		if strings.HasSuffix(table, "_blocks") {
			where += " AND sequence_number = (SELECT max(b.sequence_number) FROM " + table + " b WHERE b.dataset_id = $1 AND b.block_ref_name = 'head')"
		}
		tag, err := conn.Exec(t.Context(), "UPDATE "+table+" SET block_ref_name = $2 WHERE "+where, id, name)
		require.NoError(t, err, "%s %s", table, name)
		require.EqualValues(t, 1, tag.RowsAffected(), "%s of %s", table, id)
	}
	// Before 'head' and after it, in the four tables, in full mode.
	rename(clean[0], "public.dataset_references", "hea")
	rename(clean[1], "public.dataset_statistics", "main")
	rename(clean[2], "public.dataset_key_blocks", "HEAD")
	rename(clean[3], "public.dataset_data_blocks", "heads")
	refreshAll(t, conn)
	want = append(want, clean[:4]...)
	slices.Sort(want)
	require.Equal(t, want, viewKeys(t, conn, inv), "full refresh")
	// The same incrementally.
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode($1, 'incremental')", inv)
	refreshAll(t, conn)
	exec(t, conn, "UPDATE pgconsistency.invariant SET incremental_period = '1 millisecond'")
	rename(clean[4], "public.dataset_references", "zz")
	rename(clean[5], "public.dataset_statistics", "dev")
	rename(clean[6], "public.dataset_key_blocks", "headz")
	rename(clean[7], "public.dataset_data_blocks", "Head")
	time.Sleep(5 * time.Millisecond)
	exec(t, conn, "SELECT count(*) FROM pgconsistency.refresh_changes_plan()")
	exec(t, conn, "SELECT pgconsistency.refresh_invariant($1)", inv)
	requireKind(t, conn, inv, "incremental")
	want = append(want, clean[4:]...)
	slices.Sort(want)
	require.Equal(t, want, viewKeys(t, conn, inv), "incremental refresh")
}

// testMigrationRewritesATable: the invariants hold no dependency on the
// application's tables (their views read pgconsistency.anomaly; the
// framework runs their queries), so a migration that changes the type of a
// column they read, or drops and re-creates a table, runs as it is. The
// next refresh finds the same anomalies, none of them new; for an invariant
// in incremental mode, the re-created table's capture triggers come back
// with the next install.sql, and until then its refreshes reconcile.
func testMigrationRewritesATable(t *testing.T, s *pgtest.Server) {
	db := fixture.NewCurrentDatabase(t, s, fixture.CurrentInvariants...)
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode('dataset_statistics_missing', 'incremental')")
	refreshAll(t, conn)
	before := status(t, conn)

	exec(t, conn, "ALTER TABLE public.dataset_data_blocks ALTER COLUMN block_ref_name TYPE varchar(64)")
	rows, err := conn.Query(t.Context(), "SELECT pgconsistency.release_table('public.dataset_data_blocks')")
	require.NoError(t, err)
	released, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Empty(t, released, "nothing of define_invariant depends on the table")
	// Drop and re-create a table the incremental invariant reads.
	exec(t, conn, `BEGIN;
		CREATE TABLE public.dataset_statistics_new (LIKE public.dataset_statistics INCLUDING ALL);
		INSERT INTO public.dataset_statistics_new SELECT * FROM public.dataset_statistics;
		DROP TABLE public.dataset_statistics;
		ALTER TABLE public.dataset_statistics_new RENAME TO dataset_statistics;
		COMMIT`)

	refreshAll(t, conn)
	var kind, state string
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT last_refresh_kind, pgconsistency._reconcile_reason(invariant)
		FROM pgconsistency.status WHERE invariant = 'dataset_statistics_missing'`).Scan(&kind, &state))
	assert.Equal(t, "reconcile", kind, "its capture triggers went with the dropped table")
	assert.Contains(t, state, "capture trigger pgconsistency_capture_delete on public.dataset_statistics is missing")

	s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	refreshAll(t, conn)
	after := status(t, conn)
	for _, inv := range fixture.CurrentInvariants {
		assert.Equal(t, before[inv].Anomalies, after[inv].Anomalies, inv)
		assert.Zero(t, after[inv].NewAnomalies, "%s: the anomalies are the same ones, not new", inv)
		assert.Equal(t, "succeeded", *after[inv].LastRunOutcome, inv)
	}
	exec(t, conn, "DELETE FROM public.dataset_statistics WHERE dataset_id = $1", fixture.DatasetID(1))
	exec(t, conn, "CALL pgconsistency.refresh('dataset_statistics_missing')")
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT last_refresh_kind FROM pgconsistency.status
		WHERE invariant = 'dataset_statistics_missing'`).Scan(&kind))
	assert.Equal(t, "incremental", kind, "install.sql brought the capture triggers back")
	assert.Equal(t, before["dataset_statistics_missing"].Anomalies+1, status(t, conn)["dataset_statistics_missing"].Anomalies)
}

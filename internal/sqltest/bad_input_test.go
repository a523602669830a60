//go:build integration

package sqltest_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestDefineInvariantUnqualifiedName: a query that names a table without
// its schema is refused with what to do, not only PostgreSQL's "relation
// does not exist" (the caller's search_path finds the table; the refresh's
// does not).
func TestDefineInvariantUnqualifiedName(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t)
	conn := s.Conn(t, fixture.NewCurrentDatabase(t, s))
	_, err := conn.Exec(t.Context(), `SELECT pgconsistency.define_invariant('stats_unqualified',
		$q$ SELECT e.dataset_id::text AS key FROM public.dataset_entries e
		     WHERE NOT EXISTS (SELECT 1 FROM dataset_statistics s WHERE s.dataset_id = e.dataset_id) $q$)`)
	require.ErrorContains(t, err, `relation "dataset_statistics" does not exist`)
	require.Contains(t, hint(err), "schema-qualify every table")
	require.Contains(t, hint(err), "public.dataset_statistics, not dataset_statistics")
	var n int
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.invariant WHERE name = 'stats_unqualified'").Scan(&n))
	require.Zero(t, n, "nothing registered")
}

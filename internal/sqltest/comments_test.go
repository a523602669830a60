//go:build integration

package sqltest_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// testEveryObjectHasAComment: \df+ pgconsistency.* and \dv+ describe every
// function, procedure and view that install.sql and the optional packs
// (operations.sql, audit.sql) make, and the name tells
// internal from public: a function whose name starts with an underscore is
// internal and its comment starts with "Internal:"; no other's does. With
// an invariant in incremental mode, so that the capture functions
// _install_capture generates are among them.
func testEveryObjectHasAComment(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	s.PsqlFile(t, db, fixture.Path("sql/operations.sql"))
	s.PsqlFile(t, db, fixture.Path("sql/audit.sql"))
	conn := s.Conn(t, db)
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode('dataset_seed_missing', 'incremental')")

	rows, err := conn.Query(t.Context(), `
		SELECT CASE p.prokind WHEN 'p' THEN 'procedure ' ELSE 'function ' END || p.oid::regprocedure::text,
		       p.proname::text, coalesce(pg_catalog.obj_description(p.oid, 'pg_proc'), '')
		  FROM pg_catalog.pg_proc p
		 WHERE p.pronamespace = 'pgconsistency'::regnamespace
		UNION ALL
		SELECT 'view ' || c.oid::regclass::text, c.relname::text, coalesce(pg_catalog.obj_description(c.oid, 'pg_class'), '')
		  FROM pg_catalog.pg_class c
		 WHERE c.relnamespace = 'pgconsistency'::regnamespace AND c.relkind IN ('v', 'm')
		 ORDER BY 1`)
	require.NoError(t, err)
	var objects, internal, generated int
	for rows.Next() {
		var object, name, comment string
		require.NoError(t, rows.Scan(&object, &name, &comment))
		objects++
		isInternal := strings.HasPrefix(name, "_")
		saysInternal := strings.HasPrefix(comment, "Internal:")
		switch {
		case comment == "":
			t.Errorf("%s has no COMMENT", object)
		case isInternal && !saysInternal:
			t.Errorf("%s is internal (its name starts with _), but its comment does not start with \"Internal:\": %q", object, comment)
		case !isInternal && saysInternal:
			t.Errorf("%s says it is internal, but its name does not start with _: %q", object, comment)
		}
		if isInternal {
			internal++
		}
		if strings.HasPrefix(name, "_capture_") {
			generated++
		}
	}
	require.NoError(t, rows.Err())
	assert.Greater(t, objects, 50, "functions, procedures and views in schema pgconsistency")
	assert.Greater(t, internal, 20, "internal functions")
	assert.Equal(t, 2, generated, "capture functions (dataset_entries and dataset_key_blocks)")
}

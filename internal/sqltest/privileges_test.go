//go:build integration

package sqltest_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// privilegeModel is docs/security.md's table of who may run what, as
// grants: function name → the roles besides its owner with EXECUTE on it.
// Every function of the schema and the packs not named here is executable
// by its owner alone. A new function fails TestPrivilegeModel until it is
// placed here and in docs/security.md.
var privilegeModel = map[string][]string{
	// PUBLIC: pure, read nothing, write nothing (docs/security.md, "PUBLIC").
	"version":                 {"PUBLIC"},
	"_valid_refresh_settings": {"PUBLIC"},
	"_deprecated_column":      {"PUBLIC"},
	// The collector's reader.
	"new_anomalies_for_log":             {"pgconsistency_reader"},
	"new_anomalies_with_origin_for_log": {"pgconsistency_reader"},
	"finished_requests_for_log":         {"pgconsistency_reader"},
	"advance_log_cursor":                {"pgconsistency_reader"},
	"advance_request_log_cursor":        {"pgconsistency_reader"},
	// The refresher: pg_cron, deploy jobs, the collector's scheduler and
	// changes loop.
	"refresh":                 {"pgconsistency_refresher"},
	"refresh_plan":            {"pgconsistency_refresher"},
	"refresh_changes_plan":    {"pgconsistency_refresher"},
	"refresh_invariant":       {"pgconsistency_refresher"},
	"capture_wal":             {"pgconsistency_refresher"},
	"wal_stream_start":        {"pgconsistency_refresher"}, // the receiver's stream (0.7.7)
	"capture_wal_stream":      {"pgconsistency_refresher"},
	"claim_refresh_request":   {"pgconsistency_refresher"},
	"expire_acknowledgements": {"pgconsistency_refresher"},
	"request_refresh":         {"pgconsistency_refresher"},
	"observe_deploy_marker":   {"pgconsistency_refresher"},
	// The slot functions (0.7.1): owned by pgconsistency_capture, the WAL
	// capture's NOLOGIN REPLICATION role; run by capture_wal and
	// set_capture, which run as the owner of the schema.
	"_wal_create_slot":  {schemaOwner},
	"_wal_drop_slot":    {schemaOwner},
	"_wal_advance_slot": {schemaOwner},
	"_wal_slot_changes": {schemaOwner},
}

// schemaOwner in privilegeModel stands for the owner of the pgconsistency
// schema.
const schemaOwner = "(the schema's owner)"

// slotFunctionOwner: the owner of the slot functions once roles.sql ran.
const slotFunctionOwner = "pgconsistency_capture"

// relationModel: relation → the grants besides its owner's ("role:PRIVILEGE").
var relationModel = map[string][]string{
	"status":    {"pgconsistency_reader:SELECT"},
	"invariant": {"pgconsistency_refresher:SELECT"},
}

// TestPrivilegeModel reads the privileges of everything installed in the
// schema (the framework, the three packs, roles.sql, the capture triggers'
// generated functions) from the catalog and holds them against
// docs/security.md: every SECURITY DEFINER function pins its search_path;
// EXECUTE and table privileges go exactly to the roles the threat model
// says; PUBLIC reaches only the functions it lists.
func TestPrivilegeModel(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t)
	db := fixture.NewCurrentDatabase(t, s)
	for _, f := range []string{"sql/operations.sql", "sql/audit.sql", "sql/roles.sql"} {
		s.PsqlFile(t, db, fixture.Path(f))
	}
	conn := s.Conn(t, db)
	// The generated capture functions too: one invariant in incremental mode.
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode('dataset_seed_missing', 'incremental')")
	ctx := t.Context()

	rows, err := conn.Query(ctx, `
		SELECT p.proname, p.prosecdef, coalesce(pg_catalog.array_to_string(p.proconfig, ';'), ''),
		       coalesce((SELECT pg_catalog.array_agg(g.name ORDER BY g.name)
		                   FROM (SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS name
		                           FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) a
		                          WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner) g), '{}')
		  FROM pg_catalog.pg_proc p
		 WHERE p.pronamespace = 'pgconsistency'::regnamespace
		 ORDER BY 1`)
	require.NoError(t, err)
	type fn struct {
		name     string
		definer  bool
		config   string
		grantees []string
	}
	fns, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (fn, error) {
		var f fn
		return f, r.Scan(&f.name, &f.definer, &f.config, &f.grantees)
	})
	require.NoError(t, err)
	require.Greater(t, len(fns), 80, "the schema's functions were read")
	var owner string
	require.NoError(t, conn.QueryRow(ctx, "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'pgconsistency'").Scan(&owner))
	rows, err = conn.Query(ctx, `SELECT DISTINCT proowner::regrole::text FROM pg_proc
		WHERE pronamespace = 'pgconsistency'::regnamespace AND proname IN ('_wal_create_slot', '_wal_drop_slot', '_wal_advance_slot', '_wal_slot_changes')`)
	require.NoError(t, err)
	slotOwners, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{slotFunctionOwner}, slotOwners, "the slot functions belong to the capture role")

	var problems []string
	definers := 0
	for _, f := range fns {
		if f.definer {
			definers++
			if !strings.Contains(f.config, "search_path=pg_catalog, pg_temp") {
				problems = append(problems, fmt.Sprintf("%s is SECURITY DEFINER without SET search_path = pg_catalog, pg_temp (it has %q)", f.name, f.config))
			}
		}
		want := slices.Clone(privilegeModel[f.name])
		if want == nil {
			want = []string{}
		}
		for i, w := range want {
			if w == schemaOwner {
				want[i] = owner
			}
		}
		if !slices.Equal(want, f.grantees) {
			problems = append(problems, fmt.Sprintf("%s: EXECUTE granted to %v, docs/security.md says %v", f.name, f.grantees, want))
		}
	}
	assert.Greater(t, definers, 15, "the SECURITY DEFINER functions were seen")
	assert.Contains(t, namesOf(fns, func(f fn) string { return f.name }), "_capture_"+captureOID(t, conn),
		"the generated capture function is checked too")

	rows, err = conn.Query(ctx, `
		SELECT c.relname,
		       coalesce((SELECT pg_catalog.array_agg(g.name ORDER BY g.name)
		                   FROM (SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END
		                                         || ':' || a.privilege_type AS name
		                           FROM pg_catalog.aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) g), '{}')
		  FROM pg_catalog.pg_class c
		 WHERE c.relnamespace = 'pgconsistency'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'S', 'p')
		 ORDER BY 1`)
	require.NoError(t, err)
	for rows.Next() {
		var name string
		var grants []string
		require.NoError(t, rows.Scan(&name, &grants))
		want := relationModel[name]
		if want == nil {
			want = []string{}
		}
		if !slices.Equal(want, grants) {
			problems = append(problems, fmt.Sprintf("relation %s: granted %v, docs/security.md says %v", name, grants, want))
		}
	}
	require.NoError(t, rows.Err())
	var schemaUsage []string
	require.NoError(t, conn.QueryRow(ctx, `
		SELECT coalesce(pg_catalog.array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END), '{}')
		  FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
		 WHERE n.nspname = 'pgconsistency' AND a.grantee <> n.nspowner AND a.privilege_type = 'USAGE'`).Scan(&schemaUsage))
	if slices.Contains(schemaUsage, "PUBLIC") {
		problems = append(problems, "PUBLIC has USAGE on the schema pgconsistency")
	}
	assert.Empty(t, problems)
}

func namesOf[T any](xs []T, name func(T) string) []string {
	out := make([]string, 0, len(xs))
	for _, x := range xs {
		out = append(out, name(x))
	}
	return out
}

// captureOID is the oid of a table the capture triggers are on.
func captureOID(t *testing.T, conn *pgx.Conn) string {
	t.Helper()
	var oid string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT 'public.dataset_key_blocks'::regclass::oid::text").Scan(&oid))
	return oid
}

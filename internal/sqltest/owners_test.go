//go:build integration

package sqltest_test

import (
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// The dataset pack's default owner and runbook (sql/dataset_invariants.sql,
// docs/sql.md "Owners and routing").
const (
	packOwner   = "data-platform"
	packRunbook = "https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants"
)

// owner is an invariant's owner and runbook_url as the status view shows
// them; "" is unset (NULL; an empty string is not a valid value).
type owner struct{ Owner, RunbookURL string }

func owners(t *testing.T, conn *pgx.Conn) map[string]owner {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT invariant, coalesce(owner, ''), coalesce(runbook_url, '') FROM pgconsistency.status")
	require.NoError(t, err)
	out := map[string]owner{}
	for rows.Next() {
		var inv string
		var o owner
		require.NoError(t, rows.Scan(&inv, &o.Owner, &o.RunbookURL))
		out[inv] = o
	}
	require.NoError(t, rows.Err())
	return out
}

func ownedBy(o, runbook string) owner { return owner{Owner: o, RunbookURL: runbook} }

// TestOwners: owner and runbook_url of invariants on a fresh install. The
// dataset pack gives its default; define_invariant and register_invariant
// take them; set_owner changes them; re-running install.sql and the packs
// keeps what set_owner (or an UPDATE) set, and gives the pack's default
// again only where it is unset; bad values fail naming the problem; only
// the schema's owner may call set_owner.
func TestOwners(t *testing.T) {
	t.Parallel() // a cluster of its own
	s := pgtest.Start(t)
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)

	got := owners(t, conn)
	require.Len(t, got, len(fixture.Invariants))
	for _, inv := range fixture.Invariants {
		assert.Equal(t, ownedBy(packOwner, packRunbook), got[inv], "%s, of the dataset pack", inv)
	}

	exec(t, conn, `SELECT pgconsistency.define_invariant('custom_unowned', 'SELECT dataset_id::text AS key FROM public.dataset_entries WHERE false')`)
	exec(t, conn, `SELECT pgconsistency.define_invariant('custom_owned', 'SELECT dataset_id::text AS key FROM public.dataset_entries WHERE false',
		owner => 'team-a', runbook_url => 'https://wiki.example.com/custom')`)
	exec(t, conn, "CREATE MATERIALIZED VIEW public.good AS SELECT dataset_id::text AS key FROM public.dataset_entries WHERE false WITH NO DATA")
	exec(t, conn, "CREATE UNIQUE INDEX ON public.good (key)")
	exec(t, conn, "SELECT pgconsistency.register_invariant('custom_registered', 'public', 'good', 'info', 'custom', 'team-b')")
	got = owners(t, conn)
	assert.Equal(t, owner{}, got["custom_unowned"], "defined without an owner")
	assert.Equal(t, ownedBy("team-a", "https://wiki.example.com/custom"), got["custom_owned"])
	assert.Equal(t, ownedBy("team-b", ""), got["custom_registered"])

	// Changed later: set_owner returns the previous owner.
	var previous *string
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT pgconsistency.set_owner('dataset_seed_missing', 'team-a', 'https://wiki.example.com/seed')").Scan(&previous))
	assert.Equal(t, ptr(packOwner), previous, "set_owner returns the previous owner")
	exec(t, conn, "SELECT pgconsistency.set_owner('dataset_head_ref_missing', 'team-b', NULL)")
	exec(t, conn, "UPDATE pgconsistency.invariant SET owner = 'team-c' WHERE name = 'dataset_statistics_missing'")
	exec(t, conn, "SELECT pgconsistency.set_owner('custom_owned', NULL, NULL)")
	// A definition run again with another default changes nothing that is set.
	exec(t, conn, `SELECT pgconsistency.define_invariant('custom_unowned', 'SELECT dataset_id::text AS key FROM public.dataset_entries WHERE false',
		owner => 'team-d')`)
	exec(t, conn, `SELECT pgconsistency.register_invariant('custom_registered', 'public', 'good', 'info', 'custom', 'team-d',
		'https://wiki.example.com/registered')`)
	want := owners(t, conn)
	assert.Equal(t, ownedBy("team-a", "https://wiki.example.com/seed"), want["dataset_seed_missing"])
	assert.Equal(t, ownedBy("team-b", ""), want["dataset_head_ref_missing"])
	assert.Equal(t, ownedBy("team-c", packRunbook), want["dataset_statistics_missing"])
	assert.Equal(t, owner{}, want["custom_owned"])
	assert.Equal(t, ownedBy("team-d", ""), want["custom_unowned"], "unset: the definition's default")
	assert.Equal(t, ownedBy("team-b", "https://wiki.example.com/registered"), want["custom_registered"],
		"the owner set is kept, the runbook unset takes the definition's")

	// The next deployment keeps them; only the unset runbook of a pack
	// invariant gets the pack's default again.
	s.PsqlFile(t, db, fixture.Path("sql/install.sql"))
	want["dataset_head_ref_missing"] = ownedBy("team-b", packRunbook)
	assert.Equal(t, want, owners(t, conn), "after install.sql ran again")

	for _, tc := range []struct{ call, want string }{
		{"SELECT pgconsistency.set_owner('no_such_invariant', 'team-a', NULL)", "unknown invariant 'no_such_invariant'"},
		{"SELECT pgconsistency.set_owner('custom_owned', '', NULL)", `owner of invariant custom_owned is '', which is not a valid owner`},
		{"SELECT pgconsistency.set_owner('custom_owned', ' team-a', NULL)", "which is not a valid owner"},
		{"SELECT pgconsistency.set_owner('custom_owned', 'team-a', 'wiki/page')", `runbook_url of invariant custom_owned is 'wiki/page', which is not an http(s) URL`},
		{"SELECT pgconsistency.set_owner('custom_owned', 'team-a', 'https://wiki.example.com/a page')", "not an http(s) URL"},
		{"SELECT pgconsistency.define_invariant('custom_bad', 'SELECT ''x''::text AS key', owner => 'team' || chr(10) || 'a')", "not a valid owner"},
		{"SELECT pgconsistency.register_invariant('custom_registered', 'public', 'good', runbook_url => 'ftp://x')", "not an http(s) URL"},
		{"UPDATE pgconsistency.invariant SET owner = '' WHERE name = 'custom_owned'", "invariant_owner_valid"},
		{"UPDATE pgconsistency.invariant SET runbook_url = 'x' WHERE name = 'custom_owned'", "invariant_runbook_url_valid"},
	} {
		_, err := conn.Exec(t.Context(), tc.call)
		require.ErrorContains(t, err, tc.want, tc.call)
	}
	assert.Equal(t, want, owners(t, conn), "after the refused calls")

	// Only the schema's owner sets owners: the reader and the refresher
	// (sql/roles.sql) may not.
	s.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	for _, grant := range []string{"GRANT pgconsistency_reader TO ROLE", "GRANT pgconsistency_refresher TO ROLE"} {
		role, _ := loginAs(t, s, conn, db, grant)
		_, err := role.Exec(t.Context(), "SELECT pgconsistency.set_owner('custom_owned', 'team-a', NULL)")
		assert.ErrorContains(t, err, "permission denied for function set_owner", grant)
	}
}

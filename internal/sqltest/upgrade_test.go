//go:build integration

package sqltest_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// fromRelease is an earlier release a TestUpgradeFrom… test upgrades from:
// its SQL, kept verbatim, and the dataset invariants it creates on
// testdata/legacy/schema.sql (the pack has grown since: fixture.Invariants).
type fromRelease struct {
	version           string
	dir               string
	datasetInvariants []string
}

var (
	release010 = fromRelease{version: "0.1.0", dir: "testdata/sql/0.1.0", datasetInvariants: fixture.Invariants[:8]}
	// 0.2.0 added dataset_root_has_upstream; its four other new invariants
	// need today's schema, which testdata/legacy/schema.sql is not.
	release020 = fromRelease{version: "0.2.0", dir: "testdata/sql/0.2.0", datasetInvariants: fixture.Invariants[:9]}
	// 0.3.0 has the invariants of 0.2.0 on this schema. useRelease puts one
	// in incremental mode: capture triggers and their generated functions.
	release030 = fromRelease{version: "0.3.0", dir: "testdata/sql/0.3.0", datasetInvariants: fixture.Invariants[:9]}
	// 0.4.0 renamed, and added no invariant.
	release040 = fromRelease{version: "0.4.0", dir: "testdata/sql/0.4.0", datasetInvariants: fixture.Invariants[:9]}
	// 0.5.0 added owners, and no invariant.
	release050 = fromRelease{version: "0.5.0", dir: "testdata/sql/0.5.0", datasetInvariants: fixture.Invariants[:9]}
	// 0.6.0 added deploys and causes, and no invariant.
	release060 = fromRelease{version: "0.6.0", dir: "testdata/sql/0.6.0", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.0 added the WAL capture, and no invariant.
	release070 = fromRelease{version: "0.7.0", dir: "testdata/sql/0.7.0", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.1 gave the WAL capture its own role, and no invariant.
	release071 = fromRelease{version: "0.7.1", dir: "testdata/sql/0.7.1", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.2 paced the WAL capture's reads, and added no invariant.
	release072 = fromRelease{version: "0.7.2", dir: "testdata/sql/0.7.2", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.3 kept the plans of the refresh's steps, and added no invariant.
	release073 = fromRelease{version: "0.7.3", dir: "testdata/sql/0.7.3", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.4 took key columns by their place in the WAL's rows, and added no invariant.
	release074 = fromRelease{version: "0.7.4", dir: "testdata/sql/0.7.4", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.5 gave an UPDATE's keys only to the invariants whose columns it
	// changed, and added no invariant.
	release075 = fromRelease{version: "0.7.5", dir: "testdata/sql/0.7.5", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.6 took each decoded row's key with one CASE, and added no invariant.
	release076 = fromRelease{version: "0.7.6", dir: "testdata/sql/0.7.6", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.7 let the receiver stream the WAL capture's slot, and added no
	// invariant.
	release077 = fromRelease{version: "0.7.7", dir: "testdata/sql/0.7.7", datasetInvariants: fixture.Invariants[:9]}
	// 0.7.8 ran incremental refreshes without JIT, and added no invariant.
	release078 = fromRelease{version: "0.7.8", dir: "testdata/sql/0.7.8", datasetInvariants: fixture.Invariants[:9]}
)

// atLeast tells whether r is version v ("x.y.z") or later.
func (r fromRelease) atLeast(v string) bool {
	parse := func(s string) (out [3]int) {
		for i, p := range strings.SplitN(s, ".", 3) {
			out[i], _ = strconv.Atoi(p)
		}
		return out
	}
	a, b := parse(r.version), parse(v)
	return slices.Compare(a[:], b[:]) >= 0
}

// oldInternalNames are the internal functions of 0.3.0 and earlier, named
// with a leading underscore since (as are the generated capture_<table oid>
// functions).
var oldInternalNames = []string{
	"install_ddl", "install_comment", "install_column", "install_index", "install_view", "register_row", "query_shape",
	"anomaly_view_sql", "copy_snapshot", "upgrade_defined_views", "valid_refresh_settings", "apply_refresh_settings",
	"refresh_due", "open_counts", "recount", "acknowledge_open", "log_cursor_owned", "reconcile_reason_started",
	"reconcile_reason_changed", "reconcile_reason", "check_incremental", "install_capture", "dispatch_captured_keys",
	// of the operations and audit packs
	"deadlocks_remember", "audit_trigger", "drop_audit_triggers",
}

// currentRelease is the version of the SQL in sql/ (NewIn030 checks what
// it adds to an upgraded install).
const currentRelease = "0.7.9"

// logConsumer is the log consumer whose cursor the upgrade must keep.
const logConsumer = "consumer-a"

// upgradeFiles are what a user runs to upgrade, in this order, each with
// psql -v ON_ERROR_STOP=1: the installer, the optional packs they had
// installed, and the roles.
var upgradeFiles = []string{"install.sql", "operations.sql", "audit.sql", "roles.sql"}

// TestUpgradeFrom010, TestUpgradeFrom020, TestUpgradeFrom030 and
// TestUpgradeFrom040 (testUpgrade): a database
// installed with an earlier release and used for a while (refreshes, new
// and resolved anomalies, acknowledgements, changed parameters and
// settings, custom invariants of define_invariant and of
// register_invariant, a log consumer halfway through the log, a pending
// refresh request, a deploy marker, login roles) is upgraded by running the
// current sql/ files over it. The installed version must be the one of
// CHANGELOG.md; everything the user had must be there unchanged; the roles
// keep their rights; the receivers of the earlier releases keep working;
// the next refresh gives the same counts; the log consumer gets each
// anomaly once.
func TestUpgradeFrom010(t *testing.T) {
	t.Parallel() // a server of its own
	testUpgrade(t, release010)
}

func TestUpgradeFrom020(t *testing.T) {
	t.Parallel() // a server of its own
	testUpgrade(t, release020)
}

func TestUpgradeFrom030(t *testing.T) {
	t.Parallel() // a server of its own
	testUpgrade(t, release030)
}

func TestUpgradeFrom040(t *testing.T) {
	t.Parallel() // a server of its own
	testUpgrade(t, release040)
}

func TestUpgradeFrom050(t *testing.T) {
	t.Parallel() // a server of its own
	testUpgrade(t, release050)
}

func TestUpgradeFrom060(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release060)
}

func TestUpgradeFrom070(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release070)
}

func TestUpgradeFrom071(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release071)
}

func TestUpgradeFrom072(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release072)
}

func TestUpgradeFrom073(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release073)
}

func TestUpgradeFrom074(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release074)
}

func TestUpgradeFrom075(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release075)
}

func TestUpgradeFrom076(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release076)
}

func TestUpgradeFrom077(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release077)
}

func TestUpgradeFrom078(t *testing.T) {
	t.Parallel()
	testUpgrade(t, release078)
}

func testUpgrade(t *testing.T, rel fromRelease) {
	s := pgtest.Start(t)
	db := s.CreateDatabase(t, "")
	s.PsqlFile(t, db, fixture.Path("testdata/legacy/schema.sql"))
	s.PsqlFile(t, db, fixture.Path("testdata/legacy/fixtures/clean.sql"))
	for _, inv := range rel.datasetInvariants {
		s.PsqlFile(t, db, fixture.Path(filepath.Join("testdata/legacy/fixtures", inv+".sql")))
	}
	for _, f := range upgradeFiles {
		s.PsqlFile(t, db, fixture.Path(filepath.Join(rel.dir, f)))
	}
	admin := s.Conn(t, db)
	u := useRelease(t, s, admin, db, rel)
	before := captureState(t, admin, u.roles)
	requireUsedState(t, before, u, rel)
	// A dashboard reads the invariant views through a pool that lives
	// across the upgrade, its statements prepared and cached (pgx's default).
	dashboard := s.Conn(t, db)
	for _, name := range slices.Sorted(maps.Keys(before.Invariants)) {
		require.NoError(t, readWholeView(t, dashboard, before.Invariants[name]), "SELECT * FROM the view of %s", name)
	}

	// upgrade runs the current files; it returns the privileges of the
	// login roles just before roles.sql runs: install.sql alone must keep
	// them (a receiver scrapes meanwhile, and not every deployment re-runs
	// roles.sql, which needs the schema's owner).
	upgrade := func() (beforeRolesSQL map[string]string) {
		for _, f := range upgradeFiles {
			if f == "roles.sql" {
				beforeRolesSQL = capturePrivileges(t, admin, u.roles)
				// A pg_cron job running as the refresher keeps working
				// between install.sql and roles.sql (or without roles.sql):
				// install.sql grants what a release adds to the loop.
				_, err := u.refresher.Exec(t.Context(), "CALL pgconsistency.refresh()")
				require.NoError(t, err, "CALL pgconsistency.refresh() as the refresher, before roles.sql ran")
			}
			s.PsqlFile(t, db, fixture.Path(filepath.Join("sql", f)))
		}
		return beforeRolesSQL
	}
	beforeRolesSQL := upgrade()
	upgraded := captureState(t, admin, u.roles)

	t.Run("Version", func(t *testing.T) {
		var got string
		err := admin.QueryRow(t.Context(), "SELECT pgconsistency.version()").Scan(&got)
		if err != nil {
			t.Errorf("SELECT pgconsistency.version() after the upgrade: %v", err)
		}
		want, cerr := changelogVersion()
		require.NoError(t, cerr)
		if err == nil {
			assert.Equal(t, want, got, "pgconsistency.version() against the top release of CHANGELOG.md")
		}
	})

	t.Run("StateKept", func(t *testing.T) {
		equalByKey(t, "privilege (before roles.sql ran)", before.Privileges, beforeRolesSQL, false)
		compareState(t, before, upgraded)
		// install.sql runs on every deployment: the next one, over the
		// upgraded database, must change nothing either.
		equalByKey(t, "privilege (before roles.sql ran again)", before.Privileges, upgrade(), false)
		again := captureState(t, admin, u.roles)
		compareState(t, before, again)
		equalByKey(t, "anomaly (after install.sql ran again)", upgraded.Anomalies, again.Anomalies, false)
	})

	// The internal functions are named with a leading underscore since
	// 0.3.0: none is left under its old name, and the capture triggers of
	// an earlier release call the renamed functions of their tables and
	// keep capturing.
	t.Run("InternalNames", func(t *testing.T) {
		rows, err := admin.Query(t.Context(), `SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
			WHERE p.pronamespace = 'pgconsistency'::regnamespace
			  AND (p.proname = ANY ($1) OR p.proname ~ '^capture_[0-9]+$') ORDER BY 1`, oldInternalNames)
		require.NoError(t, err)
		left, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		assert.Empty(t, left, "functions left under the names of an earlier release")
		rows, err = admin.Query(t.Context(), `SELECT g.tgrelid::regclass::text || ' ' || g.tgname || ': ' || g.tgfoid::regprocedure::text
			FROM pg_catalog.pg_trigger g
			WHERE g.tgname LIKE 'pgconsistency\_capture\_%' AND NOT g.tgisinternal
			  AND g.tgfoid IS DISTINCT FROM pg_catalog.to_regprocedure(format('pgconsistency._capture_%s()', g.tgrelid::oid))
			ORDER BY 1`)
		require.NoError(t, err)
		wrong, err := pgx.CollectRows(rows, pgx.RowTo[string])
		require.NoError(t, err)
		assert.Empty(t, wrong, "capture triggers that do not call pgconsistency._capture_<their table's oid>()")
		if !rel.atLeast("0.3.0") {
			return
		}
		const inv = "dataset_seed_not_first"
		require.NotEmpty(t, captureTriggers(t, admin), "the capture triggers %s made for %s", rel.version, inv)
		var stale int
		require.NoError(t, admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_catalog.pg_proc p
			WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.proname ~ '^_capture_[0-9]+$'
			  AND p.prosrc NOT LIKE '%pgconsistency._install_capture()%'`).Scan(&stale))
		assert.Zero(t, stale, "capture functions whose text is still that of 0.3.0")
		// 0.7.9: no query on pg_attribute in an UPDATE's capture.
		require.NoError(t, admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_catalog.pg_proc p
			WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.proname ~ '^_capture_[0-9]+$'
			  AND p.prosrc LIKE '%FROM pg_catalog.pg_attribute%'`).Scan(&stale))
		assert.Zero(t, stale, "capture functions that query pg_attribute at each UPDATE (0.7.5 to 0.7.8)")
		// A write of an application role, captured through the renamed
		// functions: the next refresh re-checks its key only. (0.7.5: a
		// write of a column the invariant does not read gives no key.)
		app, _ := loginAs(t, s, admin, db, "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ROLE")
		exec(t, app, `UPDATE public.dataset_key_blocks SET created_at = created_at - interval '1 second'
			WHERE dataset_id = (SELECT min(dataset_id) FROM public.dataset_key_blocks)`)
		refreshAs(t, u.refresher, inv)
		assert.Equal(t, refreshStatus{RefreshMode: "incremental", LastRefreshKind: ptr("incremental"), Anomalies: before.Status[inv].Anomalies,
			RecheckedKeys: 0, LastOutcome: "succeeded"}, readRefreshStatus(t, admin, inv), "a refresh after a write of created_at, which it does not read")
		// A block's number moved and back: sequence_number is read.
		for _, by := range []int{1000, -1000} {
			exec(t, app, `UPDATE public.dataset_key_blocks k SET sequence_number = k.sequence_number + $1
				WHERE k.ctid = (SELECT x.ctid FROM public.dataset_key_blocks x WHERE x.event_type <> 'Seed'
				                 ORDER BY x.dataset_id, x.sequence_number LIMIT 1)`, by)
			refreshAs(t, u.refresher, inv)
			assert.Equal(t, refreshStatus{RefreshMode: "incremental", LastRefreshKind: ptr("incremental"), Anomalies: before.Status[inv].Anomalies,
				RecheckedKeys: 1, LastOutcome: "succeeded"}, readRefreshStatus(t, admin, inv), "a refresh after a block moved by %d", by)
		}
		// Back to full, as the rest of the test expects; the capture goes.
		var old string
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency.set_refresh_mode($1, 'full')", inv).Scan(&old))
		assert.Equal(t, "incremental", old)
		assert.Empty(t, captureTriggers(t, admin), "capture triggers once no invariant is incremental")
		var fns int
		require.NoError(t, admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_catalog.pg_proc
			WHERE pronamespace = 'pgconsistency'::regnamespace AND proname ~ '^_?capture_[0-9]+$'`).Scan(&fns))
		assert.Zero(t, fns, "capture functions once no invariant is incremental")
	})

	t.Run("RolesKeepTheirRights", func(t *testing.T) {
		// The receivers keep running through the upgrade: the exact status
		// queries of 0.1.0 and 0.2.0 (receiver/pgconsistencyreceiver) must
		// still work, as the reader.
		want := map[string]int64{}
		for inv, st := range before.Status {
			if st.Enabled {
				want[inv] = st.Anomalies
			}
		}
		dropNew := func(got map[string]int64) map[string]int64 {
			for inv, n := range got {
				if _, existed := before.Status[inv]; !existed {
					// An invariant new in this release: listed, not refreshed yet.
					assert.Zero(t, n, "%s, new in this release, before its first refresh", inv)
					delete(got, inv)
				}
			}
			return got
		}

		rows, err := u.reader.Query(t.Context(), receiver010StatusQuery)
		require.NoError(t, err, "the 0.1.0 receiver's status query, as the reader")
		got := map[string]int64{}
		for rows.Next() {
			var inv string
			var n int64
			dest := []any{&inv, &n} // and every other column, as the receiver does
			for range receiver010StatusColumns[2:] {
				dest = append(dest, new(any))
			}
			require.NoError(t, rows.Scan(dest...))
			got[inv] = n
		}
		require.NoError(t, rows.Err())
		assert.Equal(t, want, dropNew(got), "status as the 0.1.0 receiver reads it")

		got, versions, err := readStatus020(t, u.reader)
		if assert.NoError(t, err, "the 0.2.0 receiver's status transaction, as the reader") {
			assert.Equal(t, want, dropNew(got), "status as the 0.2.0 receiver reads it")
			assert.Equal(t, []string{currentRelease}, versions, "the version the 0.2.0 receiver reports")
		}

		assert.Equal(t, u.unread, readLog010(t, u.reader, 100), "the reader reads the rest of its log as %s", logConsumer)

		exec(t, u.refresher, "CALL pgconsistency.refresh()")
		var claimed bool
		require.NoError(t, u.refresher.QueryRow(t.Context(), "SELECT pgconsistency.claim_refresh_request()").Scan(&claimed))
		assert.False(t, claimed, "the pending request is not due yet")
		var outcome string
		require.NoError(t, u.refresher.QueryRow(t.Context(),
			"SELECT pgconsistency.refresh_invariant('dataset_seed_missing', false)").Scan(&outcome))
		assert.Contains(t, []string{"succeeded", "not_due"}, outcome, "the receiver's scheduler, as the refresher")
	})

	t.Run("RefreshGivesTheSameCounts", func(t *testing.T) {
		exec(t, admin, "CALL pgconsistency.refresh(force => true)")
		after := captureState(t, admin, u.roles)
		for inv, b := range before.Status {
			a, ok := after.Status[inv]
			if !assert.True(t, ok, "invariant %s is gone", inv) {
				continue
			}
			if !b.Enabled {
				assert.Equal(t, b, a, "%s is disabled: not refreshed, its status untouched", inv)
				continue
			}
			if !assert.Equal(t, "succeeded", a.LastOutcome, inv) && a.LastError != nil {
				t.Logf("%s: %s", inv, *a.LastError)
			}
			assert.Equal(t, [4]int64{b.Anomalies, 0, 0, b.AcknowledgedAnomalies},
				[4]int64{a.Anomalies, a.NewAnomalies, a.ResolvedAnomalies, a.AcknowledgedAnomalies},
				"%s: anomalies, new, resolved, acknowledged", inv)
		}
		// Nothing changed in the data: the anomalies are the same ones.
		// Since 0.3.0 a refresh writes only changes: an anomaly that
		// persists keeps even its last_seen_at. Its details are its row as
		// of this refresh. (An invariant new in this release may find
		// anomalies of its own.)
		got := maps.Clone(after.Anomalies)
		maps.DeleteFunc(got, func(_ string, a anomalySnapshot) bool { return !before.hasInvariant(a.Invariant) })
		for k, a := range got {
			if a.ResolvedAt == nil {
				assertDetailsAre(t, after.Views[a.Invariant][a.Key], a.Details,
					"details of the open anomaly %s after the refresh: its row in the view", k)
			}
		}
		equalByKey(t, "anomaly after the refresh", withoutOpenDetails(before.Anomalies), withoutOpenDetails(got), false)
		equalByKey(t, "rows after the refresh of the anomaly view of", before.Views, after.Views, true)
	})

	t.Run("LogDeliversEachAnomalyOnce", func(t *testing.T) {
		exec(t, admin, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(18))
		exec(t, admin, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
		var delivered []string
		for range 10 {
			// two at a time: the cursor moves several times after the upgrade
			batch := readLog010(t, u.reader, 2)
			if len(batch) == 0 {
				break
			}
			for _, r := range batch {
				if before.hasInvariant(r.Invariant) {
					delivered = append(delivered, r.Invariant+" "+r.Key)
				} else {
					t.Logf("delivered %s %s of an invariant new in this release", r.Invariant, r.Key)
				}
			}
			exec(t, u.reader, "SELECT pgconsistency.advance_log_cursor($1, $2)", logConsumer, batch[len(batch)-1].Seq)
		}
		var want []string
		for _, r := range u.unread {
			want = append(want, r.Invariant+" "+r.Key)
		}
		want = append(want, "dataset_head_ref_missing "+fixture.DatasetID(18))
		assert.Equal(t, want, delivered, "what %s had not read before the upgrade, then the new anomaly, each once", logConsumer)
	})

	t.Run("AuditKeepsRecording", func(t *testing.T) {
		after := captureState(t, admin, u.roles).Audit
		assert.Equal(t, before.Audit.Tables, after.Tables)
		// the same triggers, calling the same function under its name of
		// 0.4.0 (renamed in place)
		assert.Equal(t, renamedIn040(before).Audit.Triggers, after.Triggers)
		assert.Equal(t, before.Audit.Rows+1, after.Rows, "the head reference deleted after the upgrade is recorded")
		var op string
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT operation FROM pgconsistency.audit_history($1) LIMIT 1", fixture.DatasetID(18)).Scan(&op))
		assert.Equal(t, "DELETE", op)
	})

	// What 0.2.0 adds to an upgraded install, besides keeping the rest.
	t.Run("NewIn020", func(t *testing.T) {
		var version, installed string
		require.NoError(t, u.reader.QueryRow(t.Context(), "SELECT DISTINCT version FROM pgconsistency.status").Scan(&version))
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency.version()").Scan(&installed))
		assert.Equal(t, installed, version, "the status view's version column, as the reader reads it")
		if rel.version == "0.1.0" {
			rows, err := admin.Query(t.Context(), "SELECT DISTINCT resolved_retention::text FROM pgconsistency.invariant")
			require.NoError(t, err)
			retentions, err := pgx.CollectRows(rows, pgx.RowTo[string])
			require.NoError(t, err)
			assert.Equal(t, []string{"30 days"}, retentions, "every upgraded invariant has the default retention")
		} // else StateKept checked that the retentions set in 0.2.0 were kept
		for _, idx := range []string{"anomaly_acknowledged_until", "anomaly_resolved"} {
			var exists bool
			require.NoError(t, admin.QueryRow(t.Context(), "SELECT to_regclass('pgconsistency.' || $1) IS NOT NULL", idx).Scan(&exists))
			assert.True(t, exists, idx)
		}
		var owner *string
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT owner FROM pgconsistency.log_cursor WHERE consumer = $1", logConsumer).Scan(&owner))
		require.NotNil(t, owner, "the cursor is owned by the role that used it (since 0.2.0, or its first use after the upgrade)")
		assert.Equal(t, u.roles["reader"], *owner)
		var plan int
		require.NoError(t, u.refresher.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.refresh_plan(force => true)").Scan(&plan))
		assert.Positive(t, plan, "refresh_plan() as the refresher")
	})

	// What 0.3.0 changes and adds in an upgraded install. Last: it switches
	// refresh modes (capture triggers on the application tables) and
	// changes data.
	// 0.4.0 renamed columns: the new names hold what the old ones held
	// before the upgrade, and the old ones (read by captureState, so by
	// StateKept above) still read the same until 0.8.0.
	t.Run("NewIn040", func(t *testing.T) {
		acknowledged := 0
		for k, a := range before.Anomalies {
			if a.AckReason == nil && a.AckUntil == nil {
				continue
			}
			acknowledged++
			var reason *string
			var until *time.Time
			require.NoError(t, admin.QueryRow(t.Context(), `SELECT acknowledged_reason, acknowledged_until FROM pgconsistency.anomaly
				WHERE invariant = $1 AND key = $2`, a.Invariant, a.Key).Scan(&reason, &until))
			assert.Equal(t, a.AckReason, reason, "acknowledged_reason of %s", k)
			assert.Equal(t, a.AckUntil, until, "acknowledged_until of %s", k)
		}
		assert.Positive(t, acknowledged, "acknowledged anomalies before the upgrade")
		var rows, differ int
		require.NoError(t, u.reader.QueryRow(t.Context(), `
			SELECT count(*), count(*) FILTER (WHERE last_status IS DISTINCT FROM last_run_outcome
			                                     OR refresh_duration_seconds IS DISTINCT FROM snapshot_duration_seconds)
			  FROM pgconsistency.status`).Scan(&rows, &differ))
		assert.Equal(t, len(upgraded.Status), rows, "status rows, as the reader")
		assert.Zero(t, differ, "status rows whose old and new columns differ, as the reader")
		var oldIndex bool
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT to_regclass('pgconsistency.anomaly_ack_until') IS NOT NULL").Scan(&oldIndex))
		assert.False(t, oldIndex, "anomaly_ack_until, renamed anomaly_acknowledged_until")
	})

	// 0.5.0: owners. The pack's invariants get its default owner and
	// runbook; the user's own have none; what set_owner() sets is kept by
	// the next install, and the reader sees both in the status view.
	t.Run("NewIn050", func(t *testing.T) {
		newIn050(t, admin, u, rel, upgrade)
	})

	// 0.6.0: which deploy broke it. The deploy marker the install had
	// starts the deployment history; the anomalies open before the upgrade
	// have no deployment (unknown); one that appears now has the latest.
	t.Run("NewIn060", func(t *testing.T) {
		newIn060(t, admin, u, rel)
	})

	// 0.7.0: the WAL capture (opt-in) and the changes refreshed within seconds.
	t.Run("NewIn070", func(t *testing.T) {
		newIn070(t, admin, u)
	})

	// 0.7.1: the WAL capture's own role, and its cheaper read.
	t.Run("NewIn071", func(t *testing.T) {
		newIn071(t, admin, rel)
	})

	// 0.7.2: the WAL capture's read, paced and cheaper per change.
	t.Run("NewIn072", func(t *testing.T) {
		newIn072(t, admin, rel)
	})

	// 0.7.3: the refresh's steps keep their plans for the session.
	t.Run("NewIn073", func(t *testing.T) {
		newIn073(t, admin)
	})

	// 0.7.4: the WAL capture's read takes key columns by their place.
	t.Run("NewIn074", func(t *testing.T) {
		newIn074(t, admin, rel)
	})

	// 0.7.5: an UPDATE that leaves the columns an invariant reads as they
	// were gives it no key.
	t.Run("NewIn075", func(t *testing.T) {
		newIn075(t, admin, rel)
	})

	// 0.7.6: the WAL capture's read takes each row's key with one CASE
	// over the sources.
	t.Run("NewIn076", func(t *testing.T) {
		newIn076(t, admin)
	})

	// 0.7.7: the receiver may stream the WAL capture's slot over a
	// replication connection.
	t.Run("NewIn077", func(t *testing.T) {
		newIn077(t, admin)
	})

	// 0.7.8: an incremental refresh runs its query without JIT.
	t.Run("NewIn078", func(t *testing.T) {
		newIn078(t, admin)
	})

	// 0.7.9: the capture triggers check the columns an UPDATE compares
	// without a query; _query_shape gives the columns a query reads.
	t.Run("NewIn079", func(t *testing.T) {
		newIn079(t, admin)
	})

	t.Run("NewIn030", func(t *testing.T) {
		newIn030(t, s, db, admin, u, rel, before, upgraded, dashboard)
	})
}

// used is what useRelease left: the login roles and their connections, and
// the log records consumer-a has not read yet.
type used struct {
	reader, refresher *pgx.Conn
	roles             map[string]string // "reader"/"refresher" → login role
	unread            []logRow
}

// useRelease builds the state a user of rel has after a while, through the
// calls they make, on a database with the anomaly fixtures of rel's
// dataset invariants.
func useRelease(t *testing.T, s *pgtest.Server, admin *pgx.Conn, db string, rel fromRelease) used {
	t.Helper()
	reader, readerRole := loginAs(t, s, admin, db, "GRANT pgconsistency_reader TO ROLE")
	refresher, refresherRole := loginAs(t, s, admin, db, "GRANT pgconsistency_refresher TO ROLE")
	u := used{reader: reader, refresher: refresher,
		roles: map[string]string{"reader": readerRole, "refresher": refresherRole}}
	headRefMissing := func(i int) {
		exec(t, admin, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(i))
	}

	// Tuning, and invariants of the user's own outside the packs.
	exec(t, admin, "SELECT pgconsistency.enable_audit('public.dataset_references', 'dataset_id')")
	exec(t, admin, "SELECT pgconsistency.set_parameter('transaction_long_running', 'threshold', '2 hours')")
	// On an invariant the pack ships no settings for: 0.1.0's install.sql
	// resets those of the four that ship some (a known 0.1.0 bug, apart
	// from upgrades).
	exec(t, admin, `UPDATE pgconsistency.invariant SET settings = '{"work_mem": "64MB"}' WHERE name = 'dataset_seed_missing'`)
	exec(t, admin, "UPDATE pgconsistency.invariant SET refresh_period = '6 hours' WHERE name = 'dataset_statistics_duplicated'")
	exec(t, admin, "UPDATE pgconsistency.invariant SET statement_timeout = '5 minutes', lock_timeout = '10 seconds' WHERE name = 'dataset_key_blocks_missing'")
	if rel.version != "0.1.0" {
		exec(t, admin, "UPDATE pgconsistency.invariant SET resolved_retention = '90 days' WHERE name = 'dataset_head_ref_missing'")
	}
	exec(t, admin, `SELECT pgconsistency.define_invariant(
		name => 'root_dataset_with_dev_ref', severity => 'info',
		description => 'Root dataset with a dev reference (custom, outside the packs)',
		query => $q$ SELECT e.dataset_id::text AS key, e.dataset_name::text AS dataset_name
		               FROM public.dataset_entries e
		               JOIN public.dataset_references r ON r.dataset_id = e.dataset_id AND r.block_ref_name = 'dev'
		              WHERE e.kind = 'root' $q$,
		settings => '{"enable_nestloop": "off"}')`)
	exec(t, admin, "UPDATE pgconsistency.invariant SET refresh_period = '1 hour' WHERE name = 'root_dataset_with_dev_ref'")
	if rel.atLeast("0.3.0") {
		// Capture triggers on dataset_entries and dataset_key_blocks, which
		// nothing below writes (InternalNames does, after the upgrade).
		exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'incremental')")
	}
	// A materialized view of the user's own, outside the pgconsistency
	// schema, registered as it is.
	exec(t, admin, `CREATE MATERIALIZED VIEW public.derivative_many_upstreams AS
		SELECT d.downstream_dataset_id::text AS key, count(*) AS upstream_edges
		  FROM public.dataset_dependencies d
		 GROUP BY d.downstream_dataset_id
		HAVING count(*) > 1
		WITH NO DATA`)
	exec(t, admin, "CREATE UNIQUE INDEX derivative_many_upstreams_key ON public.derivative_many_upstreams (key)")
	exec(t, admin, `SELECT pgconsistency.register_invariant('derivative_many_upstreams', 'public', 'derivative_many_upstreams',
		'info', 'A derivative that reads more than one dataset (custom materialized view)')`)

	exec(t, admin, "CALL pgconsistency.refresh()")
	exec(t, admin, "UPDATE pgconsistency.invariant SET enabled = false WHERE name = 'lock_wait_long'")

	// Acknowledgements: until a date, all of an invariant, and until resolved.
	exec(t, admin, "SELECT pgconsistency.acknowledge('dataset_seed_missing', $1, 'fix scheduled', now() + interval '30 days')", fixture.DatasetID(13))
	exec(t, admin, "SELECT pgconsistency.acknowledge_all('dataset_seed_not_first', 'known leftovers of the 2026-11 incident')")
	exec(t, admin, "SELECT pgconsistency.acknowledge('dataset_key_blocks_missing', $1, 'dataset being deleted')", fixture.DatasetID(11))

	// The log consumer starts at the end of the log.
	require.Empty(t, readLog010(t, reader, 100), "a new consumer starts at the end")

	// Three datasets break and one is fixed; one that stays broken changes
	// (a third statistics row: its anomaly's details, written when it
	// appeared, are no longer its row in the view). The refresher refreshes
	// (as pg_cron would). The consumer delivers the first new anomaly only.
	headRefMissing(10)
	exec(t, admin, "DELETE FROM public.dataset_statistics WHERE dataset_id = $1", fixture.DatasetID(17))
	exec(t, admin, "DELETE FROM public.dataset_dependencies WHERE downstream_dataset_id = $1", fixture.DatasetID(28))
	exec(t, admin, "INSERT INTO public.dataset_references VALUES ($1, 'head', fixture.block_hash(1, 'head', 2))", fixture.DatasetID(1))
	exec(t, admin, "INSERT INTO public.dataset_statistics (dataset_id, block_ref_name, num_records, data_size, checkpoints_size) VALUES ($1, 'head', 7, 7, 0)", fixture.DatasetID(8))
	exec(t, refresher, "CALL pgconsistency.refresh(force => true)")
	batch := readLog010(t, reader, 100)
	require.Len(t, batch, 3, "the three new anomalies: %v", batch)
	exec(t, reader, "SELECT pgconsistency.advance_log_cursor($1, $2)", logConsumer, batch[0].Seq)
	u.unread = batch[1:]

	// A deployment: the marker changes (a request in a day), and the deploy
	// pipeline asks for a refresh too (pushed back to two days).
	var changed bool
	require.NoError(t, refresher.QueryRow(t.Context(), "SELECT pgconsistency.observe_deploy_marker('v41', '1 day')").Scan(&changed))
	require.False(t, changed, "the first marker is the baseline")
	require.NoError(t, refresher.QueryRow(t.Context(), "SELECT pgconsistency.observe_deploy_marker('v42', '1 day')").Scan(&changed))
	require.True(t, changed)
	exec(t, refresher, "SELECT pgconsistency.request_refresh(delay => '2 days', reason => 'release 42 migrated')")
	return u
}

// requireUsedState checks that the state before the upgrade is the one
// useRelease meant to build, so the comparisons after it test something.
func requireUsedState(t *testing.T, st upgradeState, u used, rel fromRelease) {
	t.Helper()
	counts := func(inv string) [4]int64 {
		s := st.Status[inv]
		return [4]int64{s.Anomalies, s.NewAnomalies, s.ResolvedAnomalies, s.AcknowledgedAnomalies}
	}
	require.Equal(t, [4]int64{3, 1, 1, 0}, counts("dataset_head_ref_missing"), "1 fixed, 10 broken")
	require.Equal(t, [4]int64{5, 1, 0, 0}, counts("dataset_statistics_missing"), "17 broken")
	require.Equal(t, [4]int64{2, 0, 0, 0}, counts("dataset_statistics_duplicated"))
	require.Equal(t, [4]int64{3, 1, 0, 0}, counts("derivative_dependencies_missing"), "28 broken")
	require.Equal(t, [4]int64{2, 0, 0, 1}, counts("dataset_seed_missing"))
	require.Equal(t, [4]int64{0, 0, 0, 2}, counts("dataset_seed_not_first"))
	require.Equal(t, [4]int64{2, 0, 0, 1}, counts("dataset_key_blocks_missing"))
	require.Equal(t, [4]int64{3, 0, 0, 0}, counts("root_dataset_with_dev_ref"))
	require.Equal(t, []string{fixture.DatasetID(30)}, slices.Collect(maps.Keys(st.Views["derivative_many_upstreams"])),
		"30 has two upstreams (and 28 none any more)")
	require.Len(t, st.Status, len(rel.datasetInvariants)+len(operationsInvariants)+2)
	for _, inv := range rel.datasetInvariants {
		require.Contains(t, st.Status, inv)
	}
	require.False(t, st.Status["lock_wait_long"].Enabled)
	require.Len(t, u.unread, 2)
	require.EqualValues(t, 1, st.Status["dataset_seed_missing"].PendingRequests)
	require.Len(t, st.Requests, 1)
	require.Equal(t, 2, st.Requests[0].Requests)
	require.NotNil(t, st.DeployMarker)
	require.NotNil(t, st.DeployMarker.ChangedAt)
	require.Equal(t, "granted", st.Privileges["reader: SELECT on table pgconsistency.status"])
	require.Equal(t, "granted", st.Privileges["refresher: EXECUTE on function pgconsistency.refresh(text, boolean)"])
	require.Equal(t, "denied", st.Privileges["reader: EXECUTE on functions pgconsistency.define_invariant"])
	require.EqualValues(t, 2, st.Audit.Rows, "the head reference deleted and the one put back")
	stale := st.Anomalies["dataset_statistics_duplicated "+fixture.DatasetID(8)]
	require.NotNil(t, stale.Details)
	var details map[string]any
	require.NoError(t, json.Unmarshal([]byte(*stale.Details), &details))
	if rel.atLeast("0.3.0") {
		require.Equal(t, st.Views["dataset_statistics_duplicated"][fixture.DatasetID(8)], details,
			"since 0.3.0 the details of 8's anomaly are its row as of the latest refresh")
	} else {
		require.NotEqual(t, st.Views["dataset_statistics_duplicated"][fixture.DatasetID(8)], details,
			"the details of 8's anomaly are those of when it appeared, not its row in the view")
	}
	if rel.version != "0.1.0" {
		require.Equal(t, "90 days", st.Retentions["dataset_head_ref_missing"])
	}
}

// readLog010 is the 0.1.0 logs receiver's read of consumer-a's log
// (receiver/pgconsistencyreceiver/logs.go): at most maxRows records, the
// cursor not advanced.
func readLog010(t *testing.T, conn *pgx.Conn, maxRows int) []logRow {
	t.Helper()
	rows, err := conn.Query(t.Context(),
		"SELECT seq, invariant, severity, key, details::text, first_seen_at FROM pgconsistency.new_anomalies_for_log($1, $2)",
		logConsumer, maxRows)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (logRow, error) {
		var l logRow
		var severity string
		var details *string
		var firstSeen time.Time
		err := r.Scan(&l.Seq, &l.Invariant, &severity, &l.Key, &details, &firstSeen)
		return l, err
	})
	require.NoError(t, err)
	return out
}

// receiver010StatusColumns are the status columns the 0.1.0 receiver reads
// (receiver/pgconsistencyreceiver/client.go); invariant and anomalies first.
var receiver010StatusColumns = []string{"invariant", "anomalies", "severity", "new_anomalies", "resolved_anomalies",
	"acknowledged_anomalies", "refreshed_at", "last_duration_seconds", "consecutive_failures", "last_outcome",
	"refresh_period_seconds", "pending_requests", "deploy_marker_changed_at"}

var receiver010StatusQuery = "SELECT " + strings.Join(receiver010StatusColumns, ", ") + " FROM pgconsistency.status WHERE enabled"

// changelogVersion is the version of the top release heading of
// CHANGELOG.md ("## [0.2.0] - 2026-12-01"); an [Unreleased] section is not one.
func changelogVersion() (string, error) {
	path := fixture.Path("CHANGELOG.md")
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("CHANGELOG.md does not exist at the repository root (%s): the release that adds "+
			"pgconsistency.version() must add it, its top heading \"## [x.y.z] - date\" naming the version", path)
	}
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`(?m)^## \[(\d+\.\d+\.\d+[^\]]*)\]`).FindSubmatch(b)
	if m == nil {
		return "", fmt.Errorf("%s has no release heading \"## [x.y.z] - date\"", path)
	}
	return string(m[1]), nil
}

// upgradeState is what a user of pgconsistency has in their database,
// read with named columns only: a later release may add columns.
type upgradeState struct {
	Status       map[string]statusSnapshot    // by invariant
	Invariants   map[string]invariantSnapshot // by name
	Parameters   map[string]parameterSnapshot // by "invariant.name"
	Anomalies    map[string]anomalySnapshot   // by "invariant key", open and resolved
	LogCursors   map[string]logCursorSnapshot // by consumer
	Requests     []refreshRequestSnapshot     // every refresh request, by id
	DeployMarker *deployMarkerSnapshot
	Views        map[string]map[string]map[string]any // invariant → key → the view row without key
	// invariant → its view's columns, "name type" and "name collation"
	Columns, Collations map[string][]string
	// invariant → resolved_retention (0.2.0 and later; nil before)
	Retentions map[string]string
	Audit      auditSnapshot
	// "reader: SELECT on table pgconsistency.status" → granted, denied or
	// missing (the object is gone)
	Privileges map[string]string
}

func (st upgradeState) hasInvariant(name string) bool {
	_, ok := st.Invariants[name]
	return ok
}

// statusSnapshot: the columns of pgconsistency.status in 0.1.0. A later
// release may add columns; these must keep their names and values.
type statusSnapshot struct {
	Invariant              string     `db:"invariant"`
	Severity               string     `db:"severity"`
	Description            string     `db:"description"`
	Enabled                bool       `db:"enabled"`
	ViewSchema             string     `db:"view_schema"`
	ViewName               string     `db:"view_name"`
	RefreshPeriod          string     `db:"refresh_period"`
	RefreshPeriodSeconds   float64    `db:"refresh_period_seconds"`
	Anomalies              int64      `db:"anomalies"`
	NewAnomalies           int64      `db:"new_anomalies"`
	ResolvedAnomalies      int64      `db:"resolved_anomalies"`
	AcknowledgedAnomalies  int64      `db:"acknowledged_anomalies"`
	RefreshedAt            *time.Time `db:"refreshed_at"`
	RefreshDurationSeconds *float64   `db:"refresh_duration_seconds"`
	ConsecutiveFailures    int64      `db:"consecutive_failures"`
	LastStatus             *string    `db:"last_status"`
	LastStartedAt          *time.Time `db:"last_started_at"`
	LastFinishedAt         *time.Time `db:"last_finished_at"`
	LastDurationSeconds    *float64   `db:"last_duration_seconds"`
	LastError              *string    `db:"last_error"`
	LastSkippedAt          *time.Time `db:"last_skipped_at"`
	Skips                  int64      `db:"skips"`
	LastOutcome            string     `db:"last_outcome"`
	PendingRequests        int64      `db:"pending_requests"`
	DeployMarkerChangedAt  *time.Time `db:"deploy_marker_changed_at"`
}

const statusSnapshotQuery = `
SELECT invariant, severity, description, enabled, view_schema, view_name, refresh_period::text AS refresh_period,
       refresh_period_seconds, anomalies, new_anomalies, resolved_anomalies, acknowledged_anomalies,
       refreshed_at, refresh_duration_seconds, consecutive_failures, last_status, last_started_at,
       last_finished_at, last_duration_seconds, last_error, last_skipped_at, skips, last_outcome,
       pending_requests, deploy_marker_changed_at
  FROM pgconsistency.status`

type invariantSnapshot struct {
	Name             string    `db:"name"`
	Description      string    `db:"description"`
	Severity         string    `db:"severity"`
	ViewSchema       string    `db:"view_schema"`
	ViewName         string    `db:"view_name"`
	Enabled          bool      `db:"enabled"`
	RefreshPeriod    string    `db:"refresh_period"`
	StatementTimeout string    `db:"statement_timeout"`
	LockTimeout      string    `db:"lock_timeout"`
	Settings         string    `db:"settings"` // but "incremental", which 0.3.0 adds to the pack's (NewIn030)
	AfterRefresh     *string   `db:"after_refresh"`
	RegisteredAt     time.Time `db:"registered_at"`
	// A changed query of a pack invariant would change this and re-create
	// its view empty until the next refresh: a release may do it on
	// purpose, and must then say so in CHANGELOG.md and here.
	QueryMD5 *string `db:"query_md5"`
}

const invariantSnapshotQuery = `
SELECT name, description, severity, view_schema, view_name, enabled, refresh_period::text AS refresh_period,
       statement_timeout::text AS statement_timeout, lock_timeout::text AS lock_timeout,
       (settings - 'incremental')::text AS settings, after_refresh, registered_at, query_md5
  FROM pgconsistency.invariant`

type parameterSnapshot struct {
	Invariant    string  `db:"invariant"`
	Name         string  `db:"name"`
	Value        string  `db:"value"`
	Type         string  `db:"type"`
	DefaultValue string  `db:"default_value"`
	Description  *string `db:"description"`
}

const parameterSnapshotQuery = `
SELECT invariant, name, value, type::text AS type, default_value, description
  FROM pgconsistency.invariant_parameter`

// anomalySnapshot: one row of pgconsistency.anomaly. seq is what log
// cursors count in: it must not change for an anomaly that stays.
type anomalySnapshot struct {
	Invariant      string     `db:"invariant"`
	Key            string     `db:"key"`
	Seq            int64      `db:"seq"`
	FirstSeenAt    time.Time  `db:"first_seen_at"`
	LastSeenAt     time.Time  `db:"last_seen_at"`
	ResolvedAt     *time.Time `db:"resolved_at"`
	Details        *string    `db:"details"`
	AcknowledgedAt *time.Time `db:"acknowledged_at"`
	AcknowledgedBy *string    `db:"acknowledged_by"`
	AckReason      *string    `db:"ack_reason"`
	AckUntil       *time.Time `db:"ack_until"`
}

// The anomalies here are minutes old: the retention of resolved anomalies
// (0.2.0 and later) must keep them.
const anomalySnapshotQuery = `
SELECT invariant, key, seq, first_seen_at, last_seen_at, resolved_at, details::text AS details,
       acknowledged_at, acknowledged_by, ack_reason, ack_until
  FROM pgconsistency.anomaly`

// logCursorSnapshot: a consumer's position in the log. 0.2.0 may add
// columns (an owner, say); last_seq must keep meaning "delivered up to the
// anomaly with this seq" (LogDeliversEachAnomalyOnce checks the meaning).
type logCursorSnapshot struct {
	Consumer  string    `db:"consumer"`
	LastSeq   int64     `db:"last_seq"`
	UpdatedAt time.Time `db:"updated_at"`
}

const logCursorSnapshotQuery = `SELECT consumer, last_seq, updated_at FROM pgconsistency.log_cursor`

type refreshRequestSnapshot struct {
	ID               int64      `db:"id"`
	FirstRequestedAt time.Time  `db:"first_requested_at"`
	RequestedAt      time.Time  `db:"requested_at"`
	DueAt            time.Time  `db:"due_at"`
	Requests         int        `db:"requests"`
	Reason           *string    `db:"reason"`
	ClaimedAt        *time.Time `db:"claimed_at"`
}

const refreshRequestSnapshotQuery = `
SELECT id, first_requested_at, requested_at, due_at, requests, reason, claimed_at
  FROM pgconsistency.refresh_request ORDER BY id`

type deployMarkerSnapshot struct {
	Value     *string    `db:"value"`
	SeenAt    time.Time  `db:"seen_at"`
	ChangedAt *time.Time `db:"changed_at"`
}

const deployMarkerSnapshotQuery = `SELECT value, seen_at, changed_at FROM pgconsistency.deploy_marker`

// auditSnapshot: the audit pack's registry, its triggers and how much
// history it holds.
type auditSnapshot struct {
	Tables   []string // schema.table key_column enabled_at enabled_by
	Triggers []string // table: trigger definition
	Rows     int64
}

// privilegeChecks are what 0.1.0's roles.sql grants, and some of what it
// never grants (application data, the state tables, acknowledging): checked
// for both login roles. A later release may grant more on new objects, but
// must neither take these grants away nor give the denied ones.
var privilegeChecks = []struct{ privilege, kind, object string }{
	{"CONNECT", "database", ""}, // the test database
	{"USAGE", "schema", "pgconsistency"},
	{"SELECT", "table", "pgconsistency.status"},
	{"SELECT", "table", "pgconsistency.invariant"},
	{"EXECUTE", "function", "pgconsistency.new_anomalies_for_log(text, integer)"},
	{"EXECUTE", "function", "pgconsistency.advance_log_cursor(text, bigint)"},
	{"EXECUTE", "function", "pgconsistency.refresh(text, boolean)"},
	{"EXECUTE", "function", "pgconsistency.refresh_invariant(text, boolean)"},
	{"EXECUTE", "function", "pgconsistency.claim_refresh_request()"},
	{"EXECUTE", "function", "pgconsistency.expire_acknowledgements()"},
	{"EXECUTE", "function", "pgconsistency.request_refresh(interval, text)"},
	{"EXECUTE", "function", "pgconsistency.observe_deploy_marker(text, interval)"},
	{"SELECT", "table", "pgconsistency.anomaly"},
	{"UPDATE", "table", "pgconsistency.log_cursor"},
	{"DELETE", "table", "pgconsistency.refresh_state"},
	{"SELECT", "table", "pgconsistency.dataset_seed_missing"},
	{"SELECT", "table", "public.dataset_entries"},
	{"EXECUTE", "function", "pgconsistency.acknowledge_all(text, text, timestamptz)"},
	// by name: its arguments change from release to release
	{"EXECUTE", "functions", "pgconsistency.define_invariant"},
}

// privilegeQueries answer granted, denied or missing for (role, object, privilege).
var privilegeQueries = map[string]string{
	"database": `SELECT CASE WHEN has_database_privilege($1::name, coalesce(nullif($2::text, ''), current_database()), $3::text)
	                         THEN 'granted' ELSE 'denied' END`,
	"schema": `SELECT CASE WHEN to_regnamespace($2::text) IS NULL THEN 'missing'
	                       WHEN has_schema_privilege($1::name, $2::text, $3::text) THEN 'granted' ELSE 'denied' END`,
	"table": `SELECT CASE WHEN to_regclass($2::text) IS NULL THEN 'missing'
	                      WHEN has_table_privilege($1::name, $2::text, $3::text) THEN 'granted' ELSE 'denied' END`,
	"function": `SELECT CASE WHEN to_regprocedure($2::text) IS NULL THEN 'missing'
	                         WHEN has_function_privilege($1::name, $2::text, $3::text) THEN 'granted' ELSE 'denied' END`,
	// every function of that name: granted when one of them is
	"functions": `SELECT CASE WHEN count(*) = 0 THEN 'missing'
	                          WHEN bool_or(has_function_privilege($1::name, p.oid, $3::text)) THEN 'granted' ELSE 'denied' END
	                FROM pg_catalog.pg_proc p
	               WHERE p.pronamespace::regnamespace::text || '.' || p.proname = $2::text`,
}

// collectByName reads query's rows into T by column name.
func collectByName[T any](t *testing.T, conn *pgx.Conn, query string) []T {
	t.Helper()
	rows, err := conn.Query(t.Context(), query)
	require.NoError(t, err, query)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByName[T])
	require.NoError(t, err, query)
	return out
}

func byKey[T any](rows []T, key func(T) string) map[string]T {
	out := make(map[string]T, len(rows))
	for _, r := range rows {
		out[key(r)] = r
	}
	return out
}

// captureState reads everything a user has in pgconsistency; roles maps
// "reader" and "refresher" to the login roles whose privileges are read.
func captureState(t *testing.T, conn *pgx.Conn, roles map[string]string) upgradeState {
	t.Helper()
	st := upgradeState{
		Status: byKey(collectByName[statusSnapshot](t, conn, statusSnapshotQuery),
			func(r statusSnapshot) string { return r.Invariant }),
		Invariants: byKey(collectByName[invariantSnapshot](t, conn, invariantSnapshotQuery),
			func(r invariantSnapshot) string { return r.Name }),
		Parameters: byKey(collectByName[parameterSnapshot](t, conn, parameterSnapshotQuery),
			func(r parameterSnapshot) string { return r.Invariant + "." + r.Name }),
		Anomalies: byKey(collectByName[anomalySnapshot](t, conn, anomalySnapshotQuery),
			func(r anomalySnapshot) string { return r.Invariant + " " + r.Key }),
		LogCursors: byKey(collectByName[logCursorSnapshot](t, conn, logCursorSnapshotQuery),
			func(r logCursorSnapshot) string { return r.Consumer }),
		Requests: collectByName[refreshRequestSnapshot](t, conn, refreshRequestSnapshotQuery),
		Views:    map[string]map[string]map[string]any{},
	}
	if m := collectByName[deployMarkerSnapshot](t, conn, deployMarkerSnapshotQuery); len(m) == 1 {
		st.DeployMarker = &m[0]
	}
	for name, inv := range st.Invariants {
		st.Views[name] = viewContent(t, conn, inv.ViewSchema, inv.ViewName)
	}
	st.Columns, st.Collations = viewColumns(t, conn)
	var hasRetention bool
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
		WHERE attrelid = 'pgconsistency.invariant'::regclass AND attname = 'resolved_retention' AND NOT attisdropped)`).Scan(&hasRetention))
	if hasRetention {
		rows, err := conn.Query(t.Context(), "SELECT name, resolved_retention::text FROM pgconsistency.invariant")
		require.NoError(t, err)
		st.Retentions = map[string]string{}
		for rows.Next() {
			var name, retention string
			require.NoError(t, rows.Scan(&name, &retention))
			st.Retentions[name] = retention
		}
		require.NoError(t, rows.Err())
	}

	rows, err := conn.Query(t.Context(), `SELECT concat_ws(' ', table_schema || '.' || table_name, key_column, enabled_at, enabled_by)
		FROM pgconsistency.audited_table ORDER BY 1`)
	require.NoError(t, err)
	st.Audit.Tables, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	rows, err = conn.Query(t.Context(), `SELECT tgrelid::regclass::text || ': ' || pg_get_triggerdef(oid)
		FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'pgconsistency\_audit%' ORDER BY 1`)
	require.NoError(t, err)
	st.Audit.Triggers, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.audit_log").Scan(&st.Audit.Rows))

	st.Privileges = capturePrivileges(t, conn, roles)
	return st
}

// capturePrivileges answers privilegeChecks for each login role.
func capturePrivileges(t *testing.T, conn *pgx.Conn, roles map[string]string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for label, role := range roles {
		for _, c := range privilegeChecks {
			var got string
			require.NoError(t, conn.QueryRow(t.Context(), privilegeQueries[c.kind], role, c.object, c.privilege).Scan(&got),
				"%s %s %s", c.privilege, c.kind, c.object)
			what := c.object
			if c.kind == "database" {
				what = "the database"
			}
			out[fmt.Sprintf("%s: %s on %s %s", label, c.privilege, c.kind, what)] = got
		}
	}
	return out
}

// viewContent is an anomaly view's rows, key → the row without key. Not
// through pgx's statement cache: that a statement prepared before the
// upgrade still runs after it is NewIn030's to check, once.
func viewContent(t *testing.T, conn *pgx.Conn, schema, view string) map[string]map[string]any {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT v.key, to_jsonb(v) - 'key' FROM "+pgx.Identifier{schema, view}.Sanitize()+" v",
		pgx.QueryExecModeDescribeExec)
	require.NoError(t, err, "reading %s.%s", schema, view)
	out := map[string]map[string]any{}
	for rows.Next() {
		var key string
		var row map[string]any
		require.NoError(t, rows.Scan(&key, &row))
		out[key] = row
	}
	require.NoError(t, rows.Err(), "reading %s.%s", schema, view)
	return out
}

// compareState asserts that after holds what before held, entry by entry,
// so that a failure names what was lost or changed.
func compareState(t *testing.T, before, after upgradeState) {
	t.Helper()
	before = renamedIn040(before)
	// A release may add invariants (and their views and status rows) and
	// parameters: new entries there are allowed. Nothing may be lost.
	equalByKey(t, "invariant", before.Invariants, after.Invariants, true)
	equalByKey(t, "parameter", before.Parameters, after.Parameters, true)
	equalByKey(t, "status row", before.Status, after.Status, true)
	equalByKey(t, "rows of the anomaly view of", before.Views, after.Views, true)
	// An open anomaly's details may become its row in the view (since
	// 0.3.0 they are its row as of the latest refresh, and the view of an
	// invariant of define_invariant reads them); all else stays.
	equalByKey(t, "anomaly", withoutOpenDetails(before.Anomalies), withoutOpenDetails(after.Anomalies), false)
	for _, k := range slices.Sorted(maps.Keys(before.Anomalies)) {
		b, a := before.Anomalies[k], after.Anomalies[k]
		if b.ResolvedAt != nil || a.Key == "" || equalJSON(b.Details, a.Details) {
			continue
		}
		assertDetailsAre(t, before.Views[b.Invariant][b.Key], a.Details,
			"details of the open anomaly %s: unchanged, or its row in the view before the upgrade", k)
	}
	if before.Retentions != nil {
		equalByKey(t, "resolved_retention of", before.Retentions, after.Retentions, true)
	}
	equalByKey(t, "log cursor", before.LogCursors, after.LogCursors, false)
	equalByKey(t, "privilege", before.Privileges, after.Privileges, false)
	assert.Equal(t, before.Requests, after.Requests, "pgconsistency.refresh_request")
	assert.Equal(t, before.DeployMarker, after.DeployMarker, "pgconsistency.deploy_marker")
	assert.Equal(t, before.Audit, after.Audit, "the audit pack's tables, triggers and history")
}

// equalByKey asserts that every entry of before is in after, unchanged; an
// entry only in after fails unless newAllowed (then it is logged).
func equalByKey[V any](t *testing.T, what string, before, after map[string]V, newAllowed bool) {
	t.Helper()
	for _, k := range slices.Sorted(maps.Keys(before)) {
		a, ok := after[k]
		if !ok {
			t.Errorf("%s %s is gone", what, k)
			continue
		}
		assert.Equal(t, before[k], a, "%s %s", what, k)
	}
	for _, k := range slices.Sorted(maps.Keys(after)) {
		if _, ok := before[k]; ok {
			continue
		}
		if newAllowed {
			t.Logf("%s %s is new", what, k)
		} else {
			t.Errorf("%s %s is new", what, k)
		}
	}
}

// renamedIn040 is st with the internal functions of the packs under their
// names of 0.4.0 (renamed in place by the upgrade): what refers to them by
// name, the invariant deadlocks_detected's after_refresh and the audit
// triggers' definitions.
func renamedIn040(st upgradeState) upgradeState {
	invariants := maps.Clone(st.Invariants)
	for name, inv := range invariants {
		if inv.AfterRefresh != nil && *inv.AfterRefresh == "pgconsistency.deadlocks_remember" {
			inv.AfterRefresh = ptr("pgconsistency._deadlocks_remember")
			invariants[name] = inv
		}
	}
	st.Invariants = invariants
	triggers := slices.Clone(st.Audit.Triggers)
	for i, def := range triggers {
		triggers[i] = strings.ReplaceAll(def, "pgconsistency.audit_trigger(", "pgconsistency._audit_trigger(")
	}
	st.Audit.Triggers = triggers
	return st
}

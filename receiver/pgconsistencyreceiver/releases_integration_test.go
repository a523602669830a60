//go:build integration

package pgconsistencyreceiver

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// releaseDatabase creates a database with the application schema, the clean
// data and the dataset_seed_missing fixture, and the SQL of a kept release
// (testdata/sql/<release>/install.sql) installed and refreshed.
func releaseDatabase(t *testing.T, srv *pgtest.Server, release string) string {
	t.Helper()
	db := srv.CreateDatabase(t, "")
	srv.PsqlFile(t, db, fixture.Path("testdata/legacy/schema.sql"))
	srv.PsqlFile(t, db, fixture.Path("testdata/legacy/fixtures/clean.sql"))
	srv.PsqlFile(t, db, fixture.Path("testdata/legacy/fixtures/dataset_seed_missing.sql"))
	srv.PsqlFile(t, db, fixture.Path(filepath.Join("testdata/sql", release, "install.sql")))
	_, err := srv.Conn(t, db).Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	return db
}

// failingQueries runs fn, closes the client's connections and returns how
// many transactions of database db were rolled back meanwhile: a status
// query that fails (undefined_column) rolls its transaction back. A backend
// reports its counts when it exits, if not before.
func failingQueries(t *testing.T, admin *pgx.Conn, db string, pc *pgxClient, fn func()) int64 {
	t.Helper()
	read := func() int64 {
		var n int64
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT xact_rollback FROM pg_catalog.pg_stat_database WHERE datname = $1", db).Scan(&n))
		return n
	}
	before := read()
	fn()
	pc.pool.Reset()
	require.Eventually(t, func() bool {
		var n int
		err := admin.QueryRow(t.Context(), `SELECT count(*) FROM pg_catalog.pg_stat_activity
			WHERE datname = $1 AND application_name = 'otelcol-pgconsistency'`, db).Scan(&n)
		return err == nil && n == 0
	}, 10*time.Second, 20*time.Millisecond, "the client's connections closed")
	// the exiting backend's counts, flushed as it exits
	after := read()
	for range 5 {
		time.Sleep(100 * time.Millisecond)
		after = read()
	}
	return after - before
}

// TestIntegrationOlderReleases: a collector upgraded before the database
// reports the SQL of 0.1.0, 0.2.0, 0.4.0 and 0.5.0 (testdata/sql/): the counts, no
// version for 0.1.0, every invariant in full mode and nothing healed (0.1.0
// and 0.2.0 refresh fully; the metrics are there, at their true values),
// no owner nor runbook before 0.5.0, no deploy marker value before 0.6.0. It
// finds the status shape once, not on every scrape; it probes the newest
// shape again after a reconnect, and by itself after the SQL is upgraded
// with install.sql, without a reconnect.
func TestIntegrationOlderReleases(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	for _, tc := range []struct {
		release string
		shape   statusShape
		version string // of the metric pgconsistency.version; "" absent
	}{
		{"0.1.0", shape010, ""},
		{"0.2.0", shape020, "0.2.0"},
		{"0.4.0", shape030, "0.4.0"},
		{"0.5.0", shape050, "0.5.0"},
		{"0.6.0", shape060, "0.6.0"},
	} {
		t.Run(tc.release, func(t *testing.T) {
			// The receiver, as deployed: every metric, every scrape.
			scraped := releaseDatabase(t, srv, tc.release)
			sink, _ := startReceiver(t, srv, scraped)
			snap := waitFor(t, sink, "release "+tc.release, func(s snapshot) error {
				if up, _ := s.get("pgconsistency.up", ""); up != 1 {
					return fmt.Errorf("pgconsistency.up = %v", up)
				}
				if n, _ := s.get("pgconsistency.anomalies", "dataset_seed_missing"); n != 3 {
					return fmt.Errorf("pgconsistency.anomalies{dataset_seed_missing} = %v, want 3", n)
				}
				return nil
			})
			invariants := 0
			for key := range snap.values["pgconsistency.anomalies"] {
				invariants++
				healed, ok := snap.get("pgconsistency.reconcile.healed", key)
				assert.True(t, ok && healed == 0, "reconcile.healed{%s} = %v (present %v), want 0", key, healed, ok)
				full, _ := snap.get("pgconsistency.refresh.mode", key+"/full")
				incremental, ok := snap.get("pgconsistency.refresh.mode", key+"/incremental")
				assert.True(t, full == 1 && incremental == 0 && ok, "refresh.mode{%s}: full %v, incremental %v", key, full, incremental)
			}
			assert.GreaterOrEqual(t, invariants, 8, "the release's dataset invariants")
			for name := range snap.values {
				assert.NotContains(t, name, "pgconsistency.capture", "no capture before 0.7.0")
			}
			_, hasVersion := snap.get("pgconsistency.version", "")
			assert.Equal(t, tc.version != "", hasVersion, "pgconsistency.version present")

			// The client alone, in a database of its own, to count its
			// failing queries: the first status probes the newer shapes
			// (one failing query each), the next ones run only the shape
			// that worked.
			db := releaseDatabase(t, srv, tc.release)
			admin := srv.Conn(t, db)
			c, err := newPgxClient(t.Context(), serverConfig(srv, db))
			require.NoError(t, err)
			t.Cleanup(c.close)
			pc := c.(*pgxClient)
			status := func() []invariantStatus {
				rows, err := pc.status(t.Context())
				require.NoError(t, err)
				require.NotEmpty(t, rows)
				return rows
			}
			n := failingQueries(t, admin, db, pc, func() {
				rows := status()
				assert.Equal(t, tc.version, rows[0].Version)
				for _, r := range rows {
					if tc.shape > shape050 {
						assert.Empty(t, r.Owner+r.RunbookURL, "%s: owner and runbook before 0.5.0", r.Invariant)
					}
					assert.Empty(t, r.DeployMarker, "%s: no deploy marker value before 0.6.0", r.Invariant)
				}
				assert.Equal(t, tc.shape, pc.shape, "the shape remembered")
			})
			assert.EqualValues(t, tc.shape, n, "failing queries of the first status (one per newer shape)")
			// The next status is on a new connection: it probes again, once.
			n = failingQueries(t, admin, db, pc, func() {
				for range 21 {
					status()
				}
			})
			assert.EqualValues(t, tc.shape, n, "failing queries of 21 statuses after a reconnect")

			// install.sql upgrades the SQL under the open connection: the
			// next status notices (the version changed), the one after reads
			// the newest shape, with no failing query.
			n = failingQueries(t, admin, db, pc, func() {
				status()
				conns := pc.pool.Stat().NewConnsCount()
				srv.PsqlFile(t, db, fixture.Path("sql/install.sql"))
				_, err = admin.Exec(t.Context(), "SELECT pgconsistency.set_refresh_mode('dataset_seed_missing', 'incremental')")
				require.NoError(t, err)
				status()
				modes := map[string]string{}
				owners := map[string]string{}
				for _, r := range status() {
					modes[r.Invariant] = r.RefreshMode
					owners[r.Invariant] = r.Owner + " " + r.RunbookURL
					assert.NotEmpty(t, r.Version, "%s: version after the upgrade", r.Invariant)
				}
				assert.Equal(t, "incremental", modes["dataset_seed_missing"])
				assert.Equal(t, "full", modes["dataset_head_ref_missing"])
				// 0.5.0: the dataset pack's default owner and runbook.
				assert.Equal(t, "data-platform https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#dataset-invariants",
					owners["dataset_head_ref_missing"])
				assert.Equal(t, shapeNewest, pc.shape)
				assert.Equal(t, conns, pc.pool.Stat().NewConnsCount(), "no reconnect")
			})
			assert.EqualValues(t, tc.shape, n, "failing queries: the first status's probe only, none through the upgrade")

			// And the receiver follows an upgrade of its database.
			srv.PsqlFile(t, scraped, fixture.Path("sql/install.sql"))
			_, err = srv.Conn(t, scraped).Exec(t.Context(), "SELECT pgconsistency.set_refresh_mode('dataset_seed_missing', 'incremental')")
			require.NoError(t, err)
			waitFor(t, sink, "the receiver after the upgrade", func(s snapshot) error {
				if v, _ := s.get("pgconsistency.refresh.mode", "dataset_seed_missing/incremental"); v != 1 {
					return fmt.Errorf("refresh.mode{dataset_seed_missing/incremental} = %v", v)
				}
				if _, ok := s.get("pgconsistency.version", ""); !ok {
					return fmt.Errorf("no pgconsistency.version")
				}
				// 0.7.0: the capture, trigger by default
				if v, ok := s.get("pgconsistency.capture.invariants", "/trigger"); !ok || v != 1 {
					return fmt.Errorf("capture.invariants{trigger} = %v (present %v), want 1", v, ok)
				}
				if v, ok := s.get("pgconsistency.capture.invariants", "/wal"); !ok || v != 0 {
					return fmt.Errorf("capture.invariants{wal} = %v (present %v), want 0", v, ok)
				}
				return nil
			})
		})
	}
}

// TestIntegrationUpgradeDuringProbe: install.sql commits between two
// attempts of the shape probe (the newest shape failed on the old view, the
// next older one works on the upgraded view). The client must not keep that
// older shape: the next status notices the view changed and the one after
// reads the newest shape, capture included. Before the view marker, the
// client remembered the older shape with the new version and never probed
// again (a CI failure: capture.invariants absent after the upgrade).
func TestIntegrationUpgradeDuringProbe(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := releaseDatabase(t, srv, "0.6.0")
	c, err := newPgxClient(t.Context(), serverConfig(srv, db))
	require.NoError(t, err)
	t.Cleanup(c.close)
	pc := c.(*pgxClient)
	upgrades := 0
	pc.steppedDown = func() {
		if upgrades == 0 {
			srv.PsqlFile(t, db, fixture.Path("sql/install.sql"))
		}
		upgrades++
	}
	rows, err := pc.status(t.Context())
	require.NoError(t, err)
	require.Equal(t, 1, upgrades, "the newest shape failed once, on the 0.6.0 view")
	assert.False(t, rows[0].CaptureReported, "this status stepped down to an older shape")
	assert.Equal(t, shape060, pc.shape)

	_, err = pc.status(t.Context())
	require.NoError(t, err)
	assert.Equal(t, shapeNewest, pc.shape, "the view changed since the shape was chosen: probe the newest next")
	rows, err = pc.status(t.Context())
	require.NoError(t, err)
	assert.True(t, rows[0].CaptureReported, "the newest shape, read after the upgrade")
	assert.Equal(t, 1, upgrades, "no failing attempt after the upgrade")
}

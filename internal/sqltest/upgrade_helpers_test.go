//go:build integration

package sqltest_test

import (
	"encoding/json"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// receiver020StatusQuery is the 0.2.0 receiver's status query
// (receiver/pgconsistencyreceiver/client.go at d2f9eda, statusQuery).
const receiver020StatusQuery = `SELECT invariant, severity, anomalies, new_anomalies, resolved_anomalies, acknowledged_anomalies, refreshed_at,
	last_duration_seconds, consecutive_failures, last_outcome, refresh_period_seconds, pending_requests,
	deploy_marker_changed_at, version FROM pgconsistency.status WHERE enabled`

// receiver020Status is a row as the 0.2.0 receiver reads it (invariantStatus).
type receiver020Status struct {
	Invariant             string     `db:"invariant"`
	Severity              string     `db:"severity"`
	Anomalies             int64      `db:"anomalies"`
	NewAnomalies          int64      `db:"new_anomalies"`
	ResolvedAnomalies     int64      `db:"resolved_anomalies"`
	AcknowledgedAnomalies int64      `db:"acknowledged_anomalies"`
	RefreshedAt           *time.Time `db:"refreshed_at"`
	LastDurationSeconds   *float64   `db:"last_duration_seconds"`
	ConsecutiveFailures   int64      `db:"consecutive_failures"`
	LastOutcome           string     `db:"last_outcome"`
	RefreshPeriod         float64    `db:"refresh_period_seconds"`
	PendingRequests       int64      `db:"pending_requests"`
	DeployMarkerChangedAt *time.Time `db:"deploy_marker_changed_at"`
	Version               string     `db:"version"`
}

// readStatus020 runs the 0.2.0 receiver's scrape transaction (readStatus:
// BEGIN READ ONLY, its statement_timeout, the query, COMMIT, in one batch)
// and returns the anomalies by invariant and the versions it read.
func readStatus020(t *testing.T, conn *pgx.Conn) (map[string]int64, []string, error) {
	t.Helper()
	var rows []receiver020Status
	b := &pgx.Batch{}
	b.Queue("BEGIN READ ONLY")
	b.Queue("SELECT pg_catalog.set_config('statement_timeout', $1, true)", "10000")
	b.Queue(receiver020StatusQuery).Query(func(r pgx.Rows) error {
		var err error
		rows, err = pgx.CollectRows(r, pgx.RowToStructByName[receiver020Status])
		return err
	})
	b.Queue("COMMIT")
	if err := conn.SendBatch(t.Context(), b).Close(); err != nil {
		if conn.PgConn().TxStatus() != 'I' {
			_, _ = conn.Exec(t.Context(), "ROLLBACK")
		}
		return nil, nil, err
	}
	anomalies := map[string]int64{}
	versions := map[string]bool{}
	for _, r := range rows {
		anomalies[r.Invariant] = r.Anomalies
		versions[r.Version] = true
	}
	return anomalies, slices.Sorted(maps.Keys(versions)), nil
}

// readWholeView reads every row of an invariant's view as a dashboard
// would, with SELECT * through pgx's statement cache.
func readWholeView(t *testing.T, conn *pgx.Conn, inv invariantSnapshot) error {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT * FROM "+pgx.Identifier{inv.ViewSchema, inv.ViewName}.Sanitize())
	if err != nil {
		return err
	}
	for rows.Next() {
		if _, err := rows.Values(); err != nil {
			rows.Close()
			return err
		}
	}
	return rows.Err()
}

// viewColumns reads the columns of every invariant's view: "name type"
// and, for the collatable ones, "name collation".
func viewColumns(t *testing.T, conn *pgx.Conn) (columns, collations map[string][]string) {
	t.Helper()
	rows, err := conn.Query(t.Context(), `
		SELECT i.name,
		       coalesce(array_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
		                FILTER (WHERE a.attnum IS NOT NULL), '{}'),
		       coalesce(array_agg(a.attname || ' ' || co.collname ORDER BY a.attnum) FILTER (WHERE co.oid IS NOT NULL), '{}')
		  FROM pgconsistency.invariant i
		  LEFT JOIN pg_catalog.pg_attribute a
		    ON a.attrelid = to_regclass(format('%I.%I', i.view_schema, i.view_name)) AND a.attnum > 0 AND NOT a.attisdropped
		  LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
		 GROUP BY i.name`)
	require.NoError(t, err)
	columns, collations = map[string][]string{}, map[string][]string{}
	for rows.Next() {
		var name string
		var cols, colls []string
		require.NoError(t, rows.Scan(&name, &cols, &colls))
		columns[name], collations[name] = cols, colls
	}
	require.NoError(t, rows.Err())
	return columns, collations
}

// withoutOpenDetails is anomalies with the details of the open ones left
// out (they are compared on their own, with the view's rows).
func withoutOpenDetails(anomalies map[string]anomalySnapshot) map[string]anomalySnapshot {
	out := maps.Clone(anomalies)
	for k, a := range out {
		if a.ResolvedAt == nil {
			a.Details = nil
			out[k] = a
		}
	}
	return out
}

func decodeDetails(details *string) (any, error) {
	if details == nil {
		return nil, nil
	}
	var v any
	err := json.Unmarshal([]byte(*details), &v)
	return v, err
}

// equalJSON: both NULL, or the same JSON value.
func equalJSON(a, b *string) bool {
	va, erra := decodeDetails(a)
	vb, errb := decodeDetails(b)
	return erra == nil && errb == nil && assert.ObjectsAreEqual(va, vb)
}

// assertDetailsAre asserts that details (an anomaly's, as text) are row (a
// view row without key, as viewContent reads it).
func assertDetailsAre(t *testing.T, row map[string]any, details *string, msgAndArgs ...any) {
	t.Helper()
	got, err := decodeDetails(details)
	require.NoError(t, err)
	var want any
	if row != nil {
		want = map[string]any(row)
	}
	assert.Equal(t, want, got, msgAndArgs...)
}

// refreshStatus is what NewIn030 reads of an invariant's status row.
type refreshStatus struct {
	RefreshMode     string  `db:"refresh_mode"`
	LastRefreshKind *string `db:"last_refresh_kind"`
	Anomalies       int64   `db:"anomalies"`
	NewAnomalies    int64   `db:"new_anomalies"`
	Resolved        int64   `db:"resolved_anomalies"`
	RecheckedKeys   int64   `db:"rechecked_keys"`
	HealedAnomalies int64   `db:"healed_anomalies"`
	LastOutcome     string  `db:"last_outcome"`
}

func readRefreshStatus(t *testing.T, conn *pgx.Conn, invariant string) refreshStatus {
	t.Helper()
	rows, err := conn.Query(t.Context(), `SELECT refresh_mode, last_refresh_kind, anomalies, new_anomalies, resolved_anomalies,
		rechecked_keys, healed_anomalies, last_outcome FROM pgconsistency.status WHERE invariant = $1`, invariant)
	require.NoError(t, err)
	st, err := pgx.CollectExactlyOneRow(rows, pgx.RowToStructByName[refreshStatus])
	require.NoError(t, err, "the status of %s", invariant)
	return st
}

// refreshAs refreshes one invariant now as conn (the refresher, as the
// receiver's scheduler does) and requires that it succeeded.
func refreshAs(t *testing.T, conn *pgx.Conn, invariant string) {
	t.Helper()
	var outcome string
	// The two steps of a refresh loop: the plan (which, since 0.7.0, moves
	// the captured keys to the invariants), then the refresh.
	exec(t, conn, "SELECT count(*) FROM pgconsistency.refresh_plan($1)", invariant)
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency.refresh_invariant($1, true)", invariant).Scan(&outcome))
	require.Equal(t, "succeeded", outcome, "refresh_invariant(%s)", invariant)
}

func captureTriggers(t *testing.T, conn *pgx.Conn) []string {
	t.Helper()
	rows, err := conn.Query(t.Context(), `SELECT tgrelid::regclass::text || ' ' || tgname FROM pg_catalog.pg_trigger
		WHERE tgname LIKE 'pgconsistency\_capture\_%' AND NOT tgisinternal ORDER BY 1`)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}

// newIn030 checks what 0.3.0 changes and adds in a database upgraded from
// rel: before is the state before the upgrade, upgraded right after it;
// dashboard is a connection that read every invariant view before it.
func newIn030(t *testing.T, s *pgtest.Server, db string, admin *pgx.Conn, u used, rel fromRelease,
	before, upgraded upgradeState, dashboard *pgx.Conn) {
	t.Run("Version", func(t *testing.T) {
		var got string
		require.NoError(t, u.reader.QueryRow(t.Context(), "SELECT pgconsistency.version()").Scan(&got))
		assert.Equal(t, currentRelease, got, "pgconsistency.version(), as the reader")
	})

	// The dataset pack's invariants get the settings of incremental
	// re-checks; their other settings are kept (StateKept).
	t.Run("IncrementalSettingsAdded", func(t *testing.T) {
		for _, name := range rel.datasetInvariants {
			var inc string
			require.NoError(t, admin.QueryRow(t.Context(),
				"SELECT coalesce(settings -> 'incremental', 'null')::text FROM pgconsistency.invariant WHERE name = $1", name).Scan(&inc))
			assert.Equal(t, `{"enable_hashjoin": "off", "enable_mergejoin": "off"}`, inc, name)
		}
	})

	// The views of the packs' invariants (define_invariant) are plain
	// views of their open anomalies now, and read nothing else.
	t.Run("ViewsReadTheAnomalies", func(t *testing.T) {
		packs := slices.Concat(rel.datasetInvariants, slices.Sorted(maps.Keys(operationsInvariants)))
		for _, name := range packs {
			inv, ok := upgraded.Invariants[name]
			if !assert.True(t, ok, "invariant %s is gone", name) {
				continue
			}
			var kind string
			var reads []string
			require.NoError(t, admin.QueryRow(t.Context(), `
				SELECT c.relkind::text,
				       coalesce((SELECT array_agg(DISTINCT d.refobjid::regclass::text ORDER BY d.refobjid::regclass::text)
				                   FROM pg_catalog.pg_rewrite w
				                   JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = w.oid
				                  WHERE w.ev_class = c.oid AND d.refclassid = 'pg_catalog.pg_class'::regclass
				                    AND d.refobjid <> c.oid), '{}')
				  FROM pg_catalog.pg_class c
				 WHERE c.oid = to_regclass(format('%I.%I', $1::text, $2::text))`, inv.ViewSchema, inv.ViewName).Scan(&kind, &reads))
			assert.Equal(t, "v", kind, "relkind of %s.%s", inv.ViewSchema, inv.ViewName)
			assert.Equal(t, []string{"pgconsistency.anomaly"}, reads, "what %s.%s reads", inv.ViewSchema, inv.ViewName)
		}
	})

	t.Run("ViewsKeepTheirColumns", func(t *testing.T) {
		for _, name := range slices.Sorted(maps.Keys(before.Columns)) {
			assert.Equal(t, before.Columns[name], upgraded.Columns[name], "columns (name type) of the view of %s", name)
			// A key whose collation changes sorts differently (ORDER BY
			// key), and makes PostgreSQL refuse the statements on the view
			// a pool prepared before the upgrade.
			assert.Equal(t, before.Collations[name], upgraded.Collations[name], "collations of the columns of the view of %s", name)
		}
	})

	t.Run("PreparedStatementsKeepWorking", func(t *testing.T) {
		for _, name := range slices.Sorted(maps.Keys(before.Invariants)) {
			assert.NoError(t, readWholeView(t, dashboard, before.Invariants[name]),
				"SELECT * FROM the view of %s, prepared on a connection before the upgrade", name)
		}
	})

	// An upgraded dataset invariant refreshes incrementally: the writes of
	// an application role (no privilege on pgconsistency) are captured,
	// and the refresher's refreshes find what they broke.
	t.Run("SetRefreshMode", func(t *testing.T) {
		const inv = "dataset_statistics_missing"
		for label, role := range u.roles {
			var got string
			require.NoError(t, admin.QueryRow(t.Context(), privilegeQueries["function"], role,
				"pgconsistency.set_refresh_mode(text, text)", "EXECUTE").Scan(&got))
			assert.Equal(t, "denied", got, "%s: EXECUTE on pgconsistency.set_refresh_mode", label)
		}
		app, _ := loginAs(t, s, admin, db, "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ROLE")
		start := readRefreshStatus(t, admin, inv)
		require.Equal(t, "full", start.RefreshMode)
		require.Equal(t, before.Status[inv].Anomalies, start.Anomalies)

		var old string
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency.set_refresh_mode($1, 'incremental')", inv).Scan(&old))
		assert.Equal(t, "full", old, "set_refresh_mode returns the mode before")
		assert.NotEmpty(t, captureTriggers(t, admin), "capture triggers after the switch to incremental")
		refreshAs(t, u.refresher, inv)
		st := readRefreshStatus(t, admin, inv)
		assert.Equal(t, refreshStatus{RefreshMode: "incremental", LastRefreshKind: ptr("reconcile"), Anomalies: start.Anomalies,
			LastOutcome: "succeeded"}, st, "the first refresh after the switch: a reconcile that heals nothing")

		exec(t, app, "DELETE FROM public.dataset_statistics WHERE dataset_id = $1", fixture.DatasetID(29))
		refreshAs(t, u.refresher, inv)
		st = readRefreshStatus(t, admin, inv)
		assert.Equal(t, refreshStatus{RefreshMode: "incremental", LastRefreshKind: ptr("incremental"), Anomalies: start.Anomalies + 1,
			NewAnomalies: 1, RecheckedKeys: 1, LastOutcome: "succeeded"}, st, "an incremental refresh after the application broke 29")
		assert.Contains(t, viewKeys(t, admin, inv), fixture.DatasetID(29), "the view of %s", inv)

		require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency.set_refresh_mode($1, 'full')", inv).Scan(&old))
		assert.Equal(t, "incremental", old)
		assert.Empty(t, captureTriggers(t, admin), "capture triggers once no invariant is incremental")
		refreshAs(t, u.refresher, inv)
		st = readRefreshStatus(t, admin, inv)
		assert.Equal(t, "full", st.RefreshMode)
		assert.Equal(t, ptr("full"), st.LastRefreshKind)
		assert.Equal(t, [3]int64{start.Anomalies + 1, 0, 0}, [3]int64{st.Anomalies, st.NewAnomalies, st.Resolved},
			"anomalies, new, resolved after the switch back to full")
	})

	// The user's own materialized view, registered with register_invariant,
	// stays theirs and keeps refreshing.
	t.Run("RegisteredInvariantRefreshes", func(t *testing.T) {
		const inv = "derivative_many_upstreams"
		var kind string
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = 'public.derivative_many_upstreams'::regclass").Scan(&kind))
		assert.Equal(t, "m", kind, "the user's materialized view")
		exec(t, admin, "INSERT INTO public.dataset_dependencies (upstream_dataset_id, downstream_dataset_id) VALUES ($1, $2)",
			fixture.DatasetID(1), fixture.DatasetID(29))
		refreshAs(t, u.refresher, inv)
		st := readRefreshStatus(t, admin, inv)
		assert.Equal(t, [3]int64{before.Status[inv].Anomalies + 1, 1, 0}, [3]int64{st.Anomalies, st.NewAnomalies, st.Resolved},
			"anomalies, new, resolved after a second upstream edge of 29")
		assert.Equal(t, map[string]any{"upstream_edges": float64(2)},
			viewContent(t, admin, "public", inv)[fixture.DatasetID(29)], "29 in the user's view")
		var details *string
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT details::text FROM pgconsistency.anomaly WHERE invariant = $1 AND key = $2",
			inv, fixture.DatasetID(29)).Scan(&details))
		assertDetailsAre(t, map[string]any{"upstream_edges": float64(2)}, details, "the anomaly of 29")
	})
}

func ptr[T any](v T) *T { return &v }

// newIn050 checks what 0.5.0 adds to a database upgraded from rel: owners.
// The dataset pack's invariants get its default owner and runbook, the
// others none; the reader reads both in the status view; what set_owner
// (or an UPDATE) sets is kept by the next deployment (upgrade runs the
// current files again).
func newIn050(t *testing.T, admin *pgx.Conn, u used, rel fromRelease, upgrade func() map[string]string) {
	got := owners(t, u.reader)
	for inv, o := range got {
		if slices.Contains(rel.datasetInvariants, inv) || slices.Contains(fixture.Invariants, inv) {
			assert.Equal(t, ownedBy(packOwner, packRunbook), o, "%s, of the dataset pack", inv)
		} else {
			assert.Equal(t, owner{}, o, "%s, not of the dataset pack", inv)
		}
	}
	for _, inv := range rel.datasetInvariants {
		assert.Contains(t, got, inv)
	}

	exec(t, admin, "SELECT pgconsistency.set_owner('dataset_seed_missing', 'team-a', 'https://wiki.example.com/seed')")
	exec(t, admin, "SELECT pgconsistency.set_owner('root_dataset_with_dev_ref', 'team-b', 'https://wiki.example.com/dev-ref')")
	exec(t, admin, "UPDATE pgconsistency.invariant SET owner = 'team-c' WHERE name = 'derivative_many_upstreams'")
	want := owners(t, u.reader)
	assert.Equal(t, ownedBy("team-a", "https://wiki.example.com/seed"), want["dataset_seed_missing"])
	assert.Equal(t, ownedBy("team-c", ""), want["derivative_many_upstreams"])
	upgrade()
	assert.Equal(t, want, owners(t, u.reader), "owners after the next deployment")
}

// newIn060 checks the deployment history an upgrade starts with, and that a
// new anomaly after the upgrade is attributed to the latest deployment.
func newIn060(t *testing.T, admin *pgx.Conn, u used, rel fromRelease) {
	var markers []string
	rows, err := admin.Query(t.Context(), "SELECT coalesce(marker, 'NULL') FROM pgconsistency.deployment ORDER BY id")
	require.NoError(t, err)
	markers, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	if rel.atLeast("0.6.0") {
		// 0.6.0 recorded every marker it saw: the history is kept.
		assert.Equal(t, []string{"v41", "v42"}, markers, "the deployments 0.6.0 recorded")
	} else {
		assert.Equal(t, []string{"v42"}, markers, "the marker the install had")
		var unknown int
		require.NoError(t, admin.QueryRow(t.Context(), `SELECT count(*) FROM pgconsistency.anomaly_origin
			WHERE deploy = 'no deployment recorded' AND cause = 'no cause recorded'`).Scan(&unknown))
		assert.Positive(t, unknown, "anomalies open before the upgrade: deployment unknown")
	}
	summary := func() (n int64) {
		require.NoError(t, admin.QueryRow(t.Context(), `SELECT new_anomalies FROM pgconsistency.deployment_summary
			WHERE deploy_marker = 'v42' AND invariant = 'dataset_head_ref_missing'`).Scan(&n))
		return n
	}
	before := summary() // what the subtests before this one broke
	exec(t, admin, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(12))
	exec(t, admin, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	var marker, cause string
	require.NoError(t, admin.QueryRow(t.Context(), `SELECT deploy_marker, cause FROM pgconsistency.anomaly_origin
		WHERE invariant = 'dataset_head_ref_missing' AND key = $1`, fixture.DatasetID(12)).Scan(&marker, &cause))
	assert.Equal(t, "v42", marker)
	// useRelease audits dataset_references: the DELETE above is the cause.
	assert.Contains(t, cause, "DELETE on public.dataset_references")
	assert.Equal(t, before+1, summary(), "one more after v42")

	// The receiver's logs read the same anomaly with its origin, as the
	// reader (granted by roles.sql; 10_privileges.sql grants it too where
	// the role exists, for an upgrade that does not re-run roles.sql).
	const consumer = "consumer-060"
	exec(t, u.reader, "SELECT count(*) FROM pgconsistency.new_anomalies_with_origin_for_log($1, 10)", consumer) // the cursor
	exec(t, admin, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(13))
	exec(t, admin, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	var key, logMarker, operation string
	require.NoError(t, u.reader.QueryRow(t.Context(), `SELECT key, deploy_marker, cause_operation
		FROM pgconsistency.new_anomalies_with_origin_for_log($1, 10)`, consumer).Scan(&key, &logMarker, &operation),
		"new_anomalies_with_origin_for_log as the reader")
	assert.Equal(t, fixture.DatasetID(13), key)
	assert.Equal(t, "v42", logMarker)
	assert.Equal(t, "DELETE", operation)

	// The status view, as the reader (the receiver's metrics, the alert's
	// deploy and cause): where that refresh's new anomaly came from, in the
	// columns the upgrade added to refresh_state.
	var newMarker, newOperation, newTable string
	var causes int64
	var since bool
	require.NoError(t, u.reader.QueryRow(t.Context(), `SELECT new_deploy_marker, new_deployed_since_previous_refresh,
		new_causes, new_cause_operation, new_cause_table
		FROM pgconsistency.status WHERE invariant = 'dataset_head_ref_missing'`).Scan(
		&newMarker, &since, &causes, &newOperation, &newTable))
	assert.Equal(t, "v42", newMarker)
	assert.False(t, since, "v42 was there before the previous refresh")
	assert.EqualValues(t, 1, causes)
	assert.Equal(t, "DELETE", newOperation)
	assert.Equal(t, "public.dataset_references", newTable)

	// The log of finished refresh requests, as the reader: the cursor made
	// by new_anomalies_with_origin_for_log (a consumer of before the upgrade
	// alike: its column is NULL) starts at the current end; a request that
	// finishes now is reported once.
	var hasColumn bool
	require.NoError(t, admin.QueryRow(t.Context(), `SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
		WHERE attrelid = 'pgconsistency.log_cursor'::regclass AND attname = 'last_request_id' AND NOT attisdropped)`).Scan(&hasColumn))
	assert.True(t, hasColumn, "pgconsistency.log_cursor.last_request_id")
	finished := func() (ids []int64) {
		rows, err := u.reader.Query(t.Context(), "SELECT request_id FROM pgconsistency.finished_requests_for_log($1, 10)", consumer)
		require.NoError(t, err, "finished_requests_for_log as the reader")
		ids, err = pgx.CollectRows(rows, pgx.RowTo[int64])
		require.NoError(t, err)
		return ids
	}
	assert.Empty(t, finished(), "the requests of before are not news")
	exec(t, admin, "SELECT pgconsistency.request_refresh(delay => '0 seconds', reason => 'deploy after the upgrade')")
	exec(t, admin, "CALL pgconsistency.refresh()")
	var reason string
	var invariants int
	require.NoError(t, u.reader.QueryRow(t.Context(), `SELECT reason, (SELECT count(*) FROM jsonb_object_keys(invariants))
		FROM pgconsistency.finished_requests_for_log($1, 10)`, consumer).Scan(&reason, &invariants))
	assert.Equal(t, "deploy after the upgrade", reason)
	var enabled int
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.invariant WHERE enabled").Scan(&enabled))
	assert.Equal(t, enabled, invariants, "every enabled invariant")
	ids := finished()
	require.Len(t, ids, 1)
	exec(t, u.reader, "SELECT pgconsistency.advance_request_log_cursor($1, $2)", consumer, ids[0])
	assert.Empty(t, finished(), "delivered once")
}

// newIn070 checks what 0.7.0 adds to an upgraded install: the trigger
// capture as before (the WAL capture is opt-in, refused with its fix on a
// server without logical decoding), incremental_period, the capture's
// status columns, and the refresher's grant of the changes plan.
func newIn070(t *testing.T, admin *pgx.Conn, u used) {
	var method string
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT method FROM pgconsistency.capture").Scan(&method))
	assert.Equal(t, "trigger", method, "an upgrade keeps the trigger capture")
	var periods []string
	rows, err := admin.Query(t.Context(), "SELECT DISTINCT incremental_period::text FROM pgconsistency.invariant")
	require.NoError(t, err)
	periods, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{"00:00:02"}, periods, "incremental_period, its default for every invariant")
	var capture, slot *string
	require.NoError(t, u.reader.QueryRow(t.Context(),
		"SELECT capture, capture_slot_status FROM pgconsistency.status WHERE invariant = 'dataset_seed_missing'").Scan(&capture, &slot),
		"the reader reads the capture's columns")
	assert.Nil(t, slot, "no slot with the trigger capture")
	_, err = u.refresher.Exec(t.Context(), "SELECT count(*) FROM pgconsistency.refresh_changes_plan()")
	require.NoError(t, err, "the refresher runs the changes plan after an upgrade")
	_, err = admin.Exec(t.Context(), "SELECT pgconsistency.set_capture('wal')")
	require.ErrorContains(t, err, "wal_level = logical", "the WAL capture needs logical decoding, and says so")
}

// newIn071: roles.sql created pgconsistency_capture (NOLOGIN REPLICATION)
// and gave it the four slot functions, SECURITY DEFINER; the read statement
// of the capture is built from the sources the upgraded install has.
func newIn071(t *testing.T, admin *pgx.Conn, rel fromRelease) {
	var login, replication bool
	require.NoError(t, admin.QueryRow(t.Context(),
		"SELECT rolcanlogin, rolreplication FROM pg_roles WHERE rolname = 'pgconsistency_capture'").Scan(&login, &replication))
	assert.False(t, login, "pgconsistency_capture cannot log in")
	assert.True(t, replication, "pgconsistency_capture has REPLICATION")
	rows, err := admin.Query(t.Context(), `SELECT proname || ' ' || proowner::regrole::text || ' ' || prosecdef::text FROM pg_proc
		WHERE pronamespace = 'pgconsistency'::regnamespace
		  AND proname IN ('_wal_create_slot', '_wal_drop_slot', '_wal_advance_slot', '_wal_slot_changes') ORDER BY proname`)
	require.NoError(t, err)
	fns, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	assert.Equal(t, []string{
		"_wal_advance_slot pgconsistency_capture true",
		"_wal_create_slot pgconsistency_capture true",
		"_wal_drop_slot pgconsistency_capture true",
		"_wal_slot_changes pgconsistency_capture true",
	}, fns)
	var kind *string
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT kind FROM pgconsistency._wal_slot_check('pgconsistency_none')").Scan(&kind))
	if assert.NotNil(t, kind) {
		assert.Equal(t, "missing", *kind)
	}
	if !rel.atLeast("0.3.0") {
		return // no invariant in incremental mode: no capture source
	}
	var statement *string
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency._wal_read_statement()").Scan(&statement))
	if assert.NotNil(t, statement, "the read statement of the upgraded capture sources") {
		assert.Contains(t, *statement, "pgconsistency._wal_slot_changes($1, $2, $3, $4)")
	}
}

// newIn072: the changes loop reads the slot at most once per the shortest
// incremental_period (_wal_read_due: due with no read yet), and the read
// statement of the upgraded capture sources matches each change with them
// once, and takes a text key column as its JSON string.
func newIn072(t *testing.T, admin *pgx.Conn, rel fromRelease) {
	var due bool
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency._wal_read_due(clock_timestamp())").Scan(&due))
	assert.True(t, due, "no WAL read yet: the changes loop reads now")
	if !rel.atLeast("0.3.0") {
		return // no invariant in incremental mode: no capture source
	}
	var statement *string
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency._wal_read_statement()").Scan(&statement))
	if assert.NotNil(t, statement, "the read statement of the upgraded capture sources") {
		assert.Contains(t, *statement, "AS s(source, schema_name, table_name, ", "the changes matched with the sources once")
		assert.Contains(t, *statement, `'{"n": "dataset_id"}'::jsonb) END #>> '{}')`, "r.dataset_id::text taken as its JSON string")
	}
}

// newIn073: the functions a refresh runs for every invariant, and the
// changes loop for every pass, are PL/pgSQL, which keeps their plans for the
// session; as SQL functions with a SET clause, PostgreSQL planned their
// bodies again at every call.
func newIn073(t *testing.T, admin *pgx.Conn) {
	rows, err := admin.Query(t.Context(), `SELECT p.proname || ' ' || l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
		WHERE p.pronamespace = 'pgconsistency'::regnamespace AND p.proname = ANY ($1) ORDER BY 1`, perCallFunctions)
	require.NoError(t, err)
	got, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	var want []string
	for _, fn := range perCallFunctions {
		want = append(want, fn+" plpgsql")
	}
	slices.Sort(want)
	assert.Equal(t, want, got)
}

// newIn074: the WAL capture's read takes a key column by its place in the
// decoded row, by its name only where that place holds another column; the
// _wal_column_value(text) of 0.7.3, which searched by name only, is gone.
func newIn074(t *testing.T, admin *pgx.Conn, rel fromRelease) {
	var old, statement *string
	require.NoError(t, admin.QueryRow(t.Context(),
		`SELECT to_regprocedure('pgconsistency._wal_column_value(text)')::text, pgconsistency._wal_read_statement()`).Scan(&old, &statement))
	assert.Nil(t, old, "0.7.3's _wal_column_value(text)")
	if !rel.atLeast("0.3.0") {
		return // no invariant in incremental mode: no capture source
	}
	require.NotNil(t, statement, "the read statement of the capture sources")
	assert.Contains(t, *statement, `CASE WHEN tuple.columns -> 0 ->> 'name' = 'dataset_id' THEN tuple.columns -> 0 -> 'value'`)
}

// newIn075: the key sources of the dataset pack know the columns their
// invariant reads, and the capture of an UPDATE compares those: in the
// capture triggers (the old and new rows' values counted) and in the
// WAL capture's read (_wal_unchanged, where the old row is in the WAL).
func newIn075(t *testing.T, admin *pgx.Conn, rel fromRelease) {
	var cols *string
	require.NoError(t, admin.QueryRow(t.Context(), `SELECT read_columns::text FROM pgconsistency.invariant_key_source
		WHERE invariant = 'dataset_seed_not_first' AND relation = 'public.dataset_key_blocks'`).Scan(&cols))
	if assert.NotNil(t, cols, "read_columns of dataset_seed_not_first's key blocks") {
		assert.Equal(t, "{dataset_id,event_type,sequence_number}", *cols)
	}
	exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'incremental')")
	defer exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'full')")
	var body string
	require.NoError(t, admin.QueryRow(t.Context(), `SELECT p.prosrc FROM pg_catalog.pg_proc p
		WHERE p.oid = pg_catalog.to_regprocedure(format('pgconsistency._capture_%s()', 'public.dataset_key_blocks'::regclass::oid))`).Scan(&body))
	assert.Contains(t, body, "ROW(r.dataset_id, r.event_type, r.sequence_number)::text)) AS x(read_columns, v)", "an UPDATE compared on the columns read")
	var statement *string
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency._wal_read_statement()").Scan(&statement))
	if assert.NotNil(t, statement, "the read statement of the capture sources") {
		assert.Contains(t, *statement, `CASE WHEN change.c -> 'columns' -> 2 ->> 'name' = 'event_type'`, "an UPDATE compared on the columns read")
	}
}

// newIn076: the WAL capture's read takes each decoded row's key with one
// CASE over the capture sources (_wal_key_expression), not a SELECT per
// source (_wal_key_select, gone); the statement of the previous release's
// reads is not kept (install.sql's _install_capture empties it).
func newIn076(t *testing.T, admin *pgx.Conn) {
	var old *string
	var kept bool
	require.NoError(t, admin.QueryRow(t.Context(),
		`SELECT to_regprocedure('pgconsistency._wal_key_select(integer, regclass, text)')::text,
		        EXISTS (SELECT 1 FROM pgconsistency.capture WHERE read_statement IS NOT NULL)`).Scan(&old, &kept))
	assert.Nil(t, old, "0.7.5's _wal_key_select")
	assert.False(t, kept, "a read statement of the release before")
	exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'incremental')")
	defer exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'full')")
	var statement *string
	require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency._wal_read_statement()").Scan(&statement))
	if assert.NotNil(t, statement, "the read statement of the capture sources") {
		assert.Contains(t, *statement, "CASE tuple.source WHEN ", "one CASE over the sources")
		assert.NotContains(t, *statement, " UNION ALL ", "a SELECT per source")
	}
}

// perCallFunctions are the functions a refresh calls once per invariant, or
// the changes loop once per pass: 0.7.3 made them PL/pgSQL (and added
// _work_table; 0.7.4 _wal_column_value, which now reads the catalog; 0.7.5
// _key_reads_row, _wal_column_place and _wal_unchanged; 0.7.6
// _wal_key_expression, which replaced _wal_key_select).
var perCallFunctions = []string{
	"_anomaly_causes_looked", "_changed_invariants", "_incremental_index_hint", "_key_columns", "_key_reads_row", "_open_counts",
	"_record_success", "_refresh_retention", "_replica_identity_columns", "_wal_add_tables", "_wal_column_place", "_wal_column_value",
	"_wal_key_expression", "_wal_read_due", "_wal_read_period", "_wal_read_statement", "_wal_slot_check", "_wal_slot_problem",
	"_wal_unchanged", "_work_table",
}

// newIn077: the capture records who read the slot last (capture.read_by),
// and the receiver's stream has its two functions, which the refresher
// role may call where roles.sql ran before the upgrade; with the trigger
// capture, the stream is told why it cannot start and may store nothing.
func newIn077(t *testing.T, admin *pgx.Conn) {
	var column, refresherMay bool
	require.NoError(t, admin.QueryRow(t.Context(),
		`SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
		                 WHERE attrelid = 'pgconsistency.capture'::regclass AND attname = 'read_by' AND NOT attisdropped),
		        to_regrole('pgconsistency_refresher') IS NULL
		        OR (has_function_privilege('pgconsistency_refresher', 'pgconsistency.wal_stream_start()', 'EXECUTE')
		            AND has_function_privilege('pgconsistency_refresher', 'pgconsistency.capture_wal_stream(text[], text)', 'EXECUTE'))`).
		Scan(&column, &refresherMay))
	assert.True(t, column, "capture.read_by")
	assert.True(t, refresherMay, "pgconsistency_refresher may call the stream's functions")
	var method string
	var problem *string
	var stored *int64
	require.NoError(t, admin.QueryRow(t.Context(),
		`SELECT (SELECT method FROM pgconsistency.capture), (pgconsistency.wal_stream_start()).problem,
		        pgconsistency.capture_wal_stream(ARRAY['{"action":"B"}', '{"action":"C"}'], NULL)`).Scan(&method, &problem, &stored))
	if method == "trigger" {
		if assert.NotNil(t, problem, "why the stream cannot start with the trigger capture") {
			assert.Contains(t, *problem, "the capture is trigger, not wal")
		}
		assert.Nil(t, stored, "what the stream may store with the trigger capture")
	}
}

// newIn078: the step of an incremental refresh that runs the invariant's
// query turns JIT off for its transaction (the incremental settings apply
// after it, and may turn it on again); _wal_drop_slot leaves a slot a
// walsender holds (its callers no longer check that themselves; the
// behaviour is TestWALStream's, this checks the upgrade replaced it).
func newIn078(t *testing.T, admin *pgx.Conn) {
	var unheldOnly bool
	require.NoError(t, admin.QueryRow(t.Context(),
		`SELECT pg_catalog.strpos(p.prosrc, 's.active_pid IS NULL') > 0 FROM pg_catalog.pg_proc p
		  WHERE p.oid = 'pgconsistency._wal_drop_slot(text)'::regprocedure`).Scan(&unheldOnly))
	assert.True(t, unheldOnly, "_wal_drop_slot drops only a slot no walsender holds")

	tx, err := admin.Begin(t.Context())
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(t.Context()) }()
	_, err = tx.Exec(t.Context(), "SET LOCAL jit = on")
	require.NoError(t, err)
	tag, err := tx.Exec(t.Context(), `SELECT pgconsistency._refresh_rows_incremental(i, '{}'::text[], true)
		  FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'`)
	require.NoError(t, err)
	require.EqualValues(t, 1, tag.RowsAffected())
	var jit string
	require.NoError(t, tx.QueryRow(t.Context(), "SHOW jit").Scan(&jit))
	assert.Equal(t, "off", jit, "JIT after the incremental rows step")
}

// newIn079: _query_shape gives the columns a query reads of each relation
// (read_columns), from its one temporary view: _query_columns is gone, and
// _define_read_columns takes them; the capture function of a table made now
// checks the columns an UPDATE compares without a query on pg_attribute
// (that the upgrade replaced those made before is checked where the
// capture triggers of the earlier release are).
func newIn079(t *testing.T, admin *pgx.Conn) {
	var oldColumns, oldDefine *string
	var read string
	require.NoError(t, admin.QueryRow(t.Context(),
		`SELECT to_regprocedure('pgconsistency._query_columns(text)')::text,
		        to_regprocedure('pgconsistency._define_read_columns(text, text)')::text,
		        (pgconsistency._query_shape('SELECT e.dataset_id::text AS key FROM public.dataset_entries e')).read_columns::text`).
		Scan(&oldColumns, &oldDefine, &read))
	assert.Nil(t, oldColumns, "0.7.8's _query_columns")
	assert.Nil(t, oldDefine, "0.7.8's _define_read_columns(text, text)")
	assert.Equal(t, `{"public.dataset_entries": ["dataset_id"]}`, read, "_query_shape's read_columns")

	exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'incremental')")
	defer exec(t, admin, "SELECT pgconsistency.set_refresh_mode('dataset_seed_not_first', 'full')")
	var body string
	require.NoError(t, admin.QueryRow(t.Context(), `SELECT p.prosrc FROM pg_catalog.pg_proc p
		WHERE p.oid = pg_catalog.to_regprocedure(format('pgconsistency._capture_%s()', 'public.dataset_key_blocks'::regclass::oid))`).Scan(&body))
	assert.Contains(t, body, "pg_catalog.pg_identify_object_as_address(", "the columns compared checked in the system cache")
	assert.NotContains(t, body, "pg_catalog.pg_attribute", "a query on pg_attribute at each UPDATE")
}

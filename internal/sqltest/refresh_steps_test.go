//go:build integration

package sqltest_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestRefreshSteps: each step of refresh_invariant (sql/framework/
// 08_refresh.sql) on its own, called as refresh_invariant calls it. The
// whole refresh is tested everywhere else; these pin what each step does.
func TestRefreshSteps(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t)
	db := fixture.NewCurrentDatabase(t, s, "dataset_seed_missing")
	conn := s.Conn(t, db)
	exec(t, conn, "CALL pgconsistency.refresh(force => true)")
	ctx := t.Context()

	// inTx runs f in a transaction that is rolled back: the steps write.
	inTx := func(t *testing.T, f func(tx pgx.Tx)) {
		t.Helper()
		tx, err := conn.Begin(ctx)
		require.NoError(t, err)
		defer tx.Rollback(context.Background()) //nolint:errcheck // undone whatever happened; nothing to report
		f(tx)
	}

	t.Run("Lock", func(t *testing.T) {
		holder := s.Conn(t, db)
		hold, err := holder.Begin(ctx)
		require.NoError(t, err)
		defer hold.Rollback(context.Background()) //nolint:errcheck // undone whatever happened; nothing to report
		var took bool
		require.NoError(t, hold.QueryRow(ctx, "SELECT pgconsistency._refresh_lock('dataset_seed_missing', now())").Scan(&took))
		require.True(t, took, "the first session takes the lock")
		var skips0, skips1 int64
		require.NoError(t, conn.QueryRow(ctx, "SELECT skips FROM pgconsistency.refresh_state WHERE invariant = 'dataset_seed_missing'").Scan(&skips0))
		require.NoError(t, conn.QueryRow(ctx, "SELECT pgconsistency._refresh_lock('dataset_seed_missing', now())").Scan(&took))
		require.False(t, took, "a second one does not wait: it skips")
		require.NoError(t, conn.QueryRow(ctx, "SELECT skips FROM pgconsistency.refresh_state WHERE invariant = 'dataset_seed_missing'").Scan(&skips1))
		assert.Equal(t, skips0+1, skips1, "the skip is recorded")
	})

	t.Run("Origin", func(t *testing.T) {
		exec(t, conn, "SELECT pgconsistency.observe_deploy_marker('v7', '0 seconds')")
		var marker *string
		var prevSeen *time.Time
		require.NoError(t, conn.QueryRow(ctx, `SELECT deploy_marker, prev_seen_at
			FROM pgconsistency._refresh_origin('dataset_seed_missing', clock_timestamp())`).Scan(&marker, &prevSeen))
		require.NotNil(t, marker)
		assert.Equal(t, "v7", *marker, "the latest deployment")
		assert.NotNil(t, prevSeen, "when the previous refresh saw the rows")
	})

	t.Run("Rows", func(t *testing.T) {
		inTx(t, func(tx pgx.Tx) {
			var kind string
			var n int
			require.NoError(t, tx.QueryRow(ctx, `SELECT kind FROM pgconsistency._refresh_rows(
				(SELECT i FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'))`).Scan(&kind))
			require.NoError(t, tx.QueryRow(ctx, "SELECT count(*) FROM pg_temp.pgconsistency_result").Scan(&n))
			assert.Equal(t, "full", kind)
			assert.Equal(t, len(fixture.CurrentBreakage["dataset_seed_missing"]), n, "the query's rows, whole")
		})
	})

	// The rows' temporary table outlives the commit (no truncation at every
	// commit), and is emptied before each use: by DELETE, or by TRUNCATE
	// once it holds more than 8 MB.
	t.Run("WorkTable", func(t *testing.T) {
		var outcome string
		require.NoError(t, conn.QueryRow(ctx, "SELECT pgconsistency.refresh_invariant('dataset_seed_missing')").Scan(&outcome))
		require.Equal(t, "succeeded", outcome)
		count := func() (n int) {
			require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM pg_temp.pgconsistency_result").Scan(&n))
			return n
		}
		size := func() (n int64) {
			require.NoError(t, conn.QueryRow(ctx, "SELECT pg_total_relation_size('pg_temp.pgconsistency_result')").Scan(&n))
			return n
		}
		assert.Equal(t, len(fixture.CurrentBreakage["dataset_seed_missing"]), count(), "the refresh's rows, still there after its commit")
		empty := "SELECT pgconsistency._work_table('pgconsistency_result', 'key text PRIMARY KEY, details jsonb')"
		exec(t, conn, empty)
		assert.Zero(t, count(), "emptied before a use")
		exec(t, conn, `INSERT INTO pg_temp.pgconsistency_result
			SELECT 'k' || i, jsonb_build_object('pad', repeat('x', 200)) FROM generate_series(1, 40000) i`)
		require.Greater(t, size(), int64(8<<20), "a mass incident's rows")
		exec(t, conn, empty)
		assert.Zero(t, count())
		assert.Less(t, size(), int64(1<<20), "over 8 MB: truncated, the file given back")
		exec(t, conn, "INSERT INTO pg_temp.pgconsistency_result SELECT 'k' || i, '{}' FROM generate_series(1, 1000) i")
		small := size()
		exec(t, conn, empty)
		assert.Zero(t, count())
		assert.Equal(t, small, size(), "under 8 MB: deleted, the file left alone")
	})

	t.Run("LifecycleAndCauses", func(t *testing.T) {
		var looked bool
		var causes int
		require.NoError(t, conn.QueryRow(ctx, "SELECT pgconsistency._anomaly_causes_looked()").Scan(&looked))
		require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM pgconsistency._anomaly_causes('dataset_seed_missing', ARRAY['x'], now())").Scan(&causes))
		assert.False(t, looked, "no audit pack, no cause looked for")
		assert.Zero(t, causes)
		inTx(t, func(tx pgx.Tx) {
			// The rows of the refresh with one dataset more: one appears.
			_, err := tx.Exec(ctx, `SELECT pgconsistency._refresh_rows((SELECT i FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'))`)
			require.NoError(t, err)
			_, err = tx.Exec(ctx, `INSERT INTO pg_temp.pgconsistency_result VALUES ('extra', '{}')`)
			require.NoError(t, err)
			var appeared, resolved int64
			var causes *int64
			require.NoError(t, tx.QueryRow(ctx, `SELECT l.appeared, l.resolved, l.causes
				FROM pgconsistency._refresh_origin('dataset_seed_missing', clock_timestamp()) o,
				     pgconsistency._refresh_lifecycle((SELECT i FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'),
				                                      clock_timestamp(), NULL, NULL, o) l`).Scan(&appeared, &resolved, &causes))
			assert.EqualValues(t, 1, appeared)
			assert.EqualValues(t, 0, resolved)
			assert.Nil(t, causes, "no cause looked for")
		})
	})

	t.Run("Failure", func(t *testing.T) {
		for _, tc := range []struct{ state, message, outcome, contains string }{
			{"55P03", "canceling statement due to lock timeout", "timed_out", "lock_timeout (00:00:30)"},
			{"23505", `duplicate key value violates unique constraint "pgconsistency_result_pkey"`, "failed", "returned the same key more than once"},
			{"23502", `null value in column "key" of relation "pgconsistency_result"`, "failed", "whose key is NULL"},
			{"42P01", `relation "x" does not exist`, "failed", `relation "x" does not exist`},
		} {
			var outcome, msg string
			require.NoError(t, conn.QueryRow(ctx, `SELECT outcome, error FROM pgconsistency._refresh_failure(
				(SELECT i FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'), $1, $2, NULL, 'Key (key)=(a)')`,
				tc.state, tc.message).Scan(&outcome, &msg))
			assert.Equal(t, tc.outcome, outcome, tc.state)
			assert.Contains(t, msg, tc.contains, tc.state)
		}
		// 57014 with no statement_timeout armed: a cancel, the whole refresh stops.
		var outcome *string
		require.NoError(t, conn.QueryRow(ctx, `SELECT outcome FROM pgconsistency._refresh_failure(
			(SELECT i FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'), '57014', 'canceling statement due to user request', NULL, NULL)`).Scan(&outcome))
		assert.Nil(t, outcome)
	})

	t.Run("RecordFailureKeepsTheSnapshot", func(t *testing.T) {
		inTx(t, func(tx pgx.Tx) {
			var before, after int64
			var refreshed0, refreshed1 time.Time
			require.NoError(t, tx.QueryRow(ctx, "SELECT anomalies, refreshed_at FROM pgconsistency.refresh_state WHERE invariant = 'dataset_seed_missing'").Scan(&before, &refreshed0))
			_, err := tx.Exec(ctx, "SELECT pgconsistency._record_failure('dataset_seed_missing', 'failed', now(), now(), 'boom')")
			require.NoError(t, err)
			var outcome string
			var failures int
			require.NoError(t, tx.QueryRow(ctx, `SELECT anomalies, refreshed_at, last_run_outcome, consecutive_failures
				FROM pgconsistency.refresh_state WHERE invariant = 'dataset_seed_missing'`).Scan(&after, &refreshed1, &outcome, &failures))
			assert.Equal(t, before, after)
			assert.Equal(t, refreshed0, refreshed1, "the latest good snapshot stays")
			assert.Equal(t, "failed", outcome)
			assert.Equal(t, 1, failures)
		})
	})

	t.Run("Retention", func(t *testing.T) {
		inTx(t, func(tx pgx.Tx) {
			_, err := tx.Exec(ctx, `UPDATE pgconsistency.anomaly SET resolved_at = now() - interval '40 days'
				WHERE invariant = 'dataset_seed_missing' AND key = $1`, fixture.DatasetID(13))
			require.NoError(t, err)
			_, err = tx.Exec(ctx, `SELECT pgconsistency._refresh_retention((SELECT i FROM pgconsistency.invariant i WHERE i.name = 'dataset_seed_missing'), now())`)
			require.NoError(t, err)
			var n int
			require.NoError(t, tx.QueryRow(ctx, "SELECT count(*) FROM pgconsistency.anomaly WHERE invariant = 'dataset_seed_missing'").Scan(&n))
			assert.Equal(t, len(fixture.CurrentBreakage["dataset_seed_missing"])-1, n, "the one resolved 40 days ago (retention 30 days) goes")
		})
	})
}

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

// TestRenamedNames: the names 0.4.0 renamed still work until 0.8.0 on a
// fresh install. The status view's old columns hold what the new ones hold
// and reading them raises a deprecation NOTICE, once per session and
// column, naming the new column; a query that does not read them raises
// nothing. The anomaly table's old acknowledgement columns read the same as
// the new ones (read-only: they are generated).
func TestRenamedNames(t *testing.T) {
	t.Parallel() // a cluster of its own
	s := pgtest.Start(t)
	db := fixture.NewDatabase(t, s, "dataset_seed_missing", "dataset_head_ref_missing")
	conn, notices := connWithNotices(t, s, db)
	exec(t, conn, "CALL pgconsistency.refresh()")
	exec(t, conn, "SELECT pgconsistency.acknowledge('dataset_seed_missing', key, 'fix scheduled', now() + interval '1 day') FROM pgconsistency.dataset_seed_missing")
	deprecations := func() []string {
		var out []string
		for _, n := range notices() {
			if strings.Contains(n, "deprecated") {
				out = append(out, n)
			}
		}
		return out
	}

	rows, err := conn.Query(t.Context(), `SELECT invariant, anomalies, last_run_outcome, snapshot_duration_seconds FROM pgconsistency.status`)
	require.NoError(t, err)
	rows.Close()
	require.NoError(t, rows.Err())
	assert.Empty(t, deprecations(), "the new names raise nothing")

	for range 2 {
		var total, differ int
		require.NoError(t, conn.QueryRow(t.Context(), `
			SELECT count(*), count(*) FILTER (WHERE last_status IS DISTINCT FROM last_run_outcome
			                                     OR refresh_duration_seconds IS DISTINCT FROM snapshot_duration_seconds)
			  FROM pgconsistency.status`).Scan(&total, &differ))
		assert.Greater(t, total, 1, "status rows")
		assert.Zero(t, differ, "rows whose old columns differ from the new ones")
	}
	assert.Equal(t, []string{
		`NOTICE: pgconsistency: pgconsistency.status.last_status is deprecated and will be removed in 0.8.0; read last_run_outcome instead`,
		`NOTICE: pgconsistency: pgconsistency.status.refresh_duration_seconds is deprecated and will be removed in 0.8.0; read snapshot_duration_seconds instead`,
	}, deprecations(), "one notice per old column and session, whatever the rows and the queries")

	var acknowledged, same int
	require.NoError(t, conn.QueryRow(t.Context(), `
		SELECT count(*), count(*) FILTER (WHERE ack_reason = acknowledged_reason AND ack_until = acknowledged_until)
		  FROM pgconsistency.anomaly WHERE acknowledged_at IS NOT NULL`).Scan(&acknowledged, &same))
	assert.Positive(t, acknowledged, "acknowledged anomalies")
	assert.Equal(t, acknowledged, same, "ack_reason and ack_until read as acknowledged_reason and acknowledged_until")
	_, err = conn.Exec(t.Context(), "UPDATE pgconsistency.anomaly SET ack_until = now()")
	assert.ErrorContains(t, err, `column "ack_until" can only be updated to DEFAULT`, "the old columns are read-only")
}

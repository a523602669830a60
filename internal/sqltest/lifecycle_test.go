//go:build integration

package sqltest_test

import (
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// TestLifecycle covers the anomalies' lifecycle, acknowledgements and the
// log cursor.
func TestLifecycle(t *testing.T) {
	runOnOneCluster(t, []sqlTest{
		{"NewResolvedBackAgain", testNewResolvedBackAgain},
		{"Acknowledgements", testAcknowledgements},
		{"LogCursor", testLogCursor},
	})
}

type anomalyRow struct {
	Seq          int64
	FirstSeenAt  time.Time
	LastSeenAt   time.Time
	ResolvedAt   *time.Time
	Acknowledged bool
	Details      map[string]any
}

func anomalyOf(t *testing.T, conn *pgx.Conn, invariant, key string) anomalyRow {
	t.Helper()
	var a anomalyRow
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT seq, first_seen_at, last_seen_at, resolved_at,
		acknowledged_at IS NOT NULL, details FROM pgconsistency.anomaly WHERE invariant = $1 AND key = $2`, invariant, key).
		Scan(&a.Seq, &a.FirstSeenAt, &a.LastSeenAt, &a.ResolvedAt, &a.Acknowledged, &a.Details))
	return a
}

func counts(t *testing.T, conn *pgx.Conn, invariant string) [4]int64 {
	t.Helper()
	var c [4]int64
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT anomalies, new_anomalies, resolved_anomalies, acknowledged_anomalies
		FROM pgconsistency.status WHERE invariant = $1`, invariant).Scan(&c[0], &c[1], &c[2], &c[3]))
	return c
}

func testNewResolvedBackAgain(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s)
	conn := s.Conn(t, db)
	const inv = "dataset_seed_missing"
	key := fixture.DatasetID(4)
	refresh := func() { exec(t, conn, "CALL pgconsistency.refresh($1)", inv) }
	breakSeed := func() {
		exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", key)
	}
	fixSeed := func() {
		exec(t, conn, `INSERT INTO public.dataset_key_blocks (dataset_id, block_ref_name, event_type, sequence_number, block_hash, event_payload)
			VALUES ($1, 'head', 'Seed', 0, fixture.block_hash(4, 'head', 0), '{}')`, key)
	}

	refresh()
	breakSeed()
	refresh()
	first := anomalyOf(t, conn, inv, key)
	assert.Nil(t, first.ResolvedAt)
	assert.Equal(t, first.FirstSeenAt, first.LastSeenAt)
	assert.Equal(t, map[string]any{"key_blocks": float64(2), "min_sequence_number": float64(1)}, first.Details,
		"the view's row, without key, when it appeared")
	assert.Equal(t, [4]int64{1, 1, 0, 0}, counts(t, conn, inv), "new")

	refresh()
	still := anomalyOf(t, conn, inv, key)
	assert.Equal(t, first, still, "a persisting anomaly: its row is not written again")
	assert.Equal(t, [4]int64{1, 0, 0, 0}, counts(t, conn, inv), "old")
	var lastRefreshed time.Time
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT refreshed_at FROM pgconsistency.status WHERE invariant = $1", inv).Scan(&lastRefreshed))

	fixSeed()
	refresh()
	resolved := anomalyOf(t, conn, inv, key)
	require.NotNil(t, resolved.ResolvedAt)
	assert.Equal(t, lastRefreshed, resolved.LastSeenAt, "last seen: the end of the latest refresh that still saw it")
	assert.Equal(t, [4]int64{0, 0, 1, 0}, counts(t, conn, inv), "resolved")

	breakSeed()
	refresh()
	back := anomalyOf(t, conn, inv, key)
	assert.Nil(t, back.ResolvedAt)
	assert.Greater(t, back.Seq, first.Seq, "a new seq: it will be logged again")
	assert.True(t, back.FirstSeenAt.After(first.FirstSeenAt))
	assert.Equal(t, [4]int64{1, 1, 0, 0}, counts(t, conn, inv), "back again: new again")
}

func testAcknowledgements(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_seed_missing") // 13, 14, 24
	conn := s.Conn(t, db)
	const inv = "dataset_seed_missing"
	exec(t, conn, "CALL pgconsistency.refresh()")
	require.Equal(t, [4]int64{3, 3, 0, 0}, counts(t, conn, inv))

	// Known leftovers of the incident, acknowledged in bulk.
	var n int
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT pgconsistency.acknowledge_all($1, 'lost in the 2026-11 incident, not recoverable')", inv).Scan(&n))
	assert.Equal(t, 3, n)
	assert.Equal(t, [4]int64{0, 3, 0, 3}, counts(t, conn, inv), "acknowledged leave anomalies at once")
	assert.True(t, anomalyOf(t, conn, inv, fixture.DatasetID(13)).Acknowledged)

	// A new one in the same invariant counts, and is new.
	exec(t, conn, "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(5))
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	assert.Equal(t, [4]int64{1, 1, 0, 3}, counts(t, conn, inv))

	// One acknowledgement taken back, one given with an expiry.
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency.unacknowledge($1, $2)", inv, fixture.DatasetID(13)).Scan(&n))
	assert.Equal(t, 1, n)
	assert.Equal(t, [4]int64{2, 1, 0, 2}, counts(t, conn, inv))
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency.acknowledge($1, $2, 'fix scheduled', now() + interval '1 hour')",
		inv, fixture.DatasetID(5)).Scan(&n))
	assert.Equal(t, [4]int64{1, 1, 0, 3}, counts(t, conn, inv))

	// The hour passes: the next refresh() call (due or not) ends it.
	exec(t, conn, "UPDATE pgconsistency.anomaly SET acknowledged_until = now() - interval '1 second' WHERE key = $1", fixture.DatasetID(5))
	exec(t, conn, "CALL pgconsistency.refresh()")
	assert.Equal(t, [4]int64{2, 1, 0, 2}, counts(t, conn, inv), "expired")
	assert.False(t, anomalyOf(t, conn, inv, fixture.DatasetID(5)).Acknowledged)

	// Refreshes keep acknowledgements of anomalies that stay open.
	exec(t, conn, "CALL pgconsistency.refresh($1)", inv)
	assert.Equal(t, [4]int64{2, 0, 0, 2}, counts(t, conn, inv))

	for call, want := range map[string]string{
		"SELECT pgconsistency.acknowledge('dataset_seed_missing', 'no-such-key', 'x')":                 "no open anomaly 'no-such-key' in invariant 'dataset_seed_missing'",
		"SELECT pgconsistency.acknowledge('dataset_seed_missing', 'x', '  ')":                          "acknowledging needs a reason",
		"SELECT pgconsistency.acknowledge_all('nope', 'x')":                                            "unknown invariant 'nope'",
		"SELECT pgconsistency.acknowledge('dataset_seed_missing', 'x', 'y', now() - interval '1 day')": "is already past",
	} {
		_, err := conn.Exec(t.Context(), call)
		require.ErrorContains(t, err, want, call)
	}
}

type logRow struct {
	Seq       int64
	Invariant string
	Key       string
}

func logBatch(t *testing.T, conn *pgx.Conn, consumer string, max int) []logRow {
	t.Helper()
	rows, err := conn.Query(t.Context(), "SELECT seq, invariant, key FROM pgconsistency.new_anomalies_for_log($1, $2)", consumer, max)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[logRow])
	require.NoError(t, err)
	return out
}

func testLogCursor(t *testing.T, s *pgtest.Server) {
	db := fixture.NewDatabase(t, s, "dataset_head_ref_missing") // 1, 2, 21
	conn := s.Conn(t, db)
	exec(t, conn, "CALL pgconsistency.refresh()")
	assert.Empty(t, logBatch(t, conn, "pgconsistency/a", 10), "a new consumer starts at the end: old anomalies are not new to it")

	for _, i := range []int{3, 4, 5} {
		exec(t, conn, "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'", fixture.DatasetID(i))
	}
	exec(t, conn, "CALL pgconsistency.refresh('dataset_head_ref_missing')")
	batch := logBatch(t, conn, "pgconsistency/a", 2)
	require.Len(t, batch, 2, "at most max_rows")
	assert.Len(t, logBatch(t, conn, "pgconsistency/a", 2), 2, "not advanced: the same again")
	exec(t, conn, "SELECT pgconsistency.advance_log_cursor('pgconsistency/a', $1)", batch[1].Seq)
	rest := logBatch(t, conn, "pgconsistency/a", 2)
	require.Len(t, rest, 1)
	exec(t, conn, "SELECT pgconsistency.advance_log_cursor('pgconsistency/a', $1)", rest[0].Seq)
	assert.Empty(t, logBatch(t, conn, "pgconsistency/a", 2))
	keys := []string{batch[0].Key, batch[1].Key, rest[0].Key}
	assert.ElementsMatch(t, []string{fixture.DatasetID(3), fixture.DatasetID(4), fixture.DatasetID(5)}, keys)
	exec(t, conn, "SELECT pgconsistency.advance_log_cursor('pgconsistency/a', 1)")
	assert.Empty(t, logBatch(t, conn, "pgconsistency/a", 2), "the cursor never goes back")
}

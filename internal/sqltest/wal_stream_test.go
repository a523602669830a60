//go:build integration

package sqltest_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/walstream"
)

// TestWALStream: the WAL capture's slot read over a replication connection
// (internal/walstream, the receiver's refresh::wal_stream), through the
// faults that lose keys in practice. Each ends with every invariant's count
// equal to its query run whole.
func TestWALStream(t *testing.T) {
	t.Parallel()
	s := pgtest.Start(t, walCapture...)
	run := func(name string, test func(*testing.T, *pgtest.Server, string, *pgx.Conn)) {
		t.Run(name, func(t *testing.T) {
			db, conn := walDatabase(t, s)
			test(t, s, db, conn)
		})
	}
	run("KeysStoredThenConfirmed", testStreamKeys)
	run("StoppedBeforeStoring", testStreamStoppedBeforeStoring)
	run("TablesChanged", testStreamTablesChanged)
	run("SlotDropped", testStreamSlotDropped)
	run("BackToTriggers", testStreamBackToTriggers)
	run("RoleWithoutReplication", testStreamRoleWithoutReplication)
	run("ThroughPgBouncer", testStreamThroughPgBouncer)
	// Last: it stops the server.
	run("PostgreSQLRestarted", testStreamRestart)
}

// stream is one walstream.Run in a goroutine, on connections of its own.
type stream struct {
	cancel context.CancelFunc
	done   chan error

	mu     sync.Mutex
	stores int
}

func startStream(t *testing.T, s *pgtest.Server, db string, o walstream.Options) *stream {
	t.Helper()
	if o.Replication == nil {
		rc, err := pgconn.ParseConfig(s.DSN(db))
		require.NoError(t, err)
		o.Replication = rc
	}
	if o.Conn == nil {
		store := s.Conn(t, db)
		o.Conn = func(context.Context) (walstream.Querier, error) { return store, nil }
	}
	if o.StatusInterval == 0 {
		o.StatusInterval = 200 * time.Millisecond
	}
	st := &stream{done: make(chan error, 1)}
	onStore := o.OnStore
	o.OnStore = func(n int, p pglogrepl.LSN) {
		st.mu.Lock()
		st.stores++
		st.mu.Unlock()
		if onStore != nil {
			onStore(n, p)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	st.cancel = cancel
	go func() { st.done <- walstream.Run(ctx, o) }()
	t.Cleanup(func() { _ = st.stop() }) // what it returned, the test asserted if it cared
	return st
}

// stop ends the stream and returns what Run returned.
func (st *stream) stop() error {
	st.cancel()
	err, ok := <-st.done
	if ok {
		close(st.done)
	}
	return err
}

// ended waits for Run to return by itself.
func (st *stream) ended(t *testing.T) error {
	t.Helper()
	select {
	case err := <-st.done:
		close(st.done)
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("the stream did not end")
		return nil
	}
}

// streaming waits until the stream holds the slot.
func streaming(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	slotHeld(t, conn, true, "the stream holds the slot")
}

// notStreaming waits until no replication connection holds the slot.
func notStreaming(t *testing.T, conn *pgx.Conn) {
	t.Helper()
	slotHeld(t, conn, false, "the stream's walsender gone")
}

func slotHeld(t *testing.T, conn *pgx.Conn, want bool, what string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var active bool
		return conn.QueryRow(t.Context(), `SELECT s.active FROM pg_replication_slots s JOIN pgconsistency.capture c USING (slot_name)`).
			Scan(&active) == nil && active == want
	}, 30*time.Second, 10*time.Millisecond, what)
}

// walNow is the WAL written so far.
func walNow(t *testing.T, conn *pgx.Conn) string {
	t.Helper()
	var lsn string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pg_current_wal_flush_lsn()::text").Scan(&lsn))
	return lsn
}

// storedPast waits until the stream stored the keys of everything before
// lsn, and confirmed it to the slot.
func storedPast(t *testing.T, conn *pgx.Conn, lsn string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var ok bool
		return conn.QueryRow(t.Context(), `SELECT c.read_by = 'stream' AND s.confirmed_flush_lsn >= $1::pg_lsn
			FROM pgconsistency.capture c JOIN pg_replication_slots s USING (slot_name)`, lsn).Scan(&ok) == nil && ok
	}, 30*time.Second, 10*time.Millisecond, "the stream stores and confirms what was written before %s", lsn)
}

// sentPast waits until the stream's walsender sent what was written before
// lsn.
func sentPast(t *testing.T, conn *pgx.Conn, lsn string) {
	t.Helper()
	require.Eventually(t, func() bool {
		var sent bool
		return conn.QueryRow(t.Context(), `SELECT r.sent_lsn >= $1::pg_lsn FROM pg_stat_replication r
			JOIN pg_replication_slots s ON s.active_pid = r.pid JOIN pgconsistency.capture c USING (slot_name)`, lsn).
			Scan(&sent) == nil && sent
	}, 30*time.Second, 10*time.Millisecond, "the walsender sent what was written before %s", lsn)
}

// pendingKeys counts the keys captured or dispatched, not yet refreshed.
func pendingKeys(t *testing.T, conn *pgx.Conn) int {
	t.Helper()
	var n int
	require.NoError(t, conn.QueryRow(t.Context(),
		"SELECT (SELECT count(*) FROM pgconsistency.captured_key) + (SELECT count(*) FROM pgconsistency.pending_key)").Scan(&n))
	return n
}

func testStreamKeys(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	startStream(t, s, db, walstream.Options{})
	streaming(t, conn)
	// The SQL read leaves a streamed slot alone.
	var read *int64
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency.capture_wal()").Scan(&read))
	require.Nil(t, read, "capture_wal() while the stream holds the slot")
	breakSeed(t, conn, 1)
	exec(t, conn, "DELETE FROM public.dataset_statistics WHERE dataset_id = fixture.dataset_id(2)")
	storedPast(t, conn, walNow(t, conn))
	require.Positive(t, pendingKeys(t, conn), "the keys of the writes, stored by the stream")
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	require.EqualValues(t, 1, status(t, conn)["dataset_seed_missing"].Anomalies)
	require.EqualValues(t, 1, status(t, conn)["dataset_statistics_missing"].Anomalies)
}

// testStreamStoppedBeforeStoring: a collector stopped (or killed) between
// receiving changes and storing their keys: the slot was never told it had
// them, so nothing is lost: the SQL read (the refresh loop, as when no
// stream runs) gets them, and so does a stream started again.
func testStreamStoppedBeforeStoring(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	for i, readAgain := range []string{"the refresh loop", "a stream started again"} {
		store := &heldStores{q: s.Conn(t, db), attempted: make(chan struct{}, 1)}
		st := startStream(t, s, db, walstream.Options{Conn: func(context.Context) (walstream.Querier, error) { return store, nil }})
		streaming(t, conn)
		breakSeed(t, conn, i+1)
		written := walNow(t, conn)
		select {
		case <-store.attempted:
		case <-time.After(30 * time.Second):
			t.Fatal("the stream never tried to store the write")
		}
		require.ErrorIs(t, st.stop(), context.Canceled)
		// Its walsender gone: until then, a read by SQL leaves the slot to
		// it (the refresh loop's next pass reads it).
		notStreaming(t, conn)
		var confirmedBefore bool
		require.NoError(t, conn.QueryRow(t.Context(), `SELECT s.confirmed_flush_lsn < $1::pg_lsn AND coalesce(c.wal_position < $1::pg_lsn, true)
			FROM pgconsistency.capture c JOIN pg_replication_slots s USING (slot_name)`, written).Scan(&confirmedBefore))
		require.True(t, confirmedBefore, "the slot confirmed, and the capture stored, nothing past what was not stored")
		require.Zero(t, pendingKeys(t, conn), "nothing was stored")
		if i == 1 {
			startStream(t, s, db, walstream.Options{})
			storedPast(t, conn, written)
			require.Positive(t, pendingKeys(t, conn), "the keys, stored by the stream started again")
		}
		refreshAll(t, conn)
		requireExact(t, conn)
		requireKind(t, conn, "dataset_seed_missing", "incremental")
		require.EqualValues(t, i+1, status(t, conn)["dataset_seed_missing"].Anomalies, readAgain)
	}
}

// heldStores holds the stream's stores back, so that it keeps the slot and
// confirms nothing past them: the stores of changes (every store, empty
// ones too, with all) wait until open is closed (never, when nil: as if the
// collector died between receiving changes and storing their keys) or the
// stream stops. attempted, when set, is signalled at the first one held.
type heldStores struct {
	q         walstream.Querier
	all       bool
	open      chan struct{}
	attempted chan struct{}
}

func (h *heldStores) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	if strings.Contains(sql, "capture_wal_stream") && (h.all || len(args[0].([]string)) > 0) {
		select {
		case h.attempted <- struct{}{}:
		default:
		}
		select {
		case <-h.open:
		case <-ctx.Done():
			return errRow{ctx.Err()}
		}
	}
	return h.q.QueryRow(ctx, sql, args...)
}

type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

// testStreamTablesChanged: an invariant on a table nothing captured before,
// put in incremental mode while the stream runs, changes the tables
// decoded: the stream starts again from the stored position, and the
// writes to the new table in between are not lost.
func testStreamTablesChanged(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	exec(t, conn, "CREATE TABLE public.stream_rows (id integer PRIMARY KEY, v text NOT NULL)")
	exec(t, conn, "INSERT INTO public.stream_rows SELECT i, 'ok' FROM generate_series(1, 10) i")
	// It stores only 2 s after a change of a table it decodes: it decodes
	// the UPDATE below with the tables of before, for sure.
	st := startStream(t, s, db, walstream.Options{FlushDelay: 2 * time.Second, StatusInterval: time.Hour})
	streaming(t, conn)
	exec(t, conn, `SELECT pgconsistency.define_invariant('stream_rows_bad',
		$q$SELECT r.id::text AS key FROM public.stream_rows r WHERE r.v = 'bad'$q$,
		keys => '{"public.stream_rows": "r.id::text"}')`)
	refreshAll(t, conn)
	exec(t, conn, "SELECT pgconsistency.set_refresh_mode('stream_rows_bad', 'incremental')")
	refreshAll(t, conn) // its reconcile
	exec(t, conn, "UPDATE public.stream_rows SET v = 'bad' WHERE id = 3")
	breakSeed(t, conn, 2)
	written := walNow(t, conn)
	sentPast(t, conn, written)
	require.ErrorIs(t, st.ended(t), walstream.ErrTablesChanged)
	startStream(t, s, db, walstream.Options{})
	storedPast(t, conn, written)
	exec(t, conn, "UPDATE public.stream_rows SET v = 'bad' WHERE id = 4")
	breakSeed(t, conn, 1)
	storedPast(t, conn, walNow(t, conn))
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "stream_rows_bad", "incremental")
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	require.EqualValues(t, 2, status(t, conn)["stream_rows_bad"].Anomalies)
}

// testStreamSlotDropped: the slot dropped (its walsender terminated first,
// as a DBA must): the stream cannot start until the refresh loop created
// the slot again; the reconcile heals and reports what was missed.
func testStreamSlotDropped(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	st := startStream(t, s, db, walstream.Options{})
	streaming(t, conn)
	exec(t, conn, `SELECT pg_terminate_backend(s.active_pid) FROM pg_replication_slots s JOIN pgconsistency.capture c USING (slot_name)`)
	require.Error(t, st.ended(t))
	require.Eventually(t, func() bool {
		_, err := conn.Exec(t.Context(), "SELECT pg_drop_replication_slot(slot_name) FROM pgconsistency.capture")
		return err == nil
	}, 30*time.Second, 10*time.Millisecond, "the slot, free, dropped")
	breakSeed(t, conn, 5) // never decoded
	st = startStream(t, s, db, walstream.Options{})
	var notReady *walstream.NotReadyError
	require.ErrorAs(t, st.ended(t), &notReady)
	assert.Contains(t, notReady.Problem, "was missing")
	refreshAll(t, conn) // capture_wal creates the slot again; every invariant reconciles
	requireExact(t, conn)
	requireSlotLost(t, conn, "was missing")
	requireHealed(t, conn, "dataset_seed_missing")
	startStream(t, s, db, walstream.Options{})
	breakSeed(t, conn, 6)
	storedPast(t, conn, walNow(t, conn))
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
}

// testStreamBackToTriggers: set_capture('trigger') while the stream holds
// the slot works; while the stream still holds it (its stores held back
// here), the refresh loop and a stream starting leave it alone; the stream
// ends at its next store, and the next refresh loop drops the slot it
// leaves (or the next start of a stream does).
func testStreamBackToTriggers(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	store := &heldStores{q: s.Conn(t, db), all: true, open: make(chan struct{})}
	st := startStream(t, s, db, walstream.Options{Conn: func(context.Context) (walstream.Querier, error) { return store, nil }})
	streaming(t, conn)
	require.NoError(t, setCapture(t, conn, "trigger"))
	slots := func() (n int) {
		require.NoError(t, conn.QueryRow(t.Context(),
			"SELECT count(*) FROM pg_replication_slots WHERE slot_name = (SELECT slot_name FROM pgconsistency.capture)").Scan(&n))
		return n
	}
	var read *int64
	var problem string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT pgconsistency.capture_wal(), (pgconsistency.wal_stream_start()).problem").
		Scan(&read, &problem), "a slot the stream still holds: no attempt to drop it")
	assert.Nil(t, read, "capture_wal with the trigger capture")
	assert.Contains(t, problem, "the capture is trigger")
	slotHeld(t, conn, true, "the stream still holds the slot")
	close(store.open)
	require.ErrorIs(t, st.ended(t), walstream.ErrCaptureChanged)
	notStreaming(t, conn) // a slot still held is dropped later
	require.Equal(t, 1, slots(), "the slot the stream held, left by set_capture")
	// The next refresh loop drops it: nothing reads it any more.
	breakSeed(t, conn, 1)
	refreshAll(t, conn)
	requireExact(t, conn)
	require.Zero(t, slots(), "the slot the stream held, dropped by the refresh loop")
	st = startStream(t, s, db, walstream.Options{})
	var notReady *walstream.NotReadyError
	require.ErrorAs(t, st.ended(t), &notReady)
	assert.Contains(t, notReady.Problem, "the capture is trigger")
}

// testStreamRoleWithoutReplication: the error names the fix.
func testStreamRoleWithoutReplication(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	role, password := s.CreateLoginRole(t, db, "pgc_stream_")
	rc, err := pgconn.ParseConfig(s.DSN(db))
	require.NoError(t, err)
	rc.User, rc.Password = role, password
	st := startStream(t, s, db, walstream.Options{Replication: rc})
	err = st.ended(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "ALTER ROLE <role> REPLICATION")
	// With REPLICATION, it streams.
	exec(t, conn, "ALTER ROLE "+pgx.Identifier{role}.Sanitize()+" REPLICATION")
	startStream(t, s, db, walstream.Options{Replication: rc})
	breakSeed(t, conn, 1)
	storedPast(t, conn, walNow(t, conn))
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
}

// testStreamThroughPgBouncer: a replication connection pointed at a
// transaction-pooling PgBouncer is refused; the error says where to point
// it. The slot stays with the SQL reads.
func testStreamThroughPgBouncer(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	b := s.StartPgBouncer(t, db)
	rc, err := pgconn.ParseConfig(b.DSN(s.User, s.Password))
	require.NoError(t, err)
	err = startStream(t, s, db, walstream.Options{Replication: rc}).ended(t)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "unsupported startup parameter")
	assert.Contains(t, err.Error(), "point refresh::wal_stream::endpoint at the PostgreSQL server itself")
	breakSeed(t, conn, 1)
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
}

// testStreamRestart: PostgreSQL restarted mid-stream: the stream ends; one
// started again picks up where the stored position is, with what was
// written while it was down.
func testStreamRestart(t *testing.T, s *pgtest.Server, db string, conn *pgx.Conn) {
	st := startStream(t, s, db, walstream.Options{})
	streaming(t, conn)
	breakSeed(t, conn, 1)
	storedPast(t, conn, walNow(t, conn))
	s.Stop(t)
	err := st.ended(t)
	require.Error(t, err)
	require.False(t, errors.Is(err, context.Canceled), "ended by the server: %v", err)
	s.StartAgain(t)
	conn = s.Conn(t, db)
	breakSeed(t, conn, 2) // while no stream runs
	startStream(t, s, db, walstream.Options{})
	breakSeed(t, conn, 3)
	storedPast(t, conn, walNow(t, conn))
	refreshAll(t, conn)
	requireExact(t, conn)
	requireKind(t, conn, "dataset_seed_missing", "incremental")
	require.EqualValues(t, 3, status(t, conn)["dataset_seed_missing"].Anomalies)
}

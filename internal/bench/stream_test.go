//go:build integration

package bench

// incStream: the receiver's stream of the WAL capture's slot
// (refresh::wal_stream: internal/walstream.Run, as the receiver runs it)
// beside the writers, timed: its stores, and its walsender's CPU.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/walstream"
)

type incStream struct {
	cancel context.CancelFunc
	done   chan error
	conn   *pgx.Conn // where it stores
	admin  *pgx.Conn // where its walsender is looked up

	mu      sync.Mutex
	changes int64
	store   time.Duration
}

func startIncStream(tb testing.TB, srv *pgtest.Server, db string) *incStream {
	rc, err := pgconn.ParseConfig(srv.DSN(db))
	must(tb, err)
	st := &incStream{done: make(chan error, 1), conn: srv.Conn(tb, db), admin: srv.Conn(tb, db)}
	ctx, cancel := context.WithCancel(context.Background())
	st.cancel = cancel
	go func() {
		st.done <- walstream.Run(ctx, walstream.Options{
			Replication: rc,
			Conn: func(context.Context) (walstream.Querier, error) {
				return timedQuerier{q: st.conn, st: st}, nil
			},
			OnStore: func(n int, _ pglogrepl.LSN) {
				st.mu.Lock()
				st.changes += int64(n)
				st.mu.Unlock()
			},
		})
	}()
	deadline := time.Now().Add(30 * time.Second)
	for st.senderPID(tb) == 0 {
		select {
		case err := <-st.done:
			tb.Fatalf("the WAL stream ended before it started: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatal("the WAL stream did not take the slot within 30 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return st
}

// senderPID is the pid of the walsender that holds the slot, 0 if none.
func (st *incStream) senderPID(tb testing.TB) int {
	var pid *int
	must(tb, st.admin.QueryRow(tb.Context(), `SELECT s.active_pid FROM pg_replication_slots s
		JOIN pgconsistency.capture c ON c.slot_name = s.slot_name`).Scan(&pid))
	if pid == nil {
		return 0
	}
	return *pid
}

// snapshot: the changes stored, the time in stores, and the walsender's
// CPU time (utime + stime of /proc/<pid>/stat, in clock ticks of 10 ms).
func (st *incStream) snapshot(tb testing.TB) incLoopStats {
	st.mu.Lock()
	s := incLoopStats{changes: st.changes, store: st.store}
	st.mu.Unlock()
	pid := st.senderPID(tb)
	if pid == 0 {
		tb.Fatal("the WAL stream lost the slot during the phase")
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	must(tb, err)
	// The fields after the command (which is in parentheses and may hold
	// spaces): utime and stime are the 12th and 13th.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	must(tb, errors.Join(err1, err2))
	s.sender = time.Duration(utime+stime) * 10 * time.Millisecond
	return s
}

// waitStored waits until the stream stored the keys of everything written
// so far, and confirmed it to the slot.
func (st *incStream) waitStored(tb testing.TB, conn *pgx.Conn) {
	var written string
	must(tb, conn.QueryRow(tb.Context(), `SELECT pg_current_wal_flush_lsn()::text`).Scan(&written))
	deadline := time.Now().Add(5 * time.Minute)
	for {
		var stored bool
		must(tb, conn.QueryRow(tb.Context(), `SELECT s.confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots s
			JOIN pgconsistency.capture c ON c.slot_name = s.slot_name`, written).Scan(&stored))
		if stored {
			return
		}
		select {
		case err := <-st.done:
			tb.Fatalf("the WAL stream ended: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("the WAL stream did not store what was written before %s within 5 minutes", written)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stop ends the stream; it must have ended for no other reason.
func (st *incStream) stop(tb testing.TB) {
	st.cancel()
	if err := <-st.done; !errors.Is(err, context.Canceled) {
		tb.Fatalf("the WAL stream: %v", err)
	}
}

// timedQuerier adds the time of each store (QueryRow and its Scan) to st.
type timedQuerier struct {
	q  walstream.Querier
	st *incStream
}

func (t timedQuerier) QueryRow(ctx context.Context, sql string, args ...any) pgx.Row {
	start := time.Now() // before: QueryRow runs the statement
	return timedRow{row: t.q.QueryRow(ctx, sql, args...), st: t.st, start: start}
}

type timedRow struct {
	row   pgx.Row
	st    *incStream
	start time.Time
}

func (r timedRow) Scan(dest ...any) error {
	err := r.row.Scan(dest...)
	r.st.mu.Lock()
	r.st.store += time.Since(r.start)
	r.st.mu.Unlock()
	return err
}

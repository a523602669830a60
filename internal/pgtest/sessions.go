//go:build integration || e2e

package pgtest

import (
	"context"
	"sync"
	"testing"
	"time"
)

// SessionWatch counts, every 20 ms until Max is called or the test ends,
// the sessions in pg_stat_activity whose application_name starts with a
// prefix, and keeps the highest count: how many connections a client held
// at most.
type SessionWatch struct {
	mu      sync.Mutex
	highest int
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// WatchSessions starts a SessionWatch of the sessions whose
// application_name starts with prefix, on a connection of its own.
func (s *Server) WatchSessions(tb testing.TB, prefix string) *SessionWatch {
	tb.Helper()
	conn := s.Conn(tb, "")
	w := &SessionWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			var n int
			if conn.QueryRow(context.Background(), `SELECT count(*) FROM pg_catalog.pg_stat_activity
				WHERE starts_with(application_name, $1)`, prefix).Scan(&n) == nil {
				w.mu.Lock()
				w.highest = max(w.highest, n)
				w.mu.Unlock()
			}
			select {
			case <-w.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	tb.Cleanup(w.finish)
	return w
}

func (w *SessionWatch) finish() {
	w.once.Do(func() { close(w.stop) })
	<-w.done
}

// Max stops the watch and returns the highest count it saw.
func (w *SessionWatch) Max() int {
	w.finish()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.highest
}

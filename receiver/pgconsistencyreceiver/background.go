package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// background is the goroutine of one of the receiver's loops (the
// scheduler, the changes loop, the WAL stream, discovery): started with the
// receiver, stopped at its shutdown.
type background struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// launch starts loop in a goroutine of its own; loop returns when its context
// is cancelled.
func (b *background) launch(loop func(context.Context)) {
	ctx, cancel := context.WithCancel(context.Background())
	b.cancel = cancel
	b.done = make(chan struct{})
	go func() {
		defer close(b.done)
		loop(ctx)
	}()
}

// shutdown cancels the loop (and what it has in flight) and waits for it
// to return. Safe to call without launch.
func (b *background) shutdown() {
	if b.cancel == nil {
		return
	}
	b.cancel()
	<-b.done
}

// failureSeries is what a loop knows of its failures in a row: how many,
// and the one it last logged, so that a failure that persists is logged
// when its message changes and at most once per maxWait, not at every try.
type failureSeries struct {
	count       int
	lastError   string
	lastErrorAt time.Time
}

// failed counts err and says how long to wait before the next try: base,
// doubled at each failure in a row, up to maxWait. It logs err, with
// message(wait), when it is news: as an error, or as info when it is the
// first of a series and the server ended the connection (a restart, a
// database dropped WITH (FORCE)), which the next try reconnects from.
func (f *failureSeries) failed(logger *zap.Logger, err error, base, maxWait time.Duration, message func(wait time.Duration) string) time.Duration {
	f.count++
	wait := min(maxWait, base<<min(f.count-1, 16))
	if msg := err.Error(); msg != f.lastError || time.Since(f.lastErrorAt) >= maxWait {
		f.lastError, f.lastErrorAt = msg, time.Now()
		log := logger.Error
		if f.count == 1 && (isAdminShutdown(err) || databaseGone(err)) {
			log = logger.Info
		}
		log(message(wait), zap.Error(err), zap.Int("consecutive_failures", f.count))
	}
	return wait
}

// reset ends the series and says how long it was.
func (f *failureSeries) reset() int {
	n := f.count
	f.count, f.lastError = 0, ""
	return n
}

// lastingSQLError is err's PostgreSQL error when no retry soon will change
// it, so that the loop says what to do and waits long: undefined_function
// (the SQL in the database is older than the loop needs) or
// insufficient_privilege (a grant is missing). nil for any other error.
func lastingSQLError(err error) *pgconn.PgError {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && (pgErr.Code == "42883" || pgErr.Code == "42501") {
		return pgErr
	}
	return nil
}

package pgconsistencyreceiver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// fakeChanges is a changes loop whose passes return the errors given, in
// order (nil once they run out), with its log observed.
func fakeChanges(t *testing.T, errs ...error) (*changesLoop, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	c := newChangesLoop(testConfig(), zap.New(core))
	c.run = func(context.Context) error {
		if len(errs) == 0 {
			return nil
		}
		err := errs[0]
		errs = errs[1:]
		return err
	}
	return c, logs
}

func repeat(err error, n int) []error {
	out := make([]error, n)
	for i := range out {
		out[i] = err
	}
	return out
}

// SQL older than 0.7.0, or a role without EXECUTE on refresh_changes_plan():
// said once at info, with what to do, and looked at again every minute;
// never an error.
func TestChangesLoopUnavailableIsLoggedOnce(t *testing.T) {
	for name, tc := range map[string]struct {
		code, want string
	}{
		"older SQL":    {"42883", "upgrade it with `psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql`"},
		"no privilege": {"42501", "`GRANT pgconsistency_refresher TO <the receiver's role>`"},
	} {
		t.Run(name, func(t *testing.T) {
			c, logs := fakeChanges(t, repeat(&pgconn.PgError{Code: tc.code, Message: "no"}, 5)...)
			for range 5 {
				assert.Equal(t, time.Minute, c.step(t.Context()), "looked at again every minute")
			}
			require.Equal(t, 1, logs.Len(), "logged once: %v", logs.All())
			e := logs.All()[0]
			assert.Equal(t, zapcore.InfoLevel, e.Level)
			assert.Contains(t, e.Message, tc.want)

			// Once it can be called: said so, and every interval again.
			assert.Equal(t, time.Second, c.step(t.Context()).Round(100*time.Millisecond))
			assert.Equal(t, 1, logs.FilterMessageSnippet("can be called now").Len())
			assert.Zero(t, logs.FilterLevelExact(zapcore.ErrorLevel).Len())
		})
	}
}

// A pass that keeps failing (the database down) backs off up to a minute,
// and its error is logged when it changes, not at every pass.
func TestChangesLoopFailuresBackOffAndAreNotLoggedEverySecond(t *testing.T) {
	down := errors.New("connection refused")
	c, logs := fakeChanges(t, append(repeat(down, 8), errors.New("another error"))...)
	var waits []time.Duration
	for range 9 {
		waits = append(waits, c.step(t.Context()))
	}
	assert.Equal(t, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second,
		32 * time.Second, time.Minute, time.Minute, time.Minute}, waits)
	errs := logs.FilterLevelExact(zapcore.ErrorLevel).All()
	require.Len(t, errs, 2, "the first failure and the changed one: %v", errs)
	assert.Contains(t, errs[0].ContextMap()["error"], "connection refused")
	assert.Contains(t, errs[1].ContextMap()["error"], "another error")

	assert.Equal(t, time.Second, c.step(t.Context()).Round(100*time.Millisecond), "back to every interval")
	assert.Equal(t, 1, logs.FilterMessageSnippet("passes succeed again").Len())
}

// Shutdown stops the goroutine (goleak checks it in TestMain) and is safe
// without start.
func TestChangesLoopShutdown(t *testing.T) {
	c, _ := fakeChanges(t)
	c.shutdown()
	c, _ = fakeChanges(t)
	c.start()
	time.Sleep(20 * time.Millisecond)
	c.shutdown()
}

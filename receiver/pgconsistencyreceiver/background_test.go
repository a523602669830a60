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

// TestFailureSeries: the wait doubles from base up to the bound; a failure
// is logged when its message changes, not when it repeats; the first of a
// series that is a server restart is info, the rest errors; reset says how
// many there were and starts again from base.
func TestFailureSeries(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	logger := zap.New(core)
	message := func(wait time.Duration) string { return "next in " + wait.String() }
	restart := &pgconn.PgError{Code: "57P01", Message: "terminating connection due to administrator command"}
	other := errors.New("connection refused")

	var f failureSeries
	var waits []time.Duration
	for _, err := range []error{restart, restart, other, other, other, other, other, other, other} {
		waits = append(waits, f.failed(logger, err, time.Second, 30*time.Second, message))
	}
	assert.Equal(t, []time.Duration{1 * time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second,
		30 * time.Second, 30 * time.Second, 30 * time.Second, 30 * time.Second}, waits)
	entries := logs.AllUntimed()
	require.Len(t, entries, 2, "the restart once, then the other error once")
	assert.Equal(t, zapcore.InfoLevel, entries[0].Level, "the first failure of a series, a restart")
	assert.Equal(t, "next in 1s", entries[0].Message)
	assert.Equal(t, zapcore.ErrorLevel, entries[1].Level)
	assert.Equal(t, "next in 4s", entries[1].Message)
	assert.EqualValues(t, 3, entries[1].ContextMap()["consecutive_failures"])

	assert.Equal(t, 9, f.reset())
	assert.Equal(t, time.Second, f.failed(logger, other, time.Second, 30*time.Second, message), "from base again")
	assert.Len(t, logs.AllUntimed(), 3, "the same error after a reset is news")
	assert.Equal(t, zapcore.ErrorLevel, logs.AllUntimed()[2].Level)
}

// TestBackground: shutdown cancels the loop and returns once it returned;
// without launch it does nothing.
func TestBackground(t *testing.T) {
	var idle background
	idle.shutdown()

	var b background
	returned := false
	b.launch(func(ctx context.Context) {
		<-ctx.Done()
		time.Sleep(10 * time.Millisecond)
		returned = true
	})
	b.shutdown()
	assert.True(t, returned, "shutdown waited for the loop")
}

func TestLastingSQLError(t *testing.T) {
	for code, lasting := range map[string]bool{"42883": true, "42501": true, "57P01": false, "42P01": false} {
		err := &pgconn.PgError{Code: code}
		assert.Equal(t, lasting, lastingSQLError(err) != nil, code)
	}
	assert.Nil(t, lastingSQLError(errors.New("no PostgreSQL error")))
}

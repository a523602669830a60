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

	"github.com/pgconsistency/pgconsistency/internal/walstream"
)

// fakeStreamer is a WAL streamer whose streams end with the errors given,
// in order, with its log observed.
func fakeStreamer(t *testing.T, errs ...error) (*walStreamer, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	cfg := testConfig()
	cfg.Refresh.WALStream.Enabled = true
	w := newWALStreamer(cfg, zap.New(core))
	w.run = func(context.Context, walstream.Options) error {
		require.NotEmpty(t, errs, "a stream more than the test expected")
		err := errs[0]
		errs = errs[1:]
		return err
	}
	return w, logs
}

// Why the stream waits decides how long and how loudly: a stream that
// cannot start (the trigger capture) waits a few seconds, said once at
// info; a change of the tables starts again at once; older SQL or a
// missing privilege waits a minute, said once; any other end waits longer
// and longer, logged as an error (a restart of the server, once, at info).
func TestWALStreamerWaits(t *testing.T) {
	notReady := &walstream.NotReadyError{Problem: "the capture is trigger, not wal"}
	w, logs := fakeStreamer(t, notReady, notReady, notReady, walstream.ErrTablesChanged,
		&pgconn.PgError{Code: "42883", Message: "function pgconsistency.wal_stream_start() does not exist"},
		&pgconn.PgError{Code: "42883", Message: "function pgconsistency.wal_stream_start() does not exist"},
		errors.New("the WAL stream: connection reset"), errors.New("the WAL stream: connection reset"),
		errors.New("the WAL stream: connection reset"))
	for _, want := range []time.Duration{
		streamNotReadyRetry, streamNotReadyRetry, streamNotReadyRetry, 0, time.Minute, time.Minute, time.Second, 2 * time.Second, 4 * time.Second,
	} {
		assert.Equal(t, want, w.step(t.Context()))
	}
	var messages []string
	for _, e := range logs.All() {
		messages = append(messages, e.Level.String()+": "+e.Message)
	}
	require.Len(t, messages, 4, "the same error is logged again only after a minute: %q", messages)
	assert.Equal(t, "info: pgconsistency WAL stream: waiting: the capture is trigger, not wal", messages[0])
	assert.Contains(t, messages[1], "debug: pgconsistency WAL stream: the tables the WAL capture decodes changed")
	assert.Contains(t, messages[2], "warn: pgconsistency WAL stream: off for now: the pgconsistency SQL in this database is older than 0.7.7")
	assert.Contains(t, messages[3], "error: pgconsistency WAL stream ended; the next one starts in 1s")
}

// The stream connects where refresh::wal_stream says, as its role, with
// the receiver's own connection is left as it is (walstream.Run adds
// replication=database).
func TestWALStreamerConnection(t *testing.T) {
	cfg := testConfig()
	cfg.Refresh.WALStream = WALStreamConfig{Enabled: true, Endpoint: "db-primary.internal:5432", Username: "pgc_stream", Password: "pw"}
	w := newWALStreamer(cfg, zap.NewNop())
	var got walstream.Options
	w.run = func(_ context.Context, o walstream.Options) error {
		got = o
		return context.Canceled
	}
	require.ErrorIs(t, w.stream(t.Context()), context.Canceled)
	require.NotNil(t, got.Replication)
	assert.Equal(t, "db-primary.internal", got.Replication.Host)
	assert.EqualValues(t, 5432, got.Replication.Port)
	assert.Equal(t, "pgc_stream", got.Replication.User)
	assert.Equal(t, "pw", got.Replication.Password)
	assert.Equal(t, "app", got.Replication.Database)
	assert.Equal(t, streamAppName, got.Replication.RuntimeParams["application_name"])
	assert.Equal(t, "db.example.internal:5433", cfg.Endpoint, "the receiver's endpoint")
	assert.Equal(t, "otel", cfg.Username)
}

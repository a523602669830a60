package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pgconsistency/pgconsistency/internal/walstream"
)

const (
	// streamAppName is the application_name of the stream's connections
	// (the replication one, and the one its keys are stored on).
	streamAppName = "otelcol-pgconsistency-stream"
	// streamNotReadyRetry is how often the stream looks again when it
	// cannot start (the trigger capture, the slot missing until the
	// refresh loop creates it again).
	streamNotReadyRetry = 5 * time.Second
	// streamMaxBackoff bounds the wait after failures, and how often a
	// failure that persists is logged again.
	streamMaxBackoff = time.Minute
	// streamHealthy is how long a stream must have run for its end to
	// count as a new failure, not one more of a series.
	streamHealthy = time.Minute
)

// walStreamer runs refresh::wal_stream for one database: internal/walstream's
// Run, started again after each end, with a wait that says why (see step).
type walStreamer struct {
	background
	cfg    *Config
	logger *zap.Logger

	// run is one stream: walstream.Run, or a fake in tests.
	run func(context.Context, walstream.Options) error

	// Used by the loop goroutine only.
	conn      dedicatedConn
	streaming bool   // logged as streaming since it last ended
	waiting   string // why the stream cannot start, as logged; "" when it streams
	failures  failureSeries
}

func newWALStreamer(cfg *Config, logger *zap.Logger) *walStreamer {
	w := &walStreamer{cfg: cfg, logger: logger, run: walstream.Run}
	w.conn = dedicatedConn{cfg: cfg, appName: streamAppName, onNotice: noticeLogger(logger, zapcore.DebugLevel)}
	return w
}

// start runs the stream until shutdown, which stops it (the keys received
// and not stored are not confirmed: the slot sends them again) and closes
// its connections.
func (w *walStreamer) start() { w.launch(w.loop) }

func (w *walStreamer) loop(ctx context.Context) {
	defer w.conn.close()
	for {
		wait := w.step(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// step runs one stream until it ends, and says how long to wait before the
// next.
func (w *walStreamer) step(ctx context.Context) time.Duration {
	began := time.Now()
	err := w.stream(ctx)
	w.streaming = false
	if ctx.Err() != nil {
		return 0
	}
	var notReady *walstream.NotReadyError
	switch {
	case errors.As(err, &notReady):
		w.failures.reset()
		if notReady.Problem != w.waiting {
			w.waiting = notReady.Problem
			w.logger.Info("pgconsistency WAL stream: waiting: "+notReady.Problem, zap.Duration("retry_interval", streamNotReadyRetry))
		}
		return streamNotReadyRetry
	case errors.Is(err, walstream.ErrTablesChanged):
		w.logger.Debug("pgconsistency WAL stream: " + err.Error())
		return 0
	case errors.Is(err, walstream.ErrCaptureChanged):
		w.logger.Info("pgconsistency WAL stream: " + err.Error() + "; it waits for the capture to be wal again")
		return 0
	}
	if reason := streamUnavailable(err); reason != "" {
		w.conn.close()
		if reason != w.waiting {
			w.waiting = reason
			w.logger.Warn(reason, zap.Duration("retry_interval", streamMaxBackoff), zap.Error(err))
		}
		return streamMaxBackoff
	}
	w.conn.close() // reconnect next time: the connection may be broken
	if time.Since(began) >= streamHealthy {
		w.failures.reset()
	}
	w.waiting = ""
	return w.failures.failed(w.logger, err, time.Second, streamMaxBackoff, func(wait time.Duration) string {
		return "pgconsistency WAL stream ended; the next one starts in " + wait.String() +
			" from the position whose keys are stored (the refresh loop reads the slot by SQL meanwhile)"
	})
}

// stream runs one walstream.Run with the configured connections.
func (w *walStreamer) stream(ctx context.Context) error {
	sc := w.cfg.streamConfig()
	cc, err := connConfig(ctx, sc)
	if err != nil {
		return err
	}
	rc := cc.Config.Copy()
	rc.RuntimeParams["application_name"] = streamAppName
	return w.run(ctx, walstream.Options{
		Replication: rc,
		Conn: func(ctx context.Context) (walstream.Querier, error) {
			return w.conn.get(ctx)
		},
		FlushDelay: w.cfg.Refresh.WALStream.FlushDelay,
		OnStore: func(int, pglogrepl.LSN) {
			if !w.streaming {
				w.streaming = true
				w.logger.Info("pgconsistency WAL stream: streaming the WAL capture's slot", zap.String("endpoint", sc.Endpoint),
					zap.String("username", sc.Username))
				w.waiting = ""
			}
		},
	})
}

// streamUnavailable says, for an error that no retry soon will change, what
// to do about it: "" for any other error.
func streamUnavailable(err error) string {
	pgErr := lastingSQLError(err)
	switch {
	case pgErr == nil:
		return ""
	case pgErr.Code == "42883": // undefined_function
		return "pgconsistency WAL stream: off for now: the pgconsistency SQL in this database is older than 0.7.7 " +
			"(no wal_stream_start()); upgrade it with `psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql`, or set refresh::wal_stream::enabled: false; " +
			"looked for again every minute"
	default: // insufficient_privilege
		return fmt.Sprintf("pgconsistency WAL stream: off for now: %s; the receiver's role needs pgconsistency_refresher "+
			"(`GRANT pgconsistency_refresher TO <the receiver's role>`), and the stream's role REPLICATION "+
			"(`ALTER ROLE <refresh::wal_stream::username> REPLICATION`); tried again every minute", pgErr.Message)
	}
}

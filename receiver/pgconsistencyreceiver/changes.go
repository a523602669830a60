package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// changesAppName is the application_name of the changes loop's connection
// in pg_stat_activity.
const changesAppName = "otelcol-pgconsistency-changes"

// refreshChangesPlan captures and dispatches the keys written since the
// previous plan (the WAL capture reads its slot here, with plain SQL) and
// lists the invariants in incremental mode they concern, once their
// incremental_period has passed (SQL 0.7.0).
const refreshChangesPlan = "SELECT name, forced, statement_timeout_ms FROM " + schema + ".refresh_changes_plan()"

const (
	// changesRetryUnavailable is how often the loop looks again for a
	// refresh_changes_plan() it cannot call (older SQL, no privilege).
	changesRetryUnavailable = time.Minute
	// changesMaxBackoff bounds the wait after failed passes, and how often
	// a failure that persists is logged again.
	changesMaxBackoff = time.Minute
	// changesMinPlanTimeout is the least statement_timeout of the plan: it
	// decodes the WAL written since the previous read (up to 100,000
	// changes), which the scrape's timeout is not sized for.
	changesMinPlanTimeout = 30 * time.Second
)

// changesLoop refreshes, within seconds of their commit, the invariants in
// incremental mode whose tables were written: every refresh::changes_interval
// it runs refresh_changes_plan() in a transaction of its own, then
// refresh_invariant() for each invariant it listed, one transaction each
// under the invariant's statement_timeout, as the scheduler does. It has its
// own connection and goroutine, beside the scheduler of
// refresh::poll_interval (or pg_cron): a reconcile there, however long,
// never holds it back, and it never delays a scrape. Every limit is set per
// transaction and the WAL capture is read with plain SQL (no replication
// connection), so it works behind a transaction-pooling proxy. It runs only
// where it can: with SQL older than 0.7.0, or a role that may not call
// refresh_changes_plan(), it says once what to do and looks again every
// minute.
type changesLoop struct {
	background
	cfg    *Config
	logger *zap.Logger

	// run is one pass: pass, or a fake in tests.
	run func(context.Context) error

	// Used by the loop goroutine only.
	conn        dedicatedConn
	unavailable string // why refresh_changes_plan() cannot be called, as logged; "" when it can
	failures    failureSeries
}

func newChangesLoop(cfg *Config, logger *zap.Logger) *changesLoop {
	c := &changesLoop{cfg: cfg, logger: logger}
	// A skip (the scheduler or pg_cron is refreshing the invariant, a
	// reconcile perhaps) is routine here, every second: debug. Warnings
	// (failures, a reconcile that healed, a slot created again) stay warnings.
	c.conn = dedicatedConn{cfg: cfg, appName: changesAppName, onNotice: noticeLogger(logger, zapcore.DebugLevel)}
	c.run = c.pass
	return c
}

// start runs the loop until shutdown, which cancels a refresh in flight and
// closes the connection.
func (c *changesLoop) start() { c.launch(c.loop) }

func (c *changesLoop) loop(ctx context.Context) {
	defer c.conn.close()
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		timer.Reset(c.step(ctx))
	}
}

// step runs one pass and says how long to wait before the next: the rest
// of the interval; a minute while refresh_changes_plan() cannot be called;
// longer and longer (up to a minute) while passes fail.
func (c *changesLoop) step(ctx context.Context) time.Duration {
	interval := c.cfg.Refresh.ChangesInterval
	began := time.Now()
	err := c.run(ctx)
	if ctx.Err() != nil {
		return 0
	}
	if reason := changesUnavailable(err); reason != "" {
		// Hold no connection while waiting.
		c.conn.close()
		c.failures.reset()
		if reason != c.unavailable {
			c.unavailable = reason
			c.logger.Info(reason, zap.Duration("retry_interval", changesRetryUnavailable), zap.Error(err))
		}
		return changesRetryUnavailable
	}
	if c.unavailable != "" {
		c.unavailable = ""
		c.logger.Info("pgconsistency changes loop: refresh_changes_plan() can be called now; invariants in incremental mode " +
			"are refreshed within seconds of the writes to their tables")
	}
	if err != nil {
		c.conn.close() // reconnect next time: the connection may be broken
		return c.failures.failed(c.logger, err, interval, changesMaxBackoff, func(wait time.Duration) string {
			return "pgconsistency changes pass failed; the next one is in " + wait.String() +
				" (logged again after a minute if it goes on failing)"
		})
	}
	if n := c.failures.reset(); n > 0 {
		c.logger.Info("pgconsistency changes loop: passes succeed again", zap.Int("failed_passes", n))
	}
	return max(0, interval-time.Since(began))
}

// changesUnavailable says, for an error of the plan that no retry soon will
// change, what to do about it: "" for any other error.
func changesUnavailable(err error) string {
	pgErr := lastingSQLError(err)
	switch {
	case pgErr == nil:
		return ""
	case pgErr.Code == "42883": // undefined_function
		return "pgconsistency changes loop: off for now: the pgconsistency SQL in this database is older than 0.7.0 " +
			"(no refresh_changes_plan()); to refresh changed invariants within seconds, upgrade it with " +
			"`psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql` (or set refresh::changes_interval: 0 to turn the loop off); looked for again every minute"
	default: // insufficient_privilege
		return "pgconsistency changes loop: off for now: the receiver's role may not call pgconsistency.refresh_changes_plan(); " +
			"to refresh changed invariants within seconds, `GRANT pgconsistency_refresher TO <the receiver's role>` " +
			"(or set refresh::changes_interval: 0 to turn the loop off); tried again every minute"
	}
}

// pass refreshes the invariants whose tables were written, if any.
func (c *changesLoop) pass(ctx context.Context) error {
	conn, err := c.conn.get(ctx)
	if err != nil {
		return err
	}
	// The plan (the keys it captured and dispatched) is committed before
	// the refreshes, which read the keys it dispatched.
	var plan []plannedRefresh
	if err := inTransaction(ctx, conn, false, max(c.cfg.effectiveTimeout(), changesMinPlanTimeout), func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, refreshChangesPlan)
		if err != nil {
			return err
		}
		plan, err = pgx.CollectRows(rows, pgx.RowToStructByName[plannedRefresh])
		return err
	}); err != nil {
		return err
	}
	outcomes := map[string][]string{}
	var errs []error
	for _, p := range plan {
		outcome, err := refreshOne(ctx, conn, p)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			errs = append(errs, fmt.Errorf("refreshing %s: %w", p.Name, err))
			if conn.IsClosed() {
				break
			}
			continue
		}
		outcomes[outcome] = append(outcomes[outcome], p.Name)
	}
	if len(outcomes) > 0 && c.logger.Core().Enabled(zapcore.DebugLevel) {
		fields := make([]zap.Field, 0, len(outcomes))
		for outcome, names := range outcomes {
			fields = append(fields, zap.String(outcome, strings.Join(names, ",")))
		}
		c.logger.Debug("pgconsistency changes pass", fields...)
	}
	return errors.Join(errs...)
}

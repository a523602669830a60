package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// scheduler (the receiver's refresh scheduler) runs the refreshes from the
// collector, for servers without pg_cron: every refresh::poll_interval it
// watches the deploy marker, then runs the refresh loop of CALL
// pgconsistency.refresh() as statements of its own: refresh_plan() (takes a
// due refresh request, expires acknowledgements, lists what is due), then
// refresh_invariant() for each invariant it listed, one transaction each
// under the invariant's statement_timeout. It has its
// own connection and goroutine, so a refresh never delays or fails a scrape.
// Several collectors may run it against one database: the advisory lock and
// the due check in pgconsistency.refresh_invariant() make each invariant
// refresh once per period. Every limit is set per transaction, so it works
// behind a transaction-pooling proxy.
type scheduler struct {
	background
	cfg    *Config
	logger *zap.Logger
	conn   dedicatedConn // used by the loop goroutine only
}

func newScheduler(cfg *Config, logger *zap.Logger) *scheduler {
	s := &scheduler{cfg: cfg, logger: logger}
	s.conn = dedicatedConn{cfg: cfg, appName: "otelcol-pgconsistency-refresh", onNotice: noticeLogger(logger, zapcore.InfoLevel)}
	return s
}

// noticeLogger logs what refreshes say for what it is: skips and the like
// as information (a skip is not an error) at level info, warnings (failures,
// and a reconcile that corrected what the incremental capture had missed)
// as warnings, with their DETAIL in the message and their HINT as a field.
// The severity is read unlocalized: a server with lc_messages in another
// language says WARNUNG or AVERTISSEMENT in the localized one.
func noticeLogger(logger *zap.Logger, info zapcore.Level) pgconn.NoticeHandler {
	return func(_ *pgconn.PgConn, n *pgconn.Notice) {
		msg := n.Message
		if n.Detail != "" {
			msg += " (" + n.Detail + ")"
		}
		var fields []zap.Field
		if n.Hint != "" {
			fields = append(fields, zap.String("hint", n.Hint))
		}
		severity := n.SeverityUnlocalized
		if severity == "" { // servers before 9.6
			severity = n.Severity
		}
		level := info
		if severity == "WARNING" {
			level = zapcore.WarnLevel
		}
		logger.Log(level, msg, fields...)
	}
}

// start runs the loop until shutdown, which cancels a refresh in flight
// and closes the connection.
func (s *scheduler) start() { s.launch(s.loop) }

func (s *scheduler) loop(ctx context.Context) {
	defer s.conn.close()
	ticker := time.NewTicker(s.cfg.Refresh.interval())
	defer ticker.Stop()
	for {
		if err := s.pass(ctx); err != nil && ctx.Err() == nil {
			s.logger.Error("pgconsistency scheduler: refresh pass failed; the next one is in "+s.cfg.Refresh.interval().String(), zap.Error(err))
			s.conn.close() // reconnect next time: the connection may be broken
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

// plannedRefresh is one row of pgconsistency.refresh_plan().
type plannedRefresh struct {
	Name               string `db:"name"`
	Forced             bool   `db:"forced"`
	StatementTimeoutMS int64  `db:"statement_timeout_ms"`
}

// pass does one round of due work.
func (s *scheduler) pass(ctx context.Context) error {
	conn, err := s.conn.get(ctx)
	if err != nil {
		return err
	}
	timeout := s.cfg.effectiveTimeout()
	if q := s.cfg.Refresh.DeployMarker.Query; q != "" {
		if err := inTransaction(ctx, conn, false, timeout, func(tx pgx.Tx) error {
			// A standby cannot record the marker; refresh_plan() says why
			// nothing is refreshed there.
			var standby bool
			if err := tx.QueryRow(ctx, "SELECT pg_catalog.pg_is_in_recovery()").Scan(&standby); err != nil || standby {
				return err
			}
			return s.observeDeployMarker(ctx, tx, q)
		}); err != nil {
			return err
		}
	}
	// The plan (a claimed request, expired acknowledgements) is committed
	// before the refreshes, as in CALL pgconsistency.refresh().
	var plan []plannedRefresh
	if err := inTransaction(ctx, conn, false, timeout, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, "SELECT name, forced, statement_timeout_ms FROM "+schema+".refresh_plan()")
		if err != nil {
			return err
		}
		plan, err = pgx.CollectRows(rows, pgx.RowToStructByName[plannedRefresh])
		return err
	}); err != nil {
		return explainRefreshError(err)
	}

	outcomes := map[string][]string{}
	forced := false
	var errs []error
	for _, p := range plan {
		forced = forced || p.Forced
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
	if len(outcomes) > 0 && (len(outcomes) > 1 || len(outcomes["not_due"]) == 0) {
		fields := make([]zap.Field, 0, len(outcomes)+1)
		fields = append(fields, zap.Bool("requested", forced))
		for outcome, names := range outcomes {
			fields = append(fields, zap.String(outcome, strings.Join(names, ",")))
		}
		s.logger.Info("pgconsistency scheduler: refresh pass", fields...)
	}
	return errors.Join(errs...)
}

// refreshOne refreshes one invariant in a transaction of its own, under the
// invariant's statement_timeout. Its commit does not wait for the WAL flush:
// a refresh lost in a crash is redone by the next one (as in CALL refresh()).
func refreshOne(ctx context.Context, conn *pgx.Conn, p plannedRefresh) (string, error) {
	var outcome string
	err := inTransaction(ctx, conn, false, time.Duration(p.StatementTimeoutMS)*time.Millisecond, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_catalog.set_config('synchronous_commit', 'off', true)"); err != nil {
			return err
		}
		return tx.QueryRow(ctx, "SELECT "+schema+".refresh_invariant($1, $2)", p.Name, p.Forced).Scan(&outcome)
	})
	return outcome, err
}

// explainRefreshError says what to do when the SQL the scheduler calls is
// missing: an install older than the receiver.
func explainRefreshError(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42883" { // undefined_function
		return fmt.Errorf("%w; the pgconsistency SQL in this database is older than the receiver's scheduler needs (0.2.0): "+
			"upgrade it with `psql -v ON_ERROR_STOP=1 -d DB -f sql/install.sql`", err)
	}
	return err
}

func (s *scheduler) observeDeployMarker(ctx context.Context, tx pgx.Tx, query string) error {
	var value *string
	if err := tx.QueryRow(ctx, "SELECT ("+query+")::text").Scan(&value); err != nil {
		return fmt.Errorf(`running "refresh::deploy_marker::query": %w`, err)
	}
	var changed bool
	delay := strconv.FormatInt(s.cfg.Refresh.DeployMarker.Delay.Milliseconds(), 10) + " milliseconds"
	if err := tx.QueryRow(ctx, "SELECT "+schema+".observe_deploy_marker($1, $2::interval)", value, delay).Scan(&changed); err != nil {
		return err
	}
	if changed {
		s.logger.Info("pgconsistency: deploy marker changed; refresh requested once the deployment has settled",
			zap.Stringp("marker", value), zap.Duration("delay", s.cfg.Refresh.DeployMarker.Delay))
	}
	return nil
}

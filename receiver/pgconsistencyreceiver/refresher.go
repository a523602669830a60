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
)

// refresher runs the refreshes from the collector, for servers without
// pg_cron: every refresh.schedule it watches the deploy marker, takes a due
// refresh request, and refreshes each enabled invariant that is due (all of
// them after a request), each as a statement of its own under the
// invariant's statement_timeout. It has its own connection and goroutine,
// so a refresh never delays or fails a scrape. Several collectors may run
// it against one database: the advisory lock and the due check in
// pgconsistency.refresh_invariant() make each invariant refresh once per
// period.
type refresher struct {
	cfg    *Config
	logger *zap.Logger
	schema string

	cancel context.CancelFunc
	done   chan struct{}
	conn   dedicatedConn // used by the loop goroutine only
}

func newRefresher(cfg *Config, logger *zap.Logger) *refresher {
	r := &refresher{cfg: cfg, logger: logger, schema: pgx.Identifier{cfg.Schema}.Sanitize()}
	r.conn = dedicatedConn{cfg: cfg, appName: "otelcol-pgconsistency-refresh", onNotice: r.logNotice}
	return r
}

// logNotice logs what refreshes say for what it is: skips and the like as
// information (a skip is not an error), warnings (failures) as warnings.
func (r *refresher) logNotice(_ *pgconn.PgConn, n *pgconn.Notice) {
	msg := n.Message
	if n.Detail != "" {
		msg += " (" + n.Detail + ")"
	}
	if n.Severity == "WARNING" {
		r.logger.Warn(msg)
	} else {
		r.logger.Info(msg)
	}
}

func (r *refresher) start() {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.done = make(chan struct{})
	go r.loop(ctx)
}

// shutdown stops the loop, cancelling a refresh in flight, and closes the
// connection. Safe to call without start.
func (r *refresher) shutdown() {
	if r.cancel == nil {
		return
	}
	r.cancel()
	<-r.done
}

func (r *refresher) loop(ctx context.Context) {
	defer close(r.done)
	defer r.conn.close()
	ticker := time.NewTicker(r.cfg.Refresh.Schedule)
	defer ticker.Stop()
	for {
		if err := r.pass(ctx); err != nil && ctx.Err() == nil {
			r.logger.Error("pgconsistency refresh pass failed; the next one is in "+r.cfg.Refresh.Schedule.String(), zap.Error(err))
			r.conn.close() // reconnect next time: the connection may be broken
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

type dueInvariant struct {
	name             string
	statementTimeout string // milliseconds
}

// pass does one round of due work.
func (r *refresher) pass(ctx context.Context) error {
	conn, err := r.conn.get(ctx)
	if err != nil {
		return err
	}
	// The bookkeeping queries run under the receiver's timeout, not under the
	// statement_timeout of the last invariant refreshed.
	if _, err := conn.Exec(ctx, "SELECT pg_catalog.set_config('statement_timeout', $1, false)",
		strconv.FormatInt(r.cfg.effectiveTimeout().Milliseconds(), 10)); err != nil {
		return err
	}
	var standby bool
	if err := conn.QueryRow(ctx, "SELECT pg_catalog.pg_is_in_recovery()").Scan(&standby); err != nil {
		return err
	}
	if standby {
		r.logger.Info("pgconsistency: nothing refreshed: the server is a standby; refreshes run on the primary and replicate here")
		return nil
	}
	if q := r.cfg.Refresh.DeployMarker.Query; q != "" {
		if err := r.observeDeployMarker(ctx, conn, q); err != nil {
			return err
		}
	}
	var force bool
	if err := conn.QueryRow(ctx, "SELECT "+r.schema+".claim_refresh_request()").Scan(&force); err != nil {
		return err
	}
	rows, err := conn.Query(ctx, `SELECT name, (extract(epoch FROM statement_timeout) * 1000)::bigint::text
		FROM `+r.schema+`.invariant WHERE enabled ORDER BY name`)
	if err != nil {
		return err
	}
	invariants, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (dueInvariant, error) {
		var d dueInvariant
		err := row.Scan(&d.name, &d.statementTimeout)
		return d, err
	})
	if err != nil {
		return err
	}

	outcomes := map[string][]string{}
	var errs []error
	for _, inv := range invariants {
		outcome, err := r.refreshOne(ctx, conn, inv, force)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			errs = append(errs, fmt.Errorf("refreshing %s: %w", inv.name, err))
			if conn.IsClosed() {
				break
			}
			continue
		}
		outcomes[outcome] = append(outcomes[outcome], inv.name)
	}
	if len(outcomes) > 0 && (len(outcomes) > 1 || len(outcomes["not_due"]) == 0) {
		fields := make([]zap.Field, 0, len(outcomes)+1)
		fields = append(fields, zap.Bool("requested", force))
		for outcome, names := range outcomes {
			fields = append(fields, zap.String(outcome, strings.Join(names, ",")))
		}
		r.logger.Info("pgconsistency refresh pass", fields...)
	}
	return errors.Join(errs...)
}

// refreshOne refreshes one invariant as a statement of its own, so that the
// invariant's statement_timeout applies to it alone.
func (r *refresher) refreshOne(ctx context.Context, conn *pgx.Conn, inv dueInvariant, force bool) (string, error) {
	if _, err := conn.Exec(ctx, "SELECT pg_catalog.set_config('statement_timeout', $1, false)", inv.statementTimeout); err != nil {
		return "", err
	}
	var outcome string
	err := conn.QueryRow(ctx, "SELECT "+r.schema+".refresh_invariant($1, $2)", inv.name, force).Scan(&outcome)
	return outcome, err
}

func (r *refresher) observeDeployMarker(ctx context.Context, conn *pgx.Conn, query string) error {
	var value *string
	if err := conn.QueryRow(ctx, "SELECT ("+query+")::text").Scan(&value); err != nil {
		return fmt.Errorf(`running "refresh::deploy_marker::query": %w`, err)
	}
	var changed bool
	delay := strconv.FormatInt(r.cfg.Refresh.DeployMarker.Delay.Milliseconds(), 10) + " milliseconds"
	if err := conn.QueryRow(ctx, "SELECT "+r.schema+".observe_deploy_marker($1, $2::interval)", value, delay).Scan(&changed); err != nil {
		return err
	}
	if changed {
		r.logger.Info("pgconsistency: deploy marker changed; refresh requested once the deployment has settled",
			zap.Stringp("marker", value), zap.Duration("delay", r.cfg.Refresh.DeployMarker.Delay))
	}
	return nil
}

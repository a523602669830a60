package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/plog"
	"go.opentelemetry.io/collector/receiver"
	"go.uber.org/zap"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// logsReceiver emits one log record per new anomaly. The database keeps a
// cursor per receiver (its component id): records are read after it, at most
// logs::max_records_per_interval per collection interval, and the cursor moves
// only once the pipeline took them. So each anomaly is logged once, across
// restarts too; a pipeline that refuses a batch gets it again at the next
// interval. It does not use the scraper controller, which cannot tell a
// scraper whether its data was consumed.
type logsReceiver struct {
	cfg      *Config
	logger   *zap.Logger
	next     consumer.Logs
	consumer string
	lb       *metadata.LogsBuilder
	resource pcommon.Resource
	query    string
	advance  string

	cancel context.CancelFunc
	done   chan struct{}
	conn   dedicatedConn // used by the loop goroutine only
}

func newLogsReceiver(cfg *Config, set receiver.Settings, next consumer.Logs) *logsReceiver {
	r := &logsReceiver{
		cfg:      cfg,
		logger:   set.Logger,
		next:     next,
		consumer: set.ID.String(),
		lb:       metadata.NewLogsBuilder(set),
		query: "SELECT seq, invariant, severity, key, details::text, first_seen_at FROM " +
			schema + ".new_anomalies_for_log($1, $2)",
		advance: "SELECT " + schema + ".advance_log_cursor($1, $2)",
		conn:    dedicatedConn{cfg: cfg, appName: "otelcol-pgconsistency-logs"},
	}
	// The same resource attributes as the metrics, as configured for them.
	r.resource = resourceFor(cfg, metadata.NewResourceBuilder(cfg.ResourceAttributes))
	return r
}

func (r *logsReceiver) Start(context.Context, component.Host) error {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.done = make(chan struct{})
	go r.loop(ctx)
	return nil
}

// Shutdown stops the loop and closes the connection; safe without Start.
func (r *logsReceiver) Shutdown(context.Context) error {
	if r.cancel != nil {
		r.cancel()
		<-r.done
	}
	return nil
}

func (r *logsReceiver) loop(ctx context.Context) {
	defer close(r.done)
	defer r.conn.close()
	select {
	case <-ctx.Done():
		return
	case <-time.After(r.cfg.InitialDelay):
	}
	ticker := time.NewTicker(r.cfg.CollectionInterval)
	defer ticker.Stop()
	for {
		if err := r.pass(ctx); err != nil && ctx.Err() == nil {
			r.logger.Error("pgconsistency: reading new anomalies for the logs pipeline failed; retrying next interval", zap.Error(err))
			r.conn.close()
		}
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

type newAnomaly struct {
	seq         int64
	invariant   string
	severity    string
	key         string
	details     *string
	firstSeenAt time.Time
}

// pass delivers one batch of new anomalies, then moves the cursor.
func (r *logsReceiver) pass(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.effectiveTimeout())
	defer cancel()
	conn, err := r.conn.get(ctx)
	if err != nil {
		return err
	}
	timeout := r.cfg.effectiveTimeout()
	var batch []newAnomaly
	if err := inTransaction(ctx, conn, false, timeout, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, r.query, r.consumer, r.cfg.Logs.maxRecords())
		if err != nil {
			return err
		}
		batch, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (newAnomaly, error) {
			var a newAnomaly
			err := row.Scan(&a.seq, &a.invariant, &a.severity, &a.key, &a.details, &a.firstSeenAt)
			return a, err
		})
		return err
	}); err != nil || len(batch) == 0 {
		return err
	}
	now := pcommon.NewTimestampFromTime(time.Now())
	for _, a := range batch {
		r.lb.AppendLogRecord(logRecord(a, now))
	}
	if err := r.next.ConsumeLogs(ctx, r.lb.Emit(metadata.WithLogsResource(r.resource))); err != nil {
		return fmt.Errorf("the logs pipeline refused %d new anomaly records (kept for the next interval): %w", len(batch), err)
	}
	return inTransaction(ctx, conn, false, timeout, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, r.advance, r.consumer, batch[len(batch)-1].seq)
		return err
	})
}

func logRecord(a newAnomaly, observed pcommon.Timestamp) plog.LogRecord {
	lr := plog.NewLogRecord()
	lr.SetTimestamp(pcommon.NewTimestampFromTime(a.firstSeenAt))
	lr.SetObservedTimestamp(observed)
	lr.SetSeverityText(a.severity)
	lr.SetSeverityNumber(severityNumber(a.severity))
	lr.SetEventName("pgconsistency.anomaly.new")
	lr.Body().SetStr(fmt.Sprintf("new anomaly in invariant %s: %s", a.invariant, a.key))
	attrs := lr.Attributes()
	attrs.PutStr("pgconsistency.invariant", a.invariant)
	attrs.PutStr("pgconsistency.severity", a.severity)
	attrs.PutStr("pgconsistency.anomaly.key", a.key)
	attrs.PutInt("pgconsistency.anomaly.seq", a.seq)
	attrs.PutStr("pgconsistency.anomaly.first_seen", a.firstSeenAt.UTC().Format(time.RFC3339Nano))
	if a.details != nil {
		var details map[string]any
		if json.Unmarshal([]byte(*a.details), &details) == nil {
			_ = attrs.PutEmptyMap("pgconsistency.anomaly.details").FromRaw(details)
		}
	}
	return lr
}

func severityNumber(severity string) plog.SeverityNumber {
	switch severity {
	case "critical":
		return plog.SeverityNumberError
	case "warning":
		return plog.SeverityNumberWarn
	default:
		return plog.SeverityNumberInfo
	}
}

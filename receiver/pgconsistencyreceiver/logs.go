package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/consumer/consumererror"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/plog"
	"go.opentelemetry.io/collector/receiver"
	"go.uber.org/zap"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// logsReceiver emits one log record per new anomaly and, on SQL 0.6.0, one
// per requested refresh (after a deployment) that finished. The database keeps a
// cursor per receiver (its component id), one position for each kind:
// records are read after it, at most logs::max_records_per_interval per
// collection interval (both kinds together, the anomalies first), and the
// cursor moves only once ConsumeLogs returned nil. So each record is
// delivered at least once, across restarts too, as long as nothing in the
// pipeline acknowledges before delivery (README, "Delivery"); a pipeline
// that refuses a batch gets it again at the next interval, never skipped.
// It does not use the scraper controller, which cannot tell a scraper
// whether its data was consumed.
type logsReceiver struct {
	cfg      *Config
	logger   *zap.Logger
	next     consumer.Logs
	consumer string
	lb       *metadata.LogsBuilder
	resource pcommon.Resource
	query    string // SQL older than 0.6.0
	origin   string // 0.6.0+: with the deployment and the cause
	advance  string
	finished string // 0.6.0+: the refresh requests that finished
	// advanceFinished moves the cursor of finished requests.
	advanceFinished string
	// withOrigin, withFinished: the installed SQL has been seen to have
	// origin's (finished's) function; once both are, they are not looked up
	// again (the loop goroutine only; cleared when a pass fails, e.g. after
	// a downgrade).
	withOrigin   bool
	withFinished bool

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
		origin: "SELECT seq, invariant, severity, key, details::text, first_seen_at, deploy_marker, deployed_at, " +
			"deployed_since_previous_refresh, refresh_reason, cause_audit_id, cause_operation, cause_table, cause_txid, " +
			"cause_changed_at, cause_db_user, cause_application_name FROM " +
			schema + ".new_anomalies_with_origin_for_log($1, $2)",
		advance: "SELECT " + schema + ".advance_log_cursor($1, $2)",
		finished: "SELECT request_id, reason, claimed_at, finished_at, superseded, deploy_marker, deployed_at, " +
			"new_anomalies, invariants::text, not_refreshed, not_clean FROM " +
			schema + ".finished_requests_for_log($1, $2)",
		advanceFinished: "SELECT " + schema + ".advance_request_log_cursor($1, $2)",
		conn:            dedicatedConn{cfg: cfg, appName: "otelcol-pgconsistency-logs"},
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

// hasFunctions tells whether the installed SQL (0.6.0+) has
// new_anomalies_with_origin_for_log and finished_requests_for_log; checked
// on every pass until it has both, so an upgrade of the SQL is picked up
// without a restart.
const hasFunctions = "SELECT pg_catalog.to_regprocedure('" + schema + ".new_anomalies_with_origin_for_log(text,integer)') IS NOT NULL, " +
	"pg_catalog.to_regprocedure('" + schema + ".finished_requests_for_log(text,integer)') IS NOT NULL"

type newAnomaly struct {
	seq         int64
	invariant   string
	severity    string
	key         string
	details     *string
	firstSeenAt time.Time
	origin      *anomalyOrigin // nil: SQL older than 0.6.0
}

// anomalyOrigin is where a new anomaly came from (SQL 0.6.0): the
// deployment it appeared after and the audited change that caused it.
type anomalyOrigin struct {
	deployMarker          *string
	deployedAt            *time.Time
	deployedSincePrevious *bool
	refreshReason         *string
	causeAuditID          *int64
	causeOperation        *string
	causeTable            *string
	causeTxid             *int64
	causeChangedAt        *time.Time
	causeDBUser           *string
	causeApplicationName  *string
}

// finishedRequest is a requested refresh that finished (SQL 0.6.0): a row
// of finished_requests_for_log.
type finishedRequest struct {
	id           int64
	reason       *string
	claimedAt    time.Time
	finishedAt   time.Time
	superseded   bool
	deployMarker *string
	deployedAt   *time.Time
	newAnomalies int64
	invariants   map[string]requestInvariant
	notRefreshed []string
	notClean     []string
}

// requestInvariant is what a requested refresh found in one invariant:
// outcome is nil when the refresh did not reach it.
type requestInvariant struct {
	NewAnomalies int64   `json:"new_anomalies"`
	Outcome      *string `json:"outcome"`
}

// pass delivers one batch of new anomalies and finished refresh requests,
// then moves the cursor.
func (r *logsReceiver) pass(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.effectiveTimeout())
	defer cancel()
	conn, err := r.conn.get(ctx)
	if err != nil {
		return err
	}
	timeout := r.cfg.effectiveTimeout()
	var batch []newAnomaly
	var finished []finishedRequest
	if err := inTransaction(ctx, conn, false, timeout, func(tx pgx.Tx) error {
		withOrigin, withFinished := r.withOrigin, r.withFinished
		if !withOrigin || !withFinished {
			if err := tx.QueryRow(ctx, hasFunctions).Scan(&withOrigin, &withFinished); err != nil {
				return err
			}
		}
		query := r.query
		if withOrigin {
			query = r.origin
		}
		rows, err := tx.Query(ctx, query, r.consumer, r.cfg.Logs.maxRecords())
		if err != nil {
			return err
		}
		batch, err = pgx.CollectRows(rows, func(row pgx.CollectableRow) (newAnomaly, error) {
			var a newAnomaly
			if !withOrigin {
				err := row.Scan(&a.seq, &a.invariant, &a.severity, &a.key, &a.details, &a.firstSeenAt)
				return a, err
			}
			o := &anomalyOrigin{}
			a.origin = o
			err := row.Scan(&a.seq, &a.invariant, &a.severity, &a.key, &a.details, &a.firstSeenAt,
				&o.deployMarker, &o.deployedAt, &o.deployedSincePrevious, &o.refreshReason,
				&o.causeAuditID, &o.causeOperation, &o.causeTable, &o.causeTxid,
				&o.causeChangedAt, &o.causeDBUser, &o.causeApplicationName)
			return a, err
		})
		if err == nil && withFinished {
			// Called with no room left too: a new consumer's cursor starts
			// at the current end now, not when the anomalies are drained.
			finished, err = r.readFinished(ctx, tx, max(r.cfg.Logs.maxRecords()-len(batch), 0))
		}
		if err == nil {
			r.withOrigin, r.withFinished = withOrigin, withFinished
		}
		return err
	}); err != nil || len(batch)+len(finished) == 0 {
		if err != nil {
			r.withOrigin, r.withFinished = false, false
		}
		return err
	}
	now := pcommon.NewTimestampFromTime(time.Now())
	for _, a := range batch {
		r.lb.AppendLogRecord(logRecord(a, now))
	}
	for _, f := range finished {
		r.lb.AppendLogRecord(finishedRecord(f, now))
	}
	if err := r.next.ConsumeLogs(ctx, r.lb.Emit(metadata.WithLogsResource(r.resource))); err != nil {
		// The cursor stays: the same records (and any newer ones, up to
		// max_records_per_interval) are read and sent again at the next
		// interval, whatever the error. A permanent one (an HTTP 400 from
		// an OTLP backend) is no reason to skip them: nothing here can tell
		// a bad record from a misconfigured backend, and skipping would
		// lose every record of the latter.
		return fmt.Errorf("the logs pipeline refused %s (kept: sent again at the next interval)%s: %w",
			refusedRecords(batch, finished), permanentHint(err), err)
	}
	return inTransaction(ctx, conn, false, timeout, func(tx pgx.Tx) error {
		if len(batch) > 0 {
			if _, err := tx.Exec(ctx, r.advance, r.consumer, batch[len(batch)-1].seq); err != nil {
				return err
			}
		}
		if len(finished) > 0 {
			if _, err := tx.Exec(ctx, r.advanceFinished, r.consumer, finished[len(finished)-1].id); err != nil {
				return err
			}
		}
		return nil
	})
}

// refusedRecords names the records of a refused batch by their ids.
func refusedRecords(batch []newAnomaly, finished []finishedRequest) string {
	var parts []string
	if len(batch) > 0 {
		parts = append(parts, fmt.Sprintf("%d new anomaly records (pgconsistency.anomaly.seq %d to %d)",
			len(batch), batch[0].seq, batch[len(batch)-1].seq))
	}
	if len(finished) > 0 {
		parts = append(parts, fmt.Sprintf("%d finished refresh records (pgconsistency.refresh.request_id %d to %d)",
			len(finished), finished[0].id, finished[len(finished)-1].id))
	}
	return strings.Join(parts, " and ")
}

// permanentHint says what to do when the pipeline says it will never take
// the batch: until it does, no later record is sent.
func permanentHint(err error) string {
	if !consumererror.IsPermanent(err) {
		return ""
	}
	return "; the error is permanent, so no later record goes out until the backend takes these: fix what it " +
		"refuses, or skip them on purpose with SELECT pgconsistency.advance_log_cursor(<receiver id>, <last seq>)"
}

// readFinished reads at most maxRows refresh requests that finished since
// the consumer's cursor (SQL 0.6.0).
func (r *logsReceiver) readFinished(ctx context.Context, tx pgx.Tx, maxRows int) ([]finishedRequest, error) {
	rows, err := tx.Query(ctx, r.finished, r.consumer, maxRows)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (finishedRequest, error) {
		var f finishedRequest
		var invariants string
		if err := row.Scan(&f.id, &f.reason, &f.claimedAt, &f.finishedAt, &f.superseded, &f.deployMarker, &f.deployedAt,
			&f.newAnomalies, &invariants, &f.notRefreshed, &f.notClean); err != nil {
			return f, err
		}
		if err := json.Unmarshal([]byte(invariants), &f.invariants); err != nil {
			return f, fmt.Errorf("reading the invariants of finished refresh request %d: %w", f.id, err)
		}
		return f, nil
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
	if a.origin != nil {
		putOrigin(attrs, a.origin)
	}
	return lr
}

// Texts of the origin attributes when there is nothing to name (as in the
// pgconsistency.anomaly_origin view).
const (
	noDeployment      = "no deployment recorded"
	noDeploymentSince = "no deployment since the last clean refresh"
	noCauseRecorded   = "no cause recorded"
	timeLayoutOrigin  = time.RFC3339Nano
)

// putOrigin adds the deployment and the cause of a new anomaly (SQL 0.6.0)
// to its log record: pgconsistency.deploy.* (the deploy marker current at
// the refresh that found it, when it changed, whether that was after the
// invariant's previous refresh, the reason of the refresh request) and
// pgconsistency.cause.* (the last audited change of the key, with the
// audit_restore call for a DELETE), or pgconsistency.cause "no cause
// recorded".
func putOrigin(attrs pcommon.Map, o *anomalyOrigin) {
	if o.deployedAt == nil {
		attrs.PutStr("pgconsistency.deploy", noDeployment)
	} else {
		marker := "NULL"
		if o.deployMarker != nil {
			marker = *o.deployMarker
			attrs.PutStr("pgconsistency.deploy.marker", marker)
		}
		at := o.deployedAt.UTC().Format(timeLayoutOrigin)
		attrs.PutStr("pgconsistency.deploy.deployed_at", at)
		since := o.deployedSincePrevious != nil && *o.deployedSincePrevious
		attrs.PutBool("pgconsistency.deploy.since_previous_refresh", since)
		if since {
			attrs.PutStr("pgconsistency.deploy", fmt.Sprintf("after deployment %s (%s)", marker, at))
		} else {
			attrs.PutStr("pgconsistency.deploy", fmt.Sprintf("%s (latest deployment: %s, %s)", noDeploymentSince, marker, at))
		}
	}
	if o.refreshReason != nil {
		attrs.PutStr("pgconsistency.refresh.reason", *o.refreshReason)
	}
	if o.causeAuditID == nil {
		attrs.PutStr("pgconsistency.cause", noCauseRecorded)
		return
	}
	str := func(p *string) string {
		if p == nil {
			return ""
		}
		return *p
	}
	attrs.PutInt("pgconsistency.cause.audit_id", *o.causeAuditID)
	attrs.PutStr("pgconsistency.cause.operation", str(o.causeOperation))
	attrs.PutStr("pgconsistency.cause.table", str(o.causeTable))
	if o.causeTxid != nil {
		attrs.PutInt("pgconsistency.cause.txid", *o.causeTxid)
	}
	changedAt := ""
	if o.causeChangedAt != nil {
		changedAt = o.causeChangedAt.UTC().Format(timeLayoutOrigin)
		attrs.PutStr("pgconsistency.cause.changed_at", changedAt)
	}
	attrs.PutStr("pgconsistency.cause.db_user", str(o.causeDBUser))
	attrs.PutStr("pgconsistency.cause.application_name", str(o.causeApplicationName))
	attrs.PutStr("pgconsistency.cause", fmt.Sprintf("%s on %s at %s by %s (application_name %q)",
		str(o.causeOperation), str(o.causeTable), changedAt, str(o.causeDBUser), str(o.causeApplicationName)))
	if str(o.causeOperation) == "DELETE" {
		attrs.PutStr("pgconsistency.cause.restore", fmt.Sprintf("SELECT %s.audit_restore(%d)", schema, *o.causeAuditID))
	}
}

// finishedRecord is the log record of a requested refresh that finished:
// per invariant, how many anomalies it found, so that "the deployment was
// clean" is a fact. WARN when an invariant is not clean (new anomalies, a
// failed or timed out refresh, or not refreshed), else INFO.
func finishedRecord(f finishedRequest, observed pcommon.Timestamp) plog.LogRecord {
	lr := plog.NewLogRecord()
	lr.SetTimestamp(pcommon.NewTimestampFromTime(f.finishedAt))
	lr.SetObservedTimestamp(observed)
	if len(f.notClean) == 0 {
		lr.SetSeverityText("info")
		lr.SetSeverityNumber(plog.SeverityNumberInfo)
	} else {
		lr.SetSeverityText("warning")
		lr.SetSeverityNumber(plog.SeverityNumberWarn)
	}
	lr.SetEventName("pgconsistency.refresh.finished")
	deployment := noDeployment
	if f.deployedAt != nil {
		marker := "NULL"
		if f.deployMarker != nil {
			marker = *f.deployMarker
		}
		deployment = fmt.Sprintf("after deployment %s (%s)", marker, f.deployedAt.UTC().Format(timeLayoutOrigin))
	}
	lr.Body().SetStr(finishedBody(f, deployment))
	attrs := lr.Attributes()
	attrs.PutInt("pgconsistency.refresh.request_id", f.id)
	if f.reason != nil {
		attrs.PutStr("pgconsistency.refresh.reason", *f.reason)
	}
	attrs.PutStr("pgconsistency.refresh.claimed_at", f.claimedAt.UTC().Format(timeLayoutOrigin))
	attrs.PutStr("pgconsistency.refresh.finished_at", f.finishedAt.UTC().Format(timeLayoutOrigin))
	attrs.PutBool("pgconsistency.refresh.superseded", f.superseded)
	attrs.PutStr("pgconsistency.deploy", deployment)
	if f.deployMarker != nil {
		attrs.PutStr("pgconsistency.deploy.marker", *f.deployMarker)
	}
	if f.deployedAt != nil {
		attrs.PutStr("pgconsistency.deploy.deployed_at", f.deployedAt.UTC().Format(timeLayoutOrigin))
	}
	attrs.PutInt("pgconsistency.anomalies.new", f.newAnomalies)
	invariants := attrs.PutEmptyMap("pgconsistency.invariants")
	invariants.EnsureCapacity(len(f.invariants))
	for _, name := range slices.Sorted(maps.Keys(f.invariants)) {
		invariants.PutInt(name, f.invariants[name].NewAnomalies)
	}
	putStrings(attrs.PutEmptySlice("pgconsistency.invariants.not_clean"), f.notClean)
	putStrings(attrs.PutEmptySlice("pgconsistency.invariants.not_refreshed"), f.notRefreshed)
	return lr
}

func putStrings(s pcommon.Slice, values []string) {
	s.EnsureCapacity(len(values))
	for _, v := range values {
		s.AppendEmpty().SetStr(v)
	}
}

// finishedBody is the record's one readable line, e.g. "requested refresh
// finished (deploy marker changed from v1 to v2): after deployment v2
// (2026-12-02T05:00:00Z) 1 new anomaly: dataset_seed_missing 1; 12 of 13
// invariants clean".
func finishedBody(f finishedRequest, deployment string) string {
	var b strings.Builder
	b.WriteString("requested refresh finished")
	if f.reason != nil {
		fmt.Fprintf(&b, " (%s)", *f.reason)
	}
	if f.superseded {
		b.WriteString(", cut short by the next request")
	}
	fmt.Fprintf(&b, ": %s", deployment)
	if len(f.notClean) == 0 {
		if f.deployedAt != nil {
			b.WriteString(", the deployment was clean")
		} else {
			b.WriteString(", clean")
		}
		fmt.Fprintf(&b, ": 0 new anomalies in %d invariants", len(f.invariants))
		return b.String()
	}
	if f.deployedAt == nil {
		b.WriteString(",")
	}
	names := slices.Sorted(maps.Keys(f.invariants))
	if f.newAnomalies == 1 {
		b.WriteString(" 1 new anomaly")
	} else {
		fmt.Fprintf(&b, " %d new anomalies", f.newAnomalies)
	}
	sep := ": "
	for _, name := range names {
		if n := f.invariants[name].NewAnomalies; n > 0 {
			fmt.Fprintf(&b, "%s%s %d", sep, name, n)
			sep = ", "
		}
	}
	sep = "; failed: "
	for _, name := range names {
		if o := f.invariants[name].Outcome; o != nil && *o != "succeeded" {
			fmt.Fprintf(&b, "%s%s (%s)", sep, name, strings.ReplaceAll(*o, "_", " "))
			sep = ", "
		}
	}
	if len(f.notRefreshed) > 0 {
		fmt.Fprintf(&b, "; not refreshed: %s", strings.Join(f.notRefreshed, ", "))
	}
	fmt.Fprintf(&b, "; %d of %d invariants clean", len(f.invariants)-len(f.notClean), len(f.invariants))
	return b.String()
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

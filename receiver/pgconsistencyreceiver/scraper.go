package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/scraper/scrapererror"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// pgScraper reads the status of one database ("database") or of several
// ("databases", "discovery"), each with a client, a resource and, with
// refresh::poll_interval, a refresh scheduler of its own, and with
// refresh::changes_interval (the default) a changes loop of its own.
type pgScraper struct {
	cfg       *Config
	logger    *zap.Logger
	mb        *metadata.MetricsBuilder
	newClient clientFactory

	// mu guards dbs: a scrape holds it for reading while it reads the
	// status of every database; discovery takes it to add and remove.
	mu  sync.RWMutex
	dbs map[string]*watchedDatabase

	discovery *discovery // nil unless discovery::enabled
}

// watchedDatabase is one database the scraper reads.
type watchedDatabase struct {
	name       string
	client     client
	resource   pcommon.Resource
	scheduler  *scheduler   // nil unless refresh::poll_interval is set
	changes    *changesLoop // nil when refresh::changes_interval is 0
	stream     *walStreamer // nil unless refresh::wal_stream::enabled
	discovered bool         // found by discovery: dropped quietly when it goes away
}

func newScraper(cfg *Config, set receiver.Settings, newClient clientFactory) *pgScraper {
	s := &pgScraper{
		cfg:       cfg,
		logger:    set.Logger,
		mb:        metadata.NewMetricsBuilder(cfg.MetricsBuilderConfig, set),
		newClient: newClient,
		dbs:       map[string]*watchedDatabase{},
	}
	if cfg.Discovery.Enabled {
		s.discovery = newDiscovery(cfg, set.Logger, s)
	}
	return s
}

// resourceFor is the resource of the database cfg watches.
func resourceFor(cfg *Config, rb *metadata.ResourceBuilder) pcommon.Resource {
	host, port, _ := cfg.hostPort() // validated at startup
	rb.SetPostgresqlDatabaseName(cfg.Database)
	rb.SetServerAddress(host)
	rb.SetServerPort(int64(port))
	return rb.Emit()
}

func (s *pgScraper) start(ctx context.Context, _ component.Host) error {
	switch {
	case s.discovery != nil:
		// The TLS files are read now, so that a wrong path fails the start
		// as it does with "database".
		if _, err := connConfig(ctx, s.cfg); err != nil {
			return err
		}
		s.discovery.start()
	case len(s.cfg.Databases) > 0:
		for _, name := range s.cfg.Databases {
			if err := s.add(ctx, name, false); err != nil {
				return err
			}
		}
	default:
		return s.add(ctx, s.cfg.Database, false)
	}
	return nil
}

// add starts watching database name. Its client does not connect yet.
func (s *pgScraper) add(ctx context.Context, name string, discovered bool) error {
	cfg, logger := s.cfg, s.logger
	if s.cfg.multiDatabase() {
		cfg = s.cfg.forDatabase(name)
		logger = logger.With(zap.String("database", name))
	}
	c, err := s.newClient(ctx, cfg)
	if err != nil {
		return err
	}
	db := &watchedDatabase{
		name:       name,
		client:     c,
		resource:   resourceFor(cfg, s.mb.NewResourceBuilder()),
		discovered: discovered,
	}
	if cfg.Refresh.interval() > 0 {
		db.scheduler = newScheduler(cfg, logger)
		db.scheduler.start()
	}
	if cfg.Refresh.ChangesInterval > 0 {
		db.changes = newChangesLoop(cfg, logger)
		db.changes.start()
	}
	if cfg.Refresh.WALStream.Enabled {
		db.stream = newWALStreamer(cfg, logger)
		db.stream.start()
	}
	s.mu.Lock()
	s.dbs[name] = db
	s.mu.Unlock()
	return nil
}

// remove stops watching database name: its series stop, its connections
// close. It reports whether it was watched: a scrape and a discovery may
// both find it gone at the same moment, and only the one that removed it
// logs so.
func (s *pgScraper) remove(name string) bool {
	s.mu.Lock()
	db := s.dbs[name]
	delete(s.dbs, name)
	s.mu.Unlock()
	if db == nil {
		return false
	}
	db.close()
	return true
}

func (db *watchedDatabase) close() {
	if db.scheduler != nil {
		db.scheduler.shutdown()
	}
	if db.changes != nil {
		db.changes.shutdown()
	}
	if db.stream != nil {
		db.stream.shutdown()
	}
	db.client.close()
}

// watching lists the names of the databases watched now.
func (s *pgScraper) watching() []string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Sorted(maps.Keys(s.dbs))
}

func (s *pgScraper) shutdown(context.Context) error {
	if s.discovery != nil {
		s.discovery.shutdown()
	}
	s.mu.Lock()
	dbs := s.dbs
	s.dbs = map[string]*watchedDatabase{}
	s.mu.Unlock()
	for _, db := range dbs {
		db.close()
	}
	return nil
}

// scrape reads the status of every watched database, all at once (each has
// its own connection), and records each under its own resource. A database
// that could not be read gets pgconsistency.up = 0 and a partial error; one
// that discovery found and that is gone since (dropped, or pgconsistency
// removed) is no longer watched, logged once, not an error.
func (s *pgScraper) scrape(ctx context.Context) (pmetric.Metrics, error) {
	now := pcommon.NewTimestampFromTime(time.Now())
	type result struct {
		db   *watchedDatabase
		rows []invariantStatus
		err  error
	}
	s.mu.RLock()
	results := make([]result, 0, len(s.dbs))
	for _, name := range slices.Sorted(maps.Keys(s.dbs)) {
		results = append(results, result{db: s.dbs[name]})
	}
	var wg sync.WaitGroup
	for i := range results {
		wg.Go(func() {
			results[i].rows, results[i].err = results[i].db.client.status(ctx)
		})
	}
	wg.Wait()
	s.mu.RUnlock()

	var errs []error
	for _, r := range results {
		if r.err != nil && r.db.discovered && databaseGone(r.err) {
			if s.remove(r.db.name) {
				s.logger.Info("pgconsistency: database no longer watched; discovery watches it again if it comes back with pgconsistency",
					zap.String("database", r.db.name), zap.Error(r.err))
			}
			continue
		}
		if r.err != nil {
			errs = append(errs, r.err)
			s.mb.RecordPgconsistencyUpDataPoint(now, 0)
		} else {
			s.recordStatus(now, r.rows)
		}
		s.mb.EmitForResource(metadata.WithResource(r.db.resource))
	}
	if len(errs) > 0 {
		// Partial, not full: the controller drops the metrics of a failed
		// scrape, and pgconsistency.up = 0 is exactly what must get through.
		return s.mb.Emit(), scrapererror.NewPartialScrapeError(errors.Join(errs...), len(errs))
	}
	return s.mb.Emit(), nil
}

// databaseGone is true for the errors that say the database, or the
// pgconsistency schema in it, does not exist (any more).
func databaseGone(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return false
	}
	switch pgErr.Code {
	case "3D000", "42P01", "3F000": // invalid_catalog_name, undefined_table, invalid_schema_name
		return true
	}
	return false
}

// recordStatus records what one database's pgconsistency.status says: every
// enabled invariant, zeros included, so that "no anomalies" never looks
// like "no data".
func (s *pgScraper) recordStatus(now pcommon.Timestamp, rows []invariantStatus) {
	s.mb.RecordPgconsistencyUpDataPoint(now, 1)
	for i := range rows {
		r := &rows[i]
		owned := ownerAttributes(r)
		s.mb.RecordPgconsistencyAnomaliesDataPoint(now, r.Anomalies, r.Invariant, r.Severity, owned...)
		s.mb.RecordPgconsistencyAnomaliesNewDataPoint(now, r.NewAnomalies, r.Invariant, r.Severity, owned...)
		s.mb.RecordPgconsistencyAnomaliesResolvedDataPoint(now, r.ResolvedAnomalies, r.Invariant, r.Severity, owned...)
		s.mb.RecordPgconsistencyAnomaliesAcknowledgedDataPoint(now, r.AcknowledgedAnomalies, r.Invariant, r.Severity, owned...)
		s.mb.RecordPgconsistencyRefreshFailuresDataPoint(now, r.ConsecutiveFailures, r.Invariant, owned...)
		// Never refreshed: timestamp 0 makes the snapshot infinitely old, so
		// staleness alerts fire instead of the series being absent.
		var refreshedAt float64
		if r.RefreshedAt != nil {
			refreshedAt = unixSeconds(*r.RefreshedAt)
		}
		s.mb.RecordPgconsistencySnapshotTimestampDataPoint(now, refreshedAt, r.Invariant, owned...)
		var duration float64
		if r.LastDurationSeconds != nil {
			duration = *r.LastDurationSeconds
		}
		s.mb.RecordPgconsistencyRefreshDurationDataPoint(now, duration, r.Invariant, owned...)
		s.mb.RecordPgconsistencyRefreshPeriodDataPoint(now, r.RefreshPeriod, r.Invariant, owned...)
		// Every outcome, 1 for the latest and 0 for the others, so that a
		// change of outcome never leaves a stale series behind.
		for name, outcome := range metadata.MapAttributeOutcome {
			var v int64
			if name == r.LastOutcome {
				v = 1
			}
			s.mb.RecordPgconsistencyRefreshOutcomeDataPoint(now, v, r.Invariant, outcome, owned...)
		}
		// Likewise every mode.
		for name, mode := range metadata.MapAttributeMode {
			var v int64
			if name == r.RefreshMode {
				v = 1
			}
			s.mb.RecordPgconsistencyRefreshModeDataPoint(now, v, r.Invariant, mode, owned...)
		}
		s.mb.RecordPgconsistencyReconcileHealedDataPoint(now, r.HealedAnomalies, r.Invariant, owned...)
		// Where the new anomalies came from: only while there are some, and
		// only what is known (no series says "no deploy" or "no cause").
		if r.NewAnomalies > 0 && r.NewDeployedAt != nil {
			s.mb.RecordPgconsistencyAnomaliesNewDeployTimestampDataPoint(now, unixSeconds(*r.NewDeployedAt),
				r.Invariant, r.NewDeployMarker, owned...)
		}
		if r.NewAnomalies > 0 && r.NewCauseChangedAt != nil {
			s.mb.RecordPgconsistencyAnomaliesNewCauseTimestampDataPoint(now, unixSeconds(*r.NewCauseChangedAt),
				r.Invariant, r.NewCauseOperation, r.NewCauseTable, r.NewCauseDBUser, r.NewCauseApplicationName, owned...)
		}
	}
	if len(rows) > 0 {
		// database-wide, repeated on every row of the status view
		s.mb.RecordPgconsistencyRefreshRequestsPendingDataPoint(now, rows[0].PendingRequests)
		if at := rows[0].DeployMarkerChangedAt; at != nil {
			s.mb.RecordPgconsistencyDeployMarkerTimestampDataPoint(now, unixSeconds(*at), rows[0].DeployMarker)
		}
		if v := rows[0].Version; v != "" {
			s.mb.RecordPgconsistencyVersionDataPoint(now, 1, v)
		}
		if rows[0].CaptureReported {
			s.recordCapture(now, rows)
		}
	}
}

// recordCapture records which capture the invariants in incremental mode
// use, every capture with its count (0 included), and, when the database
// uses the WAL capture, its slot: what the slot keeps, how far the capture's
// latest read is behind, and the bound. SQL 0.7.0 and later only.
func (s *pgScraper) recordCapture(now pcommon.Timestamp, rows []invariantStatus) {
	counts := map[string]int64{}
	for i := range rows {
		counts[rows[i].Capture]++
	}
	for name, capture := range metadata.MapAttributeCapture {
		s.mb.RecordPgconsistencyCaptureInvariantsDataPoint(now, counts[name], capture)
	}
	slot := &rows[0]
	if slot.CaptureSlotStatus == "" {
		return // trigger capture: no slot
	}
	switch {
	case slot.CaptureWALRetainedBytes != nil:
		s.mb.RecordPgconsistencyCaptureWalRetainedDataPoint(now, *slot.CaptureWALRetainedBytes)
	case slot.CaptureSlotStatus == "missing" || slot.CaptureSlotStatus == "lost":
		// Dropped, lost in a failover, or invalidated: it keeps nothing
		// until the next read creates it again (and every invariant in
		// incremental mode reconciles).
		s.mb.RecordPgconsistencyCaptureWalRetainedDataPoint(now, 0)
	}
	if slot.CaptureWALLagBytes != nil {
		s.mb.RecordPgconsistencyCaptureWalLagDataPoint(now, *slot.CaptureWALLagBytes)
	}
	if slot.CaptureWALBoundBytes != nil {
		s.mb.RecordPgconsistencyCaptureWalBoundDataPoint(now, *slot.CaptureWALBoundBytes)
	}
}

// ownerAttributes are the owner and runbook_url attributes of an invariant's
// data points: only those it has (SQL 0.5.0 and later, where set), so that
// an unset one is absent rather than empty. They are functions of the
// invariant: no series is added, a change of owner renames the series.
func ownerAttributes(r *invariantStatus) []metadata.MetricAttributeOption {
	var out []metadata.MetricAttributeOption
	if r.Owner != "" {
		out = append(out, metadata.WithOwnerMetricAttribute(r.Owner))
	}
	if r.RunbookURL != "" {
		out = append(out, metadata.WithRunbookURLMetricAttribute(r.RunbookURL))
	}
	return out
}

// unixSeconds is t as the seconds since 1970 of the timestamp metrics.
func unixSeconds(t time.Time) float64 {
	return float64(t.UnixNano()) / 1e9
}

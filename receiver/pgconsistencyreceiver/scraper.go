package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"time"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/pdata/pcommon"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/scraper/scrapererror"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

type pgScraper struct {
	cfg       *Config
	mb        *metadata.MetricsBuilder
	newClient clientFactory
	client    client
	resource  pcommon.Resource
	refresher *refresher // nil unless refresh::poll_interval is set
}

func newScraper(cfg *Config, set receiver.Settings, newClient clientFactory) *pgScraper {
	s := &pgScraper{
		cfg:       cfg,
		mb:        metadata.NewMetricsBuilder(cfg.MetricsBuilderConfig, set),
		newClient: newClient,
	}
	if cfg.Refresh.interval() > 0 {
		s.refresher = newRefresher(cfg, set.Logger)
	}
	// The resource is the same on every scrape: build it once.
	s.resource = resourceFor(cfg, s.mb.NewResourceBuilder())
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
	c, err := s.newClient(ctx, s.cfg)
	if err != nil {
		return err
	}
	s.client = c
	if s.refresher != nil {
		s.refresher.start()
	}
	return nil
}

func (s *pgScraper) shutdown(context.Context) error {
	if s.refresher != nil {
		s.refresher.shutdown()
	}
	if s.client != nil {
		s.client.close()
		s.client = nil
	}
	return nil
}

// scrape reads pgconsistency.status once and records every enabled invariant,
// zeros included, so that "no anomalies" never looks like "no data".
func (s *pgScraper) scrape(ctx context.Context) (pmetric.Metrics, error) {
	now := pcommon.NewTimestampFromTime(time.Now())
	rows, err := s.client.status(ctx)
	if err != nil {
		s.mb.RecordPgconsistencyUpDataPoint(now, 0)
		// Partial, not full: the controller drops the metrics of a failed
		// scrape, and pgconsistency.up = 0 is exactly what must get through.
		return s.mb.Emit(metadata.WithResource(s.resource)), scrapererror.NewPartialScrapeError(err, 1)
	}
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
			refreshedAt = float64(r.RefreshedAt.UnixNano()) / 1e9
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
	}
	if len(rows) > 0 {
		// database-wide, repeated on every row of the status view
		s.mb.RecordPgconsistencyRefreshRequestsPendingDataPoint(now, rows[0].PendingRequests)
		if at := rows[0].DeployMarkerChangedAt; at != nil {
			s.mb.RecordPgconsistencyDeployMarkerTimestampDataPoint(now, float64(at.UnixNano())/1e9)
		}
		if v := rows[0].Version; v != "" {
			s.mb.RecordPgconsistencyVersionDataPoint(now, 1, v)
		}
	}
	return s.mb.Emit(metadata.WithResource(s.resource)), nil
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

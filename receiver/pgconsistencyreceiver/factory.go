package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"
	"errors"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/scraper"
	"go.opentelemetry.io/collector/scraper/scraperhelper"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// NewFactory creates a factory for the pgconsistency receiver.
func NewFactory() receiver.Factory {
	return receiver.NewFactory(
		metadata.Type,
		func() component.Config { return createDefaultConfig() },
		receiver.WithMetrics(createMetricsReceiver, metadata.MetricsStability),
		receiver.WithLogs(createLogsReceiver, metadata.LogsStability))
}

// runConfig is the configuration a receiver runs with: a copy of the
// collector's, with the derived timeout filled in, so that the scraper
// controller, the connect timeout and the statement_timeout all see one
// value. The password read from password_file at Start goes into this copy
// too, never into the collector's configuration.
func runConfig(cfg *Config) *Config {
	c := *cfg
	c.Timeout = cfg.effectiveTimeout()
	return &c
}

func createLogsReceiver(
	_ context.Context,
	set receiver.Settings,
	rConf component.Config,
	next consumer.Logs,
) (receiver.Logs, error) {
	cfg := runConfig(rConf.(*Config))
	if cfg.multiDatabase() {
		return nil, errMultiDatabaseLogs
	}
	warnDeprecations(cfg, set)
	return &logsWithPasswordFile{newLogsReceiver(cfg, set, next)}, nil
}

// errMultiDatabaseLogs refuses a logs pipeline for a receiver that watches
// several databases: the logs receiver reads the log cursor of one.
var errMultiDatabaseLogs = errors.New(`a pgconsistency receiver with "databases" or "discovery" can only be in a metrics pipeline: ` +
	`in a logs pipeline, use one receiver per database with "database" (e.g. pgconsistency/logs_app: {database: app, ...})`)

// logsWithPasswordFile reads password_file before the logs receiver starts.
type logsWithPasswordFile struct {
	*logsReceiver
}

func (r *logsWithPasswordFile) Start(ctx context.Context, host component.Host) error {
	if err := r.cfg.loadPasswordFile(); err != nil {
		return err
	}
	return r.logsReceiver.Start(ctx, host)
}

func createMetricsReceiver(
	_ context.Context,
	set receiver.Settings,
	rConf component.Config,
	next consumer.Metrics,
) (receiver.Metrics, error) {
	cfg := runConfig(rConf.(*Config))
	warnDeprecations(cfg, set)
	s := newScraper(cfg, set, newPgxClient)
	sc, err := scraper.NewMetrics(s.scrape,
		scraper.WithStart(func(ctx context.Context, host component.Host) error {
			// Before the client is created: it copies the password.
			if err := cfg.loadPasswordFile(); err != nil {
				return err
			}
			return s.start(ctx, host)
		}),
		scraper.WithShutdown(s.shutdown))
	if err != nil {
		return nil, err
	}
	return scraperhelper.NewMetricsController(&cfg.ControllerConfig, set, next,
		scraperhelper.AddMetricsScraper(metadata.Type, sc))
}

// warnDeprecations logs a warning for each deprecated setting in use.
func warnDeprecations(cfg *Config, set receiver.Settings) {
	for _, w := range cfg.deprecations() {
		set.Logger.Warn(w)
	}
}

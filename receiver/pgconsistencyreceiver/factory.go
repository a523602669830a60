package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"context"

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

func createLogsReceiver(
	_ context.Context,
	set receiver.Settings,
	rConf component.Config,
	next consumer.Logs,
) (receiver.Logs, error) {
	return newLogsReceiver(rConf.(*Config), set, next), nil
}

func createMetricsReceiver(
	_ context.Context,
	set receiver.Settings,
	rConf component.Config,
	next consumer.Metrics,
) (receiver.Metrics, error) {
	cfg := rConf.(*Config)
	s := newScraper(cfg, set, newPgxClient)
	sc, err := scraper.NewMetrics(s.scrape,
		scraper.WithStart(s.start),
		scraper.WithShutdown(s.shutdown))
	if err != nil {
		return nil, err
	}
	return scraperhelper.NewMetricsController(&cfg.ControllerConfig, set, next,
		scraperhelper.AddMetricsScraper(metadata.Type, sc))
}

package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"go.opentelemetry.io/collector/config/confignet"
	"go.opentelemetry.io/collector/config/configopaque"
	"go.opentelemetry.io/collector/config/configtls"
	"go.opentelemetry.io/collector/scraper/scraperhelper"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

const (
	defaultEndpoint           = "localhost:5432"
	defaultSchema             = "pgconsistency"
	defaultCollectionInterval = 60 * time.Second
	defaultTimeout            = 10 * time.Second
	defaultDeployDelay        = 10 * time.Minute
	defaultMaxLogRecords      = 100

	// PostgreSQL truncates identifiers longer than this many bytes.
	maxIdentifierLength = 63
)

// Config is the configuration of the pgconsistency receiver.
type Config struct {
	scraperhelper.ControllerConfig `mapstructure:",squash"`
	metadata.MetricsBuilderConfig  `mapstructure:",squash"`

	// Endpoint is host:port for transport tcp; for transport unix it is the
	// directory of the server's socket and the port, e.g. /var/run/postgresql:5432.
	confignet.AddrConfig `mapstructure:",squash"`

	Username string              `mapstructure:"username"`
	Password configopaque.String `mapstructure:"password"`
	Database string              `mapstructure:"database"`

	// TLS to the server. Default: TLS required, certificate not verified
	// (sslmode=require); insecure: true disables TLS, and
	// insecure_skip_verify: false verifies the certificate (sslmode=verify-full).
	TLS configtls.ClientConfig `mapstructure:"tls"`

	// Schema is where sql/install.sql put the pgconsistency objects.
	Schema string `mapstructure:"schema"`

	// Refresh makes the receiver run the refreshes itself, for servers
	// without pg_cron. Off by default.
	Refresh RefreshConfig `mapstructure:"refresh"`

	// Logs configures the receiver in a logs pipeline.
	Logs LogsConfig `mapstructure:"logs"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// RefreshConfig configures the receiver's refresh scheduler.
type RefreshConfig struct {
	// Schedule is how often the receiver looks for due work: invariants whose
	// refresh_period has passed, a due refresh request, a changed deploy
	// marker. 0 (the default) turns the scheduler off.
	Schedule time.Duration `mapstructure:"schedule"`
	// DeployMarker, when its query is set, requests a refresh after Delay
	// whenever the value of the query changes.
	DeployMarker DeployMarkerConfig `mapstructure:"deploy_marker"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// LogsConfig configures the log records of new anomalies.
type LogsConfig struct {
	// MaxRecordsPerScrape caps the records of one collection interval, so a
	// flood of anomalies cannot flood the pipeline; the rest follow at the
	// next intervals.
	MaxRecordsPerScrape int `mapstructure:"max_records_per_scrape"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// DeployMarkerConfig is a query whose value changes with each deployment.
type DeployMarkerConfig struct {
	// Query returns one row and one column, e.g.
	// SELECT max(version) FROM public.schema_migrations.
	Query string `mapstructure:"query"`
	// Delay is how long the deployment needs to settle before the refresh.
	Delay time.Duration `mapstructure:"delay"`

	// prevent unkeyed literal initialization
	_ struct{}
}

func createDefaultConfig() *Config {
	cc := scraperhelper.NewDefaultControllerConfig()
	cc.CollectionInterval = defaultCollectionInterval
	cc.Timeout = defaultTimeout
	return &Config{
		ControllerConfig:     cc,
		MetricsBuilderConfig: metadata.DefaultMetricsBuilderConfig(),
		AddrConfig: confignet.AddrConfig{
			Endpoint:  defaultEndpoint,
			Transport: confignet.TransportTypeTCP,
		},
		TLS: configtls.ClientConfig{
			Insecure:           false,
			InsecureSkipVerify: true,
		},
		Schema: defaultSchema,
		Refresh: RefreshConfig{
			DeployMarker: DeployMarkerConfig{Delay: defaultDeployDelay},
		},
		Logs: LogsConfig{MaxRecordsPerScrape: defaultMaxLogRecords},
	}
}

// Validate reports every problem of the configuration at once, each naming
// its key and how to fix it. The collector refuses to start on any of them.
func (cfg *Config) Validate() error {
	var errs []error
	if _, _, err := cfg.hostPort(); err != nil {
		errs = append(errs, err)
	}
	if cfg.Username == "" {
		errs = append(errs, errors.New(`"username" must be set: the PostgreSQL role the receiver logs in as (it needs only SELECT on the pgconsistency schema)`))
	}
	if cfg.Database == "" {
		errs = append(errs, errors.New(`"database" must be set: the database where sql/install.sql installed pgconsistency`))
	}
	switch {
	case cfg.Schema == "":
		errs = append(errs, fmt.Errorf(`"schema" must not be empty: set it to the schema of the pgconsistency objects (default %q)`, defaultSchema))
	case len(cfg.Schema) > maxIdentifierLength:
		errs = append(errs, fmt.Errorf(`"schema" %q is longer than %d bytes, which PostgreSQL does not allow for a name`, cfg.Schema, maxIdentifierLength))
	}
	if cfg.Logs.MaxRecordsPerScrape <= 0 {
		errs = append(errs, fmt.Errorf(`"logs::max_records_per_scrape" (%d) must be at least 1`, cfg.Logs.MaxRecordsPerScrape))
	}
	if cfg.Refresh.Schedule < 0 {
		errs = append(errs, fmt.Errorf(`"refresh::schedule" (%s) must be positive, e.g. 1m, or 0 to leave refreshes to pg_cron`, cfg.Refresh.Schedule))
	}
	if cfg.Refresh.DeployMarker.Query != "" {
		if cfg.Refresh.Schedule <= 0 {
			errs = append(errs, errors.New(`"refresh::deploy_marker::query" needs "refresh::schedule": the scheduler is what watches the marker`))
		}
		if cfg.Refresh.DeployMarker.Delay < 0 {
			errs = append(errs, fmt.Errorf(`"refresh::deploy_marker::delay" (%s) must be zero or more`, cfg.Refresh.DeployMarker.Delay))
		}
	}
	return errors.Join(errs...)
}

// hostPort returns the host (or socket directory) and port of the endpoint.
func (cfg *Config) hostPort() (string, uint16, error) {
	switch cfg.Transport {
	case confignet.TransportTypeTCP, confignet.TransportTypeTCP4, confignet.TransportTypeTCP6, confignet.TransportTypeUnix:
	default:
		return "", 0, fmt.Errorf(`"transport" %q is not supported: use "tcp" (endpoint host:port) or "unix" (endpoint /socket/dir:port)`, cfg.Transport)
	}
	if cfg.Endpoint == "" {
		return "", 0, errors.New(`"endpoint" must be set: host:port of the PostgreSQL server, e.g. localhost:5432`)
	}
	host, portText, err := net.SplitHostPort(cfg.Endpoint)
	if err != nil {
		return "", 0, fmt.Errorf(`"endpoint" %q must be host:port, e.g. localhost:5432 (or /var/run/postgresql:5432 with transport unix): %w`, cfg.Endpoint, err)
	}
	port, err := strconv.ParseUint(portText, 10, 16)
	if err != nil || port == 0 {
		return "", 0, fmt.Errorf(`"endpoint" %q has an invalid port %q: expected a number from 1 to 65535`, cfg.Endpoint, portText)
	}
	if host == "" {
		return "", 0, fmt.Errorf(`"endpoint" %q has no host: write it as host:port, e.g. localhost:5432`, cfg.Endpoint)
	}
	if cfg.Transport == confignet.TransportTypeUnix && !strings.HasPrefix(host, "/") {
		return "", 0, fmt.Errorf(`"endpoint" %q: with transport unix, write the absolute socket directory and the port, e.g. /var/run/postgresql:5432`, cfg.Endpoint)
	}
	return host, uint16(port), nil
}

package pgconsistencyreceiver // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver"

import (
	"errors"
	"fmt"
	"go.opentelemetry.io/collector/confmap"
	"net"
	"os"
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
	defaultCollectionInterval = 60 * time.Second
	maxDerivedTimeout         = 10 * time.Second // cap of the timeout derived when "timeout" is not set
	defaultDeployDelay        = 10 * time.Minute
	defaultMaxLogRecords      = 100
	defaultDiscoveryInterval  = 5 * time.Minute
	defaultDiscoveryDatabase  = "postgres"
	defaultMaxConnections     = 30
	defaultChangesInterval    = time.Second
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
	// PasswordFile is the path of a file holding the password (e.g. a
	// mounted secret), read when the receiver starts; one trailing newline
	// is ignored. Exclusive with Password.
	PasswordFile string `mapstructure:"password_file"`
	// Database is the one database to watch. Exclusive with Databases and
	// Discovery.
	Database string `mapstructure:"database"`
	// Databases are several databases of the server to watch, each with its
	// own resource and pgconsistency.up. Exclusive with Database and
	// Discovery.
	Databases []string `mapstructure:"databases"`
	// Discovery watches every database of the server where pgconsistency is
	// installed, re-checked every interval. Exclusive with Database and
	// Databases.
	Discovery DiscoveryConfig `mapstructure:"discovery"`
	// MaxConnections bounds the connections the receiver holds for all the
	// databases of Databases or Discovery together (see
	// connectionsPerDatabase). Not used with Database.
	MaxConnections int `mapstructure:"max_connections"`

	// TLS to the server. Default: TLS required, certificate not verified
	// (sslmode=require); insecure: true disables TLS, and
	// insecure_skip_verify: false verifies the certificate (sslmode=verify-full).
	TLS configtls.ClientConfig `mapstructure:"tls"`

	// Schema is deprecated: sql/install.sql installs into schema
	// pgconsistency, the only value accepted (with a warning); remove it.
	Schema string `mapstructure:"schema"`

	// Refresh makes the receiver run the refreshes itself, for servers
	// without pg_cron (off by default), and refresh the invariants whose
	// tables were written within seconds (on by default).
	Refresh RefreshConfig `mapstructure:"refresh"`

	// Logs configures the receiver in a logs pipeline.
	Logs LogsConfig `mapstructure:"logs"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// RefreshConfig configures the receiver's refresh scheduler (poll_interval,
// deploy_marker) and its changes loop (changes_interval).
type RefreshConfig struct {
	// PollInterval is how often the receiver looks for due work: invariants
	// whose refresh_period has passed, a due refresh request, a changed
	// deploy marker. 0 (the default) turns the scheduler off.
	PollInterval time.Duration `mapstructure:"poll_interval"`
	// Schedule is the name of PollInterval before 0.4.0, still read (with a
	// deprecation warning) until 0.8.0.
	//
	// Deprecated: use PollInterval.
	Schedule time.Duration `mapstructure:"schedule"`
	// DeployMarker, when its query is set, requests a refresh after Delay
	// whenever the value of the query changes.
	DeployMarker DeployMarkerConfig `mapstructure:"deploy_marker"`
	// ChangesInterval is how often the changes loop refreshes the
	// invariants in incremental mode whose tables were written
	// (pgconsistency.refresh_changes_plan(), SQL 0.7.0), on a connection and
	// goroutine of its own, whether or not PollInterval is set. Default 1s;
	// 0 turns it off.
	ChangesInterval time.Duration `mapstructure:"changes_interval"`
	// WALStream reads the WAL capture's slot over a replication connection
	// (off by default).
	WALStream WALStreamConfig `mapstructure:"wal_stream"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// interval is the scheduler's poll interval, whichever of its two names
// set it; 0 when the scheduler is off.
func (c *RefreshConfig) interval() time.Duration {
	if c.PollInterval != 0 {
		return c.PollInterval
	}
	return c.Schedule
}

// intervalKey is the key that set interval(), for error messages.
func (c *RefreshConfig) intervalKey() string {
	if c.PollInterval == 0 && c.Schedule != 0 {
		return "refresh::schedule"
	}
	return "refresh::poll_interval"
}

// LogsConfig configures the log records of new anomalies.
type LogsConfig struct {
	// MaxRecordsPerInterval caps the records of one collection interval, so
	// a flood of anomalies cannot flood the pipeline; the rest follow at the
	// next intervals.
	MaxRecordsPerInterval int `mapstructure:"max_records_per_interval"`
	// MaxRecordsPerScrape is the name of MaxRecordsPerInterval before 0.4.0
	// (the logs receiver does not scrape), still read (with a deprecation
	// warning) until 0.8.0; 0 when not set.
	//
	// Deprecated: use MaxRecordsPerInterval.
	MaxRecordsPerScrape int `mapstructure:"max_records_per_scrape"`

	intervalSet bool // max_records_per_interval was in the configuration (Unmarshal)

	// prevent unkeyed literal initialization
	_ struct{}
}

// Unmarshal notes whether max_records_per_interval was set, so that
// setting it and its deprecated name together is refused even when it is
// set to its default value.
func (c *LogsConfig) Unmarshal(conf *confmap.Conf) error {
	if err := conf.Unmarshal(c); err != nil {
		return err
	}
	c.intervalSet = conf.IsSet("max_records_per_interval")
	return nil
}

// perIntervalSet tells whether max_records_per_interval was set: read from
// the configuration, or (a Config built in code) different from its default.
func (c *LogsConfig) perIntervalSet() bool {
	return c.intervalSet || c.MaxRecordsPerInterval != defaultMaxLogRecords
}

// maxRecords is the cap of log records per collection interval, whichever
// of its two names set it.
func (c *LogsConfig) maxRecords() int {
	if c.MaxRecordsPerScrape != 0 && !c.perIntervalSet() {
		return c.MaxRecordsPerScrape
	}
	return c.MaxRecordsPerInterval
}

// maxRecordsKey is the key that set maxRecords(), for error messages.
func (c *LogsConfig) maxRecordsKey() string {
	if c.MaxRecordsPerScrape != 0 && !c.perIntervalSet() {
		return "logs::max_records_per_scrape"
	}
	return "logs::max_records_per_interval"
}

// DiscoveryConfig configures the discovery of the databases to watch.
type DiscoveryConfig struct {
	// Enabled turns discovery on: every database of the server that accepts
	// connections, is not a template, is not excluded and has the
	// pgconsistency status view is watched.
	Enabled bool `mapstructure:"enabled"`
	// Interval is how often the list of databases is read again: a database
	// created (or given pgconsistency) since is watched from then on, one
	// dropped is no longer.
	Interval time.Duration `mapstructure:"interval"`
	// Database is where the list of databases is read (pg_database); the
	// role needs CONNECT on it.
	Database string `mapstructure:"database"`
	// Exclude are names of databases never to watch.
	Exclude []string `mapstructure:"exclude"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// WALStreamConfig makes the receiver read the WAL capture's slot
// (SELECT pgconsistency.set_capture('wal')) over a replication connection
// of its own, decoding each change once as it is written, instead of the
// refresh loop reading it by SQL, which decodes again at every read what
// was written since the slot's restart_lsn (SQL 0.7.7; docs/sql.md,
// "Incremental refresh"). The keys of the changes received are stored, and
// only then confirmed to the slot, within about a second (flush_delay), on
// an ordinary connection of its own (one more per database). With the trigger
// capture it waits, and looks again every few seconds.
type WALStreamConfig struct {
	// Enabled turns the stream on. Off by default: its role needs
	// REPLICATION.
	Enabled bool `mapstructure:"enabled"`
	// Endpoint is the PostgreSQL server itself (host:port, or the socket
	// directory and port with transport unix): a replication connection
	// cannot pass a transaction-pooling proxy such as PgBouncer. Default:
	// the receiver's endpoint.
	Endpoint string `mapstructure:"endpoint"`
	// Username is a role with REPLICATION (on Amazon RDS and Aurora:
	// rds_replication) that may connect to the database; it needs nothing
	// else. Default: the receiver's username and password.
	Username string              `mapstructure:"username"`
	Password configopaque.String `mapstructure:"password"`
	// FlushDelay is how long a change received waits for others before
	// the batch's keys are stored: the stream's share of the pace.
	// Default 1s (a store costs about 20 ms besides its changes: its
	// statement parsed again); at most 10s.
	FlushDelay time.Duration `mapstructure:"flush_delay"`

	// prevent unkeyed literal initialization
	_ struct{}
}

// maxFlushDelay bounds refresh::wal_stream::flush_delay: the changes held
// wait in memory, and the metric waits for them.
const maxFlushDelay = 10 * time.Second

// streamConfig is the receiver's configuration with the stream's endpoint
// and role, for its replication connection.
func (cfg *Config) streamConfig() *Config {
	c := *cfg
	w := &cfg.Refresh.WALStream
	if w.Endpoint != "" {
		c.Endpoint = w.Endpoint
	}
	if w.Username != "" {
		c.Username, c.Password = w.Username, w.Password
	}
	return &c
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
	// 0: derived from collection_interval, see effectiveTimeout.
	cc.Timeout = 0
	return &Config{
		ControllerConfig:     cc,
		MetricsBuilderConfig: metadata.NewDefaultMetricsBuilderConfig(),
		AddrConfig: confignet.AddrConfig{
			Endpoint:  defaultEndpoint,
			Transport: confignet.TransportTypeTCP,
		},
		// TLS, the server's certificate and host name verified against the
		// system's trust store (0.7.0; libpq's sslmode=verify-full). Plain
		// TCP is tls::insecure, no verification tls::insecure_skip_verify.
		TLS: configtls.ClientConfig{
			Insecure:           false,
			InsecureSkipVerify: false,
		},
		Refresh: RefreshConfig{
			DeployMarker:    DeployMarkerConfig{Delay: defaultDeployDelay},
			ChangesInterval: defaultChangesInterval,
		},
		Logs: LogsConfig{MaxRecordsPerInterval: defaultMaxLogRecords},
		Discovery: DiscoveryConfig{
			Interval: defaultDiscoveryInterval,
			Database: defaultDiscoveryDatabase,
		},
		MaxConnections: defaultMaxConnections,
	}
}

// multiDatabase is true when the receiver watches several databases
// (databases or discovery) rather than the one of "database".
func (cfg *Config) multiDatabase() bool {
	return len(cfg.Databases) > 0 || cfg.Discovery.Enabled
}

// connectionsPerDatabase is what one watched database takes of
// max_connections: its scrape connection, plus the refresh scheduler's with
// refresh::poll_interval, plus the changes loop's with
// refresh::changes_interval.
func (cfg *Config) connectionsPerDatabase() int {
	n := 1
	if cfg.Refresh.interval() > 0 {
		n++
	}
	if cfg.Refresh.ChangesInterval > 0 {
		n++
	}
	if cfg.Refresh.WALStream.Enabled {
		n++ // its replication connection is a WAL sender's, not counted here
	}
	return n
}

// maxDiscoveredDatabases is how many databases discovery may watch within
// max_connections, one connection being kept for discovery itself.
func (cfg *Config) maxDiscoveredDatabases() int {
	return max(0, (cfg.MaxConnections-1)/cfg.connectionsPerDatabase())
}

// forDatabase is the configuration of one watched database: a copy with
// "database" set to it (and the multi-database settings kept, so that the
// copy still says it is one of several).
func (cfg *Config) forDatabase(name string) *Config {
	c := *cfg
	c.Database = name
	return &c
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
	errs = append(errs, cfg.validateDatabases()...)
	if cfg.Password != "" && cfg.PasswordFile != "" {
		errs = append(errs, errors.New(`"password" and "password_file" are both set: keep one, "password_file" for a mounted secret or "password" (e.g. password: ${env:VAR})`))
	}
	if cfg.Timeout > 0 && cfg.CollectionInterval > 0 && cfg.Timeout >= cfg.CollectionInterval {
		errs = append(errs, fmt.Errorf(`"timeout" (%s) must be shorter than "collection_interval" (%s), so that a scrape ends before the next one is due: `+
			`lower "timeout", or remove it to use the default (half of "collection_interval", at most %s)`,
			cfg.Timeout, cfg.CollectionInterval, maxDerivedTimeout))
	}
	if cfg.Schema != "" && cfg.Schema != schema {
		errs = append(errs, fmt.Errorf(`"schema" %q is not supported: sql/install.sql installs pgconsistency into schema %q, `+
			`the only one the receiver reads; remove "schema" (it is deprecated)`, cfg.Schema, schema))
	}
	if cfg.Logs.MaxRecordsPerScrape != 0 && cfg.Logs.perIntervalSet() {
		errs = append(errs, errors.New(`"logs::max_records_per_scrape" and "logs::max_records_per_interval" are both set: `+
			`"logs::max_records_per_scrape" is the deprecated name of "logs::max_records_per_interval"; keep only "logs::max_records_per_interval"`))
	} else if n := cfg.Logs.maxRecords(); n <= 0 {
		errs = append(errs, fmt.Errorf(`"%s" (%d) must be at least 1`, cfg.Logs.maxRecordsKey(), n))
	}
	r := &cfg.Refresh
	if r.PollInterval != 0 && r.Schedule != 0 {
		errs = append(errs, errors.New(`"refresh::schedule" and "refresh::poll_interval" are both set: `+
			`"refresh::schedule" is the deprecated name of "refresh::poll_interval"; keep only "refresh::poll_interval"`))
	}
	if r.interval() < 0 {
		errs = append(errs, fmt.Errorf(`"%s" (%s) must be positive, e.g. 1m, or 0 to leave refreshes to pg_cron`, r.intervalKey(), r.interval()))
	}
	if r.ChangesInterval < 0 {
		errs = append(errs, fmt.Errorf(`"refresh::changes_interval" (%s) must be positive, e.g. 1s, or 0 to refresh changes only `+
			`with the other refreshes`, r.ChangesInterval))
	}
	if w := &r.WALStream; w.Enabled {
		if w.FlushDelay < 0 || w.FlushDelay > maxFlushDelay {
			errs = append(errs, fmt.Errorf(`"refresh::wal_stream::flush_delay" (%s) must be between 0 (the default, 1s) and %s`, w.FlushDelay, maxFlushDelay))
		}
		if w.Endpoint != "" {
			if _, _, err := cfg.streamConfig().hostPort(); err != nil {
				errs = append(errs, fmt.Errorf(`"refresh::wal_stream::endpoint": %w`, err))
			}
		}
		if w.Password != "" && w.Username == "" {
			errs = append(errs, errors.New(`"refresh::wal_stream::password" is set without "refresh::wal_stream::username": `+
				`set the role it is the password of (a role with REPLICATION), or remove it to stream as the receiver's role`))
		}
	} else if w.Endpoint != "" || w.Username != "" || w.Password != "" || w.FlushDelay != 0 {
		errs = append(errs, errors.New(`"refresh::wal_stream" has settings but is off: set "refresh::wal_stream::enabled: true" to stream the WAL capture's slot, or remove them`))
	}
	if r.DeployMarker.Query != "" {
		if r.interval() <= 0 {
			errs = append(errs, errors.New(`"refresh::deploy_marker::query" needs "refresh::poll_interval": the scheduler is what watches the marker`))
		}
		if r.DeployMarker.Delay < 0 {
			errs = append(errs, fmt.Errorf(`"refresh::deploy_marker::delay" (%s) must be zero or more`, r.DeployMarker.Delay))
		}
	}
	return errors.Join(errs...)
}

// validateDatabases checks which databases to watch: exactly one of
// "database", "databases" and "discovery::enabled", and the connection bound.
func (cfg *Config) validateDatabases() []error {
	var errs []error
	set := 0
	for _, on := range []bool{cfg.Database != "", len(cfg.Databases) > 0, cfg.Discovery.Enabled} {
		if on {
			set++
		}
	}
	switch {
	case set == 0:
		errs = append(errs, errors.New(`"database" must be set: the database where sql/install.sql installed pgconsistency `+
			`(or "databases: [app, billing]" for several, or "discovery: {enabled: true}" for every database of the server that has it)`))
	case set > 1:
		errs = append(errs, errors.New(`"database", "databases" and "discovery::enabled" are exclusive, and more than one is set: `+
			`keep "database" for one database, "databases" for a list, or "discovery" for every database that has pgconsistency`))
	}
	seen := map[string]bool{}
	for i, name := range cfg.Databases {
		switch {
		case strings.TrimSpace(name) == "":
			errs = append(errs, fmt.Errorf(`"databases" entry %d is empty: write the name of a database, or remove the entry`, i))
		case seen[name]:
			errs = append(errs, fmt.Errorf(`"databases" lists %q twice: list each database once`, name))
		}
		seen[name] = true
	}
	if cfg.MaxConnections < 1 {
		errs = append(errs, fmt.Errorf(`"max_connections" (%d) must be at least 1: the bound of the receiver's connections to all its databases`, cfg.MaxConnections))
	} else if per := cfg.connectionsPerDatabase(); len(cfg.Databases) > 0 && len(cfg.Databases)*per > cfg.MaxConnections {
		errs = append(errs, fmt.Errorf(`"max_connections" (%d) is too low for the %d databases of "databases": `+
			`each takes %d (%s); raise "max_connections" to %d, or list fewer databases`,
			cfg.MaxConnections, len(cfg.Databases), per, cfg.perDatabaseWhat(), len(cfg.Databases)*per))
	} else if cfg.Discovery.Enabled && cfg.maxDiscoveredDatabases() < 1 {
		errs = append(errs, fmt.Errorf(`"max_connections" (%d) is too low for discovery: it needs 1 connection to list the databases `+
			`and %d per database watched (%s); raise "max_connections" to at least %d`, cfg.MaxConnections, per, cfg.perDatabaseWhat(), 1+per))
	}
	d := &cfg.Discovery
	if d.Enabled {
		if d.Interval <= 0 {
			errs = append(errs, fmt.Errorf(`"discovery::interval" (%s) must be positive, e.g. 5m: how often the list of databases is read again`, d.Interval))
		}
		if d.Database == "" {
			errs = append(errs, errors.New(`"discovery::database" must be set: the database where the list of databases is read, e.g. postgres`))
		}
	} else if len(d.Exclude) > 0 {
		errs = append(errs, errors.New(`"discovery::exclude" is set but discovery is off: set "discovery::enabled: true", or remove "discovery::exclude"`))
	}
	for i, name := range d.Exclude {
		if strings.TrimSpace(name) == "" {
			errs = append(errs, fmt.Errorf(`"discovery::exclude" entry %d is empty: write the name of a database, or remove the entry`, i))
		}
	}
	return errs
}

// perDatabaseWhat says what the connections of one database are for.
func (cfg *Config) perDatabaseWhat() string {
	what := []string{"one to scrape"}
	if cfg.Refresh.interval() > 0 {
		what = append(what, "one for the refresh scheduler of refresh::poll_interval")
	}
	if cfg.Refresh.ChangesInterval > 0 {
		what = append(what, "one for the changes loop of refresh::changes_interval, which 0 turns off")
	}
	if cfg.Refresh.WALStream.Enabled {
		what = append(what, "one where refresh::wal_stream stores keys")
	}
	return strings.Join(what, ", ")
}

// deprecations are the warnings to log at start for deprecated settings.
func (cfg *Config) deprecations() []string {
	var out []string
	if cfg.Schema != "" {
		out = append(out, `"schema" is deprecated and will be removed: pgconsistency is always in schema pgconsistency; remove the key`)
	}
	if cfg.Refresh.Schedule != 0 {
		out = append(out, `"refresh::schedule" is deprecated and will be removed in 0.8.0: rename it to "refresh::poll_interval" (same value)`)
	}
	if cfg.Logs.MaxRecordsPerScrape != 0 {
		out = append(out, `"logs::max_records_per_scrape" is deprecated and will be removed in 0.8.0: rename it to "logs::max_records_per_interval" (same value)`)
	}
	return out
}

// effectiveTimeout is the limit of one scrape, of connecting and of each
// statement (statement_timeout). An explicit "timeout" wins; otherwise it
// is half of collection_interval, at most maxDerivedTimeout: the other half
// leaves the pipeline time to take the data before the next scrape is due,
// and short intervals (tests, demos) work without setting a timeout.
func (cfg *Config) effectiveTimeout() time.Duration {
	if cfg.Timeout > 0 {
		return cfg.Timeout
	}
	if cfg.CollectionInterval <= 0 {
		return maxDerivedTimeout
	}
	return min(maxDerivedTimeout, cfg.CollectionInterval/2)
}

// loadPasswordFile sets Password from PasswordFile, if set. It runs at
// Start on the receiver's own copy of the configuration, so a rotated
// secret is picked up by a restart. Errors name the key and the path, never
// the contents.
func (cfg *Config) loadPasswordFile() error {
	if cfg.PasswordFile == "" {
		return nil
	}
	b, err := os.ReadFile(cfg.PasswordFile)
	if err != nil {
		return fmt.Errorf(`"password_file": cannot read the password from %q: %w; check the path and that the collector's user may read it`, cfg.PasswordFile, err)
	}
	password := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
	if password == "" {
		return fmt.Errorf(`"password_file" %q is empty: write the password in it, or remove "password_file" if the role needs no password`, cfg.PasswordFile)
	}
	cfg.Password = configopaque.String(password)
	return nil
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

//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/config/configopaque"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/receiver/receivertest"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// newSecret is a password no message could contain by chance.
func newSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 12)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return "pw-" + hex.EncodeToString(b)
}

func writePasswordFile(t *testing.T, password string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "password")
	require.NoError(t, os.WriteFile(path, []byte(password+"\n"), 0o600))
	return path
}

// entryText is everything a log entry would print: message, logger name,
// caller, stack and every field, encoded as the collector would.
func entryText(t *testing.T, e observer.LoggedEntry) string {
	t.Helper()
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	buf, err := enc.EncodeEntry(e.Entry, e.Context)
	require.NoError(t, err)
	defer buf.Free()
	return buf.String()
}

// observedReceivers runs a metrics receiver (with the refresh scheduler on)
// and a logs receiver for cfg, logging at debug level into the returned
// observer, until every part has logged a failure matching wantFailure or,
// with wantFailure empty, until the metrics report up = 1. It returns what
// was logged and the errors of Start, Shutdown and of a direct status read.
func observedReceivers(t *testing.T, cfg *Config, wantFailure string) (*observer.ObservedLogs, []error) {
	t.Helper()
	cfg.CollectionInterval = 200 * time.Millisecond
	cfg.InitialDelay = 0
	cfg.Refresh.PollInterval = 200 * time.Millisecond
	core, logs := observer.New(zapcore.DebugLevel)
	set := receivertest.NewNopSettings(metadata.Type)
	set.Logger = zap.New(core)

	var errs []error
	sink := new(consumertest.MetricsSink)
	mr, err := NewFactory().CreateMetrics(t.Context(), set, cfg, sink)
	require.NoError(t, err)
	lr, err := NewFactory().CreateLogs(t.Context(), set, cfg, new(consumertest.LogsSink))
	require.NoError(t, err)
	// Start succeeds whatever the database says: the receiver connects lazily.
	require.NoError(t, mr.Start(t.Context(), nil))
	require.NoError(t, lr.Start(t.Context(), nil))

	if wantFailure == "" {
		require.Eventually(t, func() bool {
			s, ok := lastSnapshot(sink)
			if !ok {
				return false
			}
			up, _ := s.get("pgconsistency.up", "")
			return up == 1
		}, 60*time.Second, 50*time.Millisecond, "pgconsistency.up never became 1")
	} else {
		// Each part that connects must have logged its failure: the scrape
		// controller, the refresh scheduler and the logs receiver.
		for _, msg := range []string{"Error scraping metrics", "pgconsistency scheduler: refresh pass failed", "reading new anomalies for the logs pipeline failed"} {
			require.Eventually(t, func() bool {
				for _, e := range logs.FilterMessageSnippet(msg).All() {
					if strings.Contains(entryText(t, e), wantFailure) {
						return true
					}
				}
				return false
			}, 60*time.Second, 50*time.Millisecond, "no log entry %q mentioning %q", msg, wantFailure)
		}
	}
	errs = append(errs, mr.Shutdown(context.Background()), lr.Shutdown(context.Background()))

	// The same failure as an error value, as a caller of the client sees it.
	run := runConfig(cfg)
	run.Timeout = 10 * time.Second // a slow machine must not turn the failure into a timeout
	require.NoError(t, run.loadPasswordFile())
	c, err := newPgxClient(t.Context(), run)
	require.NoError(t, err)
	_, err = c.status(t.Context())
	c.close()
	if wantFailure != "" {
		require.ErrorContains(t, err, wantFailure)
	}
	errs = append(errs, err)
	return logs, errs
}

// assertSecretNowhere fails if secret appears in any log entry or error.
// (The failure cases first wait for the failures to be logged, so there is
// something to look at.)
func assertSecretNowhere(t *testing.T, secret string, logs *observer.ObservedLogs, errs []error) {
	t.Helper()
	for _, e := range logs.All() {
		text := entryText(t, e)
		assert.NotContains(t, text, secret, "the password is in a log entry")
		assert.NotRegexp(t, `postgres(ql)?://[^\s/]*@|\bpassword\s*=`, text, "a connection string with credentials is in a log entry")
		// configopaque.String hides a password, but only where it is typed so.
		assert.NotContains(t, fmt.Sprintf("%+v", e.ContextMap()), secret, "the password is in a log field")
	}
	for _, err := range errs {
		if err != nil {
			assert.NotContains(t, err.Error(), secret, "the password is in an error")
			assert.NotContains(t, fmt.Sprintf("%+v", err), secret, "the password is in an error")
		}
	}
}

// TestPasswordNeverLogged: whatever goes wrong while connecting (a wrong
// password read from password_file or from an environment variable, a
// database that is down), the password appears in no log entry and no error,
// at debug level, from the scraper, the refresh scheduler or the logs
// receiver. The right password from password_file logs in. Unlike the
// other integration tests it does not run in parallel: t.Setenv forbids it.
func TestPasswordNeverLogged(t *testing.T) {
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	_, err := srv.Conn(t, db).Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)

	t.Run("right password from password_file", func(t *testing.T) {
		cfg := serverConfig(srv, db)
		cfg.Password = ""
		cfg.PasswordFile = writePasswordFile(t, srv.Password)
		require.NoError(t, cfg.Validate())
		logs, errs := observedReceivers(t, cfg, "")
		for _, err := range errs {
			require.NoError(t, err)
		}
		assert.Empty(t, string(cfg.Password), "the collector's configuration never holds the file's password")
		assertSecretNowhere(t, srv.Password, logs, nil)
	})

	t.Run("wrong password from password_file", func(t *testing.T) {
		secret := newSecret(t)
		cfg := serverConfig(srv, db)
		cfg.Password = ""
		cfg.PasswordFile = writePasswordFile(t, secret)
		require.NoError(t, cfg.Validate())
		logs, errs := observedReceivers(t, cfg, "password authentication failed")
		assertSecretNowhere(t, secret, logs, errs)
	})

	t.Run("wrong password from the environment", func(t *testing.T) {
		// What password: ${env:PGCONSISTENCY_TEST_PASSWORD} resolves to.
		secret := newSecret(t)
		t.Setenv("PGCONSISTENCY_TEST_PASSWORD", secret)
		cfg := serverConfig(srv, db)
		cfg.Password = configopaque.String(os.Getenv("PGCONSISTENCY_TEST_PASSWORD"))
		require.NoError(t, cfg.Validate())
		logs, errs := observedReceivers(t, cfg, "password authentication failed")
		assertSecretNowhere(t, secret, logs, errs)
	})

	t.Run("database down", func(t *testing.T) {
		srv.Stop(t)
		for _, source := range []string{"password", "password_file"} {
			t.Run(source, func(t *testing.T) {
				secret := newSecret(t)
				cfg := serverConfig(srv, db)
				cfg.Password = configopaque.String(secret)
				if source == "password_file" {
					cfg.Password = ""
					cfg.PasswordFile = writePasswordFile(t, secret)
				}
				logs, errs := observedReceivers(t, cfg, "connect")
				assertSecretNowhere(t, secret, logs, errs)
			})
		}
	})
}

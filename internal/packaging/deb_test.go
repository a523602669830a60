//go:build e2e

package packaging

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// TestDeb installs the .deb with dpkg, checks its files and its user, runs
// the installed collector as its systemd unit would against a test
// database, then removes and purges the package.
func TestDeb(t *testing.T) {
	deb := artifact(t, packageName+"_%s-1_*.deb")
	needRoot(t, "installing the .deb with dpkg")
	dpkg := needCommand(t, "dpkg", "a Debian machine")
	if out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", packageName).Output(); err == nil &&
		!strings.Contains(string(out), "not-installed") {
		t.Fatalf("%s is already installed here (%s): this test installs and purges it; remove it first: dpkg -P %s",
			packageName, out, packageName)
	}
	_, err := user.Lookup(serviceUser)
	userExisted := err == nil
	t.Cleanup(func() {
		// whatever happened: leave the machine as it was
		_ = exec.Command(dpkg, "-P", packageName).Run()
		if !userExisted {
			_ = exec.Command("userdel", serviceUser).Run()
			_ = exec.Command("groupdel", serviceUser).Run()
		}
	})
	run(t, dpkg, "-i", deb)

	version := changelogVersion(t)
	t.Run("Files", func(t *testing.T) {
		for dst, src := range packagedFiles(t) {
			want, err := os.ReadFile(fixture.Path(src))
			require.NoError(t, err)
			got, err := os.ReadFile(dst)
			if assert.NoError(t, err, "%s (from %s)", dst, src) {
				assert.True(t, bytes.Equal(want, got), "%s differs from %s", dst, src)
			}
		}
		assertMode(t, binPath, 0o755, "root", "root")
		assertMode(t, configPath, 0o644, "root", "root")
		assertMode(t, envFilePath, 0o640, "root", serviceUser)
		conffiles := run(t, "dpkg-query", "-W", "-f=${Conffiles}", packageName)
		assert.Contains(t, conffiles, configPath)
		assert.Contains(t, conffiles, envFilePath)
		assert.Equal(t, version+"-1", strings.TrimSpace(run(t, "dpkg-query", "-W", "-f=${Version}", packageName)))
	})

	t.Run("User", func(t *testing.T) {
		u, err := user.Lookup(serviceUser)
		require.NoError(t, err, "the package's preinstall script creates the user %s", serviceUser)
		uid, _ := strconv.Atoi(u.Uid)
		assert.Less(t, uid, 1000, "a system user")
		passwd := run(t, "getent", "passwd", serviceUser)
		assert.Contains(t, passwd, ":/usr/sbin/nologin", "no login shell")
	})

	t.Run("Version", func(t *testing.T) {
		assert.Equal(t, packageName+" version "+version+"\n", run(t, binPath, "--version"))
	})

	t.Run("UnitVerifies", func(t *testing.T) {
		analyze, err := exec.LookPath("systemd-analyze")
		if err != nil {
			t.Skip("systemd-analyze is not installed (package systemd): the unit file is not verified")
		}
		run(t, analyze, "verify", unitPath)
	})

	t.Run("ServesMetrics", func(t *testing.T) {
		unit := parseUnit(t, unitPath)
		srv := pgtest.Start(t)
		db := srv.CreateDatabase(t, "")
		srv.PsqlFile(t, db, fixture.Path("testdata/legacy/schema.sql"))
		srv.PsqlFile(t, db, fixture.Path("testdata/legacy/fixtures/clean.sql"))
		srv.PsqlFile(t, db, fixture.Path("testdata/legacy/fixtures/dataset_seed_missing.sql"))
		// the SQL as the package installed it: install.sql includes framework/ relative to itself
		srv.PsqlFile(t, db, sqlDir+"/install.sql")
		srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
		srv.PsqlFile(t, db, sqlDir+"/roles.sql")
		role, password := srv.CreateLoginRole(t, db, "otel_pkg_")
		srv.Psql(t, db, "-c", "GRANT pgconsistency_reader TO "+role)

		metrics := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
		// What a user does after installing: fill in the environment file.
		setEnvironment(t, envFilePath, map[string]string{
			"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(srv.Port),
			"PGCONSISTENCY_DB_NAME":             db,
			"PGCONSISTENCY_DB_USER":             role,
			"PGCONSISTENCY_DB_PASSWORD":         password,
			"PGCONSISTENCY_DB_TLS_INSECURE":     "true",
			"PGCONSISTENCY_COLLECTION_INTERVAL": "1s",
			"PGCONSISTENCY_PROMETHEUS_ENDPOINT": metrics,
			"PGCONSISTENCY_HEALTH_ENDPOINT":     "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
			"PGCONSISTENCY_TELEMETRY_PORT":      strconv.Itoa(testkit.FreePort(t)),
		})
		log := startAsUnit(t, unit)

		want := len(fixture.Breakage["dataset_seed_missing"])
		var page string
		ok := assert.Eventually(t, func() bool {
			page = scrape(metrics)
			samples, err := testkit.ParseExposition(page)
			if err != nil {
				return false
			}
			var seedMissing, up bool
			for _, s := range samples {
				switch {
				case s.Labels["postgresql_database_name"] != db:
				case s.Name == "pgconsistency_anomalies" && s.Labels["invariant"] == "dataset_seed_missing":
					seedMissing = s.Value == float64(want)
				case s.Name == "pgconsistency_up":
					up = s.Value == 1
				}
			}
			return seedMissing && up
		}, 60*time.Second, 250*time.Millisecond, "pgconsistency_anomalies{invariant=\"dataset_seed_missing\"} %d "+
			"and pgconsistency_up 1 of database %s on http://%s/metrics", want, db, metrics)
		if !ok {
			t.Logf("last scrape:\n%s\ncollector log:\n%s", grepPrefix(page, "pgconsistency_"), log.String())
		}
	})

	t.Run("Remove", func(t *testing.T) {
		run(t, dpkg, "-r", packageName)
		for _, p := range []string{binPath, unitPath, sqlDir, exampleDir, docDir, "/usr/share/pgconsistency"} {
			assert.False(t, exists(p), "%s is left after dpkg -r", p)
		}
		// dpkg -r keeps the configuration (an edited one above all)
		assert.True(t, exists(configPath), "%s is removed by dpkg -r: it is a conffile", configPath)
		assert.True(t, exists(envFilePath), "%s is removed by dpkg -r: it is a conffile", envFilePath)

		run(t, dpkg, "-P", packageName)
		for _, p := range []string{configDir, "/var/lib/otelcol-pgconsistency"} {
			assert.False(t, exists(p), "%s is left after dpkg -P", p)
		}
		out, _ := exec.Command("dpkg-query", "-W", "-f=${Status}", packageName).CombinedOutput()
		assert.NotContains(t, string(out), "installed", "dpkg still knows %s: %s", packageName, out)
		// kept on purpose (docs/install.md): files it wrote may remain
		_, err := user.Lookup(serviceUser)
		assert.NoError(t, err, "the user %s is kept on purge, as docs/install.md says", serviceUser)
	})
}

func assertMode(t *testing.T, path string, mode os.FileMode, owner, group string) {
	t.Helper()
	fi, err := os.Stat(path)
	if !assert.NoError(t, err) {
		return
	}
	assert.Equal(t, mode, fi.Mode().Perm(), "mode of %s", path)
	st := fi.Sys().(*syscall.Stat_t)
	u, err := user.LookupId(strconv.Itoa(int(st.Uid)))
	if assert.NoError(t, err) {
		assert.Equal(t, owner, u.Username, "owner of %s", path)
	}
	g, err := user.LookupGroupId(strconv.Itoa(int(st.Gid)))
	if assert.NoError(t, err) {
		assert.Equal(t, group, g.Name, "group of %s", path)
	}
}

// unit is what the test takes from the [Service] section of a unit file.
type unit struct {
	execStart       []string
	user, group     string
	environmentFile string
}

// unitKeys are the [Service] keys the packaged unit may use: those
// startAsUnit honours, and those that only restrict or restart the service,
// which a single run of the binary does not need. Any other key fails the
// test: teach startAsUnit what it means first.
var unitKeys = map[string]bool{
	"ExecStart": true, "User": true, "Group": true, "EnvironmentFile": true,
	"Type": false, "Restart": false, "RestartSec": false, "KillMode": false, "TimeoutStopSec": false,
	"StateDirectory": false, "NoNewPrivileges": false, "ProtectSystem": false, "ProtectHome": false,
	"PrivateTmp": false, "PrivateDevices": false, "ProtectKernelTunables": false,
	"ProtectKernelModules": false, "ProtectControlGroups": false, "RestrictSUIDSGID": false,
	"LockPersonality": false,
}

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var u unit
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if strings.HasPrefix(line, "[") {
			section = line
			continue
		}
		if section != "[Service]" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		require.True(t, ok, "%s: %q", path, line)
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		_, known := unitKeys[k]
		require.True(t, known, "%s: [Service] %s: the test does not emulate it; add it to unitKeys (and to startAsUnit if it changes how the binary starts)", path, k)
		switch k {
		case "ExecStart":
			require.NotContains(t, v, "$", "%s: ExecStart with variables: teach startAsUnit to expand them", path)
			require.NotContains(t, v, `"`, "%s: ExecStart with quotes: teach startAsUnit to split them", path)
			u.execStart = strings.Fields(v)
		case "User":
			u.user = v
		case "Group":
			u.group = v
		case "EnvironmentFile":
			require.False(t, strings.HasPrefix(v, "-"), "%s: the environment file must be required, not optional", path)
			u.environmentFile = v
		}
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, u.execStart, "%s: no ExecStart", path)
	require.True(t, filepath.IsAbs(u.execStart[0]), "%s: ExecStart must start with an absolute path", path)
	require.Equal(t, serviceUser, u.user, "%s: User", path)
	require.Equal(t, envFilePath, u.environmentFile, "%s: EnvironmentFile", path)
	return u
}

// setEnvironment sets variables in an environment file, in place, keeping
// its comments: what a user does with an editor.
func setEnvironment(t *testing.T, path string, values map[string]string) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	lines := strings.Split(string(b), "\n")
	for k, v := range values {
		found := false
		for i, line := range lines {
			if strings.HasPrefix(line, k+"=") {
				lines[i], found = k+"="+v, true
			}
		}
		require.True(t, found, "%s has no line %s=", path, k)
	}
	// WriteFile keeps the mode and owner of an existing file
	require.NoError(t, os.WriteFile(path, []byte(strings.Join(lines, "\n")), 0o640))
}

// syncBuffer is a bytes.Buffer safe for a process to write while the test
// reads it.
type syncBuffer struct {
	mu  chan struct{}
	buf bytes.Buffer
}

func newSyncBuffer() *syncBuffer { return &syncBuffer{mu: make(chan struct{}, 1)} }

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu <- struct{}{}
	defer func() { <-b.mu }()
	return b.buf.String()
}

// startAsUnit starts the unit's ExecStart as systemd would: as its User and
// Group (no supplementary groups), in /, with the environment systemd gives
// a system service (PATH, and HOME, USER, LOGNAME, SHELL of User=) plus the
// EnvironmentFile's variables. It stops the process at cleanup and returns
// its output.
func startAsUnit(t *testing.T, u unit) *syncBuffer {
	t.Helper()
	account, err := user.Lookup(u.user)
	require.NoError(t, err)
	group := account.Gid
	if u.group != "" {
		g, err := user.LookupGroup(u.group)
		require.NoError(t, err)
		group = g.Gid
	}
	uid, _ := strconv.ParseUint(account.Uid, 10, 32)
	gid, _ := strconv.ParseUint(group, 10, 32)
	shell := strings.TrimSpace(run(t, "getent", "passwd", u.user))
	shell = shell[strings.LastIndex(shell, ":")+1:]
	env := []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + account.HomeDir, "USER=" + u.user, "LOGNAME=" + u.user, "SHELL=" + shell,
	}
	fileEnv, err := parseEnvironmentFile(u.environmentFile)
	require.NoError(t, err)
	env = append(env, fileEnv...)

	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, u.execStart[0], u.execStart[1:]...)
	cmd.Env = env
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}}
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	out := newSyncBuffer()
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start(), "starting %s as %s", strings.Join(u.execStart, " "), u.user)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cancel()
		if err := <-exited; err != nil {
			t.Logf("the collector stopped: %v", err)
		}
	})
	// an immediate exit (bad configuration, unreadable file) is the likely failure
	select {
	case err := <-exited:
		exited <- err
		t.Fatalf("%s exited at start: %v\n%s", strings.Join(u.execStart, " "), err, out.String())
	case <-time.After(time.Second):
	}
	return out
}

func scrape(endpoint string) string {
	client := http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + endpoint + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepPrefix(page, prefix string) string {
	var out []string
	for _, l := range strings.Split(page, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

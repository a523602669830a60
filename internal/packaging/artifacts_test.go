//go:build e2e

package packaging

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
)

// Where the packages put things; docs/install.md must name each path.
const (
	binPath     = "/usr/bin/otelcol-pgconsistency"
	unitPath    = "/lib/systemd/system/otelcol-pgconsistency.service"
	configDir   = "/etc/otelcol-pgconsistency"
	configPath  = configDir + "/config.yaml"
	envFilePath = configDir + "/otelcol-pgconsistency.env"
	sqlDir      = "/usr/share/pgconsistency/sql"
	exampleDir  = "/usr/share/pgconsistency/config"
	docDir      = "/usr/share/doc/otelcol-pgconsistency"
	grafanaDir  = "/usr/share/pgconsistency/grafana"
	serviceUser = "pgconsistency"
	packageName = "otelcol-pgconsistency"
	// the image's non-root user, as in scripts/image.sh
	imageUser = "10001:10001"
)

// packagedFiles are the files of the .deb and the .rpm, read from the
// repository: each destination with its source. The SQL is every .sql file
// of sql/ and sql/framework/, so a new pack is shipped or this fails.
func packagedFiles(t *testing.T) map[string]string {
	t.Helper()
	files := map[string]string{
		binPath:                               "_build/otelcol-pgconsistency",
		unitPath:                              "packaging/otelcol-pgconsistency.service",
		configPath:                            "config/collector-prometheus.yaml",
		envFilePath:                           "packaging/otelcol-pgconsistency.env",
		exampleDir + "/prometheus-rules.yaml": "config/prometheus-rules.yaml",
		exampleDir + "/alertmanager.yml":      "config/alertmanager.yml",
		docDir + "/install.md":                "docs/install.md",
		docDir + "/CHANGELOG.md":              "CHANGELOG.md",
	}
	// The Grafana dashboard and provisioning, every file of config/grafana/.
	require.NoError(t, filepath.WalkDir(fixture.Path("config/grafana"), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(fixture.Path("config/grafana"), path)
		if err != nil {
			return err
		}
		files[grafanaDir+"/"+filepath.ToSlash(rel)] = filepath.ToSlash(filepath.Join("config/grafana", rel))
		return nil
	}))
	for _, pattern := range []string{"sql/*.sql", "sql/framework/*.sql", "config/collector-*.yaml"} {
		matches, err := filepath.Glob(fixture.Path(pattern))
		require.NoError(t, err)
		require.NotEmpty(t, matches, pattern)
		for _, m := range matches {
			rel, err := filepath.Rel(fixture.Root(), m)
			require.NoError(t, err)
			dst := sqlDir + strings.TrimPrefix(rel, "sql")
			if strings.HasPrefix(rel, "config/") {
				dst = exampleDir + "/" + filepath.Base(rel)
			}
			files[dst] = rel
		}
	}
	return files
}

// changelogVersion is the version of the top release heading of
// CHANGELOG.md ("## [0.5.0] - 2026-12-03"), read as the Makefile reads it.
func changelogVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(fixture.Path("CHANGELOG.md"))
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^## \[(\d+\.\d+\.\d+[^\]]*)\]`).FindSubmatch(b)
	require.NotNil(t, m, "CHANGELOG.md has no release heading \"## [x.y.z] - date\"")
	return string(m[1])
}

// artifact is the one file of _build/dist matching pattern (a glob, where
// %s stands for the version).
func artifact(t *testing.T, pattern string) string {
	t.Helper()
	glob := fixture.Path(filepath.Join("_build/dist", strings.ReplaceAll(pattern, "%s", changelogVersion(t))))
	matches, err := filepath.Glob(glob)
	require.NoError(t, err)
	require.Len(t, matches, 1, "%s: expected one file; run `make package` (make test does)", glob)
	return matches[0]
}

// needRoot skips the test when not root, with the reason, except in CI
// (CI=true), where it fails: CI must run everything.
func needRoot(t *testing.T, what string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	msg := what + " needs root: run `make test` (or `make test-package`) as root"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + " (CI=true: not skipped)")
	}
	t.Skip(msg)
}

// needCommand returns the path of a command, failing in CI and skipping
// elsewhere when it is not installed.
func needCommand(t *testing.T, name, install string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err == nil {
		return path
	}
	msg := fmt.Sprintf("%s is not installed (%s)", name, install)
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + " (CI=true: not skipped)")
	}
	t.Skip(msg)
	return ""
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.CommandContext(t.Context(), name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s:\n%s", name, strings.Join(args, " "), out)
	return string(out)
}

// TestInstallDocNamesThePaths: docs/install.md says where each packaged
// file goes.
func TestInstallDocNamesThePaths(t *testing.T) {
	b, err := os.ReadFile(fixture.Path("docs/install.md"))
	require.NoError(t, err)
	for _, p := range []string{binPath, unitPath, configPath, envFilePath, sqlDir, exampleDir, docDir,
		sqlDir + "/install.sql", sqlDir + "/roles.sql", sqlDir + "/pg_cron.sql"} {
		require.Contains(t, string(b), p, "docs/install.md does not name %s", p)
	}
}

// TestEnvironmentFile: the packaged environment file sets every variable
// the packaged configuration reads, and only those.
func TestEnvironmentFile(t *testing.T) {
	config, err := os.ReadFile(fixture.Path("config/collector-prometheus.yaml"))
	require.NoError(t, err)
	var used []string
	for _, m := range regexp.MustCompile(`\$\{env:([A-Za-z_][A-Za-z0-9_]*)`).FindAllStringSubmatch(string(config), -1) {
		if !slices.Contains(used, m[1]) {
			used = append(used, m[1])
		}
	}
	env, err := parseEnvironmentFile(fixture.Path("packaging/otelcol-pgconsistency.env"))
	require.NoError(t, err)
	var set []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		set = append(set, k)
	}
	slices.Sort(used)
	slices.Sort(set)
	require.Equal(t, used, set, "packaging/otelcol-pgconsistency.env must set (and document) exactly the "+
		"variables config/collector-prometheus.yaml reads")
}

// parseEnvironmentFile reads a systemd EnvironmentFile: NAME=value lines,
// # and ; comments, blank lines, a value optionally in matching quotes.
func parseEnvironmentFile(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var env []string
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || !regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`).MatchString(strings.TrimSpace(k)) {
			return nil, fmt.Errorf("%s:%d: not NAME=value: %q", path, i+1, line)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		env = append(env, strings.TrimSpace(k)+"="+v)
	}
	return env, nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

// TestChecksumsAndSBOM: sha256sums.txt covers every artifact and matches;
// the SBOM is SPDX naming the collector's modules.
func TestChecksumsAndSBOM(t *testing.T) {
	sums := artifact(t, "sha256sums.txt")
	dir := filepath.Dir(sums)
	check := exec.CommandContext(t.Context(), "sha256sum", "--check", "--strict", filepath.Base(sums))
	check.Dir = dir
	b, err := check.CombinedOutput()
	require.NoError(t, err, "sha256sum --check in %s:\n%s", dir, b)
	out := string(b)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		if e.Name() != "sha256sums.txt" {
			assert.Contains(t, out, e.Name()+": OK", "sha256sums.txt must cover %s", e.Name())
		}
	}

	var sbom struct {
		SPDXVersion string `json:"spdxVersion"`
		Packages    []struct {
			Name        string `json:"name"`
			VersionInfo string `json:"versionInfo"`
		} `json:"packages"`
	}
	readJSON(t, artifact(t, packageName+"_%s_linux_*.spdx.json"), &sbom)
	assert.True(t, strings.HasPrefix(sbom.SPDXVersion, "SPDX-2."), "spdxVersion %q", sbom.SPDXVersion)
	var names []string
	for _, p := range sbom.Packages {
		names = append(names, p.Name+"@"+p.VersionInfo)
	}
	assert.Contains(t, names, "go.opentelemetry.io/collector/otelcol@v0.165.0", "the SBOM lists the collector's modules")
	assert.Contains(t, names, "github.com/jackc/pgx/v5@"+pgxVersion(t))
}

// pgxVersion is the pgx version go.mod requires: the receiver's driver, in
// the binary and so in the SBOM.
func pgxVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(fixture.Path("go.mod"))
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^\s*github\.com/jackc/pgx/v5 (v\S+)`).FindSubmatch(b)
	require.NotNil(t, m, "go.mod requires no github.com/jackc/pgx/v5")
	return string(m[1])
}

//go:build e2e

package packaging

import (
	"archive/tar"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// TestImage unpacks the OCI image's layers into a directory, checks its
// configuration and files, and runs its binary from there: in a chroot as
// the image's user when root, directly otherwise.
func TestImage(t *testing.T) {
	archive := artifact(t, packageName+"_%s_linux_*.oci.tar")
	version := changelogVersion(t)
	layout := t.TempDir()
	f, err := os.Open(archive)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, untar(tar.NewReader(f), layout), archive)

	var index struct {
		Manifests []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"manifests"`
	}
	readJSON(t, filepath.Join(layout, "index.json"), &index)
	require.Len(t, index.Manifests, 1, "one image in the layout")
	require.Equal(t, "application/vnd.oci.image.manifest.v1+json", index.Manifests[0].MediaType)
	var manifest struct {
		Config struct {
			Digest string `json:"digest"`
		} `json:"config"`
		Layers []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"layers"`
	}
	readJSON(t, blob(layout, index.Manifests[0].Digest), &manifest)
	var config struct {
		OS           string `json:"os"`
		Architecture string `json:"architecture"`
		Config       struct {
			User       string            `json:"User"`
			Entrypoint []string          `json:"Entrypoint"`
			Cmd        []string          `json:"Cmd"`
			Env        []string          `json:"Env"`
			Labels     map[string]string `json:"Labels"`
		} `json:"config"`
	}
	readJSON(t, blob(layout, manifest.Config.Digest), &config)

	t.Run("Config", func(t *testing.T) {
		assert.Equal(t, "linux", config.OS)
		assert.Equal(t, imageUser, config.Config.User, "a non-root user")
		assert.NotContains(t, []string{"", "0", "root", "0:0"}, config.Config.User)
		assert.Equal(t, []string{binPath}, config.Config.Entrypoint)
		assert.Equal(t, []string{"--config=" + configPath}, config.Config.Cmd)
		assert.Contains(t, config.Config.Env, "PGCONSISTENCY_PROMETHEUS_ENDPOINT=0.0.0.0:9464",
			"the exporter must listen beyond the container's loopback")
		assert.Equal(t, version, config.Config.Labels["org.opencontainers.image.version"])
	})

	rootfs := t.TempDir()
	for _, l := range manifest.Layers {
		require.Equal(t, "application/vnd.oci.image.layer.v1.tar+gzip", l.MediaType)
		unpackLayer(t, blob(layout, l.Digest), rootfs)
	}

	t.Run("Files", func(t *testing.T) {
		files := map[string]string{binPath: "_build/otelcol-pgconsistency", configPath: "config/collector-prometheus.yaml"}
		for dst, src := range packagedFiles(t) {
			if strings.HasPrefix(dst, sqlDir) || strings.HasPrefix(dst, grafanaDir) {
				files[dst] = src
			}
		}
		// Debian's CA bundle, which the receiver verifies the database against.
		bundle, err := os.ReadFile(filepath.Join(rootfs, caBundle))
		if assert.NoError(t, err, "%s in the image", caBundle) {
			assert.Greater(t, strings.Count(string(bundle), "BEGIN CERTIFICATE"), 100, "%s holds Debian's CA certificates", caBundle)
		}
		for dst, src := range files {
			want, err := os.ReadFile(fixture.Path(src))
			require.NoError(t, err)
			got, err := os.ReadFile(filepath.Join(rootfs, dst))
			if assert.NoError(t, err, "%s (from %s) in the image", dst, src) {
				assert.Equal(t, len(want), len(got), "%s differs from %s", dst, src)
				assert.True(t, string(want) == string(got), "%s differs from %s", dst, src)
			}
		}
		passwd, err := os.ReadFile(filepath.Join(rootfs, "etc/passwd"))
		require.NoError(t, err)
		uid, gid, _ := strings.Cut(imageUser, ":")
		assert.Contains(t, string(passwd), "pgconsistency:x:"+uid+":"+gid+":", "/etc/passwd names the image's user")
	})

	t.Run("Runs", func(t *testing.T) {
		var cmd *exec.Cmd
		if os.Geteuid() == 0 {
			// as the container would run it: / is the image, the user is the image's
			cmd = exec.Command("chroot", "--userspec="+config.Config.User, rootfs, binPath, "--version")
		} else {
			t.Log("not root: running the image's binary directly, not in a chroot")
			cmd = exec.Command(filepath.Join(rootfs, binPath), "--version")
		}
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s:\n%s", cmd, out)
		assert.Equal(t, packageName+" version "+version+"\n", string(out))

		if os.Geteuid() == 0 {
			// the image's default command, with its default configuration, up to the start
			args := append([]string{"--userspec=" + config.Config.User, rootfs}, config.Config.Entrypoint...)
			args = append(args, "validate")
			args = append(args, config.Config.Cmd...)
			cmd := exec.Command("chroot", args...)
			cmd.Env = config.Config.Env
			out, err := cmd.CombinedOutput()
			assert.NoError(t, err, "%s:\n%s", cmd, out)
		}
	})
}

// caBundle is where the image keeps its CA certificates (Go's first place
// to look on Linux).
const caBundle = "/etc/ssl/certs/ca-certificates.crt"

// TestImageVerifiesTLS runs the image's binary with its default
// configuration, in a chroot as the image's user, against a PostgreSQL with
// a certificate of a test CA: with the image's trust store (Debian's
// bundle) the server is not trusted and nothing is read; with SSL_CERT_FILE
// pointing at the test CA the gauges are exact.
func TestImageVerifiesTLS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to chroot into the image as its user")
	}
	rootfs := unpackImage(t)
	ca := pgtest.NewTestCA(t, "pgconsistency image test CA")
	cert, key := ca.IssueServerCert(t, "IP:127.0.0.1")
	srv := pgtest.Start(t, pgtest.WithTLS(cert, key))
	db := fixture.NewDatabase(t, srv, "dataset_seed_missing")
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	// The test CA, where the image's user can read it.
	caInImage := "/tmp/test-ca.pem"
	b, err := os.ReadFile(ca.CertFile)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(rootfs, caInImage), b, 0o644))

	run := func(t *testing.T, extraEnv ...string) (metrics string, log *strings.Builder) {
		metrics = "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
		cmd := exec.Command("chroot", "--userspec="+imageUser, rootfs, binPath, "--config="+configPath)
		cmd.Env = append([]string{
			"PGCONSISTENCY_DB_ENDPOINT=127.0.0.1:" + strconv.Itoa(srv.Port),
			"PGCONSISTENCY_DB_USER=" + srv.User,
			"PGCONSISTENCY_DB_PASSWORD=" + srv.Password,
			"PGCONSISTENCY_DB_NAME=" + db,
			"PGCONSISTENCY_COLLECTION_INTERVAL=1s",
			"PGCONSISTENCY_PROMETHEUS_ENDPOINT=" + metrics,
			"PGCONSISTENCY_HEALTH_ENDPOINT=127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
			"PGCONSISTENCY_TELEMETRY_PORT=" + strconv.Itoa(testkit.FreePort(t)),
		}, extraEnv...)
		log = &strings.Builder{}
		cmd.Stdout, cmd.Stderr = log, log
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		return metrics, log
	}
	up := regexp.MustCompile(`(?m)^pgconsistency_up\{[^}]*\} (\S+)$`)
	seed := regexp.MustCompile(`(?m)^pgconsistency_anomalies\{[^}]*invariant="dataset_seed_missing"[^}]*\} (\S+)$`)

	t.Run("the image's trust store: not trusted", func(t *testing.T) {
		metrics, log := run(t)
		require.Eventually(t, func() bool { return strings.Contains(log.String(), "unknown authority") }, 60*time.Second, 200*time.Millisecond,
			"the collector says the server's CA is unknown")
		assert.Contains(t, log.String(), "tls::ca_file")
		m := up.FindStringSubmatch(scrape(metrics))
		if m != nil {
			assert.Equal(t, "0", m[1], "pgconsistency_up")
		}
	})
	t.Run("SSL_CERT_FILE: the test CA, exact gauges", func(t *testing.T) {
		metrics, log := run(t, "SSL_CERT_FILE="+caInImage)
		want := strconv.Itoa(len(fixture.Breakage["dataset_seed_missing"]))
		var page string
		ok := assert.Eventually(t, func() bool {
			page = scrape(metrics)
			u, s := up.FindStringSubmatch(page), seed.FindStringSubmatch(page)
			return u != nil && u[1] == "1" && s != nil && s[1] == want
		}, 60*time.Second, 250*time.Millisecond, "pgconsistency_up 1 and dataset_seed_missing %s over verified TLS", want)
		if !ok {
			t.Logf("last scrape:\n%s\ncollector log:\n%s", grepPrefix(page, "pgconsistency_"), log.String())
		}
	})
}

// unpackImage unpacks the image's layers into a directory and returns it.
func unpackImage(t *testing.T) string {
	t.Helper()
	archive := artifact(t, packageName+"_%s_linux_*.oci.tar")
	layout := t.TempDir()
	f, err := os.Open(archive)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, untar(tar.NewReader(f), layout), archive)
	var index struct {
		Manifests []struct {
			Digest string `json:"digest"`
		} `json:"manifests"`
	}
	readJSON(t, filepath.Join(layout, "index.json"), &index)
	require.Len(t, index.Manifests, 1)
	var manifest struct {
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	readJSON(t, blob(layout, index.Manifests[0].Digest), &manifest)
	rootfs := t.TempDir()
	require.NoError(t, os.Chmod(rootfs, 0o755))
	for _, l := range manifest.Layers {
		unpackLayer(t, blob(layout, l.Digest), rootfs)
	}
	return rootfs
}

func blob(layout, digest string) string {
	algo, hex, _ := strings.Cut(digest, ":")
	return filepath.Join(layout, "blobs", algo, hex)
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, v), path)
}

func unpackLayer(t *testing.T, path, dir string) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	gz, err := gzip.NewReader(f)
	require.NoError(t, err)
	require.NoError(t, untar(tar.NewReader(gz), dir), path)
}

// untar writes a tar stream's directories, regular files and symlinks under
// dir, refusing names that leave it and whiteouts (the image has none).
func untar(r *tar.Reader, dir string) error {
	for {
		h, err := r.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Clean(h.Name)
		if !filepath.IsLocal(name) {
			if name == "." {
				continue
			}
			return fmt.Errorf("%s: a name outside the directory", h.Name)
		}
		if strings.HasPrefix(filepath.Base(name), ".wh.") {
			return fmt.Errorf("%s: a whiteout, not expected in this image", h.Name)
		}
		path := filepath.Join(dir, name)
		mode := h.FileInfo().Mode() & (os.ModePerm | os.ModeSticky)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(path, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(path, mode); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return err
			}
			out, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
			if err != nil {
				return err
			}
			if _, err := io.Copy(out, r); err != nil {
				out.Close()
				return err
			}
			if err := out.Close(); err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, path); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: tar entry type %q not expected in this image", h.Name, h.Typeflag)
		}
	}
}

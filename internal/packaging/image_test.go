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
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
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
			if strings.HasPrefix(dst, sqlDir) {
				files[dst] = src
			}
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

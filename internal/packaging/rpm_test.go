//go:build e2e

package packaging

import (
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestRPM lists the .rpm's files, configuration files, version and scripts
// with rpm (make test installs it).
func TestRPM(t *testing.T) {
	pkg := artifact(t, packageName+"-%s-1.*.rpm")
	rpm := needCommand(t, "rpm", "make test installs it on Debian: apt-get install rpm")
	version := changelogVersion(t)

	files := strings.Fields(run(t, rpm, "-qlp", pkg))
	for dst := range packagedFiles(t) {
		assert.Contains(t, files, dst, "rpm -qlp %s", pkg)
	}
	for _, f := range files {
		_, known := packagedFiles(t)[f]
		if !known && !slices.ContainsFunc(files, func(g string) bool { return strings.HasPrefix(g, f+"/") }) {
			t.Errorf("rpm -qlp lists %s, which is not one of the packaged files", f)
		}
	}
	configs := strings.Fields(run(t, rpm, "-qcp", pkg))
	assert.ElementsMatch(t, []string{configPath, envFilePath}, configs, "rpm -qcp: the configuration files")
	assert.Equal(t, version, run(t, rpm, "-qp", "--queryformat", "%{VERSION}", pkg))
	scripts := run(t, rpm, "-qp", "--scripts", pkg)
	assert.Contains(t, scripts, "useradd --system", "the preinstall script creates the service user")
	perms := run(t, rpm, "-qp", "--queryformat", "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]", pkg)
	assert.Contains(t, perms, "-rw-r----- root:pgconsistency "+envFilePath)
	assert.Contains(t, perms, "-rwxr-xr-x root:root "+binPath)
}

// Package packaging tests the release artifacts that `make package` writes to
// _build/dist (docs/install.md): the .deb installed with dpkg and its
// collector started as the systemd unit starts it, the OCI image's binary run
// from its unpacked layers, and the .rpm's file list. It holds no code but
// its tests; `make test` and `make test-package` build the artifacts first.
package packaging

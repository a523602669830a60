//go:build tools

// Package tools pins the versions of code generators used by this repository.
// mdatagen v0.155.0 is the newest served here and has no version list, so it is
// built from this separate module (see Makefile target `mdatagen`).
package tools

import (
	_ "go.opentelemetry.io/collector/cmd/mdatagen"
)

//go:build tools

// Package tools pins the versions of code generators used by this repository.
// mdatagen (v0.159.0, the newest whose dependencies are all served here) has
// no version list, so it is built from this separate module (see the Makefile's
// $(MDATAGEN) target).
package tools

import (
	_ "go.opentelemetry.io/collector/cmd/mdatagen"
)

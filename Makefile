# pgconsistency — see README.md.
#   make run        the demo: throwaway PostgreSQL with demo data, the collector, Prometheus
#   make test       every test and check (installs what is missing on Debian, as root)
#   make test-unit  the Go tests that need no PostgreSQL (go test ./..., no tags): seconds, warm cache
#   make test-sql   the SQL tests (internal/sqltest, tag integration)
#   make test-integration  the receiver and test helpers against real servers (tag integration)
#   make test-e2e   the built collector, Prometheus, the packages (tag e2e)
#   make build      the collector distribution: _build/otelcol-pgconsistency
#   make package    the release artifacts in _build/dist: .deb, .rpm, OCI image, SBOM, checksums (docs/install.md)
#   make test-package  make package, then its tests (internal/packaging; as root)
#   make bench      the benchmark of BENCHMARKS.md (SCALE=100000,1000000 datasets), then the mass incident
#   make soak       the collector under load (1,000 invariants; 20 databases) and a 10-minute soak
#   make generate   regenerate the receiver's mdatagen code from metadata.yaml
#   make lint       golangci-lint (.golangci.yml) on the Go code, squawk (.squawk.toml) on sql/
#   make check-generate  fail if the mdatagen code is not what metadata.yaml generates

GO        ?= go
# The pinned tools (builder, mdatagen, golangci-lint, squawk, nfpm, crane,
# syft), one file per version, are kept outside the clone so that a fresh
# clone on a machine that built them before does not build them again
# (syft alone takes minutes). Override with TOOLS=dir.
TOOLS     ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/pgconsistency/tools
BUILDER_VERSION := v0.165.0
BUILDER   := $(TOOLS)/builder-$(BUILDER_VERSION)
# the version pinned by internal/tools/go.mod
MDATAGEN_VERSION := $(shell sed -n 's/^require go.opentelemetry.io\/collector\/cmd\/mdatagen \(v[^ ]*\)$$/\1/p' internal/tools/go.mod)
MDATAGEN  := $(TOOLS)/mdatagen-$(MDATAGEN_VERSION)
GOLANGCI_LINT_VERSION := v2.15.0
GOLANGCI_LINT := $(TOOLS)/golangci-lint-$(GOLANGCI_LINT_VERSION)
SQUAWK_VERSION := 2.66.0
SQUAWK    := $(TOOLS)/squawk-$(SQUAWK_VERSION)/node_modules/.bin/squawk
NFPM_VERSION  := v2.45.2
NFPM      := $(TOOLS)/nfpm-$(NFPM_VERSION)
CRANE_VERSION := v0.22.1
CRANE     := $(TOOLS)/crane-$(CRANE_VERSION)
SYFT_VERSION  := v1.57.1
SYFT      := $(TOOLS)/syft-$(SYFT_VERSION)
RECEIVER  := receiver/pgconsistencyreceiver
COLLECTOR := _build/otelcol-pgconsistency
# The release version, from one place: the top release heading of CHANGELOG.md
# ("## [0.5.0] - 2026-12-03"; an [Unreleased] heading is not one). The
# collector's --version, pgconsistency.version() (checked by internal/sqltest/upgrade_test.go)
# and the packages all say it.
VERSION   := $(shell sed -n 's/^\#\# \[\([0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*[^]]*\)\].*/\1/p' CHANGELOG.md | head -n 1)
# _build/VERSION is rewritten only when the version changes, so a CHANGELOG
# edit that keeps the version rebuilds nothing.
VERSION_FILE := _build/VERSION
# builder-config.yaml with dist.version set to $(VERSION)
BUILDER_CONFIG := _build/builder-config.yaml
# what the distribution is built from: rebuilt when one of these changes
COLLECTOR_SOURCES := $(BUILDER_CONFIG) go.mod go.sum $(shell find receiver internal/walstream -name '*.go' -not -name '*_test.go')

.PHONY: all run test test-unit test-sql test-integration test-e2e build version package test-package deps check-fmt vet lint check-generate check-alerting fuzz generate bench soak

all: test

deps:
	@scripts/install-deps.sh

run: deps build
	@scripts/demo.sh

check-fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './_build/*')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

# Untagged (what make test-unit compiles), then with every tier's tag.
vet:
	$(GO) vet ./...
	$(GO) vet -tags $(TEST_TAGS) ./...

# Go: golangci-lint with .golangci.yml (generated code excluded; it sets
# the build tags, so the integration and e2e tests are linted too). SQL:
# squawk on sql/**/*.sql through scripts/lint-sql.sh, rules in .squawk.toml.
lint: $(GOLANGCI_LINT) $(SQUAWK)
	$(GOLANGCI_LINT) run ./...
	SQUAWK=$(SQUAWK) scripts/lint-sql.sh

$(GOLANGCI_LINT):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(TOOLS)/golangci-lint $(GOLANGCI_LINT)

# squawk-cli ships its binary in a per-platform npm package.
$(SQUAWK):
	npm install --prefix $(TOOLS)/squawk-$(SQUAWK_VERSION) --no-save --no-package-lock --no-audit --no-fund squawk-cli@$(SQUAWK_VERSION)

# The test tiers (CONTRIBUTING.md says when to run which). Tests that need
# PostgreSQL, a built binary or Prometheus are behind a build tag:
# integration (the SQL tests, the receiver's database tests, internal/pgtest,
# internal/fixture, internal/bench) or e2e (internal/e2e, internal/packaging,
# internal/soak). Each test binary starts its own PostgreSQL clusters; -p 2:
# two cores.
TEST_TAGS := integration,e2e
SQL_PKGS  := ./internal/sqltest/
E2E_PKGS  := ./internal/e2e/ ./internal/packaging/ ./internal/soak/
# every package but the SQL tests (the unit tests of these run again: seconds)
INTEGRATION_PKGS = $(shell $(GO) list -tags integration ./... | grep -v '/internal/sqltest$$')

# No PostgreSQL, no tags, nothing installed: config, factory, metric
# building against golden files, log record bodies, the loops against fakes,
# the Grafana files, the test helpers.
test-unit:
	$(GO) test -count=1 ./...

test-sql: deps
	$(GO) test -count=1 -tags integration -timeout 30m $(SQL_PKGS)

test-integration: deps
	$(GO) test -count=1 -p 2 -tags integration -timeout 30m $(INTEGRATION_PKGS)

# internal/packaging installs the .deb: as root.
test-e2e: deps build package
	$(GO) test -count=1 -p 2 -tags e2e -timeout 30m $(E2E_PKGS)

# Every check and every tier: one go test with both tags runs the unit, SQL,
# integration and e2e tests together (two packages at a time, as the tiers
# one by one would not, and within a package the tests that have a cluster
# of their own side by side), then the short soak alone, then a short fuzz
# run. The short soak (internal/soak) scrapes every 50 ms with a 45 ms
# timeout and counts the scrapes that succeed: beside the other tests,
# which keep both cores busy, it failed.
SOLO_PKG := internal/soak
test: deps check-fmt vet lint check-generate check-alerting build package
	$(GO) test -count=1 -p 2 -timeout 30m -tags $(TEST_TAGS) $(shell $(GO) list -tags $(TEST_TAGS) ./... | grep -v '/$(SOLO_PKG)$$')
	$(GO) test -count=1 -timeout 10m -tags $(TEST_TAGS) ./$(SOLO_PKG)/
	$(MAKE) fuzz

# A short, bounded run of each fuzz target (names, identifiers, endpoints),
# bounded by a count of runs, not a duration: with -fuzztime 10s, Go 1.26's
# fuzzing coordinator can report its own deadline as a failure with no
# input found (golang/go#75804, fixed in Go 1.27; a clean-clone CI run
# failed so on 2026-12-05, and passed 3 of 3 again alone). 60000 runs take
# 7-10 s here.
FUZZTIME ?= 60000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzSchema$$' -fuzztime $(FUZZTIME) ./receiver/pgconsistencyreceiver/
	$(GO) test -run '^$$' -fuzz '^FuzzEndpoint$$' -fuzztime $(FUZZTIME) ./receiver/pgconsistencyreceiver/

# The benchmark harness (internal/bench): generated data at each SCALE (a
# comma-separated list of dataset counts, multiples of 1000), refresh against
# the scan bound, scrape, prometheus-postgres-exporter, write load, collector.
# Tables on stdout, also written to bench-results.md. About 25 minutes for
# both default scales on 2 cores.
# Then the mass incident (BenchmarkMassIncident) at each INCIDENT_SCALE, on
# the bench schema as is and without its optional unique indexes: the
# refreshes right after half the datasets lost their statistics and a third
# their Seed block, against the clean pack refresh. Then
# BenchmarkIncremental (its own data, 1M datasets by default, a server with
# wal_level = logical): the incremental refresh through the changes loop
# (refresh_changes_plan, then what it lists) against a full refresh, WAL
# then trigger capture; the writers, capture off, trigger and wal
# alternated in one run (pgbench of the service's two transaction shapes,
# 1 and 2 clients, the changes loop timed beside them);
# dataset_statistics_missing on a schema that lost dataset_statistics'
# index. About 25 minutes at 1M on 2 cores. Its flags, in
# INCREMENTAL_FLAGS: -incremental.scales, -incremental.changes,
# -incremental.rounds, -incremental.fullruns, -incremental.writes (each
# pgbench run, 5s), -incremental.writerounds (rounds of the four phases,
# 6), -incremental.loop (the changes loop's interval, 1s),
# -incremental.captureonly (beside the writers, the capture alone),
# -incremental.pin (the writers on CPU 0, the capture on CPU 1: its cost
# apart from the CPU it shares), -incremental.lostindex (datasets changed
# on the schema without the index, 100,1000). Their tables are appended to
# bench-results.md.
# Then BenchmarkLatency (1M datasets, WAL capture, the built collector with
# config/collector-logs.yaml under a steady write load): from a committed
# Seed DELETE to the gauge at the collector's endpoint and to its log
# record, 100 breakages, then 100 more while the other invariants
# reconcile; p99 goal 5 s. Flags in LATENCY_FLAGS: -latency.scale,
# -latency.breakages, -latency.tps. About 20 minutes.
# Then BenchmarkRefreshFloor: what an incremental refresh costs beside its
# keys, this tree against a kept release (testdata/sql/<release>) side by
# side. Flags in FLOOR_FLAGS: -floor.scale, -floor.rounds, -floor.keys,
# -floor.previous. About 2 minutes.
SCALE ?= 100000,1000000
INCIDENT_SCALE ?= 200000,1000000
BENCH_FLAGS ?=
INCIDENT_FLAGS ?=
INCREMENTAL_FLAGS ?=
LATENCY_FLAGS ?=
FLOOR_FLAGS ?=
bench: deps build
	@scripts/install-deps.sh bench
	@# the tables go to bench-results.md, then to the terminal; progress and
	@# errors go to stderr as they happen. The exit status is the first
	@# failing go test's; each benchmark runs even if an earlier one failed.
	$(GO) test -tags integration -run '^$$' -bench '^BenchmarkSuite$$' -benchtime 1x -timeout 90m ./internal/bench \
		-args -scales $(SCALE) $(BENCH_FLAGS) > bench-results.md; rc=$$?; \
	$(GO) test -tags integration -run '^$$' -bench '^BenchmarkMassIncident$$' -benchtime 1x -timeout 150m ./internal/bench \
		-args -incident-scales $(INCIDENT_SCALE) $(INCIDENT_FLAGS) >> bench-results.md; rc2=$$?; \
	$(GO) test -tags integration -run '^$$' -bench '^BenchmarkIncremental$$' -benchtime 1x -timeout 120m ./internal/bench \
		-args $(INCREMENTAL_FLAGS) >> bench-results.md; rc3=$$?; \
	$(GO) test -tags integration -run '^$$' -bench '^BenchmarkLatency$$' -benchtime 1x -timeout 60m ./internal/bench \
		-args $(LATENCY_FLAGS) >> bench-results.md; rc4=$$?; \
	$(GO) test -tags integration -run '^$$' -bench '^BenchmarkRefreshFloor$$' -benchtime 1x -timeout 30m ./internal/bench \
		-args $(FLOOR_FLAGS) >> bench-results.md; rc5=$$?; \
	cat bench-results.md; for r in $$rc $$rc2 $$rc3 $$rc4 $$rc5; do if [ $$r -ne 0 ]; then exit $$r; fi; done

# Load and soak of the collector binary (internal/soak): one collector with
# 1,000 invariants and one with 20 receivers for 20 databases (CPU, memory,
# connections, scrape time), then a soak of -soak.duration at -soak.interval
# with a server restart in the middle (stable memory and connection count).
# About 15 minutes with the defaults; e.g. SOAK_FLAGS='-soak.duration 1h'.
SOAK_FLAGS ?=
soak: deps build
	$(GO) test -tags e2e -run '^$$' -bench '^Benchmark(Load|Soak)$$' -benchtime 1x -timeout 60m ./internal/soak -args $(SOAK_FLAGS)

# The alert rules and their unit tests, and the Alertmanager example and
# its routing (by owner, then severity: scripts/test-alert-routes.sh).
check-alerting:
	promtool check rules config/prometheus-rules.yaml
	promtool test rules config/prometheus-rules.test.yaml
	amtool check-config config/alertmanager.yml
	scripts/test-alert-routes.sh

build: $(COLLECTOR)

version:
	@echo $(VERSION)

$(VERSION_FILE): FORCE
	@if [ -z "$(VERSION)" ]; then echo 'CHANGELOG.md has no release heading "## [x.y.z] - date": add one, it is the version of the build'; exit 1; fi
	@mkdir -p $(@D)
	@[ "$$(cat $@ 2>/dev/null)" = "$(VERSION)" ] || echo "$(VERSION)" > $@

$(BUILDER_CONFIG): builder-config.yaml $(VERSION_FILE)
	@mkdir -p $(@D)
	sed 's/^\(  version:\).*/\1 $(VERSION)/' builder-config.yaml > $@
	@grep -q '^  version: $(VERSION)$$' $@ || { echo "builder-config.yaml: no dist.version line (\"  version: ...\") to set to $(VERSION)"; exit 1; }

# CGO_ENABLED=0: a static binary, the same in the packages and in the image
# (which holds nothing else). The builder resolves paths against the working
# directory, so the rendered configuration in _build/ reads as the original.
$(COLLECTOR): $(BUILDER) $(COLLECTOR_SOURCES)
	CGO_ENABLED=0 $(BUILDER) --config $(BUILDER_CONFIG)
	@$(COLLECTOR) components | grep -q 'name: pgconsistency' || { echo "$(COLLECTOR) lacks the pgconsistency receiver"; exit 1; }
	@$(COLLECTOR) --version | grep -qx 'otelcol-pgconsistency version $(VERSION)' || { echo "$(COLLECTOR) --version does not say $(VERSION): $$($(COLLECTOR) --version)"; exit 1; }

FORCE:

# Release artifacts, in _build/dist (docs/install.md), from the binary of
# make build: the .deb and the .rpm (nfpm, packaging/nfpm.yaml), the OCI
# image as an OCI layout in a tar file (crane, scripts/image.sh; no container
# engine, no registry), an SPDX SBOM of the binary's Go modules (syft, read
# from the binary, offline) and sha256sums.txt of them all.
DIST      := _build/dist
ARCH       = $(shell $(GO) env GOARCH)
PACKAGE_MAINTAINER ?= pgconsistency maintainers <maintainers@pgconsistency.invalid>
package: build $(NFPM) $(CRANE) $(SYFT)
	@rm -rf $(DIST) && mkdir -p $(DIST)
	@for p in deb rpm; do \
		VERSION=$(VERSION) ARCH=$(ARCH) MAINTAINER='$(PACKAGE_MAINTAINER)' \
			$(NFPM) package --config packaging/nfpm.yaml --packager $$p --target $(DIST)/ || exit 1; \
	done
	@CRANE=$(CRANE) VERSION=$(VERSION) ARCH=$(ARCH) scripts/image.sh $(DIST)
	@SYFT_CHECK_FOR_APP_UPDATE=false $(SYFT) scan --quiet file:$(COLLECTOR) \
		--source-name otelcol-pgconsistency --source-version $(VERSION) \
		-o spdx-json=$(DIST)/otelcol-pgconsistency_$(VERSION)_linux_$(ARCH).spdx.json
	@cd $(DIST) && sha256sum -- *.deb *.rpm *.oci.tar *.spdx.json > sha256sums.txt
	@ls -l $(DIST)

# The packages installed and run on this machine (internal/packaging): the
# .deb with dpkg (as root), the binary started as its systemd unit would start
# it against a test database, the image's binary run from its unpacked
# layers, rpm -qlp on the .rpm.
test-package: package
	$(GO) test -count=1 -tags e2e -timeout 10m ./internal/packaging

$(NFPM):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/goreleaser/nfpm/v2/cmd/nfpm@$(NFPM_VERSION)
	mv $(TOOLS)/nfpm $(NFPM)

$(CRANE):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/google/go-containerregistry/cmd/crane@$(CRANE_VERSION)
	mv $(TOOLS)/crane $(CRANE)

$(SYFT):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/anchore/syft/cmd/syft@$(SYFT_VERSION)
	mv $(TOOLS)/syft $(SYFT)

$(BUILDER):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install go.opentelemetry.io/collector/cmd/builder@$(BUILDER_VERSION)
	mv $(TOOLS)/builder $(BUILDER)

# mdatagen is not installable with `go install …@version` here (no version
# list is served), so it is built from the pinned tools module, at v0.159.0:
# the newest whose dependencies are all served (v0.161.0 needs an
# internal/schemagen v0.161.0 that is not; v0.160.0 and v0.162.0+ are not).
# Its file is named by that version, not rebuilt when a clone's go.mod is newer.
$(MDATAGEN):
	@if [ -z "$(MDATAGEN_VERSION)" ]; then echo "internal/tools/go.mod: no 'require go.opentelemetry.io/collector/cmd/mdatagen vX.Y.Z' line"; exit 1; fi
	@mkdir -p $(TOOLS)
	cd internal/tools && $(GO) build -o $(MDATAGEN) go.opentelemetry.io/collector/cmd/mdatagen

# What mdatagen writes: internal/metadata/, generated_*_test.go, documentation.md.
generate: $(MDATAGEN)
	cd $(RECEIVER) && $(MDATAGEN) metadata.yaml
	gofmt -w $(RECEIVER)/internal/metadata $(RECEIVER)/generated_*_test.go

# Regenerates in place and fails if that changed anything (a file modified,
# added or restored) against the tree as it was: stale generated code, a hand
# edit of it, or a metadata.yaml change not regenerated. Compares with the working tree,
# not with git, so a regenerated but uncommitted change passes.
check-generate: $(MDATAGEN)
	@before=$$(mktemp -d) && trap 'rm -rf "$$before"' EXIT && \
	cp -R $(RECEIVER)/. "$$before" && \
	$(MAKE) --no-print-directory -s generate && \
	if ! diff -ru "$$before" $(RECEIVER); then \
		echo "check-generate: the mdatagen code in $(RECEIVER) was stale; it is regenerated now: review it (git diff) and commit it"; \
		exit 1; \
	fi

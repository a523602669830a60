# pgconsistency — see README.md.
#   make run        the demo: throwaway PostgreSQL with demo data, the collector, Prometheus
#   make test       every test (installs what is missing on Debian, as root)
#   make build      the collector distribution: _build/otelcol-pgconsistency
#   make bench      the benchmark of BENCHMARKS.md (SCALE=100000,1000000 datasets), then the mass incident
#   make soak       the collector under load (1,000 invariants; 20 databases) and a 10-minute soak
#   make generate   regenerate the receiver's mdatagen code from metadata.yaml
#   make lint       golangci-lint (.golangci.yml) on the Go code, squawk (.squawk.toml) on sql/
#   make check-generate  fail if the mdatagen code is not what metadata.yaml generates

GO        ?= go
TOOLS     := $(CURDIR)/.tools
BUILDER_VERSION := v0.165.0
BUILDER   := $(TOOLS)/builder-$(BUILDER_VERSION)
MDATAGEN  := $(TOOLS)/mdatagen
GOLANGCI_LINT_VERSION := v2.15.0
GOLANGCI_LINT := $(TOOLS)/golangci-lint-$(GOLANGCI_LINT_VERSION)
SQUAWK_VERSION := 2.66.0
SQUAWK    := $(TOOLS)/squawk-$(SQUAWK_VERSION)/node_modules/.bin/squawk
RECEIVER  := receiver/pgconsistencyreceiver
COLLECTOR := _build/otelcol-pgconsistency
# what the distribution is built from: rebuilt when one of these changes
COLLECTOR_SOURCES := builder-config.yaml go.mod go.sum $(shell find receiver -name '*.go' -not -name '*_test.go')

.PHONY: all run test build deps check-fmt vet lint check-generate check-alerting fuzz generate bench soak

all: test

deps:
	@scripts/install-deps.sh

run: deps build
	@scripts/demo.sh

check-fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './_build/*')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# Go: golangci-lint with .golangci.yml (generated code excluded). SQL:
# squawk on sql/**/*.sql through scripts/lint-sql.sh, rules in .squawk.toml.
lint: $(GOLANGCI_LINT) $(SQUAWK)
	$(GOLANGCI_LINT) run ./...
	SQUAWK=$(SQUAWK) scripts/lint-sql.sh

$(GOLANGCI_LINT):
	GOBIN=$(TOOLS) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(TOOLS)/golangci-lint $(GOLANGCI_LINT)

# squawk-cli ships its binary in a per-platform npm package.
$(SQUAWK):
	npm install --prefix $(TOOLS)/squawk-$(SQUAWK_VERSION) --no-save --no-package-lock --no-audit --no-fund squawk-cli@$(SQUAWK_VERSION)

# Every test: unit, SQL and receiver integration against real PostgreSQL
# clusters the tests start, and end to end (internal/e2e) with the built
# collector and a real Prometheus. -p 2: two cores; each SQL, integration or
# e2e test binary runs its own PostgreSQL.
test: deps check-fmt vet lint check-generate check-alerting build
	$(GO) test -count=1 -p 2 -timeout 30m ./...
	$(MAKE) fuzz

# A short, bounded run of each fuzz target (names, identifiers, endpoints).
FUZZTIME ?= 10s
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
# BenchmarkIncremental (its own data, 1M datasets by default): incremental
# against full refresh, and the capture's cost to the writers. Their tables
# are appended to bench-results.md.
SCALE ?= 100000,1000000
INCIDENT_SCALE ?= 200000,1000000
BENCH_FLAGS ?=
INCIDENT_FLAGS ?=
INCREMENTAL_FLAGS ?=
bench: deps build
	@scripts/install-deps.sh bench
	@# the tables go to bench-results.md, then to the terminal; progress and
	@# errors go to stderr as they happen. The exit status is the first
	@# failing go test's; each benchmark runs even if an earlier one failed.
	$(GO) test -run '^$$' -bench '^BenchmarkSuite$$' -benchtime 1x -timeout 90m ./internal/bench \
		-args -scales $(SCALE) $(BENCH_FLAGS) > bench-results.md; rc=$$?; \
	$(GO) test -run '^$$' -bench '^BenchmarkMassIncident$$' -benchtime 1x -timeout 150m ./internal/bench \
		-args -incident-scales $(INCIDENT_SCALE) $(INCIDENT_FLAGS) >> bench-results.md; rc2=$$?; \
	$(GO) test -run '^$$' -bench '^BenchmarkIncremental$$' -benchtime 1x -timeout 90m ./internal/bench \
		-args $(INCREMENTAL_FLAGS) >> bench-results.md; rc3=$$?; \
	cat bench-results.md; for r in $$rc $$rc2 $$rc3; do if [ $$r -ne 0 ]; then exit $$r; fi; done

# Load and soak of the collector binary (internal/soak): one collector with
# 1,000 invariants and one with 20 receivers for 20 databases (CPU, memory,
# connections, scrape time), then a soak of -soak.duration at -soak.interval
# with a server restart in the middle (stable memory and connection count).
# About 15 minutes with the defaults; e.g. SOAK_FLAGS='-soak.duration 1h'.
SOAK_FLAGS ?=
soak: deps build
	$(GO) test -run '^$$' -bench '^Benchmark(Load|Soak)$$' -benchtime 1x -timeout 60m ./internal/soak -args $(SOAK_FLAGS)

# The alert rules and their unit tests, and the Alertmanager example and
# its routing (by owner, then severity: scripts/test-alert-routes.sh).
check-alerting:
	promtool check rules config/prometheus-rules.yaml
	promtool test rules config/prometheus-rules.test.yaml
	amtool check-config config/alertmanager.yml
	scripts/test-alert-routes.sh

build: $(COLLECTOR)

$(COLLECTOR): $(BUILDER) $(COLLECTOR_SOURCES)
	$(BUILDER) --config builder-config.yaml
	@$(COLLECTOR) components | grep -q 'name: pgconsistency' || { echo "$(COLLECTOR) lacks the pgconsistency receiver"; exit 1; }

$(BUILDER):
	GOBIN=$(TOOLS) $(GO) install go.opentelemetry.io/collector/cmd/builder@$(BUILDER_VERSION)
	mv $(TOOLS)/builder $(BUILDER)

# mdatagen is not installable with `go install …@version` here (no version
# list is served), so it is built from the pinned tools module, at v0.159.0:
# the newest whose dependencies are all served (v0.161.0 needs an
# internal/schemagen v0.161.0 that is not; v0.160.0 and v0.162.0+ are not).
$(MDATAGEN): internal/tools/go.mod
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

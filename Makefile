# pgconsistency — see README.md.
#   make test       install what is missing (Debian, as root), then every test
#   make generate   regenerate the receiver's mdatagen code from metadata.yaml

GO      ?= go
TOOLS   := $(CURDIR)/.tools
MDATAGEN := $(TOOLS)/mdatagen
RECEIVER := receiver/pgconsistencyreceiver

.PHONY: all test deps check-fmt vet unit generate check-generated

all: test

deps:
	@scripts/install-deps.sh

check-fmt:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './_build/*')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

# Every test: unit, SQL against real PostgreSQL clusters started by the tests,
# receiver integration. -p 2: this machine class has two cores, and each SQL or
# integration test binary runs its own PostgreSQL.
test: deps check-fmt vet
	$(GO) test -count=1 -p 2 -timeout 20m ./...

# mdatagen v0.155.0 is not installable with `go install …@version` (no version
# list is served), so it is built from the pinned tools module.
$(MDATAGEN): internal/tools/go.mod
	cd internal/tools && $(GO) build -o $(MDATAGEN) go.opentelemetry.io/collector/cmd/mdatagen

generate: $(MDATAGEN)
	cd $(RECEIVER) && $(MDATAGEN) metadata.yaml
	gofmt -w $(RECEIVER)

// Package logdeliveryconverter is a confmap converter of the
// otelcol-pgconsistency distribution that warns, when the collector starts,
// about a logs pipeline fed by a pgconsistency receiver whose components can
// acknowledge records before they are delivered.
//
// The receiver moves its cursor in the database once the pipeline returned
// without error; a component that returns first (a batch processor, an
// exporter's in-memory sending_queue) holds records the cursor is already
// past, and loses them when the collector stops. A receiver cannot see its
// pipeline (component.Host does not show it), but a converter sees the whole
// resolved configuration, so the check is done here. It only warns: the
// configuration is never changed.
package logdeliveryconverter // import "github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/logdeliveryconverter"

import (
	"context"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"

	"go.opentelemetry.io/collector/confmap"
	"go.uber.org/zap"
)

// receiverType is the type of the receiver whose logs pipelines are checked.
const receiverType = "pgconsistency"

// bufferingProcessors acknowledge what they take and send it later.
var bufferingProcessors = map[string]bool{
	"batch":    true,
	"logdedup": true, // contrib: holds records for its interval
}

// queueOffByDefault are the exporter types whose sending_queue is off unless
// configured; every other exporter built on exporterhelper (otlp, otlphttp
// and most of contrib) has an in-memory queue by default.
var queueOffByDefault = map[string]bool{
	"debug": true,
	"nop":   true,
}

// NewFactory returns the converter's factory (the builder's converters:).
func NewFactory() confmap.ConverterFactory {
	return confmap.NewConverterFactory(func(set confmap.ConverterSettings) confmap.Converter {
		return &converter{logger: set.Logger, stderr: os.Stderr}
	})
}

type converter struct {
	logger *zap.Logger
	// stderr takes the warnings when the logger is missing or discards them.
	stderr io.Writer
}

func (c *converter) Convert(_ context.Context, conf *confmap.Conf) error {
	for _, w := range check(conf.ToStringMap()) {
		c.warn(w)
	}
	return nil
}

func (c *converter) warn(w warning) {
	if c.logger != nil && c.logger.Core().Enabled(zap.WarnLevel) {
		c.logger.Warn(w.message(),
			zap.String("pipeline", w.pipeline), zap.String("component", w.component), zap.String("fix", w.fix))
		return
	}
	fmt.Fprintf(c.stderr, "WARN\t%s (fix: %s)\n", w.message(), w.fix)
}

// warning is one component that can acknowledge before delivery.
type warning struct {
	pipeline  string // e.g. "logs"
	component string // e.g. "processor batch", "exporter otlphttp/logs"
	why       string
	fix       string
}

func (w warning) message() string {
	return fmt.Sprintf("pgconsistency: log records can be lost: in pipeline %q, %s %s; the receiver moves its cursor "+
		"once the pipeline accepted the records, so what that component holds is lost if the collector stops "+
		"before the backend took it (see \"Delivery\" in the pgconsistency receiver README)",
		w.pipeline, w.component, w.why)
}

// check returns the warnings for the resolved configuration conf.
func check(conf map[string]any) []warning {
	service, _ := conf["service"].(map[string]any)
	pipelines, _ := service["pipelines"].(map[string]any)
	connectors, _ := conf["connectors"].(map[string]any)
	exporters, _ := conf["exporters"].(map[string]any)
	var out []warning
	seen := map[string]bool{}
	var visit func(name string)
	visit = func(name string) {
		if seen[name] {
			return
		}
		seen[name] = true
		p, _ := pipelines[name].(map[string]any)
		for _, proc := range stringList(p["processors"]) {
			if bufferingProcessors[typeOf(proc)] {
				out = append(out, warning{
					pipeline:  name,
					component: "processor " + strconv.Quote(proc),
					why:       "acknowledges records before it sends them",
					fix:       fmt.Sprintf("remove %q from service::pipelines::%s::processors", proc, name),
				})
			}
		}
		for _, exp := range stringList(p["exporters"]) {
			if _, ok := connectors[exp]; ok {
				// A connector hands the records on to the logs pipelines
				// that receive from it: check those too.
				for _, next := range slices.Sorted(maps.Keys(pipelines)) {
					np, _ := pipelines[next].(map[string]any)
					if typeOf(next) == "logs" && slices.Contains(stringList(np["receivers"]), exp) {
						visit(next)
					}
				}
				continue
			}
			cfg, _ := exporters[exp].(map[string]any)
			if why := queueAcknowledges(typeOf(exp), cfg); why != "" {
				out = append(out, warning{
					pipeline:  name,
					component: "exporter " + strconv.Quote(exp),
					why:       why,
					fix: fmt.Sprintf("set exporters::%s::sending_queue::enabled: false (the database keeps what was not "+
						"delivered), or a persistent queue: sending_queue::storage: a file_storage extension", exp),
				})
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(pipelines)) {
		p, _ := pipelines[name].(map[string]any)
		if typeOf(name) != "logs" {
			continue
		}
		if slices.ContainsFunc(stringList(p["receivers"]), func(r string) bool { return typeOf(r) == receiverType }) {
			visit(name)
		}
	}
	return out
}

// queueAcknowledges tells why an exporter of type typ with configuration
// cfg accepts records before it delivered them, or "" when it does not: its
// sending_queue is enabled, in memory, and does not wait for the result.
func queueAcknowledges(typ string, cfg map[string]any) string {
	raw, present := cfg["sending_queue"]
	if !present {
		if queueOffByDefault[typ] {
			return ""
		}
		return "has its default in-memory sending_queue, which accepts records before it sends them"
	}
	queue, _ := raw.(map[string]any) // nil for an empty section: enabled, defaults
	if enabled, ok := boolValue(queue["enabled"]); ok && !enabled {
		return ""
	}
	if s, _ := queue["storage"].(string); s != "" {
		return "" // persistent: what it accepted survives a restart
	}
	if wait, ok := boolValue(queue["wait_for_result"]); ok && wait {
		return "" // the caller gets the export's result
	}
	return "has an in-memory sending_queue, which accepts records before it sends them"
}

// boolValue reads a boolean that may still be a string after ${env:…}.
func boolValue(v any) (value, ok bool) {
	switch b := v.(type) {
	case bool:
		return b, true
	case string:
		parsed, err := strconv.ParseBool(strings.TrimSpace(b))
		return parsed, err == nil
	}
	return false, false
}

// typeOf is the type of a component or pipeline id "type[/name]".
func typeOf(id string) string {
	t, _, _ := strings.Cut(id, "/")
	return strings.TrimSpace(t)
}

func stringList(v any) []string {
	items, _ := v.([]any)
	out := make([]string, 0, len(items))
	for _, item := range items {
		if s, ok := item.(string); ok {
			out = append(out, s)
		}
	}
	return out
}

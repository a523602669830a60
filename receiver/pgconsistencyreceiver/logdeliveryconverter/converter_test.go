package logdeliveryconverter

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/confmap"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func conf(t *testing.T, yaml string) *confmap.Conf {
	t.Helper()
	r, err := confmap.NewRetrievedFromYAML([]byte(yaml))
	require.NoError(t, err)
	c, err := r.AsConf()
	require.NoError(t, err)
	return c
}

func TestCheck(t *testing.T) {
	const safeExporter = `
exporters:
  otlphttp/logs:
    endpoint: http://backend:4318
    sending_queue: {enabled: false}
  debug: {}
`
	for _, tc := range []struct {
		name string
		yaml string
		want []string // "pipeline component"
	}{{
		name: "the shipped pipeline: no batch, queue off",
		yaml: safeExporter + `
service:
  pipelines:
    logs: {receivers: [pgconsistency], processors: [memory_limiter], exporters: [otlphttp/logs, debug]}
    metrics: {receivers: [pgconsistency], processors: [batch], exporters: [debug]}
`,
	}, {
		name: "batch processor",
		yaml: safeExporter + `
service:
  pipelines:
    logs: {receivers: [pgconsistency], processors: [memory_limiter, batch], exporters: [otlphttp/logs]}
`,
		want: []string{`logs processor "batch"`},
	}, {
		name: "named batch in a named pipeline, named receiver",
		yaml: safeExporter + `
service:
  pipelines:
    logs/anomalies: {receivers: [pgconsistency/prod], processors: [batch/big], exporters: [debug]}
`,
		want: []string{`logs/anomalies processor "batch/big"`},
	}, {
		name: "otlphttp with its default queue",
		yaml: `
exporters:
  otlphttp: {endpoint: http://backend:4318}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [otlphttp]}
`,
		want: []string{`logs exporter "otlphttp"`},
	}, {
		name: "otlp with a queue section, enabled",
		yaml: `
exporters:
  otlp: {endpoint: backend:4317, sending_queue: {queue_size: 100}}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [otlp]}
`,
		want: []string{`logs exporter "otlp"`},
	}, {
		name: "enabled: true as a string (from an env variable)",
		yaml: `
exporters:
  otlp: {endpoint: backend:4317, sending_queue: {enabled: "true"}}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [otlp]}
`,
		want: []string{`logs exporter "otlp"`},
	}, {
		name: "queue off as a string",
		yaml: `
exporters:
  otlp: {endpoint: backend:4317, sending_queue: {enabled: "false"}}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [otlp]}
`,
	}, {
		name: "persistent queue",
		yaml: `
exporters:
  otlp: {endpoint: backend:4317, sending_queue: {storage: file_storage}}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [otlp]}
`,
	}, {
		name: "queue that waits for the result",
		yaml: `
exporters:
  otlp: {endpoint: backend:4317, sending_queue: {wait_for_result: true}}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [otlp]}
`,
	}, {
		name: "debug exporter: queue off by default, on when configured",
		yaml: `
exporters:
  debug: {}
  debug/queued: {sending_queue: {queue_size: 10}}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [debug, debug/queued]}
`,
		want: []string{`logs exporter "debug/queued"`},
	}, {
		name: "another receiver's logs pipeline is not ours",
		yaml: `
exporters:
  otlphttp: {endpoint: http://backend:4318}
service:
  pipelines:
    logs: {receivers: [otlp], processors: [batch], exporters: [otlphttp]}
`,
	}, {
		name: "metrics pipeline with batch and a queue is fine",
		yaml: `
exporters:
  otlphttp: {endpoint: http://backend:4318}
service:
  pipelines:
    metrics: {receivers: [pgconsistency], processors: [batch], exporters: [otlphttp]}
`,
	}, {
		name: "through a forward connector",
		yaml: safeExporter + `
connectors:
  forward: {}
service:
  pipelines:
    logs: {receivers: [pgconsistency], exporters: [forward]}
    logs/out: {receivers: [forward], processors: [batch], exporters: [otlphttp/logs]}
    logs/other: {receivers: [otlp], processors: [batch], exporters: [otlphttp/logs]}
`,
		want: []string{`logs/out processor "batch"`},
	}, {
		name: "both, in two pipelines",
		yaml: `
exporters:
  otlphttp: {endpoint: http://backend:4318}
service:
  pipelines:
    logs/a: {receivers: [pgconsistency/a], processors: [batch], exporters: [otlphttp]}
    logs/b: {receivers: [pgconsistency/b], exporters: [otlphttp]}
`,
		want: []string{`logs/a processor "batch"`, `logs/a exporter "otlphttp"`, `logs/b exporter "otlphttp"`},
	}, {
		name: "no service section",
		yaml: `receivers: {pgconsistency: {}}`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, w := range check(conf(t, tc.yaml).ToStringMap()) {
				got = append(got, w.pipeline+" "+w.component)
				assert.NotEmpty(t, w.fix)
			}
			assert.Equal(t, tc.want, got)
		})
	}
}

// The shipped logs configuration passes; with the batch processor and the
// exporter's default queue it had before, it warns about both.
func TestShippedLogsConfig(t *testing.T) {
	_, file, _, _ := runtime.Caller(0)
	shipped, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", "..", "config", "collector-logs.yaml"))
	require.NoError(t, err)
	c := conf(t, string(shipped))
	assert.Empty(t, check(c.ToStringMap()))

	require.NoError(t, c.Merge(confmap.NewFromStringMap(map[string]any{
		"exporters": map[string]any{"otlphttp/logs": map[string]any{"sending_queue": map[string]any{"enabled": true}}},
		"service": map[string]any{"pipelines": map[string]any{"logs": map[string]any{
			"processors": []any{"memory_limiter", "batch"}}}},
	})))
	var got []string
	for _, w := range check(c.ToStringMap()) {
		got = append(got, w.pipeline+" "+w.component)
	}
	assert.Equal(t, []string{`logs processor "batch"`, `logs exporter "otlphttp/logs"`}, got)
}

const batchConfig = `
service:
  pipelines:
    logs: {receivers: [pgconsistency], processors: [batch], exporters: [debug]}
`

func TestConvertLogsAWarning(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	var stderr bytes.Buffer
	c := NewFactory().Create(confmap.ConverterSettings{Logger: zap.New(core)})
	c.(*converter).stderr = &stderr
	in := conf(t, batchConfig)
	before := in.ToStringMap()
	require.NoError(t, c.Convert(context.Background(), in))
	assert.Equal(t, before, in.ToStringMap(), "the configuration is never changed")
	require.Equal(t, 1, logs.Len())
	e := logs.All()[0]
	assert.Equal(t, zap.WarnLevel, e.Level)
	assert.Contains(t, e.Message, `in pipeline "logs", processor "batch" acknowledges records before it sends them`)
	assert.Equal(t, `remove "batch" from service::pipelines::logs::processors`, e.ContextMap()["fix"])
	assert.Empty(t, stderr.String())
}

// A no-op (or missing) logger: the warning goes to stderr.
func TestConvertWithoutLoggerWritesToStderr(t *testing.T) {
	for name, logger := range map[string]*zap.Logger{"nop": zap.NewNop(), "nil": nil} {
		t.Run(name, func(t *testing.T) {
			var stderr bytes.Buffer
			c := &converter{logger: logger, stderr: &stderr}
			require.NoError(t, c.Convert(context.Background(), conf(t, batchConfig)))
			assert.Contains(t, stderr.String(), `WARN	pgconsistency: log records can be lost: in pipeline "logs", processor "batch"`)
			assert.Contains(t, stderr.String(), `(fix: remove "batch" from service::pipelines::logs::processors)`)
		})
	}
}

package pgconsistencyreceiver

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"go.opentelemetry.io/collector/consumer/consumererror"
	"go.opentelemetry.io/collector/pdata/plog"
)

// TestFinishedRecordBody: the one readable line of a finished refresh
// request's record, and its severity.
func TestFinishedRecordBody(t *testing.T) {
	at := time.Date(2026, 12, 2, 5, 0, 0, 0, time.UTC)
	str := func(s string) *string { return &s }
	ok := str("succeeded")
	base := func() finishedRequest {
		return finishedRequest{
			id: 7, reason: str("deploy marker changed from v1 to v2"), claimedAt: at, finishedAt: at.Add(time.Minute),
			deployMarker: str("v2"), deployedAt: &at,
			invariants: map[string]requestInvariant{"a": {Outcome: ok}, "b": {Outcome: ok}, "c": {Outcome: ok}},
		}
	}
	for _, tc := range []struct {
		name   string
		change func(*finishedRequest)
		body   string
		sev    plog.SeverityNumber
	}{
		{"Clean", func(*finishedRequest) {},
			"requested refresh finished (deploy marker changed from v1 to v2): after deployment v2 (2026-12-02T05:00:00Z), " +
				"the deployment was clean: 0 new anomalies in 3 invariants", plog.SeverityNumberInfo},
		{"NewAnomalies", func(f *finishedRequest) {
			f.newAnomalies = 3
			f.invariants["a"] = requestInvariant{NewAnomalies: 1, Outcome: ok}
			f.invariants["c"] = requestInvariant{NewAnomalies: 2, Outcome: ok}
			f.notClean = []string{"a", "c"}
		}, "requested refresh finished (deploy marker changed from v1 to v2): after deployment v2 (2026-12-02T05:00:00Z) " +
			"3 new anomalies: a 1, c 2; 1 of 3 invariants clean", plog.SeverityNumberWarn},
		{"FailedAndNotRefreshed", func(f *finishedRequest) {
			f.reason, f.deployMarker, f.deployedAt, f.superseded = nil, nil, nil, true
			f.invariants["a"] = requestInvariant{Outcome: str("timed_out")}
			f.invariants["b"] = requestInvariant{}
			f.notClean, f.notRefreshed = []string{"a", "b"}, []string{"b"}
		}, "requested refresh finished, cut short by the next request: no deployment recorded, 0 new anomalies; " +
			"failed: a (timed out); not refreshed: b; 1 of 3 invariants clean", plog.SeverityNumberWarn},
		{"NoDeploymentClean", func(f *finishedRequest) { f.deployMarker, f.deployedAt = nil, nil },
			"requested refresh finished (deploy marker changed from v1 to v2): no deployment recorded, clean: " +
				"0 new anomalies in 3 invariants", plog.SeverityNumberInfo},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := base()
			tc.change(&f)
			lr := finishedRecord(f, 0)
			assert.Equal(t, tc.body, lr.Body().Str())
			assert.Equal(t, tc.sev, lr.SeverityNumber())
			assert.Equal(t, "pgconsistency.refresh.finished", lr.EventName())
		})
	}
}

// The error of a refused batch names its records by id and, when the
// pipeline says it will never take them, what stops and how to skip them.
func TestRefusedBatchError(t *testing.T) {
	batch := []newAnomaly{{seq: 7}, {seq: 9}}
	finished := []finishedRequest{{id: 3}}
	assert.Equal(t, "2 new anomaly records (pgconsistency.anomaly.seq 7 to 9) and "+
		"1 finished refresh records (pgconsistency.refresh.request_id 3 to 3)", refusedRecords(batch, finished))
	assert.Equal(t, "1 finished refresh records (pgconsistency.refresh.request_id 3 to 3)", refusedRecords(nil, finished))
	assert.Empty(t, permanentHint(errors.New("queue full")))
	// as the otlphttp exporter returns an HTTP 400, through a fan-out
	permanent := errors.Join(consumererror.NewPermanent(errors.New("HTTP 400")), nil)
	assert.Contains(t, permanentHint(permanent), "no later record goes out")
	assert.Contains(t, permanentHint(permanent), "pgconsistency.advance_log_cursor(")
}

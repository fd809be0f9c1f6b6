package monitor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/etcdtest"
	"github.com/bmojo/bmojo/internal/monitor/monitortest"
	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/bmojo/bmojo/job"
)

const testJob = "mon-job"

func testLogger(t *testing.T) hclog.Logger {
	level := hclog.Warn
	if testing.Verbose() {
		level = hclog.Debug
	}
	return testlog.New(t, level)
}

// serve runs a monitor of job and an HTTP server of its handler.
func serve(t *testing.T, ctx context.Context, cli *clientv3.Client, job, token string) (*Monitor, string) {
	t.Helper()
	m, err := New(Config{JobName: job, Client: cli, Token: token, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); _ = m.Run(rctx) }()
	srv := httptest.NewServer(m.Handler())
	t.Cleanup(func() { srv.Close(); cancel(); <-done })
	waitFor(t, ctx, 10*time.Second, "monitor synced", m.Synced)
	return m, srv.URL
}

func waitFor(t *testing.T, ctx context.Context, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

func get(t *testing.T, url, token string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func TestMetricsAndStatus(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cli := etcdtest.Start(t)
	// The monitor starts first: every record comes through its watch, as
	// in a live job (a snapshot holds only the newest progress record, so
	// the ETA and the val-loss curve build up from the watch).
	_, url := serve(t, ctx, cli, testJob, "")
	if code, body := get(t, url+"/api/v1/status", ""); code != http.StatusNotFound {
		t.Fatalf("status before the job exists: %d %s, want 404", code, body)
	}
	if err := monitortest.Populate(ctx, cli, testJob); err != nil {
		t.Fatal(err)
	}
	var code int
	var body []byte
	waitFor(t, ctx, 10*time.Second, "the populated job", func() bool {
		code, body = get(t, url+"/api/v1/status", "")
		return code == http.StatusOK && bytes.Contains(body, []byte(`"checkpoint":{"step":30`))
	})
	var s Status
	if err := json.Unmarshal(body, &s); err != nil {
		t.Fatal(err)
	}
	if s.Job != testJob || s.Step != 40 || s.Steps != 100 || s.Epoch != 2 || s.RingSize != 2 || math.Abs(s.Progress-0.4) > 1e-9 {
		t.Errorf("status header %+v", s)
	}
	if s.ETASeconds == nil || math.Abs(*s.ETASeconds-90) > 1e-6 {
		t.Errorf("ETA %v, want 90 s (60 steps at 1.5 s)", s.ETASeconds)
	}
	if len(s.LossHistory) != 40 || s.LossHistory[0].Step != 1 || s.LossHistory[0].Value != 4 {
		t.Errorf("loss history: %d points starting %+v", len(s.LossHistory), s.LossHistory[0])
	}
	if len(s.ValLossHistory) != 2 || s.ValLoss != 2.6 {
		t.Errorf("val loss history %+v, val loss %v; want steps 20 and 40, newest 2.6", s.ValLossHistory, s.ValLoss)
	}
	if s.Checkpoint == nil || s.Checkpoint.Step != 30 || s.Checkpoint.Dir != "/ckpt/step-30" {
		t.Errorf("checkpoint %+v", s.Checkpoint)
	}
	if len(s.Events) != 9 || s.LastRecoverySeconds != 3.25 {
		t.Errorf("%d events, last recovery %v; want 9 and 3.25", len(s.Events), s.LastRecoverySeconds)
	}
	byID := map[string]WorkerStatus{}
	for _, w := range s.Workers {
		byID[w.ID] = w
	}
	if w := byID["w1"]; w.State != "up" || w.Rank != 1 || !w.Straggler {
		t.Errorf("w1 %+v: want up at rank 1, the straggler", w)
	}
	for _, w := range s.Workers {
		if w.Endpoint != "" {
			t.Errorf("%s: endpoint %q shown without a token", w.ID, w.Endpoint)
		}
	}
	if w := byID["w2"]; w.State != "down" || w.Up || w.Rank != -1 || !strings.Contains(w.Reason, "left") {
		t.Errorf("w2 %+v: want down, with the left event as reason", w)
	}

	code, body = get(t, url+"/metrics", "")
	if code != http.StatusOK {
		t.Fatalf("metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	val := func(m *dto.Metric) float64 {
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Counter != nil:
			return m.Counter.GetValue()
		}
		return math.NaN()
	}
	// one returns the value of name with the given labels (besides bmojo_job).
	one := func(name string, labels ...string) (float64, bool) {
		f, ok := fams[name]
		if !ok {
			return 0, false
		}
	next:
		for _, m := range f.Metric {
			have := map[string]string{}
			for _, l := range m.Label {
				have[l.GetName()] = l.GetValue()
			}
			if have["bmojo_job"] != testJob {
				t.Errorf("%s lacks bmojo_job=%s: %v", name, testJob, have)
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue next
				}
			}
			return val(m), true
		}
		return 0, false
	}
	w1 := []string{"worker_id", "w1", "rank", "1"}
	tests := []struct {
		name   string
		labels []string
		lo, hi float64
	}{
		{"bmojo_step", nil, 40, 40},
		{"bmojo_steps_total_planned", nil, 100, 100},
		{"bmojo_progress_ratio", nil, 0.4, 0.4},
		{"bmojo_eta_seconds", nil, 90, 90},
		{"bmojo_loss", nil, 2.5, 2.6},
		{"bmojo_val_loss", nil, 2.6, 2.6},
		{"bmojo_tokens_per_second", nil, 1280, 1280},
		{"bmojo_ring_epoch", nil, 2, 2},
		{"bmojo_workers", nil, 2, 2},
		{"bmojo_workers_up", nil, 2, 2},
		{"bmojo_skipped_steps_total", nil, 1, 1},
		{"bmojo_job_done", nil, 0, 0},
		{"bmojo_checkpoint_latest_step", nil, 30, 30},
		{"bmojo_last_recovery_seconds", nil, 3.25, 3.25},
		{"bmojo_membership_events_total", []string{"kind", "joined"}, 3, 3},
		{"bmojo_membership_events_total", []string{"kind", "left"}, 1, 1},
		{"bmojo_worker_step_seconds", w1, 1.6, 1.6},
		{"bmojo_worker_compute_seconds", w1, 1.5, 1.5},
		{"bmojo_worker_allreduce_wait_seconds", w1, 0.05, 0.05},
		{"bmojo_worker_data_seconds", w1, 0.01, 0.01},
		{"bmojo_worker_optimizer_seconds", w1, 0.04, 0.04},
		{"bmojo_worker_tokens_per_second", w1, 640, 640},
		{"bmojo_worker_grad_norm", w1, 0.8, 0.8},
		{"bmojo_worker_step", w1, 40, 40},
		{"bmojo_worker_up", w1, 1, 1},
		{"bmojo_worker_straggler", w1, 1, 1},
		{"bmojo_worker_up", []string{"worker_id", "w2", "rank", "-1"}, 0, 0},
		{"bmojo_checkpoint_seconds", []string{"worker_id", "w0"}, 0.3, 0.3},
		{"bmojo_worker_ring_arrival_seconds", []string{"worker_id", "w0"}, 0, 0},
		{"bmojo_worker_ring_arrival_seconds", w1, 0.5, 0.5}, // w1 is the straggler: its gradients came 0.5 s later
		{"bmojo_worker_gpu_utilization_ratio", []string{"worker_id", "w0", "gpu", "GPU-0000"}, 0.87, 0.87},
		{"bmojo_worker_gpu_memory_used_bytes", []string{"worker_id", "w0"}, 40e9, 40e9},
		{"bmojo_worker_gpu_memory_total_bytes", []string{"worker_id", "w0"}, 141e9, 141e9},
		{"bmojo_worker_gpu_power_watts", []string{"worker_id", "w0"}, 550, 550},
		{"bmojo_worker_gpu_temperature_celsius", []string{"worker_id", "w0"}, 61, 61},
	}
	for _, tt := range tests {
		v, ok := one(tt.name, tt.labels...)
		if !ok {
			t.Errorf("%s%v missing from /metrics", tt.name, tt.labels)
			continue
		}
		if v < tt.lo-1e-9 || v > tt.hi+1e-9 {
			t.Errorf("%s%v = %v, want in [%v, %v]", tt.name, tt.labels, v, tt.lo, tt.hi)
		}
	}

	// The watch keeps it live: the next step and the end show up.
	pr := job.Progress{Step: 41, Steps: 100, Epoch: 2, Loss: 2.4, TokensPerS: 1300, Workers: 2, UpdatedUnix: 1_800_000_000 + 61.5}
	if _, err := cli.Put(ctx, job.Prefix(testJob)+job.KeyProgress, job.Encode(pr)); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, job.Prefix(testJob)+job.KeyDone, job.Encode(job.Done{Step: 100, ValLoss: 2.0, Loss: 2.1})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 5*time.Second, "the watch to deliver done", func() bool {
		_, b := get(t, url+"/api/v1/status", "")
		var s Status
		return json.Unmarshal(b, &s) == nil && s.Done && s.Step == 100 && s.Progress == 1 && *s.ETASeconds == 0
	})
}

func TestAuthAndMissingJob(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cli := etcdtest.Start(t)
	if err := monitortest.Populate(ctx, cli, testJob); err != nil {
		t.Fatal(err)
	}
	_, url := serve(t, ctx, cli, testJob, "s3cret")
	tests := []struct {
		name, path, token string
		code              int
		body              string
	}{
		{"status without token", "/api/v1/status", "", 401, "missing bearer token"},
		{"status with a wrong token", "/api/v1/status", "nope", 401, "wrong bearer token"},
		{"metrics without token", "/metrics", "", 401, "missing bearer token"},
		{"status with the token", "/api/v1/status", "s3cret", 200, `"job":"mon-job"`},
		{"metrics with the token", "/metrics", "s3cret", 200, "bmojo_step"},
		{"healthz is open", "/healthz", "", 200, `"ok":true`},
		{"dashboard page is open (no data in it)", "/", "", 200, "<canvas"},
		{"dashboard script", "/app.js", "", 200, "api/v1/status"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, body := get(t, url+tt.path, tt.token)
			if code != tt.code || !strings.Contains(string(body), tt.body) {
				t.Errorf("GET %s: %d %.200s; want %d containing %q", tt.path, code, body, tt.code, tt.body)
			}
		})
	}

	_, url = serve(t, ctx, cli, "no-such-job", "")
	code, body := get(t, url+"/api/v1/status", "")
	if code != http.StatusNotFound || !strings.Contains(string(body), `no job \"no-such-job\"`) {
		t.Errorf("missing job: %d %s; want 404 naming the job", code, body)
	}
}

func TestTensorBoardRoundTrip(t *testing.T) {
	dir := t.TempDir()
	w, err := NewTBWriter(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []TBScalar{{"loss", 1, 4.25, 0}, {"loss", 2, 3.5, 0}, {"val_loss", 2, 3.75, 0}, {"tokens_per_s", 2, 1234, 0}}
	for _, s := range want {
		if err := w.Scalar(s.Tag, s.Step, float64(s.Value)); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(w.Path(), dir+"/events.out.tfevents.") {
		t.Errorf("file %s: TensorBoard only reads events.out.tfevents.*", w.Path())
	}
	b, err := os.ReadFile(w.Path())
	if err != nil {
		t.Fatal(err)
	}
	version, got, err := ReadTBScalars(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if version != "brain.Event:2" || len(got) != len(want) {
		t.Fatalf("version %q, %d scalars; want brain.Event:2 and %d", version, len(got), len(want))
	}
	for i := range want {
		if got[i].Tag != want[i].Tag || got[i].Step != want[i].Step || got[i].Value != want[i].Value || got[i].Wall < 1e9 {
			t.Errorf("scalar %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	// Known vectors: CRC-32C of 32 zero bytes is 0x8a9136aa (RFC 3720,
	// B.4); the masked values were computed with a bitwise CRC-32C
	// (polynomial 0x82f63b78) and TFRecord's mask, independently of this code.
	if c := MaskedCRC(make([]byte, 32)); c != 0x0fd7fffa {
		t.Errorf("masked crc of 32 zero bytes = %#x, want 0x0fd7fffa", c)
	}
	if c := MaskedCRC(make([]byte, 8)); c != 0x07980329 {
		t.Errorf("masked crc of 8 zero bytes (a zero length) = %#x, want 0x07980329", c)
	}
	b[len(b)-6] ^= 1 // a flipped bit in the last record's data
	if _, _, err := ReadTBScalars(bytes.NewReader(b)); !errors.Is(err, ErrTBCorrupt) {
		t.Errorf("corrupt file read with err %v, want ErrTBCorrupt", err)
	}
}

// The monitor exports what its watch sees, each step once per tag.
func TestTensorBoardExport(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cli := etcdtest.Start(t)
	dir := t.TempDir()
	m, err := New(Config{JobName: testJob, Client: cli, TensorBoardDir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- m.Run(rctx) }()
	waitFor(t, ctx, 10*time.Second, "monitor synced", m.Synced)
	if err := monitortest.Populate(ctx, cli, testJob); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 10*time.Second, "step 40", func() bool { s, err := m.Status(); return err == nil && s.Step == 40 })
	rcancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "events.out.tfevents.*"))
	if len(files) != 1 {
		t.Fatalf("event files %v, want one", files)
	}
	f, err := os.Open(files[0])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, got, err := ReadTBScalars(f)
	if err != nil {
		t.Fatal(err)
	}
	n := map[string]int{}
	for _, s := range got {
		n[s.Tag]++
		if s.Tag == "val_loss" && s.Step == 40 && math.Abs(float64(s.Value)-2.6) > 1e-6 {
			t.Errorf("val_loss at 40 = %v, want 2.6", s.Value)
		}
	}
	if n["loss"] != 40 || n["val_loss"] != 2 || n["tokens_per_s"] != 40 {
		t.Errorf("scalars per tag %v, want 40 loss, 2 val_loss, 40 tokens_per_s", n)
	}
}

// TestStatusEndpointsNeedAToken: the workers' endpoints (where their rings
// listen) are in /api/v1/status only for a caller with the token.
func TestStatusEndpointsNeedAToken(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := etcdtest.Start(t)
	if err := monitortest.Populate(ctx, cli, testJob); err != nil {
		t.Fatal(err)
	}
	_, url := serve(t, ctx, cli, testJob, "sekret")
	if code, _ := get(t, url+"/api/v1/status", ""); code != http.StatusUnauthorized {
		t.Fatalf("status without the token: %d, want 401", code)
	}
	var s Status
	waitFor(t, ctx, 10*time.Second, "the populated job", func() bool {
		code, body := get(t, url+"/api/v1/status", "sekret")
		return code == http.StatusOK && json.Unmarshal(body, &s) == nil && len(s.Workers) > 0
	})
	for _, w := range s.Workers {
		if w.ID == "w1" && w.Endpoint != "10.0.0.2:7000" {
			t.Errorf("w1's endpoint %q with the token, want 10.0.0.2:7000", w.Endpoint)
		}
	}
}

// TestHostCheckOnLoopback: a server on a loopback address answers requests
// naming localhost or a loopback IP, and refuses other host names (DNS
// rebinding) with 421.
func TestHostCheckOnLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: HostCheck(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {})),
		ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	for host, want := range map[string]int{
		fmt.Sprintf("127.0.0.1:%d", port):    http.StatusOK,
		fmt.Sprintf("localhost:%d", port):    http.StatusOK,
		"[::1]":                              http.StatusOK,
		fmt.Sprintf("evil.example:%d", port): http.StatusMisdirectedRequest,
		fmt.Sprintf("10.1.2.3:%d", port):     http.StatusMisdirectedRequest,
	} {
		req, err := http.NewRequest("GET", "http://"+ln.Addr().String()+"/", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("Host %s: %d, want %d", host, resp.StatusCode, want)
		}
	}
}

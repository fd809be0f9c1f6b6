package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/monitor"
	"github.com/bmojo/bmojo/internal/monitor/monitortest"
	"github.com/bmojo/bmojo/internal/testlog"
)

// runStatus runs `bmojo status args...` in-process and returns its output.
func runStatus(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	rootCmd.SetOut(&out)
	defer rootCmd.SetOut(nil)
	// Flags keep values between Execute calls: give every one.
	rootCmd.SetArgs(append([]string{"status", "--json=false", "--token="}, args...))
	err := rootCmd.Execute()
	return out.String(), err
}

func TestStatusCommand(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	log := testlog.New(t, hclog.Warn)
	srv, err := etcdserver.Start(ctx, etcdserver.Config{DataDir: t.TempDir(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cli, err := etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: srv.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if err := monitortest.Populate(ctx, cli, "job1"); err != nil {
		t.Fatal(err)
	}
	serve := func(job, token string) string {
		m, err := monitor.New(monitor.Config{JobName: job, Client: cli, Token: token, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		rctx, rcancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); _ = m.Run(rctx) }()
		hs := httptest.NewServer(m.Handler())
		t.Cleanup(func() { hs.Close(); rcancel(); <-done })
		for !m.Synced() {
			select {
			case <-ctx.Done():
				t.Fatal("monitor never synced")
			case <-time.After(10 * time.Millisecond):
			}
		}
		return hs.URL
	}
	url := serve("job1", "")

	resp, err := http.Get(url + "/api/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	api, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	out, err := runStatus(t, "--json", "--addr", url)
	if err != nil {
		t.Fatal(err)
	}
	if out != string(api) {
		t.Errorf("bmojo status --json differs from /api/v1/status:\n%s\n%s", out, api)
	}

	out, err = runStatus(t, "--addr", url)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"job job1  epoch 2  ring 2 workers", "40.0%  step 40/100", "w1", "up (straggler)", "down", "checkpoint step 30"} {
		if !strings.Contains(out, want) {
			t.Errorf("bmojo status output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("bmojo status:\n%s", out)

	tokURL := serve("job1", "right")
	noJobURL := serve("nope", "")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unreachable", []string{"--addr", "http://127.0.0.1:1"}, "cannot reach the monitor at http://127.0.0.1:1/api/v1/status"},
		{"missing token", []string{"--addr", tokURL}, "refused the missing token"},
		{"wrong token", []string{"--addr", tokURL, "--token", "wrong"}, "refused the wrong token"},
		{"no such job", []string{"--addr", noJobURL}, `job does not exist: no job "nope"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := runStatus(t, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
	if _, err := runStatus(t, "--addr", tokURL, "--token", "right"); err != nil {
		t.Errorf("with the right token: %v", err)
	}
}

// TestStatusCA: an https monitor is read with --ca naming the CA that
// signed its certificate, and refused (naming the reason) without it.
func TestStatusCA(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"job":"j"}`))
	}))
	defer srv.Close()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := statusClient(ca)
	if err != nil {
		t.Fatal(err)
	}
	if body, err := fetchStatus(ctx, c, srv.URL+"/api/v1/status", ""); err != nil || !strings.Contains(string(body), `"job":"j"`) {
		t.Fatalf("with --ca: %q, %v", body, err)
	}
	plain, _ := statusClient("")
	if _, err := fetchStatus(ctx, plain, srv.URL+"/api/v1/status", ""); err == nil {
		t.Fatal("a monitor signed by an unknown CA was trusted without --ca")
	}
	if _, err := statusClient(filepath.Join(t.TempDir(), "none.pem")); err == nil {
		t.Fatal("a missing --ca file was accepted")
	}
}

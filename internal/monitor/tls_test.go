package monitor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/etcdtest"
	"github.com/bmojo/bmojo/internal/pki"
)

// TestStartHTTPS: with Config.TLS the monitor serves HTTPS only: a client
// trusting the CA reads /healthz over https, and plain HTTP gets no page.
func TestStartHTTPS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cli := etcdtest.Start(t)
	ca, err := pki.NewCA("monitor test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue(pki.RoleMonitor, "monitor", []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	var url string
	stop, err := Start(ctx, Config{JobName: testJob, Client: cli, Logger: testLogger(t),
		TLS: &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}},
		"127.0.0.1:0", false, func(u string) { url = u })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if !strings.HasPrefix(url, "https://") {
		t.Fatalf("URL %q, want https", url)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	// /healthz says 503 until the monitor's first read of etcd.
	waitFor(t, ctx, 10*time.Second, "/healthz over https to answer 200", func() bool {
		resp, err := c.Get(url + "healthz")
		if err != nil {
			t.Fatalf("GET /healthz over https: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode == 200 && strings.Contains(string(body), `"ok":true`)
	})
	plain := &http.Client{Timeout: 5 * time.Second}
	if resp, err := plain.Get("http" + strings.TrimPrefix(url, "https") + "healthz"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 {
			t.Fatalf("plain HTTP got a page: %s", b)
		}
	}
}

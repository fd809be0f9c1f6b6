package allreduce

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/testpki"
)

// testCA makes a CA and one leaf certificate for 127.0.0.1 usable as both
// server and client certificate.
func testCA(t *testing.T, name string) (*x509.CertPool, tls.Certificate) {
	t.Helper()
	p, err := testpki.New(name)
	if err != nil {
		t.Fatal(err)
	}
	return p.Pool, p.Cert
}

func mtls(pool *x509.CertPool, cert tls.Certificate) (server, client *tls.Config) {
	server = &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13}
	client = &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS13}
	return server, client
}

// TestRingMutualTLS: TLS secures the gRPC streams; on the same-host path it
// secures the handshake that offers the shared memory, and the data never
// leaves the host's memory.
func TestRingMutualTLS(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, func(t *testing.T, transport string) {
		pool, cert := testCA(t, "good")
		rings := newRings(t, 3, func(_ int, c *Config) {
			c.ServerTLS, c.ClientTLS = mtls(pool, cert)
			c.Transport = transport
		})
		in := seededInputs(9, 3, 100_000)
		checkResults(t, in, allReduceAll(t, rings, in, Avg), Avg, false)
	})
}

// TestRingMutualTLSRejectsStranger: a rank whose certificate another CA
// signed cannot join.
func TestRingMutualTLSRejectsStranger(t *testing.T) {
	checkNoLeaks(t)
	pool, cert := testCA(t, "good")
	_, badCert := testCA(t, "evil")
	lis, addrs := listeners(t, 2)
	var rings []*Ring
	for i := 0; i < 2; i++ {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger = i, addrs, 5, testLogger(t)
		if i == 0 {
			c.ServerTLS, c.ClientTLS = mtls(pool, cert)
		} else {
			c.ServerTLS, c.ClientTLS = mtls(pool, badCert)
		}
		r, err := New(c, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		rings = append(rings, r)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for i, err := range parallel(2, func(i int) error { return rings[i].Connect(ctx) }) {
		if err == nil {
			t.Errorf("rank %d connected despite a foreign certificate", i)
		}
	}
}

package etcdserver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/testpki"
)

// Mutual TLS end to end: an embedded etcd that requires client
// certificates; Connect with the CA and a certificate works, without the
// certificate it is refused, and a wrong CA fails verification.
func TestConnectMutualTLS(t *testing.T) {
	pki, err := testpki.New("bmojo-etcd-test")
	if err != nil {
		t.Fatal(err)
	}
	ca, cert, key, err := pki.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{DataDir: t.TempDir(), CertFile: cert, KeyFile: key, ClientCAFile: ca, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ep := s.Endpoints()[0]; ep[:8] != "https://" {
		t.Fatalf("endpoint %s is not https", ep)
	}

	cli, err := Connect(ctx, ClientConfig{Endpoints: s.Endpoints(), CAFile: ca, CertFile: cert, KeyFile: key, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("mutual TLS: %v", err)
	}
	if _, err := cli.Put(ctx, "k", "v"); err != nil {
		t.Fatalf("put over TLS: %v", err)
	}
	cli.Close()

	// A refused certificate is not an outage: Connect says so at once
	// (ErrAuth) instead of retrying until its context ends (ErrUnreachable).
	other, err := testpki.New("stranger")
	if err != nil {
		t.Fatal(err)
	}
	oca, ocert, okey, err := other.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for name, cfg := range map[string]ClientConfig{
		"no client certificate":              {CAFile: ca},
		"a client certificate of another CA": {CAFile: ca, CertFile: ocert, KeyFile: okey},
		"a server of another CA":             {CAFile: oca, CertFile: cert, KeyFile: key},
	} {
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		cfg.Endpoints, cfg.Logger = s.Endpoints(), testLogger(t)
		cli, err := Connect(c, cfg)
		cancel()
		if err == nil {
			cli.Close()
			t.Fatalf("%s: connected", name)
		}
		if !errors.Is(err, ErrAuth) {
			t.Errorf("%s: %v, want ErrAuth", name, err)
		}
		t.Logf("%s: %v", name, err)
	}
}

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

	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 2*time.Second) }
	c1, cancel1 := short()
	defer cancel1()
	if cli, err := Connect(c1, ClientConfig{Endpoints: s.Endpoints(), CAFile: ca, Logger: testLogger(t)}); err == nil {
		_, perr := cli.Get(c1, "k")
		cli.Close()
		if perr == nil {
			t.Fatal("a client without a certificate read from a server that requires one")
		}
	} else if !errors.Is(err, ErrUnreachable) {
		t.Logf("without a client certificate: %v", err)
	}

	other, err := testpki.New("stranger")
	if err != nil {
		t.Fatal(err)
	}
	oca, ocert, okey, err := other.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c2, cancel2 := short()
	defer cancel2()
	if cli, err := Connect(c2, ClientConfig{Endpoints: s.Endpoints(), CAFile: oca, CertFile: ocert, KeyFile: okey, Logger: testLogger(t)}); err == nil {
		_, perr := cli.Get(c2, "k")
		cli.Close()
		if perr == nil {
			t.Fatal("a client trusting another CA talked to the server")
		}
	}
}

func TestStartTLSConfigErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for name, cfg := range map[string]Config{
		"cert without key":  {DataDir: t.TempDir(), CertFile: "c.pem"},
		"https without tls": {DataDir: t.TempDir(), ClientURL: "https://127.0.0.1:1"},
	} {
		if _, err := Start(ctx, cfg); !errors.Is(err, ErrBadConfig) {
			t.Errorf("%s: %v, want ErrBadConfig", name, err)
		}
	}
}

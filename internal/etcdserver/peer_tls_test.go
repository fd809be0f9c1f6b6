package etcdserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/testpki"
)

// Peer TLS: with a peer certificate and CA the raft port speaks TLS and
// refuses a peer without a certificate of that CA; a plain http peer URL
// with a certificate is a config error naming the field.
func TestPeerTLS(t *testing.T) {
	p, err := testpki.New("bmojo-etcd-peer")
	if err != nil {
		t.Fatal(err)
	}
	ca, cert, key, err := p.WriteFiles(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	peer := l.Addr().String()
	l.Close()

	_, err = Start(ctx, Config{DataDir: t.TempDir(), PeerURL: "http://" + peer, PeerCertFile: cert, PeerKeyFile: key, PeerCAFile: ca, Logger: testLogger(t)})
	if !errors.Is(err, ErrBadConfig) {
		t.Fatalf("http peer URL with a peer certificate: %v, want ErrBadConfig", err)
	}
	s, err := Start(ctx, Config{DataDir: t.TempDir(), PeerURL: "https://" + peer, PeerCertFile: cert, PeerKeyFile: key, PeerCAFile: ca, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	caPEM, err := os.ReadFile(ca)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	dial := func(certs []tls.Certificate) error { return testpki.DialPeer(peer, pool, certs) }
	if err := dial([]tls.Certificate{pair}); err != nil {
		t.Errorf("a peer with the CA's certificate: %v", err)
	}
	if err := dial(nil); err == nil {
		t.Error("a peer without a certificate was served")
	}
}

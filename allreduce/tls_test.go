package allreduce

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"math"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/internal/testpki"
	pb "github.com/bmojo/bmojo/proto/allreducepb"
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

// identityRings starts a 3-rank ring with mutual TLS from one job CA; rank
// i's certificate names ids[i]. With verify, each rank requires its
// neighbours' certificates to name their slots.
func identityRings(t *testing.T, ca *pki.CA, ids []string, verify bool, transport string) []*Ring {
	t.Helper()
	creds := make([]*pki.Creds, len(ids))
	for i, id := range ids {
		creds[i] = issue(t, ca, id)
	}
	return newRings(t, len(ids), func(rank int, c *Config) {
		c.ServerTLS, c.ClientTLS = creds[rank].Server(), creds[rank].Client()
		c.Transport = transport
		if verify {
			c.VerifyPeer = func(rank int, cert *x509.Certificate) error {
				return pki.Check(cert, pki.RoleWorker, ids[rank])
			}
		}
	})
}

func issue(t *testing.T, ca *pki.CA, id string) *pki.Creds {
	t.Helper()
	leaf, err := ca.Issue(pki.RoleWorker, id, []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f, err := pki.Write(t.TempDir(), id, ca.PEM, leaf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// impersonate dials rank 1 of a 3-rank epoch-5 ring as its predecessor
// (rank 0), with tc, and sends what an attacker who read the public facts
// would: the predecessor's hello, a data frame of 1e30 for the next
// collective, and an abort blaming rank 1. It returns the stream's final
// error (nil if the stream is still open after the frames went out).
func impersonate(t *testing.T, addr string, tc *tls.Config) error {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := conn.NewStream(ctx, &pb.Ring_ServiceDesc.Streams[0], "/"+pb.Ring_ServiceDesc.ServiceName+"/Push", grpc.ForceCodecV2(frameCodec{}))
	if err != nil {
		return err
	}
	poison := make([]byte, 4*4)
	for i := 0; i < len(poison); i += 4 {
		binary.LittleEndian.PutUint32(poison[i:], math.Float32bits(1e30))
	}
	frames := []*outFrame{
		{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Epoch: 5, SrcRank: 0, WorldSize: 3, Streams: 1}},
		{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, WorldSize: 3, Op: 1,
			Step: 0, Chunk: 0, TotalElems: 12, Dtype: pb.DType_DTYPE_F32, Elems: 4}, inline: poison},
		{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_ABORT, Epoch: 5, SrcRank: 0, WorldSize: 3, BlameRank: 1, Reason: "forged"}},
	}
	for _, f := range frames {
		if err := s.SendMsg(f); err != nil {
			break // the server hung up: RecvMsg says why
		}
	}
	done := make(chan error, 1)
	go func() { done <- s.RecvMsg(&pb.PushSummary{}) }()
	select {
	case err := <-done:
		return fromStatus(err)
	case <-time.After(time.Second):
		return nil // still open: the frames were read
	}
}

// TestRingIdentity: with VerifyPeer, nobody but the predecessor's slot can
// push to a rank. Three strangers who know the ring's public facts (epoch,
// ranks, size) try rank 1 as its predecessor: without a certificate, with
// a certificate of another CA naming the right worker, and with a valid job
// certificate naming another worker (rank 2's). Each is refused; their
// data and abort frames are never applied: the ring then reduces exactly
// and nobody failed. The control: the same job certificate against a ring
// that checks the CA but not the slot gets its abort through.
func TestRingIdentity(t *testing.T) {
	checkNoLeaks(t)
	ids := []string{"worker-a", "worker-b", "worker-c"}
	ca, err := pki.NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, err := pki.NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	noCert := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}
	otherCA := issue(t, other, "worker-a").Client()
	otherCA.InsecureSkipVerify, otherCA.VerifyConnection = true, nil // the attacker trusts anyone
	wrongSlot := issue(t, ca, "worker-c").Client()

	forTransports(t, func(t *testing.T, transport string) {
		rings := identityRings(t, ca, ids, true, transport)
		for name, tc := range map[string]*tls.Config{"no certificate": noCert, "another CA": otherCA, "wrong slot": wrongSlot} {
			err := impersonate(t, rings[1].Addr().String(), tc)
			if err == nil {
				t.Errorf("%s: the stream stayed open after its frames", name)
			}
			if name == "wrong slot" && !errors.Is(err, ErrIdentity) {
				t.Errorf("%s: got %v, want ErrIdentity", name, err)
			}
			t.Logf("%s: refused: %v", name, err)
		}
		if err := rings[1].Err(); err != nil {
			t.Fatalf("a stranger failed the ring: %v", err)
		}
		in := seededInputs(11, 3, 12)
		checkResults(t, in, allReduceAll(t, rings, in, Sum), Sum, false)
	})

	t.Run("control: CA without slot check", func(t *testing.T) {
		rings := identityRings(t, ca, ids, false, TransportGRPC)
		if err := impersonate(t, rings[1].Addr().String(), wrongSlot); err != nil {
			t.Fatalf("without VerifyPeer the job certificate was refused: %v", err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for rings[1].Err() == nil && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if err := rings[1].Err(); err == nil {
			t.Fatal("the forged abort did not reach the ring: the attack above proves nothing")
		} else {
			t.Logf("control: the forged abort failed rank 1: %v", err)
		}
	})
}

// TestRingIdentitySuccessor: a rank refuses to send to a successor whose
// certificate names another worker than the slot's (and that successor
// refuses it back): Connect fails, naming the identity.
func TestRingIdentitySuccessor(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testRingIdentitySuccessor)
}

func testRingIdentitySuccessor(t *testing.T, transport string) {
	ca, err := pki.NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"worker-a", "worker-b"}
	creds := []*pki.Creds{issue(t, ca, "worker-a"), issue(t, ca, "worker-x")} // rank 1 holds the wrong certificate
	lis, addrs := listeners(t, 2)
	rings := make([]*Ring, 2)
	for i := range rings {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger, c.Transport = i, addrs, 5, testLogger(t), transport
		c.ServerTLS, c.ClientTLS = creds[i].Server(), creds[i].Client()
		c.VerifyPeer = func(rank int, cert *x509.Certificate) error { return pki.Check(cert, pki.RoleWorker, ids[rank]) }
		if rings[i], err = New(c, lis[i]); err != nil {
			t.Fatal(err)
		}
	}
	defer parallel(2, func(i int) error { return rings[i].Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	errs := parallel(2, func(i int) error { return rings[i].Connect(ctx) })
	if errs[0] == nil {
		t.Fatal("rank 0 connected to a successor holding worker-x's certificate in worker-b's slot")
	}
	t.Logf("rank 0: %v", errs[0])
	t.Logf("rank 1: %v", errs[1])
}

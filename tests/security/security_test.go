// Package security checks, from outside, that a default `bmojo train
// --workers N` run talks only to its own processes: real processes, a real
// etcd, real gRPC, attackers who know everything the job publishes.
package security

import (
	"context"
	"crypto/tls"
	"flag"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/localrun"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

var bmojoBin string

func TestMain(m *testing.M) {
	flag.Parse()
	testbin.Main(m.Run, &bmojoBin, testing.Short())
}

// TestDefaultRunRefusesStrangers: while a default 2-worker run trains,
// strangers try its etcd and a worker's all-reduce port. etcd refuses a
// client without TLS and one without a job certificate. The worker refuses
// a push claiming its predecessor's slot from a plaintext client, from a
// TLS client without a certificate, from one whose certificate another CA
// signed, and from one holding a valid job certificate for another slot;
// each sends the predecessor's hello and an abort blaming the worker. The
// job finishes in the epoch it started in: no abort got through.
func TestDefaultRunRefusesStrangers(t *testing.T) {
	if testing.Short() {
		t.Skip("runs real processes")
	}
	const steps = 300
	j := job.Default()
	j.Name, j.Preset = "secure", "bmojo-tiny"
	mc, err := model.Preset(j.Preset)
	if err != nil {
		t.Fatal(err)
	}
	mc.SeqLen = 64
	j.Model, j.Steps, j.BatchSize = mc, steps, 4
	j.EvalEvery, j.EvalBatches, j.CheckpointEvery = 0, 1, 0
	j.CheckpointDir = t.TempDir()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var (
		endpoints []string
		ids       *localrun.Identities
		ready     = make(chan struct{})
		done      = make(chan struct{})
		res       localrun.Result
		runErr    error
	)
	go func() {
		defer close(done)
		res, runErr = localrun.Run(ctx, j, localrun.Options{Workers: 2, Executable: bmojoBin,
			Logger: testlog.New(t, hclog.Info), WorkerLevel: "warn",
			OnIdentities: func(i *localrun.Identities) { ids = i },
			OnEtcd:       func(ep []string) { endpoints = ep; close(ready) }})
	}()
	defer func() { cancel(); <-done }()
	select {
	case <-ready:
	case <-done:
		t.Fatalf("run ended before etcd started: %v", runErr)
	}
	if ids == nil || !strings.HasPrefix(endpoints[0], "https://") {
		t.Fatalf("the default run has no job identity (endpoints %v)", endpoints)
	}

	cli, err := etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: endpoints,
		CAFile: ids.Client.CA, CertFile: ids.Client.Cert, KeyFile: ids.Client.Key})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	var ring job.Ring
	for deadline := time.Now().Add(2 * time.Minute); ; {
		p, _ := localrun.ReadProgress(ctx, cli, j.Name)
		if p.Step >= 2 {
			if err := getJSON(ctx, cli, job.Prefix(j.Name)+job.KeyRing, &ring); err != nil {
				t.Fatal(err)
			}
			break
		}
		select {
		case <-done:
			t.Fatalf("run ended before step 2: %v", runErr)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no step 2 within 2 minutes")
		}
	}
	if len(ring.Members) != 2 {
		t.Fatalf("ring %+v, want 2 members", ring)
	}
	victim := ring.Members[1] // its predecessor is rank 0

	other, err := pki.NewCA("bmojo job "+j.Name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherLeaf, err := other.Issue(pki.RoleWorker, ring.Members[0].ID, nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherFiles, err := pki.Write(t.TempDir(), "other", other.PEM, otherLeaf)
	if err != nil {
		t.Fatal(err)
	}
	wrongSlot, err := ids.Issue(pki.RoleWorker, victim.ID) // a real job certificate, for the victim's own slot
	if err != nil {
		t.Fatal(err)
	}
	tlsOf := func(f pki.Files) credentials.TransportCredentials {
		c, err := f.Load()
		if err != nil {
			t.Fatal(err)
		}
		tc := c.Client()
		tc.VerifyConnection = nil // an attacker does not care whom it talks to
		return credentials.NewTLS(tc)
	}
	attackers := []struct {
		name  string
		creds credentials.TransportCredentials
		code  codes.Code // 0: any error
	}{
		{"plaintext", insecure.NewCredentials(), 0},
		{"TLS without a certificate", credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}), 0},
		{"a certificate of another CA", tlsOf(otherFiles), 0},
		{"a job certificate for another slot", tlsOf(wrongSlot), codes.PermissionDenied},
	}
	for _, a := range attackers {
		err := push(ctx, victim.Endpoint, a.creds, ring.Epoch, len(ring.Members))
		switch {
		case err == nil:
			t.Errorf("ring, %s: the worker accepted the stream", a.name)
		case a.code != 0 && status.Code(err) != a.code:
			t.Errorf("ring, %s: %v, want code %v", a.name, err, a.code)
		default:
			t.Logf("ring, %s: refused: %v", a.name, err)
		}
	}

	// etcd: no TLS, and TLS without a client certificate.
	plain := "http://" + strings.TrimPrefix(endpoints[0], "https://")
	for name, cfg := range map[string]etcdserver.ClientConfig{
		"plaintext":              {Endpoints: []string{plain}},
		"TLS without a job cert": {Endpoints: endpoints, CAFile: ids.Client.CA},
	} {
		if err := etcdGet(ctx, cfg); err == nil {
			t.Errorf("etcd, %s: read the job's keys", name)
		} else {
			t.Logf("etcd, %s: refused: %v", name, err)
		}
	}

	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("the run did not finish")
	}
	if runErr != nil {
		t.Fatal(runErr)
	}
	if res.Done.Step != steps || res.Progress.Epoch != ring.Epoch {
		t.Fatalf("job ended at step %d in epoch %d; want step %d in epoch %d (an attacker's abort got through)",
			res.Done.Step, res.Progress.Epoch, steps, ring.Epoch)
	}
}

// etcdGet tries to read the job's keys with cfg.
func etcdGet(ctx context.Context, cfg etcdserver.ClientConfig) error {
	cfg.DialTimeout, cfg.CallTimeout = time.Second, 2*time.Second
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cli, err := etcdserver.Connect(cctx, cfg)
	if err != nil {
		return err
	}
	defer cli.Close()
	_, err = cli.Get(cctx, job.Prefix("secure"), clientv3.WithPrefix())
	return err
}

func getJSON(ctx context.Context, cli *clientv3.Client, key string, v any) error {
	resp, err := cli.Get(ctx, key)
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 {
		return context.DeadlineExceeded
	}
	return job.Decode(key, resp.Kvs[0].Value, v)
}

// push plays rank 0 of an epoch's ring on addr, rank 1's address: its
// hello, then an abort blaming rank 1; it returns how the stream ended.
func push(ctx context.Context, addr string, creds credentials.TransportCredentials, epoch uint64, size int) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	s, err := pb.NewRingClient(conn).Push(ctx)
	if err != nil {
		return err
	}
	for _, f := range []*pb.FrameHeader{
		{Kind: pb.Kind_KIND_HELLO, Epoch: epoch, SrcRank: 0, WorldSize: uint32(size), Streams: 1},
		{Kind: pb.Kind_KIND_ABORT, Epoch: epoch, SrcRank: 0, WorldSize: uint32(size), BlameRank: 1, Reason: "forged"},
	} {
		if err := s.Send(&pb.Frame{Header: f}); err != nil {
			break // refused: CloseAndRecv says why
		}
	}
	_, err = s.CloseAndRecv()
	return err
}

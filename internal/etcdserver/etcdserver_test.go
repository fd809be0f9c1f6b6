package etcdserver

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/testleak"
	"github.com/bmojo/bmojo/internal/testlog"
)

func TestMain(m *testing.M) {
	testleak.Main(m)
}

func testLogger(t *testing.T) hclog.Logger { return testlog.New(t, hclog.Warn) }

func TestStartPutRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	t0 := time.Now()
	s, err := Start(ctx, Config{DataDir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("start took %s, want well under 2 s", d)
	}
	t.Logf("start: %s, endpoints %v", time.Since(t0), s.Endpoints())
	cli, err := Connect(ctx, ClientConfig{Endpoints: s.Endpoints(), Logger: testLogger(t)})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := cli.Put(ctx, "/bmojo/k", "v"); err != nil {
		t.Fatal(err)
	}
	s.Close()

	// Same data dir and port: the key survives and the old client reconnects.
	t0 = time.Now()
	s, err = Start(ctx, Config{DataDir: dir, ClientURL: s.Endpoints()[0], Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	t.Logf("restart: %s", time.Since(t0))
	resp, err := cli.Get(ctx, "/bmojo/k")
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "v" {
		t.Fatalf("after restart got %v, want /bmojo/k=v", resp.Kvs)
	}
}

func TestConnectUnreachable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	ep := "http://127.0.0.1:" + itoa(port)
	_, err = Connect(ctx, ClientConfig{Endpoints: []string{ep}, DialTimeout: 200 * time.Millisecond, Logger: testLogger(t)})
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("Connect to nothing = %v, want ErrUnreachable", err)
	}
	t.Log(err)
}

// An etcd that comes up after the first attempts is found by the retries.
func TestConnectRetriesUntilUp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	ep := "http://127.0.0.1:" + itoa(port)
	type result struct{ err error }
	done := make(chan result, 1)
	go func() {
		cli, err := Connect(ctx, ClientConfig{Endpoints: []string{ep}, DialTimeout: 300 * time.Millisecond, Logger: testLogger(t)})
		if err == nil {
			cli.Close()
		}
		done <- result{err}
	}()
	time.Sleep(500 * time.Millisecond) // let a few attempts fail first
	s, err := Start(ctx, Config{DataDir: t.TempDir(), ClientURL: ep, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r := <-done; r.err != nil {
		t.Fatalf("Connect after the server came up: %v", r.err)
	}
}

func TestBadConfig(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		run  func() error
	}{
		{"no data dir", func() error { _, err := Start(ctx, Config{}); return err }},
		{"bad client url", func() error {
			_, err := Start(ctx, Config{DataDir: t.TempDir(), ClientURL: "127.0.0.1:2379"})
			return err
		}},
		{"no endpoints", func() error { _, err := Connect(ctx, ClientConfig{}); return err }},
		{"cert without key", func() error {
			_, err := Connect(ctx, ClientConfig{Endpoints: []string{"http://x:1"}, CertFile: "c.pem"})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); !errors.Is(err, ErrBadConfig) {
				t.Fatalf("got %v, want ErrBadConfig", err)
			}
		})
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// With auth on, the right password connects and a wrong one fails at once
// with ErrAuth instead of retrying.
func TestConnectAuth(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{DataDir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	cli, err := Connect(ctx, ClientConfig{Endpoints: s.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.UserAdd(ctx, "root", "secret"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.UserGrantRole(ctx, "root", "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}
	cli.Close()

	good, err := Connect(ctx, ClientConfig{Endpoints: s.Endpoints(), Username: "root", Password: "secret"})
	if err != nil {
		t.Fatalf("right password: %v", err)
	}
	good.Close()
	t0 := time.Now()
	_, err = Connect(ctx, ClientConfig{Endpoints: s.Endpoints(), Username: "root", Password: "wrong", Logger: testLogger(t)})
	if !errors.Is(err, ErrAuth) {
		t.Fatalf("wrong password: %v, want ErrAuth", err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("wrong password took %s: it was retried", d)
	}
	t.Log(err)
}

// TestCallsBoundedWhenEtcdIsGone: with its server stopped, a client's
// requests made with a context that has no deadline fail within the call
// timeout instead of waiting for a server that never comes back.
func TestCallsBoundedWhenEtcdIsGone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{DataDir: t.TempDir(), Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	const d = 300 * time.Millisecond
	cli, err := Connect(ctx, ClientConfig{Endpoints: s.Endpoints(), CallTimeout: d, Logger: testLogger(t)})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	defer cli.Close()
	s.Close()
	bg := context.Background() //lint:nodeadline the calls below must be bounded by the client itself
	calls := map[string]func() error{
		"Get":    func() error { _, err := cli.Get(bg, "/bmojo/k"); return err },
		"Put":    func() error { _, err := cli.Put(bg, "/bmojo/k", "v"); return err },
		"Delete": func() error { _, err := cli.Delete(bg, "/bmojo/k"); return err },
		"Txn":    func() error { _, err := cli.Txn(bg).Then(clientv3.OpGet("/bmojo/k")).Commit(); return err },
		"Grant":  func() error { _, err := cli.Grant(bg, 5); return err },
	}
	for name, call := range calls {
		t0 := time.Now()
		done := make(chan error, 1)
		go func() { done <- call() }()
		select {
		case err := <-done:
			if err == nil {
				t.Errorf("%s succeeded against a stopped etcd", name)
			}
			if took := time.Since(t0); took > 10*d {
				t.Errorf("%s took %v, want about the call timeout %v", name, took, d)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("%s still blocked after 20 s with a call timeout of %v", name, d)
		}
	}
	// A caller's own deadline wins over the default.
	cctx, ccancel := context.WithTimeout(bg, 50*time.Millisecond)
	defer ccancel()
	t0 := time.Now()
	if _, err := cli.Get(cctx, "/bmojo/k"); err == nil {
		t.Error("Get succeeded against a stopped etcd")
	}
	if took := time.Since(t0); took > d {
		t.Errorf("Get with a 50 ms deadline took %v", took)
	}
}

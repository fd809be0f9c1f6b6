package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/testleak"
	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/bmojo/bmojo/job"
)

func TestMain(m *testing.M) {
	testleak.Main(m)
}

const testJob = "test-job"

// testLogger logs to the test at debug level with -v, warn otherwise.
func testLogger(t *testing.T, name string) hclog.Logger {
	level := hclog.Warn
	if testing.Verbose() {
		level = hclog.Info
	}
	return testlog.New(t, level).Named(name)
}

// testConfig shrinks every timeout.
func testConfig(t *testing.T, cli *clientv3.Client, id string) Config {
	cfg := Default()
	cfg.JobName = testJob
	cfg.Client = cli
	cfg.ID = id
	cfg.ReadyTimeout = 3 * time.Second
	cfg.BootstrapTimeout = 5 * time.Second
	// The election lease: 1 s made leadership flap when CI ran the other
	// suites beside these tests on two cores. Worker leases stay at 1 s.
	cfg.LeaseTTL = 3 * time.Second
	cfg.Debounce = 50 * time.Millisecond
	cfg.MaxBackoff = 200 * time.Millisecond
	cfg.Logger = testLogger(t, id)
	return cfg
}

type env struct {
	t      *testing.T
	ctx    context.Context
	dir    string
	url    string
	server etcdProc
	cli    *clientv3.Client
	spec   job.Spec
}

// etcdProc is the etcd a test runs against: the embedded one, or, when
// BMOJO_ETCD_BIN names an etcd executable (Debian's etcd-server package:
// BMOJO_ETCD_BIN=/usr/bin/etcd go test ./coordinator), a real etcd process.
type etcdProc interface {
	Endpoints() []string
	Close()
}

func newEnv(t *testing.T, ctx context.Context, workers int) *env {
	t.Helper()
	e := &env{t: t, ctx: ctx, dir: t.TempDir()}
	e.startEtcd()
	cli, err := etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: e.server.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	e.cli = cli
	t.Cleanup(func() { cli.Close() })
	e.spec = job.Spec{Protocol: job.ProtocolVersion, Hash: "spec-hash", CodeHash: "code-hash", Workers: workers, MinRing: 1}
	if _, err := cli.Put(ctx, job.Prefix(testJob)+job.KeySpec, job.Encode(e.spec)); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) startEtcd() {
	e.t.Helper()
	var s etcdProc
	var err error
	if bin := os.Getenv("BMOJO_ETCD_BIN"); bin != "" {
		s, err = startEtcdBinary(e.ctx, bin, e.dir, e.url)
	} else {
		s, err = etcdserver.Start(e.ctx, etcdserver.Config{DataDir: e.dir, ClientURL: e.url, Logger: testLogger(e.t, "etcd")})
	}
	if err != nil {
		e.t.Fatal(err)
	}
	e.server, e.url = s, s.Endpoints()[0]
	e.t.Cleanup(s.Close)
}

type etcdBinary struct {
	cmd      *exec.Cmd
	endpoint string
	once     sync.Once
}

func (b *etcdBinary) Endpoints() []string { return []string{b.endpoint} }

func (b *etcdBinary) Close() {
	b.once.Do(func() {
		_ = b.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = b.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = b.cmd.Process.Kill()
			<-done
		}
	})
}

// startEtcdBinary runs a real single-node etcd on dir, at clientURL (a
// free port when empty), with the short ticks of the embedded one (so
// 1 s leases are allowed), and waits until it answers.
func startEtcdBinary(ctx context.Context, bin, dir, clientURL string) (*etcdBinary, error) {
	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "0"
		}
		defer l.Close()
		return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	}
	if clientURL == "" {
		clientURL = "http://127.0.0.1:" + free()
	}
	peer := "http://127.0.0.1:" + free()
	cmd := exec.Command(bin, "--name", "test", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "test="+peer, "--heartbeat-interval", "10", "--election-timeout", "100",
		"--logger", "zap", "--log-level", "error")
	log, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		return nil, err
	}
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	b := &etcdBinary{cmd: cmd, endpoint: clientURL}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cli, err := etcdserver.Connect(cctx, etcdserver.ClientConfig{Endpoints: b.Endpoints(), DialTimeout: 500 * time.Millisecond})
	if err != nil {
		b.Close()
		return nil, err
	}
	cli.Close()
	return b, nil
}

// coordinator runs a replica until the returned stop is called.
func (e *env) coordinator(id string, cli *clientv3.Client) (*Coordinator, func() error) {
	e.t.Helper()
	c, err := New(testConfig(e.t, cli, id))
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	errc := make(chan error, 1)
	go func() { errc <- c.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() { cancel(); runErr = <-errc })
		return runErr
	}
	e.t.Cleanup(func() { stop() })
	return c, stop
}

func (e *env) get(key string, v any) bool {
	resp, err := e.cli.Get(e.ctx, job.Prefix(testJob)+key)
	if err != nil || len(resp.Kvs) == 0 {
		return false
	}
	return job.Decode(key, resp.Kvs[0].Value, v) == nil
}

func (e *env) exists(key string) bool {
	resp, err := e.cli.Get(e.ctx, job.Prefix(testJob)+key)
	return err == nil && len(resp.Kvs) > 0
}

// waitStarted waits until ring has exactly ids (in rank order) at an epoch
// > after and that epoch has started; it returns the ring and start.
func (e *env) waitStarted(timeout time.Duration, after uint64, ids ...string) (job.Ring, job.Start) {
	e.t.Helper()
	var ring job.Ring
	var start job.Start
	waitFor(e.t, e.ctx, timeout, func() (bool, string) {
		ring = job.Ring{}
		if !e.get(job.KeyRing, &ring) {
			return false, "no ring"
		}
		got := make([]string, len(ring.Members))
		for i, m := range ring.Members {
			got[i] = m.ID
		}
		if ring.Epoch <= after || strings.Join(got, ",") != strings.Join(ids, ",") {
			return false, fmt.Sprintf("ring epoch %d %v, want epoch > %d with %v", ring.Epoch, got, after, ids)
		}
		if !e.get(job.StartKey(ring.Epoch), &start) {
			return false, fmt.Sprintf("epoch %d not started", ring.Epoch)
		}
		return true, ""
	})
	return ring, start
}

// waitFor polls cond every 20 ms until it holds, failing the test after
// timeout with cond's last explanation.
func waitFor(t *testing.T, ctx context.Context, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, why := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %s", timeout, why)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%v: %s", ctx.Err(), why)
		case <-tick.C:
		}
	}
}

// fakeWorker registers under its own lease and follows the epoch protocol:
// on each ring that names it, it writes ready at its step; on start it
// takes the start's step.
type fakeWorker struct {
	id    string
	cli   *clientv3.Client
	lease clientv3.LeaseID
	step  atomic.Int64
	// started is the last epoch whose start record this worker acted on;
	// tests wait on it before changing step, else a late start record
	// would overwrite the step they set.
	started atomic.Uint64
	cancel  context.CancelFunc
	done    chan struct{}
}

func (e *env) worker(id string, ttl int64) *fakeWorker {
	e.t.Helper()
	return e.workerWith(id, ttl, func(m *job.Member) {})
}

func (e *env) workerWith(id string, ttl int64, edit func(*job.Member)) *fakeWorker {
	e.t.Helper()
	ctx, cancel := context.WithCancel(e.ctx)
	w := &fakeWorker{id: id, cli: e.cli, cancel: cancel, done: make(chan struct{})}
	lease, err := e.cli.Grant(ctx, ttl)
	if err != nil {
		e.t.Fatal(err)
	}
	w.lease = lease.ID
	m := job.Member{ID: id, Endpoint: "127.0.0.1:" + id, Device: "cpu", SpecHash: e.spec.Hash, CodeHash: e.spec.CodeHash, Protocol: job.ProtocolVersion}
	edit(&m)
	key := job.Prefix(testJob) + job.KeyMembers + id
	resp, err := e.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, job.Encode(m), clientv3.WithLease(lease.ID))).Commit()
	if err != nil || !resp.Succeeded {
		e.t.Fatalf("register %s: %v (succeeded %v)", id, err, resp != nil && resp.Succeeded)
	}
	ka, err := e.cli.KeepAlive(ctx, lease.ID)
	if err != nil {
		e.t.Fatal(err)
	}
	go func() {
		for range ka {
		}
	}()
	go w.follow(ctx)
	e.t.Cleanup(w.kill)
	return w
}

// kill stops the worker like SIGKILL: no more keep-alives, so its key goes
// when the lease expires.
func (w *fakeWorker) kill() {
	w.cancel()
	<-w.done
}

func (w *fakeWorker) follow(ctx context.Context) {
	defer close(w.done)
	p := job.Prefix(testJob)
	readied, started := uint64(0), uint64(0)
	for ctx.Err() == nil {
		wctx, cancel := context.WithCancel(ctx)
		wch := w.cli.Watch(wctx, p, clientv3.WithPrefix())
		// Act on what is there already, then on every change.
		check := func() {
			var ring job.Ring
			resp, err := w.cli.Get(ctx, p+job.KeyRing)
			if err != nil || len(resp.Kvs) == 0 || job.Decode("ring", resp.Kvs[0].Value, &ring) != nil {
				return
			}
			if ring.Rank(w.id) < 0 {
				return
			}
			if ring.Epoch > readied {
				r := job.Ready{Epoch: ring.Epoch, Step: int(w.step.Load())}
				if _, err := w.cli.Put(ctx, p+job.ReadyKey(ring.Epoch, w.id), job.Encode(r)); err == nil {
					readied = ring.Epoch
				}
			}
			sresp, err := w.cli.Get(ctx, p+job.StartKey(ring.Epoch))
			var s job.Start
			if ring.Epoch > started && err == nil && len(sresp.Kvs) > 0 && job.Decode("start", sresp.Kvs[0].Value, &s) == nil {
				w.step.Store(int64(s.Step))
				started = ring.Epoch
				w.started.Store(started)
			}
		}
		check()
		for range wch {
			check()
		}
		cancel()
	}
}

func TestThreeWorkersKillJoin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 3)
	c, stop := e.coordinator("c1", e.cli)
	w1, w2 := e.worker("w1", 1), e.worker("w2", 1)
	w3 := e.worker("w3", 1)
	ring, start := e.waitStarted(10*time.Second, 0, "w1", "w2", "w3")
	if ring.Epoch != 1 || start.Step != 0 || start.Source != "w1" {
		t.Fatalf("first epoch: ring %+v start %+v, want epoch 1 from step 0 of w1", ring, start)
	}
	if !c.IsLeader() {
		t.Fatal("the only replica does not lead")
	}

	// SIGKILL: w2's keep-alives stop; the ring re-forms when its lease expires.
	for _, w := range []*fakeWorker{w1, w3} {
		waitFor(t, ctx, 10*time.Second, func() (bool, string) {
			return w.started.Load() >= ring.Epoch, w.id + " has not acted on the first start record"
		})
	}
	w1.step.Store(17)
	w3.step.Store(16)
	t0 := time.Now()
	w2.kill()
	ring, start = e.waitStarted(10*time.Second, 1, "w1", "w3")
	t.Logf("lease (TTL 1 s) stopped -> epoch %d started: %s", ring.Epoch, time.Since(t0))
	if start.Step != 17 || start.Source != "w1" || !start.Sync {
		t.Fatalf("after the kill: start %+v, want step 17 from w1 with sync (w3 was behind)", start)
	}

	// A joiner enters at the next epoch and is told to copy from w1.
	t0 = time.Now()
	e.worker("w4", 1)
	ring, start = e.waitStarted(10*time.Second, ring.Epoch, "w1", "w3", "w4")
	t.Logf("join -> epoch %d started: %s", ring.Epoch, time.Since(t0))
	if start.Step != 17 || start.Source != "w1" || !start.Sync {
		t.Fatalf("after the join: start %+v, want step 17 from w1 with sync", start)
	}
	// Only the current epoch's barrier keys are left.
	for _, prefix := range []string{job.KeyReady, job.KeyStart} {
		resp, err := e.cli.Get(ctx, job.Prefix(testJob)+prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			k := strings.TrimPrefix(string(kv.Key), job.Prefix(testJob))
			if !strings.HasPrefix(k, job.StartKey(ring.Epoch)) && !strings.HasPrefix(k, job.KeyReady+fmt.Sprint(ring.Epoch)+"/") {
				t.Errorf("barrier key %s of an old epoch is left (epoch %d)", k, ring.Epoch)
			}
		}
	}

	kinds := map[string]int{}
	for _, r := range c.Events() {
		kinds[r.Kind]++
	}
	if kinds[NoticeJoined] != 4 || kinds[NoticeLeft] != 1 || kinds["started"] != 3 {
		t.Errorf("events %v, want 4 joined, 1 left, 3 started", kinds)
	}

	// The same events are in etcd, in order, the recovery on started ones.
	stored := e.events()
	if len(stored) != len(c.Events()) {
		t.Fatalf("%d events in etcd, %d in memory", len(stored), len(c.Events()))
	}
	for i, ev := range stored {
		r := c.Events()[i]
		if ev.Seq != uint64(i+1) || ev.Kind != r.Kind || ev.WorkerID != r.WorkerID || ev.Epoch != r.Epoch || ev.Leader != "c1" {
			t.Errorf("event %d in etcd %+v, in memory %+v", i, ev, r)
		}
	}
	if stored[0].Kind != KindLeaderElected {
		t.Errorf("first event %+v, want leader_elected", stored[0])
	}
	var recovered int
	for _, ev := range stored {
		if ev.Kind == KindStarted && ev.Epoch > 1 {
			if ev.RecoverySeconds <= 0 || ev.RecoverySeconds > 10 {
				t.Errorf("started event %+v: recovery %.3fs, want in (0, 10]", ev, ev.RecoverySeconds)
			}
			recovered++
		}
	}
	if recovered != 2 {
		t.Errorf("%d started events after a change, want 2", recovered)
	}

	// done ends Run with nil.
	if _, err := e.cli.Put(ctx, job.Prefix(testJob)+job.KeyDone, job.Encode(job.Done{Step: 17})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, 5*time.Second, func() (bool, string) { return !c.IsLeader(), "still leading after done" })
	if err := stop(); err != nil {
		t.Fatalf("Run after done = %v, want nil", err)
	}
}

// events reads events/ in key order.
func (e *env) events() []job.Event {
	e.t.Helper()
	p := job.Prefix(testJob)
	resp, err := e.cli.Get(e.ctx, p+job.KeyEvents, clientv3.WithPrefix())
	if err != nil {
		e.t.Fatal(err)
	}
	out := make([]job.Event, len(resp.Kvs))
	for i, kv := range resp.Kvs {
		if err := job.Decode(string(kv.Key), kv.Value, &out[i]); err != nil {
			e.t.Fatal(err)
		}
	}
	return out
}

// A new leader continues the sequence after the newest stored event and
// keeps only the newest job.MaxEvents.
func TestEventsContinueAndTrim(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 1)
	p := job.Prefix(testJob)
	for seq := uint64(1); seq <= job.MaxEvents; seq++ {
		if _, err := e.cli.Put(ctx, p+job.EventKey(seq), job.Encode(job.Event{Seq: seq, Kind: "old"})); err != nil {
			t.Fatal(err)
		}
	}
	e.coordinator("c1", e.cli)
	e.worker("w1", 30)
	e.waitStarted(10*time.Second, 0, "w1")
	var evs []job.Event
	waitFor(t, ctx, 5*time.Second, func() (bool, string) {
		evs = e.events()
		n := len(evs)
		return n == job.MaxEvents && evs[n-1].Kind == KindStarted, fmt.Sprintf("%d events, want %d ending with started", n, job.MaxEvents)
	})
	// leader_elected, joined, ring, started: four new, four old gone.
	first, last := evs[0], evs[len(evs)-1]
	if first.Seq != 5 || last.Seq != job.MaxEvents+4 || evs[len(evs)-4].Kind != KindLeaderElected {
		t.Fatalf("events run from seq %d to %d (the 4th newest %+v), want 5 to %d with leader_elected first of the new",
			first.Seq, last.Seq, evs[len(evs)-4], job.MaxEvents+4)
	}
}

func TestReportRemovesSuspectAtOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 3)
	e.coordinator("c1", e.cli)
	// A long TTL: only the report can remove w2 in time.
	e.worker("w1", 30)
	e.worker("w2", 30)
	e.worker("w3", 30)
	e.waitStarted(10*time.Second, 0, "w1", "w2", "w3")

	t0 := time.Now()
	rep := job.Report{Epoch: 1, Reporter: "w1", Suspect: "w2", Error: "send chunk 3 to rank 1: connection reset"}
	if _, err := e.cli.Put(ctx, job.Prefix(testJob)+job.KeyReports+"w1", job.Encode(rep)); err != nil {
		t.Fatal(err)
	}
	ring, start := e.waitStarted(5*time.Second, 1, "w1", "w3")
	t.Logf("report -> epoch %d started: %s", ring.Epoch, time.Since(t0))
	if start.Sync {
		t.Errorf("start %+v: survivors at one step need no sync", start)
	}
	if !strings.Contains(ring.Reason, "reported by w1") {
		t.Errorf("ring reason %q does not name the reporter", ring.Reason)
	}
	waitFor(t, ctx, 5*time.Second, func() (bool, string) {
		return !e.exists(job.KeyMembers+"w2") && !e.exists(job.KeyReports+"w1"),
			"the suspect's key or the consumed report is still there"
	})
}

func TestRefusedMember(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 1)
	c, _ := e.coordinator("c1", e.cli)
	e.workerWith("old", 30, func(m *job.Member) { m.CodeHash = "another-build" })
	e.worker("w1", 30)
	e.waitStarted(10*time.Second, 0, "w1")
	waitFor(t, ctx, 5*time.Second, func() (bool, string) { return !e.exists(job.KeyMembers + "old"), "refused key not deleted" })
	var refused []Record
	for _, r := range c.Events() {
		if r.Kind == NoticeRefused {
			refused = append(refused, r)
		}
	}
	if len(refused) != 1 || refused[0].WorkerID != "old" || !strings.Contains(refused[0].Reason, "another build") {
		t.Fatalf("refused events %+v, want one for old naming the build", refused)
	}
}

// Two replicas: the leader crashes (its client closed, so its lease is
// neither revoked nor kept alive); the standby takes over after the lease
// TTL and handles the next membership change.
func TestLeaderFailover(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 2)
	clients := map[string]*clientv3.Client{}
	for _, id := range []string{"c1", "c2"} {
		cli, err := etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: e.server.Endpoints()})
		if err != nil {
			t.Fatal(err)
		}
		clients[id] = cli
		t.Cleanup(func() { cli.Close() })
	}
	c1, stop1 := e.coordinator("c1", clients["c1"])
	waitFor(t, ctx, 5*time.Second, func() (bool, string) { return c1.IsLeader(), "c1 does not lead" })
	c2, _ := e.coordinator("c2", clients["c2"])
	e.worker("w1", 1)
	w2 := e.worker("w2", 1)
	e.waitStarted(10*time.Second, 0, "w1", "w2")
	if c2.IsLeader() {
		t.Fatal("both replicas lead")
	}

	t0 := time.Now()
	clients["c1"].Close() // the leader crashes
	waitFor(t, ctx, 10*time.Second, func() (bool, string) { return c2.IsLeader(), "the standby did not take over" })
	t.Logf("leader crash -> standby leads: %s", time.Since(t0))
	stop1()

	w2.kill()
	ring, start := e.waitStarted(10*time.Second, 1, "w1")
	if ring.Epoch != 2 || start.Source != "w1" {
		t.Fatalf("after takeover: ring %+v start %+v, want epoch 2 started from w1", ring, start)
	}
	t.Logf("leader crash -> epoch 2 started by the standby: %s", time.Since(t0))
}

// A leader stopped mid-epoch-change (ring published, start not) is resumed
// by the standby, which starts that same epoch.
func TestLeaderHandoverMidEpochChange(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 2)
	w1 := e.worker("w1", 30)
	w1.kill() // w1 registered but never answers: epoch 1 cannot start
	e.worker("w2", 30)
	c1, stop1 := e.coordinator("c1", e.cli)
	var ring job.Ring
	waitFor(t, ctx, 10*time.Second, func() (bool, string) {
		return e.get(job.KeyRing, &ring) && ring.Epoch == 1, "no ring 1"
	})
	if !c1.IsLeader() || e.exists(job.StartKey(1)) {
		t.Fatal("epoch 1 started without w1")
	}
	c2, _ := e.coordinator("c2", e.cli)
	t0 := time.Now()
	stop1() // graceful: resigns, so c2 takes over at once
	waitFor(t, ctx, 5*time.Second, func() (bool, string) { return c2.IsLeader(), "c2 does not lead" })
	t.Logf("leader stopped -> standby leads: %s", time.Since(t0))
	// The new leader waits for epoch 1's ready records, then its ready
	// timeout drops w1 and epoch 2 starts with w2 alone.
	ring, _ = e.waitStarted(10*time.Second, 1, "w2")
	if ring.Epoch != 2 {
		t.Fatalf("ring %+v, want epoch 2", ring)
	}
}

func TestEtcdRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 2)
	c, _ := e.coordinator("c1", e.cli)
	e.worker("w1", 5)
	e.worker("w2", 5)
	ring, _ := e.waitStarted(10*time.Second, 0, "w1", "w2")

	t0 := time.Now()
	e.server.Close()
	t.Logf("etcd closed in %s", time.Since(t0))
	time.Sleep(300 * time.Millisecond) // etcd down for a while (the point of the test)
	t0 = time.Now()
	e.startEtcd()
	t.Logf("etcd restarted in %s", time.Since(t0))
	e.worker("w3", 5)
	t.Logf("w3 registered after %s", time.Since(t0))
	ring, start := e.waitStarted(15*time.Second, ring.Epoch, "w1", "w2", "w3")
	if ring.Epoch != 2 || start.Source != "w1" {
		t.Fatalf("after the restart: ring %+v start %+v, want epoch 2", ring, start)
	}
	if !c.IsLeader() {
		t.Error("the coordinator lost leadership across a short etcd restart")
	}
}

func TestConfigValidate(t *testing.T) {
	base := Default()
	base.JobName = "j"
	base.Etcd.Endpoints = []string{"http://127.0.0.1:2379"}
	if err := base.Validate(); err != nil {
		t.Fatalf("default config: %v", err)
	}
	for _, tc := range []struct {
		name, field string
		edit        func(*Config)
	}{
		{"no job", "--job", func(c *Config) { c.JobName = "" }},
		{"job with slash", "--job", func(c *Config) { c.JobName = "a/b" }},
		{"ready timeout", "--ready-timeout", func(c *Config) { c.ReadyTimeout = 0 }},
		{"lease ttl", "LeaseTTL", func(c *Config) { c.LeaseTTL = 100 * time.Millisecond }},
		{"no endpoints", "--etcd-endpoints", func(c *Config) { c.Etcd.Endpoints = nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			tc.edit(&c)
			err := c.Validate()
			if !errors.Is(err, ErrBadConfig) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("Validate() = %v, want ErrBadConfig naming %s", err, tc.field)
			}
		})
	}
}

func TestBadSpec(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 0) // workers 0: cannot run
	err := Run(ctx, testConfig(t, e.cli, "c1"))
	if !errors.Is(err, ErrBadSpec) {
		t.Fatalf("Run with workers 0 = %v, want ErrBadSpec", err)
	}
}

// With etcd down, Run keeps retrying, and still returns promptly when its
// context ends (the standby and leader paths both block on etcd calls).
func TestStopWhileEtcdDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e := newEnv(t, ctx, 1)
	c1, stop1 := e.coordinator("c1", e.cli)
	waitFor(t, ctx, 5*time.Second, func() (bool, string) { return c1.IsLeader(), "c1 does not lead" })
	_, stop2 := e.coordinator("c2", e.cli)
	e.server.Close()
	// The leader notices its election lease is gone; both then retry.
	waitFor(t, ctx, 10*time.Second, func() (bool, string) { return !c1.IsLeader(), "c1 still leads with etcd down" })
	for i, stop := range []func() error{stop1, stop2} {
		t0 := time.Now()
		if err := stop(); !errors.Is(err, context.Canceled) {
			t.Errorf("replica %d: Run = %v, want context.Canceled", i+1, err)
		}
		t.Logf("replica %d stopped in %s", i+1, time.Since(t0))
		if d := time.Since(t0); d > 3*time.Second {
			t.Errorf("replica %d took %s to stop with etcd down", i+1, d)
		}
	}
}

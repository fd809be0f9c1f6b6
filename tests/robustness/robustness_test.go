// Package robustness runs whole jobs with real processes and breaks them:
// workers are SIGKILLed, added mid-run, the coordinator leader dies, and
// everything dies and is restarted. See README.md for what each test checks
// and the bugs the suite has found.
package robustness

import (
	"context"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/cluster"
	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/localrun"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/internal/train"
	"github.com/bmojo/bmojo/model"
)

var bmojoBin string

func TestMain(m *testing.M) {
	flag.Parse()
	testbin.Main(m.Run, &bmojoBin, testing.Short())
}

func job(t *testing.T, name string, steps, batch int) train.Job {
	t.Helper()
	j := train.Default()
	j.Name = name
	j.Preset = "bmojo-tiny"
	mc, err := model.Preset(j.Preset)
	if err != nil {
		t.Fatal(err)
	}
	mc.SeqLen = 64 // keep steps short: this suite is about the control plane
	mc.Window, mc.FadingWindow, mc.Chunk, mc.Memory = 16, 16, 16, 16
	j.Model = mc
	j.Steps, j.BatchSize = steps, batch
	j.EvalEvery, j.EvalBatches = 0, 1
	j.CheckpointEvery = 10
	j.CheckpointDir = t.TempDir()
	return j
}

type run struct {
	mu        sync.Mutex
	procs     map[string]*os.Process
	endpoints []string
	ready     chan struct{}
	res       localrun.Result
	err       error
	done      chan struct{}
	cancel    context.CancelFunc
	restart   func(down time.Duration) error // stops etcd, waits, starts it again
}

func start(t *testing.T, j train.Job, workers int) *run {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	r := &run{procs: map[string]*os.Process{}, ready: make(chan struct{}), done: make(chan struct{}), cancel: cancel}
	log := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Info, Output: testWriter{t}})
	go func() {
		defer close(r.done)
		r.res, r.err = localrun.Run(ctx, j, localrun.Options{
			Workers: workers, Executable: bmojoBin, Logger: log, WorkerLevel: "info",
			OnEtcd:        func(ep []string) { r.endpoints = ep; close(r.ready) },
			OnEtcdRestart: func(f func(time.Duration) error) { r.restart = f },
			OnWorker: func(id string, p *os.Process) {
				r.mu.Lock()
				r.procs[id] = p
				r.mu.Unlock()
			},
		})
	}()
	t.Cleanup(func() { cancel(); <-r.done })
	select {
	case <-r.ready:
	case <-r.done:
		t.Fatalf("run ended before etcd started: %v", r.err)
	}
	return r
}

func (r *run) client(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: r.endpoints, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// until polls cond like waitFor, failing at once if the run ended.
func (r *run) until(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	waitFor(t, d, what, func() bool {
		select {
		case <-r.done:
			t.Fatalf("run ended while waiting for %s: %v", what, r.err)
		default:
		}
		return cond()
	})
}

func (r *run) wait(t *testing.T) localrun.Result {
	t.Helper()
	<-r.done
	if r.err != nil {
		t.Fatalf("run: %v", r.err)
	}
	return r.res
}

// waitFor polls cond every 20 ms until it holds or the deadline passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// ledger reads every ledger entry of a finished job from its etcd data
// directory (the run's embedded etcd is gone; its data persists).
func ledger(t *testing.T, res localrun.Result, jobName string) map[int]cluster.LedgerEntry {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := etcdserver.Start(ctx, etcdserver.Config{DataDir: res.EtcdDataDir})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	cli, err := clientv3.New(clientv3.Config{Endpoints: srv.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	resp, err := cli.Get(ctx, cluster.Prefix(jobName)+cluster.KeyLedger, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]cluster.LedgerEntry{}
	for _, kv := range resp.Kvs {
		var e cluster.LedgerEntry
		if err := cluster.Decode(string(kv.Key), kv.Value, &e); err != nil {
			t.Fatal(err)
		}
		out[e.Step] = e
	}
	return out
}

// checkExactlyOnce asserts every step of the job consumed exactly its
// global batch positions, each sample once.
func checkExactlyOnce(t *testing.T, l map[int]cluster.LedgerEntry, steps, batch int) {
	t.Helper()
	for s := range steps {
		e, ok := l[s]
		if !ok {
			t.Fatalf("ledger has no entry for step %d", s)
		}
		seen := make([]int, batch)
		for id, r := range e.Ranges {
			for p := r.Start; p < r.Start+r.Count; p++ {
				if p < s*batch || p >= (s+1)*batch {
					t.Fatalf("step %d: %s consumed position %d outside the step's batch [%d,%d)", s, id, p, s*batch, (s+1)*batch)
				}
				seen[p-s*batch]++
			}
		}
		for i, n := range seen {
			if n != 1 {
				t.Fatalf("step %d: sample %d consumed %d times (ranges %v)", s, s*batch+i, n, e.Ranges)
			}
		}
	}
}

func TestKillWorkerMidRun(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 40, 6
	j := job(t, "kill", steps, batch)
	r := start(t, j, 3)
	cli := r.client(t)
	ctx := context.Background()
	r.until(t, 2*time.Minute, "step 8", func() bool { return localrun.ReadProgress(ctx, cli, j.Name).Step >= 8 })
	r.mu.Lock()
	victim := r.procs["worker-1"]
	r.mu.Unlock()
	before := localrun.ReadProgress(ctx, cli, j.Name)
	killed := time.Now()
	if err := victim.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var after cluster.Progress
	r.until(t, time.Minute, "a step committed by the 2 survivors", func() bool {
		after = localrun.ReadProgress(ctx, cli, j.Name)
		return after.Workers == 2 && after.Step > before.Step
	})
	recovery := time.Since(killed)
	t.Logf("SIGKILL at step %d (epoch %d) -> step %d committed by 2 workers at epoch %d: %v",
		before.Step, before.Epoch, after.Step, after.Epoch, recovery)
	res := r.wait(t)
	if res.Done.Step != steps {
		t.Fatalf("job ended at step %d, want %d", res.Done.Step, steps)
	}
	checkExactlyOnce(t, ledger(t, res, j.Name), steps, batch)
	// keep_checkpoints (3) of the 4 written survive, the newest.
	dirs, err := train.ListCheckpoints(j.CheckpointDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) != j.KeepCheckpoints || filepath.Base(dirs[0]) != "step-00000040" {
		t.Fatalf("checkpoints left: %v, want the newest %d", dirs, j.KeepCheckpoints)
	}
}

func TestWorkerJoinsMidRun(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 40, 6
	j := job(t, "join", steps, batch)
	r := start(t, j, 2)
	cli := r.client(t)
	ctx := context.Background()
	r.until(t, 2*time.Minute, "step 8", func() bool { return localrun.ReadProgress(ctx, cli, j.Name).Step >= 8 })
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	cmd, err := localrun.StartWorker(wctx, bmojoBin, j.Name, r.endpoints[0], "worker-late", 1, "info")
	if err != nil {
		t.Fatal(err)
	}
	go cmd.Wait()
	r.until(t, time.Minute, "a step committed by 3 workers", func() bool {
		return localrun.ReadProgress(ctx, cli, j.Name).Workers == 3
	})
	res := r.wait(t)
	if res.Done.Step != steps {
		t.Fatalf("job ended at step %d, want %d", res.Done.Step, steps)
	}
	checkExactlyOnce(t, ledger(t, res, j.Name), steps, batch)
}

// TestEverythingDiesThenResumes: SIGKILL every worker and stop etcd and the
// coordinator; the same job again resumes from the last checkpoint and its
// loss curve is bitwise identical to an uninterrupted run's.
func TestEverythingDiesThenResumes(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 40, 4
	ref := job(t, "resume", steps, batch)
	r := start(t, ref, 2)
	want := ledger(t, r.wait(t), ref.Name)

	j := job(t, "resume", steps, batch)
	r1 := start(t, j, 2)
	cli1 := r1.client(t)
	ctx := context.Background()
	r1.until(t, 2*time.Minute, "step 25", func() bool { return localrun.ReadProgress(ctx, cli1, j.Name).Step >= 25 })
	r1.mu.Lock()
	for _, p := range r1.procs {
		_ = p.Signal(syscall.SIGKILL)
	}
	r1.mu.Unlock()
	r1.cancel()
	<-r1.done
	// The newest checkpoint (step 20) is damaged on disk: the restart must
	// detect it from its manifest's SHA-256 and fall back to step 10.
	weights := filepath.Join(j.CheckpointDir, "step-00000020", train.WeightsFile)
	b, err := os.ReadFile(weights)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 0xff
	if err := os.WriteFile(weights, b, 0o644); err != nil {
		t.Fatal(err)
	}

	r2 := start(t, j, 2)
	res := r2.wait(t)
	if !res.Resumed {
		t.Fatal("second run did not resume the job")
	}
	got := ledger(t, res, j.Name)
	for s := range steps {
		if math.Float64bits(got[s].Loss) != math.Float64bits(want[s].Loss) {
			t.Fatalf("step %d: loss %v after resume, %v uninterrupted", s, got[s].Loss, want[s].Loss)
		}
	}
	checkExactlyOnce(t, got, steps, batch)
}

// TestWorkersTimesBatch: 2 workers × local batch b follow 1 worker × 2b.
func TestWorkersTimesBatch(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 8, 4
	var losses [2]map[int]cluster.LedgerEntry
	for i, workers := range []int{1, 2} {
		j := job(t, fmt.Sprintf("dp%d", workers), steps, batch)
		r := start(t, j, workers)
		losses[i] = ledger(t, r.wait(t), j.Name)
	}
	for s := range steps {
		a, b := losses[0][s].Loss, losses[1][s].Loss
		if math.Abs(a-b) > 1e-4*math.Abs(a) {
			t.Fatalf("step %d: 1 worker loss %v, 2 workers %v", s, a, b)
		}
	}
}

// TestLeaderCoordinatorKilled: two coordinator replicas; the leader is
// SIGKILLed, then a worker is killed so that only a new leader can re-form
// the ring: the job must still finish with every sample consumed once.
func TestLeaderCoordinatorKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 40, 6
	j := job(t, "leader", steps, batch)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var (
		mu     sync.Mutex
		coords []*os.Process
		procs  = map[string]*os.Process{}
	)
	ready := make(chan []string, 1)
	done := make(chan struct{})
	var res localrun.Result
	var runErr error
	go func() {
		defer close(done)
		res, runErr = localrun.Run(ctx, j, localrun.Options{
			Workers: 3, Coordinators: 2, Executable: bmojoBin, WorkerLevel: "info",
			Logger: hclog.New(&hclog.LoggerOptions{Name: "test", Output: testWriter{t}}),
			OnEtcd: func(ep []string) { ready <- ep },
			OnCoordinator: func(_ int, p *os.Process) {
				mu.Lock()
				coords = append(coords, p)
				mu.Unlock()
			},
			OnWorker: func(id string, p *os.Process) {
				mu.Lock()
				procs[id] = p
				mu.Unlock()
			},
		})
	}()
	ep := <-ready
	cli, err := clientv3.New(clientv3.Config{Endpoints: ep, DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	waitFor(t, 2*time.Minute, "step 8", func() bool { return localrun.ReadProgress(ctx, cli, j.Name).Step >= 8 })
	// The leader holds the oldest key under election/.
	resp, err := cli.Get(ctx, cluster.Prefix(j.Name)+cluster.KeyElection, clientv3.WithFirstCreate()...)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("no election key: %v", err)
	}
	pid := leaderPID(resp.Kvs[0].Value)
	mu.Lock()
	var leader *os.Process
	for _, p := range coords {
		if p.Pid == pid {
			leader = p
		}
	}
	mu.Unlock()
	if leader == nil {
		t.Fatal("could not tell which coordinator leads")
	}
	if err := leader.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	victim := procs["worker-2"]
	mu.Unlock()
	if err := victim.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-done
	if runErr != nil {
		t.Fatal(runErr)
	}
	if res.Done.Step != steps {
		t.Fatalf("job ended at step %d", res.Done.Step)
	}
	checkExactlyOnce(t, ledger(t, res, j.Name), steps, batch)
}

// leaderPID reads the pid a coordinator campaigns with (its election value
// is its id, hostname-pid by default).
func leaderPID(v []byte) int {
	s := string(v)
	pid, err := strconv.Atoi(s[strings.LastIndex(s, "-")+1:])
	if err != nil {
		return -1
	}
	return pid
}

// TestDuplicateWorkerID: a second worker claiming a live worker's id is
// refused with an error naming the holder; the job is undisturbed.
func TestDuplicateWorkerID(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 100, 4
	j := job(t, "dup", steps, batch)
	r := start(t, j, 2)
	cli := r.client(t)
	ctx := context.Background()
	r.until(t, 2*time.Minute, "step 2", func() bool { return localrun.ReadProgress(ctx, cli, j.Name).Step >= 2 })
	var out strings.Builder
	cmd := exec.Command(bmojoBin, "worker", "--job", j.Name, "--etcd-endpoints", r.endpoints[0], "--id", "worker-0", "--lease-ttl", "1")
	cmd.Stderr = &out
	err := cmd.Run()
	if err == nil || !strings.Contains(out.String(), `"worker-0" is held by pid`) {
		t.Fatalf("duplicate worker: err %v, stderr:\n%s", err, out.String())
	}
	res := r.wait(t)
	if res.Done.Step != steps {
		t.Fatalf("job ended at step %d", res.Done.Step)
	}
}

// TestEtcdBrieflyUnavailable: etcd goes away for 1.5 s mid-run (less than
// the lease TTL). Training goes on meanwhile on the ring it has; progress and
// ledger records queue and reach etcd once it is back; nothing is lost.
func TestEtcdBrieflyUnavailable(t *testing.T) {
	if testing.Short() {
		t.Skip("robustness suite: runs real processes")
	}
	const steps, batch = 80, 4
	j := job(t, "etcd-down", steps, batch)
	r := start(t, j, 2)
	cli := r.client(t)
	ctx := context.Background()
	r.until(t, 2*time.Minute, "step 10", func() bool { return localrun.ReadProgress(ctx, cli, j.Name).Step >= 10 })
	before := localrun.ReadProgress(ctx, cli, j.Name)
	if err := r.restart(1500 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	var after cluster.Progress
	r.until(t, time.Minute, "progress after the restart", func() bool {
		after = localrun.ReadProgress(ctx, cli, j.Name)
		return after.Step > before.Step
	})
	t.Logf("etcd down 1.5 s: step %d before, %d on the first read after (epoch %d -> %d)", before.Step, after.Step, before.Epoch, after.Epoch)
	if after.Step < before.Step+3 {
		t.Errorf("training did not go on while etcd was down: step %d before, %d after", before.Step, after.Step)
	}
	if after.Epoch != before.Epoch {
		t.Errorf("the ring was re-formed (epoch %d -> %d); a short etcd outage must not change membership", before.Epoch, after.Epoch)
	}
	res := r.wait(t)
	if res.Done.Step != steps {
		t.Fatalf("job ended at step %d", res.Done.Step)
	}
	checkExactlyOnce(t, ledger(t, res, j.Name), steps, batch)
}

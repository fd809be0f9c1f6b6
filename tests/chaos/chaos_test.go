// Package chaos runs a whole job with real processes throughout and kills
// them at random: an etcd server process of its own (/usr/bin/etcd, Debian's
// etcd-server), 2 coordinators and 3 workers, each restarted when it dies as
// Kubernetes would restart its pod. Workers and coordinators are SIGKILLed
// at random steps, and etcd once (restarted on the same data directory).
// The job must finish; its ledger must be exactly once by the robustness
// suite's independent check (the sampler, not the workers, says what each
// step had to read); its final loss must be within 1% of an undisturbed run
// of the same job, run first in the same test.
//
//	go test ./tests/chaos/                       # short: 200 steps, 8 kills
//	BMOJO_CHAOS=long go test -timeout 40m -v ./tests/chaos/   # make chaos: 1000 steps, 24 kills
//	BMOJO_CHAOS_SEED=N ...                       # replay the schedule of seed N
package chaos

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.yaml.in/yaml/v3"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/localrun"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tests/robustness"
)

var (
	bmojoBin  string
	longChaos = flag.Bool("chaos.long", false, "run the long schedule (also BMOJO_CHAOS=long)")
)

func TestMain(m *testing.M) {
	flag.Parse()
	testbin.Main(m.Run, &bmojoBin, testing.Short())
}

// plan is one chaos schedule's size.
type plan struct {
	name                            string
	steps                           int
	workerKills, coordKills, etcdKs int
	timeout                         time.Duration // one run, start to done
}

var (
	shortPlan = plan{name: "short", steps: 200, workerKills: 6, coordKills: 1, etcdKs: 1, timeout: 4 * time.Minute}
	longPlan  = plan{name: "long", steps: 1000, workerKills: 20, coordKills: 3, etcdKs: 1, timeout: 15 * time.Minute}
)

const (
	workers      = 3
	coordinators = 2
	batch        = 6
	restartDelay = 500 * time.Millisecond // a pod's restart
	etcdDown     = time.Second            // etcd's restart after its kill
)

// etcdExe is Debian's etcd-server; CI installs it.
const etcdExe = "/usr/bin/etcd"

func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos suite: runs real processes")
	}
	if _, err := os.Stat(etcdExe); err != nil {
		t.Skipf("chaos suite needs %s (apt-get install -y etcd-server): %v", etcdExe, err)
	}
	p := shortPlan
	if *longChaos || os.Getenv("BMOJO_CHAOS") == "long" {
		p = longPlan
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BMOJO_CHAOS_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("BMOJO_CHAOS_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("chaos %s: seed %d (replay with BMOJO_CHAOS_SEED=%d)", p.name, seed, seed)
	t0 := time.Now()

	ref := newJob(t, p.steps)
	refRes := runJob(t, ref, p, nil)
	t.Logf("undisturbed run: %d steps in %v, val loss %.5f, train loss %.5f", ref.Steps, refRes.wall.Round(time.Second),
		refRes.done.ValLoss, refRes.done.Loss)

	j := ref
	j.CheckpointDir = t.TempDir() // the same job; its own checkpoints
	sched := schedule(seed, p)
	res := runJob(t, j, p, sched)

	if err := robustness.CheckLedger(j, res.ledger); err != nil {
		t.Errorf("ledger is not exactly once: %v", err)
	}
	survived := map[string]int{}
	for _, k := range res.kills {
		survived[k.kind]++
	}
	rel := func(a, b float64) float64 { return math.Abs(a-b) / math.Abs(b) }
	valDiff, lossDiff := rel(res.done.ValLoss, refRes.done.ValLoss), rel(res.done.Loss, refRes.done.Loss)
	if res.done.Step != j.Steps {
		t.Errorf("the job finished at step %d, want %d", res.done.Step, j.Steps)
	}
	if !(valDiff <= 0.01) {
		t.Errorf("final val loss %.5f is %.2f%% from the undisturbed run's %.5f (limit 1%%)", res.done.ValLoss, 100*valDiff, refRes.done.ValLoss)
	}
	exactly := "exactly once: every step 0.." + strconv.Itoa(j.Steps-1) + " once, every rank's ranges and window checksums match the sampler"
	if t.Failed() {
		exactly = "FAILED"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "chaos %s figures (seed %d):\n", p.name, seed)
	fmt.Fprintf(&b, "  steps:          %d of %d, batch %d, %d workers, %d coordinators, model %s seq_len %d\n", res.done.Step, j.Steps, j.BatchSize, workers, coordinators, j.Preset, j.Model.SeqLen)
	fmt.Fprintf(&b, "  kills survived: %d worker, %d coordinator, %d etcd (SIGKILL; restarted) of %d scheduled\n", survived["worker"], survived["coordinator"], survived["etcd"], len(sched))
	fmt.Fprintf(&b, "  restarts:       %d worker, %d coordinator, %d etcd processes; final ring epoch %d\n", res.restarts["worker"], res.restarts["coordinator"], res.restarts["etcd"], res.epoch)
	fmt.Fprintf(&b, "  ledger:         %s\n", exactly)
	fmt.Fprintf(&b, "  final val loss: %.5f vs %.5f undisturbed (%.3f%%; limit 1%%)\n", res.done.ValLoss, refRes.done.ValLoss, 100*valDiff)
	fmt.Fprintf(&b, "  final loss:     %.5f vs %.5f undisturbed (%.3f%%)\n", res.done.Loss, refRes.done.Loss, 100*lossDiff)
	fmt.Fprintf(&b, "  wall time:      %v chaos run, %v undisturbed, %v in all\n", res.wall.Round(time.Second), refRes.wall.Round(time.Second), time.Since(t0).Round(time.Second))
	for _, k := range res.kills {
		fmt.Fprintf(&b, "    kill %-11s %-13s at step %d\n", k.kind, k.victim, k.step)
	}
	t.Log(b.String())
}

// newJob is the chaos job: bmojo-tiny cut down like the robustness suite's
// (this suite is about the control plane), an evaluation and a checkpoint
// every steps/4.
func newJob(t *testing.T, steps int) job.Job {
	t.Helper()
	j := job.Default()
	j.Name = "chaos"
	j.Preset = "bmojo-tiny"
	mc, err := model.Preset(j.Preset)
	if err != nil {
		t.Fatal(err)
	}
	mc.SeqLen = 64
	mc.Window, mc.FadingWindow, mc.Chunk, mc.Memory = 16, 16, 16, 16
	j.Model = mc
	j.Steps, j.BatchSize = steps, batch
	j.EvalEvery, j.EvalBatches = steps/4, 8 // kills land in mid-run evaluations too
	// At the default 3e-3 this small-batch job trains chaotically: a ring
	// of 2 and a ring of 3 (sums rounded in another order, 1e-8 apart at
	// step 0) end 0.6% apart in training loss and up to 1.9% in validation
	// loss after 200 steps, so no run that changes its ring size could
	// meet the 1% bound. At 1e-3 they end 4e-7 apart: the bound then
	// measures what the chaos did, not rounding.
	j.LR = 1e-3
	j.CheckpointEvery, j.KeepCheckpoints = steps/4, 3
	j.CheckpointDir = t.TempDir()
	return j
}

// kill is one scheduled SIGKILL: of kind (worker, coordinator, etcd) once
// the job has reached step.
type kill struct {
	kind   string
	step   int
	victim string // filled when done
}

// schedule draws p's kills from seed: kinds in random order at steps spread
// over 5%..90% of the job, each jittered by up to a third of the spacing;
// about one kill in four follows the previous one at once (two processes
// down together), and one worker kill waits for the last step (it lands
// during the final evaluation or the finish, when it lands before done).
func schedule(seed uint64, p plan) []kill {
	r := rand.New(rand.NewPCG(seed, 0x636861_6f73))
	var ks []kill
	for range p.workerKills {
		ks = append(ks, kill{kind: "worker"})
	}
	for range p.coordKills {
		ks = append(ks, kill{kind: "coordinator"})
	}
	for range p.etcdKs {
		ks = append(ks, kill{kind: "etcd"})
	}
	r.Shuffle(len(ks), func(i, j int) { ks[i], ks[j] = ks[j], ks[i] })
	lo, hi := p.steps/20, p.steps*9/10
	gap := float64(hi-lo) / float64(len(ks))
	for i := range ks {
		ks[i].step = lo + int(gap*(float64(i)+0.5+(r.Float64()-0.5)*2/3))
		if i > 0 && r.IntN(4) == 0 {
			ks[i].step = ks[i-1].step
		}
	}
	for i := len(ks) - 1; i >= 0; i-- {
		if ks[i].kind == "worker" {
			ks[i].step = p.steps
			break
		}
	}
	sort.SliceStable(ks, func(i, j int) bool { return ks[i].step < ks[j].step })
	return ks
}

// result is what one run reached.
type result struct {
	done     job.Done
	epoch    uint64
	ledger   map[int]job.LedgerEntry
	kills    []kill
	restarts map[string]int
	wall     time.Duration
}

// runJob runs j on a cluster of real processes, carrying out sched (none:
// the undisturbed run), until done; then every process stops and the
// ledger is read.
func runJob(t *testing.T, j job.Job, p plan, sched []kill) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), p.timeout+2*time.Minute)
	defer cancel()
	t0 := time.Now()
	c := startCluster(ctx, t, j)
	defer c.stop()
	failed := t.Fatalf // startCluster's cleanup logs the processes' logs on a failure
	deadline := time.Now().Add(p.timeout)
	remaining := func() time.Duration { return max(time.Until(deadline), time.Second) }
	var res result
	for _, k := range sched {
		c.waitFor(remaining(), fmt.Sprintf("step %d (to kill a %s)", k.step, k.kind), func(ctx context.Context) bool {
			return c.progress(ctx).Step >= k.step || c.isDone(ctx)
		})
		if c.failed {
			failed("chaos run: no progress to step %d", k.step)
		}
		var hit bool
		if k.victim, hit = c.kill(k.kind); !hit {
			t.Logf("no %s running at step >= %d: nothing killed", k.kind, k.step)
			continue
		}
		t.Logf("SIGKILL %s %s at step >= %d", k.kind, k.victim, k.step)
		res.kills = append(res.kills, k)
	}
	c.waitFor(remaining(), "done", c.isDone)
	if c.failed {
		failed("the job did not finish within %v", p.timeout)
	}
	// Workers exit on done, writing what they hold: wait for them, then
	// read the ledger.
	for _, id := range c.workerIDs {
		s := c.procs[id]
		select {
		case <-s.ended:
		case <-time.After(time.Minute):
			failed("%s still running a minute after done", id)
		}
	}
	rctx, rcancel := context.WithTimeout(ctx, robustness.CallTimeout)
	defer rcancel()
	l, err := robustness.ReadLedger(rctx, c.cli, j.Name)
	if err != nil {
		failed("%v", err)
	}
	res.ledger = l
	res.done, _ = c.readDone(rctx)
	res.epoch = c.epoch(rctx)
	res.restarts = c.restarts()
	res.wall = time.Since(t0)
	return res
}

// cluster is one job's processes: etcd, the coordinators and the workers,
// each under a supervisor that restarts it when it dies.
type cluster struct {
	t         *testing.T
	ctx       context.Context
	cancel    context.CancelFunc
	dir       string
	job       job.Job
	endpoint  string
	cli       *clientv3.Client
	procs     map[string]*supervised
	workerIDs []string
	coordIDs  []string
	rnd       *rand.Rand
	failed    bool
}

func startCluster(ctx context.Context, t *testing.T, j job.Job) *cluster {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	c := &cluster{t: t, ctx: ctx, cancel: cancel, dir: t.TempDir(), job: j, procs: map[string]*supervised{},
		rnd: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))}
	// The job identity, as a deployment has it: a job CA, etcd with
	// client-certificate authentication, every process with its own
	// certificate (the ring checks each neighbour's slot).
	ca, err := pki.NewCA("bmojo chaos", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pkiDir := filepath.Join(c.dir, "pki")
	issue := func(role, id string) pki.Files {
		t.Helper()
		leaf, err := ca.Issue(role, id, []string{"127.0.0.1"}, 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		f, err := pki.Write(pkiDir, role+"-"+id, ca.PEM, leaf)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	etcdTLS, clientTLS := issue(pki.RoleEtcd, "etcd"), issue(pki.RoleClient, "chaos")
	ports := freePorts(t, 2)
	c.endpoint = "https://127.0.0.1:" + ports[0]
	peer := "http://127.0.0.1:" + ports[1]
	c.start("etcd", etcdExe, etcdDown, "--name", "chaos", "--data-dir", filepath.Join(c.dir, "etcd"),
		"--listen-client-urls", c.endpoint, "--advertise-client-urls", c.endpoint,
		"--cert-file", etcdTLS.Cert, "--key-file", etcdTLS.Key, "--client-cert-auth", "--trusted-ca-file", etcdTLS.CA,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "chaos="+peer,
		"--logger", "zap", "--log-level", "warn")
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	cli, err := etcdserver.Connect(cctx, etcdserver.ClientConfig{Endpoints: []string{c.endpoint}, CallTimeout: robustness.CallTimeout,
		MaxBackoff: time.Second, CAFile: clientTLS.CA, CertFile: clientTLS.Cert, KeyFile: clientTLS.Key})
	if err != nil {
		c.stop()
		t.Fatal(err)
	}
	c.cli = cli
	t.Cleanup(func() {
		if t.Failed() {
			c.dumpLogs()
		}
	})
	y, err := yaml.Marshal(j)
	if err != nil {
		c.stop()
		t.Fatal(err)
	}
	jobFile := filepath.Join(c.dir, "job.yaml")
	if err := os.WriteFile(jobFile, y, 0o644); err != nil {
		c.stop()
		t.Fatal(err)
	}
	for i := range coordinators {
		id := fmt.Sprintf("coordinator-%d", i)
		c.coordIDs = append(c.coordIDs, id)
		c.start(id, bmojoBin, restartDelay, append([]string{"coordinator", "--job", j.Name, "--job-file", jobFile,
			"--workers", strconv.Itoa(workers), "--min-workers", "1", "--etcd-endpoints", c.endpoint,
			"--id", id, "--log-level", "info"}, localrun.TLSFlags(issue(pki.RoleCoordinator, id))...)...)
	}
	for i := range workers {
		id := fmt.Sprintf("worker-%d", i)
		c.workerIDs = append(c.workerIDs, id)
		c.start(id, bmojoBin, restartDelay, append([]string{"worker", "--job", j.Name, "--etcd-endpoints", c.endpoint,
			"--id", id, "--threads", "1", "--device", "cpu", "--log-level", "info"}, localrun.TLSFlags(issue(pki.RoleWorker, id))...)...)
	}
	return c
}

// start runs exe args under a supervisor named name, restarted delay after
// each death (not after a clean exit: the job is done).
func (c *cluster) start(name, exe string, delay time.Duration, args ...string) {
	f, err := os.Create(filepath.Join(c.dir, name+".log"))
	if err != nil {
		c.t.Fatal(err)
	}
	s := &supervised{name: name, log: f, ended: make(chan struct{})}
	c.procs[name] = s
	go s.run(c.ctx, exe, args, delay)
}

// stop ends every process (SIGTERM, then SIGKILL) and waits for them.
func (c *cluster) stop() {
	c.cancel()
	for _, s := range c.procs {
		select {
		case <-s.ended:
		case <-time.After(30 * time.Second):
			c.t.Errorf("%s did not stop", s.name)
		}
		s.log.Close()
	}
	if c.cli != nil {
		c.cli.Close()
	}
}

// kill SIGKILLs a running process of kind and returns its name, and false
// if none was running (every one of that kind was being restarted).
func (c *cluster) kill(kind string) (string, bool) {
	var names []string
	switch kind {
	case "worker":
		names = c.workerIDs
	case "coordinator":
		names = c.coordIDs
	default:
		names = []string{"etcd"}
	}
	var running []string
	for _, n := range names {
		if c.procs[n].running() {
			running = append(running, n)
		}
	}
	if len(running) == 0 {
		running = names // every one is restarting: the kill finds none
	}
	n := running[c.rnd.IntN(len(running))]
	return n, c.procs[n].kill()
}

// waitFor is robustness.WaitFor, stopping when the cluster ends; c.failed
// says whether cond never held.
func (c *cluster) waitFor(d time.Duration, what string, cond func(ctx context.Context) bool) {
	ok := false
	robustness.WaitFor(c.t, d, c.ctx.Done(), what, func(ctx context.Context) bool {
		ok = cond(ctx)
		return ok
	})
	c.failed = !ok
}

func (c *cluster) progress(ctx context.Context) job.Progress {
	var p job.Progress
	resp, err := c.cli.Get(ctx, job.Prefix(c.job.Name)+job.KeyProgress)
	if err == nil && len(resp.Kvs) > 0 {
		_ = job.Decode(job.KeyProgress, resp.Kvs[0].Value, &p)
	}
	return p
}

func (c *cluster) readDone(ctx context.Context) (job.Done, bool) {
	var d job.Done
	resp, err := c.cli.Get(ctx, job.Prefix(c.job.Name)+job.KeyDone)
	if err != nil || len(resp.Kvs) == 0 {
		return d, false
	}
	return d, job.Decode(job.KeyDone, resp.Kvs[0].Value, &d) == nil
}

func (c *cluster) isDone(ctx context.Context) bool {
	_, ok := c.readDone(ctx)
	return ok
}

func (c *cluster) epoch(ctx context.Context) uint64 {
	var r job.Ring
	resp, err := c.cli.Get(ctx, job.Prefix(c.job.Name)+job.KeyRing)
	if err == nil && len(resp.Kvs) > 0 {
		_ = job.Decode(job.KeyRing, resp.Kvs[0].Value, &r)
	}
	return r.Epoch
}

// restarts counts the processes started after a death, by kind.
func (c *cluster) restarts() map[string]int {
	out := map[string]int{}
	for name, s := range c.procs {
		kind, _, _ := strings.Cut(name, "-")
		s.mu.Lock()
		out[kind] += s.starts - 1
		s.mu.Unlock()
	}
	return out
}

// dumpLogs logs the tail of every process's log (on a failure).
func (c *cluster) dumpLogs() {
	for name, s := range c.procs {
		b, err := os.ReadFile(s.log.Name())
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		c.t.Logf("--- %s (last %d lines of %s):\n%s", name, min(40, len(lines)), s.log.Name(), strings.Join(lines[max(0, len(lines)-40):], "\n"))
	}
}

// supervised runs one process and restarts it when it dies, as Kubernetes
// restarts a pod's container; a clean exit (the job is done) ends it.
type supervised struct {
	name  string
	log   *os.File
	ended chan struct{}

	mu     sync.Mutex
	proc   *os.Process
	starts int
}

func (s *supervised) run(ctx context.Context, exe string, args []string, delay time.Duration) {
	defer close(s.ended)
	for ctx.Err() == nil {
		cmd := exec.CommandContext(ctx, exe, args...)
		cmd.Stdout, cmd.Stderr = s.log, s.log
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 10 * time.Second
		if err := cmd.Start(); err != nil {
			fmt.Fprintf(s.log, "chaos: start %s: %v\n", s.name, err)
		} else {
			s.mu.Lock()
			s.proc, s.starts = cmd.Process, s.starts+1
			s.mu.Unlock()
			err := cmd.Wait()
			s.mu.Lock()
			s.proc = nil
			s.mu.Unlock()
			if err == nil {
				return
			}
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				fmt.Fprintf(s.log, "chaos: %s exited: %v\n", s.name, err)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
}

func (s *supervised) running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc != nil
}

// kill SIGKILLs the process, if one is running (false if none). A killed
// process no longer counts as running, though it may not be reaped yet: a
// second kill picks another.
func (s *supervised) kill() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil || s.proc.Signal(syscall.SIGKILL) != nil {
		return false
	}
	s.proc = nil
	return true
}

// freePorts returns n ports free now on 127.0.0.1.
func freePorts(t *testing.T, n int) []string {
	t.Helper()
	var out []string
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		_, port, _ := net.SplitHostPort(l.Addr().String())
		out = append(out, port)
	}
	for _, l := range ls {
		l.Close()
	}
	return out
}

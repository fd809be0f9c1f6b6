// Package hier runs a whole job with real processes on two "hosts" of two
// workers each, so that the workers reduce hierarchically (a ring inside
// each host, a ring across the hosts per local rank: allreduce.Hier), and
// SIGKILLs one worker mid-run. The survivors (three: an unbalanced ring,
// which reduces flat) must go on at the next epoch; a replacement on the
// dead worker's host makes the ring 2 × 2 again (hierarchical again); the
// job must finish with every sample of every step consumed exactly once
// (tests/robustness's independent ledger check), and the coordinator must
// have acted on no report naming anyone but the dead worker (the
// sub-rings' ranks mapped back to ring members).
//
// Two variants, same body:
//
//   - TestHierKillWorker: the hosts are names (--host), every process on
//     this machine's loopback.
//   - TestHierKillWorkerNetns: each host is a Linux network namespace, its
//     two workers inside it, the namespaces joined by veth pairs on a
//     bridge (the cross-host rings go through the kernel's TCP stack and a
//     veth); etcd and the coordinator stay in this namespace, reached over
//     one more veth. Needs root and ip(8); skipped with a message elsewhere.
//
// Run them with:
//
//	go test -count=1 -v ./tests/hier/      # both: about 20 s, plus the build, on 2 cores
//	go test -short ./tests/hier/           # skips them
package hier

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/localrun"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/job/spec"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tests/robustness"
)

var bmojoBin string

func TestMain(m *testing.M) {
	flag.Parse()
	testbin.Main(m.Run, &bmojoBin, testing.Short())
}

// runTimeout bounds a whole run; a job that does not finish by then fails
// the test with what its processes logged.
const runTimeout = 3 * time.Minute

// hostEnv says where a variant's processes run: the address etcd serves
// on, and for each host the address its workers listen on and the command
// prefix that puts a process there.
type hostEnv struct {
	etcdIP string                // etcd's client address (this namespace)
	listen func(host int) string // a worker's --listen on host
	wrap   func(host int) []string
	flags  []string // more worker flags
}

func TestHierKillWorker(t *testing.T) {
	runKill(t, hostEnv{
		etcdIP: "127.0.0.1",
		listen: func(int) string { return "127.0.0.1:0" },
		wrap:   func(int) []string { return nil },
		flags:  []string{"--data-sockets=false"}, // the gRPC streams; the netns test takes the data sockets
	})
}

// TestHierKillWorkerNetns is TestHierKillWorker with each host in a
// network namespace of its own, and the rings between hosts on data
// sockets (--data-sockets) instead of gRPC streams.
func TestHierKillWorkerNetns(t *testing.T) {
	if testing.Short() {
		t.Skip("hierarchical kill test: runs real processes")
	}
	env := netnsEnv(t, 2)
	env.flags = []string{"--data-sockets"}
	runKill(t, env)
}

func newJob(t *testing.T, steps, batch int) job.Job {
	t.Helper()
	j := job.Default()
	j.Name = "hier"
	j.Preset = "bmojo-tiny"
	mc, err := model.Preset(j.Preset)
	if err != nil {
		t.Fatal(err)
	}
	mc.SeqLen = 64 // short steps: this test is about the all-reduce and recovery
	mc.Window, mc.FadingWindow, mc.Chunk, mc.Memory = 16, 16, 16, 16
	j.Model = mc
	j.Steps, j.BatchSize = steps, batch
	j.EvalEvery, j.EvalBatches = 0, 1
	j.CheckpointEvery = 0
	j.CheckpointDir = t.TempDir()
	j.AllReduce = job.AllReduceHier // auto, plus a warning whenever a ring cannot be hierarchical
	return j
}

// proc is one process of the run, its output in a file.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

type cluster struct {
	t      *testing.T
	env    hostEnv
	dir    string
	ca     *pki.CA
	etcdEP string
	cli    *clientv3.Client
	j      job.Job
	ctx    context.Context

	mu    sync.Mutex
	procs map[string]*proc
}

// start runs a bmojo process (args after the binary) under wrap, its
// stdout and stderr in dir/<name>.log.
func (c *cluster) start(name string, wrap []string, args ...string) *proc {
	c.t.Helper()
	p := &proc{name: name, log: filepath.Join(c.dir, name+".log"), done: make(chan struct{})}
	f, err := os.Create(p.log)
	if err != nil {
		c.t.Fatal(err)
	}
	argv := append(append(wrap, bmojoBin), args...)
	p.cmd = exec.CommandContext(c.ctx, argv[0], argv[1:]...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.Cancel = func() error { return p.cmd.Process.Signal(syscall.SIGKILL) }
	p.cmd.WaitDelay = 5 * time.Second
	if err := p.cmd.Start(); err != nil {
		f.Close()
		c.t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		f.Close()
		close(p.done)
	}()
	c.mu.Lock()
	c.procs[name] = p
	c.mu.Unlock()
	return p
}

// issue writes a certificate of the run's CA for role/id.
func (c *cluster) issue(role, id string, hosts ...string) pki.Files {
	c.t.Helper()
	leaf, err := c.ca.Issue(role, id, hosts, time.Hour)
	if err != nil {
		c.t.Fatal(err)
	}
	f, err := pki.Write(c.dir, role+"-"+id, c.ca.PEM, leaf)
	if err != nil {
		c.t.Fatal(err)
	}
	return f
}

func (c *cluster) startWorker(id string, host int) *proc {
	c.t.Helper()
	args := []string{"worker", "--job", c.j.Name, "--etcd-endpoints", c.etcdEP, "--id", id,
		"--host", fmt.Sprintf("host-%c", 'a'+host), "--listen", c.env.listen(host),
		"--threads", "1", "--device", "cpu", "--log-level", "info"}
	args = append(args, localrun.TLSFlags(c.issue(pki.RoleWorker, id))...)
	args = append(args, c.env.flags...)
	return c.start(id, c.env.wrap(host), args...)
}

// logOf returns what process name has logged so far.
func (c *cluster) logOf(name string) string {
	c.mu.Lock()
	p := c.procs[name]
	c.mu.Unlock()
	if p == nil {
		return ""
	}
	b, _ := os.ReadFile(p.log)
	return string(b)
}

// dumpLogs writes the tail of every process's log to the test log.
func (c *cluster) dumpLogs() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for name, p := range c.procs {
		b, _ := os.ReadFile(p.log)
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		c.t.Logf("--- %s (last %d lines)\n%s", name, len(lines), strings.Join(lines, "\n"))
	}
}

// progress reads the job's progress record (zero on an error).
func (c *cluster) progress() job.Progress {
	ctx, cancel := context.WithTimeout(c.ctx, robustness.CallTimeout)
	defer cancel()
	p, _ := localrun.ReadProgress(ctx, c.cli, c.j.Name)
	return p
}

// until polls cond (robustness.WaitFor), failing with the logs after d.
func (c *cluster) until(d time.Duration, what string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) || c.ctx.Err() != nil {
			c.dumpLogs()
			c.t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond) // polling etcd and log files, not waiting for a guess
	}
}

// epochLine matches the worker's "epoch started" log line, capturing its
// epoch, ring size and all-reduce scheme.
var epochLine = regexp.MustCompile(`epoch started: .*epoch=(\d+) .*ring_size=(\d+) allreduce=("[^"]+"|\S+)`)

// schemes lists the (epoch, ring size, scheme) of every epoch a worker
// started, in order.
func schemes(log string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(log))
	for sc.Scan() {
		if m := epochLine.FindStringSubmatch(sc.Text()); m != nil {
			out = append(out, fmt.Sprintf("epoch %s: %s ranks, %s", m[1], m[2], strings.Trim(m[3], `"`)))
		}
	}
	return out
}

func runKill(t *testing.T, env hostEnv) {
	if testing.Short() {
		t.Skip("hierarchical kill test: runs real processes")
	}
	const steps, batch = 40, 8
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()
	ca, err := pki.NewCA("bmojo hier test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, env: env, dir: t.TempDir(), ca: ca, j: newJob(t, steps, batch), ctx: ctx, procs: map[string]*proc{}}
	defer func() {
		cancel()
		for _, p := range c.procs {
			<-p.done
		}
		if t.Failed() {
			c.dumpLogs()
		}
	}()

	// etcd, embedded in this process, mutual TLS as a training run has it.
	etcdF := c.issue(pki.RoleEtcd, "etcd", env.etcdIP)
	// A free port at etcdIP (another process could take it before etcd
	// binds it; on a test machine that is rare enough).
	l, err := net.Listen("tcp", net.JoinHostPort(env.etcdIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	clientURL := "https://" + l.Addr().String()
	l.Close()
	srv, err := etcdserver.Start(ctx, etcdserver.Config{DataDir: filepath.Join(c.dir, "etcd"), ClientURL: clientURL,
		CertFile: etcdF.Cert, KeyFile: etcdF.Key, ClientCAFile: etcdF.CA, Logger: testlog.New(t, hclog.Warn)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c.etcdEP = srv.Endpoints()[0]
	cliF := c.issue(pki.RoleClient, "test")
	c.cli, err = etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: srv.Endpoints(), CallTimeout: robustness.CallTimeout,
		CAFile: cliF.CA, CertFile: cliF.Cert, KeyFile: cliF.Key})
	if err != nil {
		t.Fatal(err)
	}
	defer c.cli.Close()
	code, err := job.FileHash(bmojoBin)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := spec.Put(ctx, c.cli, c.j, 4, 1, code); err != nil {
		t.Fatal(err)
	}
	c.start("coordinator", nil, append([]string{"coordinator", "--job", c.j.Name, "--etcd-endpoints", c.etcdEP, "--log-level", "info"},
		localrun.TLSFlags(c.issue(pki.RoleCoordinator, "coordinator-0"))...)...)
	// Hosts a and b, two workers each; ranks by host then id: w0 w1 | w2 w3.
	for i := range 4 {
		c.startWorker(fmt.Sprintf("worker-%d", i), i/2)
	}

	c.until(time.Minute, "step 6 in a 2 x 2 hierarchical ring", func() bool {
		p := c.progress()
		return p.Step >= 6 && p.Workers == 4
	})
	for i := range 4 {
		id := fmt.Sprintf("worker-%d", i)
		s := schemes(c.logOf(id))
		if len(s) == 0 || !strings.HasSuffix(s[len(s)-1], "4 ranks, hier 2x2") {
			t.Fatalf("%s before the kill: epochs %q, want the last one 4 ranks, hier 2x2", id, s)
		}
	}
	before := c.progress()
	victim := c.procs["worker-1"]
	killed := time.Now()
	if err := victim.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Logf("%v: worker-1 (host a) SIGKILLed at step %d, epoch %d, in a hierarchical 2x2 ring", killed.Sub(t0).Round(time.Millisecond), before.Step, before.Epoch)

	var after job.Progress
	c.until(time.Minute, "a step committed by the 3 survivors", func() bool {
		after = c.progress()
		return after.Workers == 3 && after.Step > before.Step
	})
	t.Logf("%v: step %d committed by 3 workers at epoch %d, %v after the kill", time.Since(t0).Round(time.Millisecond),
		after.Step, after.Epoch, time.Since(killed).Round(time.Millisecond))

	// A replacement on host a: 2 x 2 again.
	c.startWorker("worker-4", 0)
	c.until(time.Minute, "a step committed by 4 workers after the replacement joined", func() bool {
		p := c.progress()
		return p.Workers == 4 && p.Epoch > after.Epoch
	})
	t.Logf("%v: the replacement trains in a ring of 4", time.Since(t0).Round(time.Millisecond))

	for _, id := range []string{"worker-0", "worker-2", "worker-3", "worker-4"} {
		select {
		case <-c.procs[id].done:
		case <-ctx.Done():
			c.dumpLogs()
			t.Fatalf("%s did not finish: %v", id, ctx.Err())
		}
		if err := c.procs[id].err; err != nil {
			t.Errorf("%s: %v", id, err)
		}
	}
	t.Logf("%v: every worker finished", time.Since(t0).Round(time.Millisecond))

	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
	defer rcancel()
	resp, err := c.cli.Get(rctx, job.Prefix(c.j.Name)+job.KeyDone)
	if err != nil || len(resp.Kvs) == 0 {
		t.Fatalf("no done record: %v", err)
	}
	var done job.Done
	if err := job.Decode(job.KeyDone, resp.Kvs[0].Value, &done); err != nil || done.Step != steps {
		t.Fatalf("done %+v (%v), want step %d", done, err, steps)
	}
	ledger, err := robustness.ReadLedger(rctx, c.cli, c.j.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := robustness.CheckLedger(c.j, ledger); err != nil {
		t.Fatalf("ledger is not exactly once: %v", err)
	}
	t.Logf("ledger: %d steps, each consumed exactly once", steps)

	// Every report the coordinator acted upon names the dead worker: the
	// sub-rings' ranks were mapped back to the right members.
	ev, err := c.cli.Get(rctx, job.Prefix(c.j.Name)+job.KeyEvents, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var removed []string
	for _, kv := range ev.Kvs {
		var e job.Event
		if err := job.Decode(string(kv.Key), kv.Value, &e); err != nil {
			t.Fatal(err)
		}
		if e.Kind == "reported" {
			removed = append(removed, e.WorkerID+": "+e.Reason)
			if e.WorkerID != "worker-1" {
				t.Errorf("the coordinator removed %s on a report (%s); only worker-1 died", e.WorkerID, e.Reason)
			}
		}
	}
	t.Logf("removed on reports: %q", removed)

	// The epochs each survivor trained in: hierarchical, flat with 3 (and
	// said why), hierarchical again.
	for _, id := range []string{"worker-0", "worker-2", "worker-3", "worker-4"} {
		log := c.logOf(id)
		s := schemes(log)
		t.Logf("%s: %s", id, strings.Join(s, "; "))
		if len(s) == 0 || !strings.HasSuffix(s[len(s)-1], "4 ranks, hier 2x2") {
			t.Errorf("%s: last epoch is not a hierarchical 2x2 ring: %q", id, s)
		}
		if slices.Contains(c.env.flags, "--data-sockets") && !strings.Contains(log, "to_successor=socket") {
			t.Errorf("%s: --data-sockets, but no epoch's network hop ran on data sockets", id)
		}
		if id != "worker-4" && !slicesContainsSuffix(s, "3 ranks, flat") {
			t.Errorf("%s: no flat epoch of 3 ranks after the kill: %q", id, s)
		}
		if id != "worker-4" && !strings.Contains(log, "hosts hold different numbers of members") {
			t.Errorf("%s did not say why the ring of 3 is flat", id)
		}
	}
	t.Logf("%v: done", time.Since(t0).Round(time.Millisecond))
}

func slicesContainsSuffix(xs []string, suffix string) bool {
	for _, x := range xs {
		if strings.HasSuffix(x, suffix) {
			return true
		}
	}
	return false
}

// netnsEnv makes hosts network namespaces of two workers each, joined by
// veth pairs on a bridge in a hub namespace, and one more veth from this
// namespace to the bridge for etcd and the coordinator. Everything is
// removed at cleanup. It skips the test where this cannot be done.
func netnsEnv(t *testing.T, hosts int) hostEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netns variant: needs root (ip netns, veth); TestHierKillWorker covers the same on loopback")
	}
	ip, err := exec.LookPath("ip")
	if err != nil {
		t.Skipf("netns variant: no ip(8) (apt-get install iproute2): %v", err)
	}
	// Unique per process, short (interface names have 15 characters).
	prefix := fmt.Sprintf("bh%d", os.Getpid()%100000)
	hub := prefix + "h"
	// RFC 2544's benchmarking range, a /24 per process; on this machine only.
	subnet := fmt.Sprintf("198.19.%d", 10+os.Getpid()%240)
	run := func(args ...string) error {
		var out bytes.Buffer
		cmd := exec.Command(ip, args...)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
		}
		return nil
	}
	var made []string
	t.Cleanup(func() {
		for i := len(made) - 1; i >= 0; i-- {
			_ = run("netns", "del", made[i]) // deleting a namespace deletes its veth ends, and their peers
		}
		_ = run("link", "del", prefix+"e0") // ours, if the hub went first it is gone already
	})
	if err := run("netns", "add", hub); err != nil {
		t.Skipf("netns variant: cannot create a network namespace here: %v", err)
	}
	made = append(made, hub)
	steps := [][]string{
		{"-n", hub, "link", "add", "br0", "type", "bridge"},
		{"-n", hub, "link", "set", "br0", "up"},
		// This namespace's leg: etcd and the coordinator listen on .254.
		{"link", "add", prefix + "e0", "type", "veth", "peer", "name", prefix + "e1"},
		{"link", "set", prefix + "e1", "netns", hub},
		{"-n", hub, "link", "set", prefix + "e1", "master", "br0"},
		{"-n", hub, "link", "set", prefix + "e1", "up"},
		{"addr", "add", subnet + ".254/24", "dev", prefix + "e0"},
		{"link", "set", prefix + "e0", "up"},
	}
	for h := range hosts {
		ns := fmt.Sprintf("%sr%d", prefix, h)
		if err := run("netns", "add", ns); err != nil {
			t.Fatal(err)
		}
		made = append(made, ns)
		v, p := fmt.Sprintf("%sv%d", prefix, h), fmt.Sprintf("%sp%d", prefix, h)
		steps = append(steps,
			[]string{"link", "add", v, "type", "veth", "peer", "name", p},
			[]string{"link", "set", v, "netns", ns},
			[]string{"link", "set", p, "netns", hub},
			[]string{"-n", ns, "link", "set", v, "name", "eth0"},
			[]string{"-n", ns, "addr", "add", fmt.Sprintf("%s.%d/24", subnet, h+1), "dev", "eth0"},
			[]string{"-n", ns, "link", "set", "eth0", "up"},
			[]string{"-n", ns, "link", "set", "lo", "up"},
			[]string{"-n", hub, "link", "set", p, "master", "br0"},
			[]string{"-n", hub, "link", "set", p, "up"},
		)
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			if errors.Is(err, exec.ErrNotFound) {
				t.Skip(err)
			}
			t.Fatalf("netns setup: %v", err)
		}
	}
	t.Logf("hosts: %d network namespaces (%s.1..%d) on a veth bridge; etcd and the coordinator at %s.254", hosts, subnet, hosts, subnet)
	return hostEnv{
		etcdIP: subnet + ".254",
		listen: func(h int) string { return fmt.Sprintf("%s.%d:0", subnet, h+1) },
		wrap:   func(h int) []string { return []string{ip, "netns", "exec", fmt.Sprintf("%sr%d", prefix, h)} },
	}
}

// Package localrun runs a whole job on one machine: an embedded etcd, a
// coordinator, and N worker processes (re-executions of this binary), with
// a progress bar fed from etcd. It is what `bmojo train --workers N` does;
// the same pieces run as separate processes and hosts in production.
package localrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/schollz/progressbar/v3"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/monitor"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/job/spec"
	"github.com/bmojo/bmojo/train"
)

// Options configure a local run.
type Options struct {
	Workers int // worker processes
	// Device is the workers' device spec (see internal/device): with auto
	// or cuda and GPUs present, worker i gets GPU i mod the GPU count.
	Device      string
	Executable  string       // binary to run workers with; default os.Executable()
	WorkerLevel string       // workers' log level (default warn)
	Logger      hclog.Logger // coordinator and runner logs
	Progress    io.Writer    // progress bar; nil = none
	// OnWorker is called with each worker's process once started (tests use
	// it to kill one).
	OnWorker func(id string, p *os.Process)
	// Coordinators is the number of coordinator processes (replicas that
	// elect a leader); default 1.
	Coordinators int
	// CoordinatorLevel is the coordinators' log level (default info).
	CoordinatorLevel string
	// OnCoordinator is called with each coordinator's process once started.
	OnCoordinator func(i int, p *os.Process)
	// OnEtcdRestart, when set, receives a function that stops the embedded
	// etcd, waits down, and starts it again on the same data and address
	// (tests use it for "etcd is briefly unavailable").
	OnEtcdRestart func(restart func(down time.Duration) (Outage, error))
	// OnEtcd is called with the embedded etcd's client endpoints.
	OnEtcd func(endpoints []string)
	// HTTP, when set, is where the monitor (dashboard, /metrics,
	// /api/v1/status) listens, in this process; a free port of the same
	// host when that one is taken.
	HTTP string
	// OnHTTP is called with the monitor's URL once it listens.
	OnHTTP func(url string)
	// Token, when set, is the monitor's bearer token.
	Token string
	// TensorBoard, when set, is a directory for TensorBoard event files.
	TensorBoard string
	// Insecure runs without the job identity: no TLS on etcd or the ring,
	// and any process that can reach a port may speak to it (for
	// measuring what TLS costs). By default Run makes a job CA for this run
	// and a certificate for every process (see internal/pki).
	Insecure bool
	// OnIdentities, unless Insecure, is called with the run's identities
	// before anything starts (tests use them to reach etcd and to start
	// workers of their own).
	OnIdentities func(*Identities)
}

// Result is what the job reached.
type Result struct {
	Done        job.Done
	Progress    job.Progress
	Checkpoint  string // newest committed checkpoint dir
	Resumed     bool   // the job existed already: it continued
	EtcdDataDir string
}

// Outage is when an etcd restart (Options.OnEtcdRestart) had etcd down:
// from Stopped, once the server had closed, to Restarting, when it began to
// start again.
type Outage struct{ Stopped, Restarting time.Time }

// ErrFinished means the checkpoint dir holds this job, already done.
var ErrFinished = train.ErrFinished

// Run runs job j with o.Workers local workers until it is done.
func Run(ctx context.Context, j job.Job, o Options) (Result, error) {
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if o.Workers <= 0 {
		return Result{}, fmt.Errorf("localrun: --workers must be positive, got %d", o.Workers)
	}
	if err := j.Validate(); err != nil {
		return Result{}, err
	}
	exe := o.Executable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return Result{}, fmt.Errorf("localrun: %w", err)
		}
	}
	if o.WorkerLevel == "" {
		o.WorkerLevel = "warn"
	}
	if o.CoordinatorLevel == "" {
		o.CoordinatorLevel = "info"
	}
	if err := os.MkdirAll(j.CheckpointDir, 0o755); err != nil {
		return Result{}, fmt.Errorf("localrun: checkpoint dir: %w", err)
	}
	unlock, err := lockDir(j.CheckpointDir)
	if err != nil {
		return Result{}, err
	}
	defer unlock()
	res := Result{EtcdDataDir: filepath.Join(j.CheckpointDir, "etcd")}
	var ids *Identities
	if !o.Insecure {
		if ids, err = newIdentities(j.Name, o.Workers, max(1, o.Coordinators)); err != nil {
			return res, err
		}
		defer ids.remove()
		if o.OnIdentities != nil {
			o.OnIdentities(ids)
		}
	}
	srvCfg := etcdserver.Config{DataDir: res.EtcdDataDir, Logger: log.Named("etcd")}
	if ids != nil {
		srvCfg.CertFile, srvCfg.KeyFile, srvCfg.ClientCAFile = ids.etcd.Cert, ids.etcd.Key, ids.etcd.CA
	}
	srv, err := etcdserver.Start(ctx, srvCfg)
	if err != nil {
		return res, err
	}
	var srvMu sync.Mutex
	defer func() { srvMu.Lock(); srv.Close(); srvMu.Unlock() }()
	endpoints := srv.Endpoints()
	if o.OnEtcdRestart != nil {
		o.OnEtcdRestart(func(down time.Duration) (Outage, error) {
			srvMu.Lock()
			defer srvMu.Unlock()
			var out Outage
			srv.Close()
			out.Stopped = time.Now()
			t := time.NewTimer(down)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
				return out, ctx.Err()
			}
			out.Restarting = time.Now()
			again := srvCfg
			again.ClientURL = endpoints[0]
			s, err := etcdserver.Start(ctx, again)
			if err != nil {
				return out, err
			}
			srv = s
			return out, nil
		})
	}
	if o.OnEtcd != nil {
		o.OnEtcd(endpoints)
	}
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	cliCfg := etcdserver.ClientConfig{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: log.Named("etcd")}
	if ids != nil {
		cliCfg.CAFile, cliCfg.CertFile, cliCfg.KeyFile = ids.Client.CA, ids.Client.Cert, ids.Client.Key
	}
	cli, err := etcdserver.Connect(cctx, cliCfg)
	ccancel()
	if err != nil {
		return res, fmt.Errorf("localrun: etcd: %w", err)
	}
	defer cli.Close()

	if o.HTTP != "" || o.TensorBoard != "" {
		stopMonitor, err := serveMonitor(ctx, j.Name, cli, o, log)
		if err != nil {
			return res, err
		}
		defer stopMonitor()
	}

	prefix := job.Prefix(j.Name)
	code, err := job.FileHash(exe)
	if err != nil {
		return res, fmt.Errorf("localrun: %w", err)
	}
	_, resumed, err := spec.Put(ctx, cli, j, o.Workers, 1, code)
	if err != nil {
		return res, err
	}
	res.Resumed = resumed
	if done, ok := readDone(ctx, cli, prefix); ok {
		res.Done = done
		res.Checkpoint = latestCheckpoint(j.CheckpointDir)
		return res, fmt.Errorf("%w: %s reached step %d (val loss %.4f); choose another --checkpoint-dir to train again",
			ErrFinished, j.CheckpointDir, res.Done.Step, res.Done.ValLoss)
	}
	if resumed {
		log.Info("job exists; resuming from its latest checkpoint", "job", j.Name, "checkpoint", latestCheckpoint(j.CheckpointDir))
	}

	// Every child process is waited for before Run returns: cancelling ctx
	// sends them SIGTERM (SIGKILL after exec.Cmd.WaitDelay).
	ctx, cancel := context.WithCancel(ctx)
	var children sync.WaitGroup
	defer func() { cancel(); children.Wait() }()
	coords := max(1, o.Coordinators)
	coordExit := make(chan error, coords)
	for i := range coords {
		args := []string{"coordinator", "--job", j.Name, "--etcd-endpoints", endpoints[0], "--log-level", o.CoordinatorLevel}
		if ids != nil {
			args = append(args, TLSFlags(ids.coordinators[i])...)
		}
		cmd := exec.CommandContext(ctx, exe, args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 10 * time.Second
		if err := cmd.Start(); err != nil {
			return res, fmt.Errorf("localrun: start coordinator: %w", err)
		}
		if o.OnCoordinator != nil {
			o.OnCoordinator(i, cmd.Process)
		}
		children.Go(func() { coordExit <- cmd.Wait() })
	}

	threads := max(1, runtimeCPUs()/o.Workers)
	devs := WorkerDevices(o.Device, o.Workers)
	// Workers log at warn: say here where they compute and why.
	if _, err := device.GPUs(); err != nil && o.Device != "cpu" && !strings.HasPrefix(devs[0], "cuda") {
		log.Info("workers compute on the CPU", "reason", err)
	} else {
		log.Info("worker devices", "devices", strings.Join(devs, " "))
	}
	exited := make(chan error, o.Workers)
	for i := range o.Workers {
		id := fmt.Sprintf("worker-%d", i)
		extra := []string{"--device", devs[i]}
		if ids != nil {
			extra = append(extra, TLSFlags(ids.workers[i])...)
		}
		cmd, err := StartWorker(ctx, exe, j.Name, endpoints[0], id, threads, o.WorkerLevel, extra...)
		if err != nil {
			return res, err
		}
		if o.OnWorker != nil {
			o.OnWorker(id, cmd.Process)
		}
		children.Go(func() {
			err := cmd.Wait()
			if err != nil {
				err = fmt.Errorf("%s: %w", id, err)
			}
			exited <- err
		})
	}

	var bar *progressbar.ProgressBar
	if o.Progress != nil {
		bar = progressbar.NewOptions(j.Steps, progressbar.OptionSetWriter(o.Progress),
			progressbar.OptionSetDescription("train"), progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true), progressbar.OptionSetElapsedTime(true),
			progressbar.OptionSetWidth(24), progressbar.OptionThrottle(250*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(o.Progress) }))
	}
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	running := o.Workers
	var workerErrs []error
	for {
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case err := <-coordExit:
			if err != nil && ctx.Err() == nil {
				log.Warn("coordinator exited", "error", err)
			}
		case err := <-exited:
			running--
			if err != nil {
				workerErrs = append(workerErrs, err)
				log.Warn("worker exited", "error", err)
			}
			if running == 0 {
				if done, ok := readDone(ctx, cli, prefix); ok {
					res.Done = done
					res.Progress = readProgress(ctx, cli, j.Name)
					res.Checkpoint = latestCheckpoint(j.CheckpointDir)
					if bar != nil {
						_ = bar.Finish()
					}
					return res, nil
				}
				return res, fmt.Errorf("localrun: every worker exited before the job finished: %w", errors.Join(workerErrs...))
			}
		case <-tick.C:
			p := readProgress(ctx, cli, j.Name)
			res.Progress = p
			if bar != nil && p.Step > 0 {
				bar.Describe(fmt.Sprintf("loss %.3f  %.0f tok/s  %d workers", p.Loss, p.TokensPerS, p.Workers))
				_ = bar.Set(p.Step)
			}
		}
	}
}

// WorkerDevices assigns a device spec to each of n workers: one GPU each
// (round-robin when there are more workers than GPUs) when spec is auto or
// cuda and this binary sees GPUs, else spec itself.
func WorkerDevices(spec string, n int) []string {
	out := make([]string, n)
	kind, _, err := device.Parse(spec)
	gpus, gerr := device.GPUs()
	for i := range out {
		switch {
		case err != nil || kind == "cpu":
			out[i] = spec
		case strings.HasPrefix(spec, "cuda:"):
			out[i] = spec // one named GPU for everyone
		case gerr == nil && len(gpus) > 0:
			out[i] = fmt.Sprintf("cuda:%d", i%len(gpus))
		default:
			out[i] = spec // auto falls back to the CPU in the worker; cuda fails there, naming why
		}
		if out[i] == "" {
			out[i] = "auto"
		}
	}
	return out
}

// StartWorker starts `exe worker` for job as a child process whose stderr
// goes to ours; ctx cancellation sends it SIGTERM.
func StartWorker(ctx context.Context, exe, job, endpoint, id string, threads int, level string, extra ...string) (*exec.Cmd, error) {
	args := append([]string{"worker", "--job", job, "--etcd-endpoints", endpoint,
		"--id", id, "--threads", strconv.Itoa(threads), "--log-level", level}, extra...)
	cmd := exec.CommandContext(ctx, exe, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("localrun: start %s: %w", id, err)
	}
	return cmd, nil
}

// readTimeout bounds each of the runner's own etcd reads: the progress bar
// and the final records must never wait on an etcd that is gone.
const readTimeout = 5 * time.Second

// ReadProgress returns the job's progress record (zero if none yet), or the
// error of the read; ctx should carry a deadline (the client's call timeout
// bounds it otherwise).
func ReadProgress(ctx context.Context, cli *clientv3.Client, jobName string) (job.Progress, error) {
	var p job.Progress
	resp, err := cli.Get(ctx, job.Prefix(jobName)+job.KeyProgress)
	if err != nil {
		return p, fmt.Errorf("localrun: read progress of %s: %w", jobName, err)
	}
	if len(resp.Kvs) > 0 {
		err = job.Decode(job.KeyProgress, resp.Kvs[0].Value, &p)
	}
	return p, err
}

// readProgress is ReadProgress under readTimeout, zero on any error.
func readProgress(ctx context.Context, cli *clientv3.Client, jobName string) job.Progress {
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	p, _ := ReadProgress(ctx, cli, jobName)
	return p
}

func readDone(ctx context.Context, cli *clientv3.Client, prefix string) (job.Done, bool) {
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	var d job.Done
	resp, err := cli.Get(ctx, prefix+job.KeyDone)
	if err != nil || len(resp.Kvs) == 0 {
		return d, false
	}
	return d, job.Decode(job.KeyDone, resp.Kvs[0].Value, &d) == nil
}

// latestCheckpoint is the newest checkpoint under dir that verifies, for
// the report ("" when none does).
func latestCheckpoint(dir string) string {
	m, err := checkpoint.Latest(dir, nil)
	if err != nil {
		return ""
	}
	return m.Dir
}

func runtimeCPUs() int { return runtime.NumCPU() }

// serveMonitor runs the monitor of job in this process until stop is called.
func serveMonitor(ctx context.Context, job string, cli *clientv3.Client, o Options, log hclog.Logger) (stop func(), err error) {
	return monitor.Start(ctx, monitor.Config{JobName: job, Client: cli, Token: o.Token, TensorBoardDir: o.TensorBoard,
		Logger: log.Named("monitor")}, o.HTTP, true, o.OnHTTP)
}

// lockDir takes an exclusive advisory lock on dir/.lock, so a second run on
// the same checkpoint directory fails at once with a clear error (instead of
// blocking on etcd's database lock).
func lockDir(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, ".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("localrun: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		f.Close()
		return nil, fmt.Errorf("localrun: %s is in use by another bmojo train (pid %s); wait for it or choose another --checkpoint-dir",
			dir, strings.TrimSpace(string(b[:n])))
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}

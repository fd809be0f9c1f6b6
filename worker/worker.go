// Package worker owns one data-parallel replica of a job: it registers in
// etcd under a lease, follows the coordinator's ring epochs (package job
// documents the protocol), trains its share of every global batch with the
// step every path runs (train.Engine; its Reducer here is the ring, each
// layer's gradient all-reduced while backward is still running: one flat
// ring, or a hierarchical one when the ring's members span hosts evenly,
// driver.go's collective and topology.go), and
// commits progress, ledger entries and asynchronous checkpoints. Its
// decisions are a pure state machine (state.go, golden scripts in
// testdata/) that driver.go feeds with etcd watch events, the results of
// its work and the clock. It never decides membership: that is the
// coordinator's.
package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/internal/gpu"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/train"
)

// Sentinel errors.
var (
	ErrDuplicateID = errors.New("worker id already registered")
	ErrSpec        = errors.New("job spec")
)

// Config configures one worker.
type Config struct {
	Job       string           // job name: the etcd prefix
	ID        string           // unique worker id
	Listen    string           // all-reduce listen address; port 0 picks one (default 127.0.0.1:0)
	Advertise string           // address peers dial; default: the listener's address
	Etcd      *clientv3.Client // connected client (owned by the caller)
	LeaseTTL  int              // seconds; default job.DefaultLeaseTTL
	Threads   int              // kernel threads; 0 = all cores
	// Host names the machine this worker runs on (default: the hostname;
	// on Kubernetes pass the node's name). Workers with the same host
	// reduce hierarchically when the ring allows it (job.Job.AllReduce).
	Host string
	// LocalListen is the listen address of the second all-reduce server,
	// which serves the ring of this host's workers when the all-reduce is
	// hierarchical (default: Listen's IP, a free port). Peers dial it at
	// Advertise's host (else the listener's) with this listener's port.
	LocalListen string
	// SyncCopies keeps the reference reduction path: each layer's gradient
	// leaves the device with a synchronous copy, which waits for the
	// stream. By default (false) the copy is asynchronous (kernels.
	// AsyncCopier; worker/step.go), so backward goes on meanwhile; the two
	// are bit-identical (TestReducerPathsBitIdenticalCUDA, run on a GPU by
	// scripts/gpu-check.sh), and on one H200 two replicas stepped in 200 ms
	// overlapped against 313 ms synchronous (docs/allreduce.md).
	SyncCopies bool
	// HostRing keeps a GPU worker's flat ring on host memory: without it,
	// workers on one host exchange gradient chunks GPU to GPU through CUDA
	// IPC (allreduce.TransportCUDAIPC), and the reducer never copies them
	// to the host (worker/step.go).
	HostRing bool
	// DataSockets carries the ring's chunk payloads between hosts on plain
	// data sockets that gRPC negotiates (allreduce.TransportSocket) instead
	// of on gRPC streams: the rings across hosts of a hierarchy, and a flat
	// ring whose members span hosts. `bmojo worker` sets it unless
	// --data-sockets=false: 1.00× a plain TCP ring and 2.4× Gloo on 16
	// cores, where gRPC streams are 0.58× and 1.4× (docs/allreduce.md).
	DataSockets bool
	// Device is the compute device: auto (a GPU when built with -tags cuda
	// and one is present, else the CPU), cpu, cuda or cuda:N.
	Device string
	// HopTimeout bounds one all-reduce hop (default 30 s). A killed peer is
	// detected at once by its broken stream; this is for stalls.
	HopTimeout time.Duration
	// Health, when set, is told what the gRPC health service should say:
	// ready (readiness) and live (liveness), and why (see state.go).
	Health func(ready, live bool, reason string)
	// TLS, when set, is the job identity: the ring runs mutual TLS, and a
	// neighbour must present a certificate naming the worker id that the
	// ring record places in its slot (see internal/pki). Its own
	// certificate must name ID.
	TLS    *pki.Creds
	Logger hclog.Logger
}

// Validate checks c without side effects.
func (c Config) Validate() error {
	switch {
	case c.Job == "":
		return errors.New("worker: job name is empty")
	case c.ID == "":
		return errors.New("worker: worker id is empty")
	case c.Etcd == nil:
		return errors.New("worker: no etcd client")
	case c.LeaseTTL < 0 || c.Threads < 0 || c.HopTimeout < 0:
		return errors.New("worker: lease TTL, threads and hop timeout must be >= 0")
	}
	if c.TLS != nil {
		// Peers would refuse a certificate for another id: say so now.
		if err := pki.Check(c.TLS.Leaf, pki.RoleWorker, c.ID); err != nil {
			return fmt.Errorf("worker: --id %s: its own TLS certificate: %w", c.ID, err)
		}
	}
	return nil
}

type worker struct {
	cfg    Config
	log    hclog.Logger
	cli    *clientv3.Client
	prefix string
	job    job.Job
	spec   job.Spec

	dev *device.Opened
	eng *train.Engine // the model, its optimizer, the data and the step counters

	lis     net.Listener
	addr    string
	leaseID atomic.Int64         // the member key's lease (a clientv3.LeaseID); replaced when lost
	bg      sync.WaitGroup       // the background goroutines: lease, membership and ring watchers
	ringMu  sync.Mutex           // guards ring, lis and localLis, which a connect hands over
	ring    allreduce.Collective // the open ring (flat or hierarchical), nil if none
	// localLis serves the local ring of a hierarchical all-reduce;
	// localAddr is where it was bound (a later epoch listens there again),
	// localEndpoint what peers dial.
	localLis      net.Listener
	localAddr     string
	localEndpoint string

	// Of the loop (driver.go): the epoch it trains in, the newest step's
	// stats, validation loss and throughput.
	cur       *epochRing
	last      train.StepStats
	lastVal   float64
	lastTPS   float64
	lastStats time.Time

	commits *committer
	ckpt    *checkpointer
}

// Run runs the worker until the job is done (nil) or ctx ends.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = job.DefaultLeaseTTL
	}
	if cfg.HopTimeout == 0 {
		cfg.HopTimeout = 30 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Host == "" {
		cfg.Host, _ = os.Hostname()
	}
	if cfg.Threads > 0 {
		runtime.GOMAXPROCS(cfg.Threads)
	}
	w := &worker{cfg: cfg, cli: cfg.Etcd, prefix: job.Prefix(cfg.Job),
		log: cfg.Logger.Named("worker").With("worker_id", cfg.ID)}
	ctx, cancel := context.WithCancel(ctx)
	defer func() { cancel(); w.bg.Wait() }()
	if err := w.loadSpec(ctx); err != nil {
		return err
	}
	if err := w.build(); err != nil {
		return err
	}
	defer w.dev.Close()
	if err := w.resume(ctx); err != nil {
		return err
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("worker: listen on %s: %w", cfg.Listen, err)
	}
	w.lis, w.addr = lis, lis.Addr().String()
	if cfg.Advertise != "" {
		w.addr = cfg.Advertise
	}
	defer func() {
		w.closeRing()
		w.ringMu.Lock()
		for _, l := range []net.Listener{w.lis, w.localLis} {
			if l != nil {
				l.Close()
			}
		}
		w.ringMu.Unlock()
	}()
	if err := w.listenLocal(lis.Addr().String()); err != nil {
		return err
	}
	if err := w.register(ctx); err != nil {
		return err
	}
	w.commits = newCommitter(w.cli, w.prefix, w.log)
	defer w.commits.close()
	w.ckpt = &checkpointer{w: w}
	w.bg.Go(func() { w.keepRegistered(ctx) })
	err = w.loop(ctx)
	w.closeRing() // work still in flight fails at once
	w.ckpt.wait()
	w.commits.close()
	cancel() // stop re-registering before the lease goes
	w.bg.Wait()
	if id := clientv3.LeaseID(w.leaseID.Load()); id != 0 {
		rctx, rcancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, _ = w.cli.Revoke(rctx, id)
		rcancel()
	}
	return err
}

// sleep waits d or until ctx ends, whichever is first; false if ctx ended.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

func (w *worker) key(k string) string { return w.prefix + k }

// await returns the value of key k once it exists: a read, then a watch
// from that read's revision (a new read when the watch breaks).
func (w *worker) await(ctx context.Context, k string) ([]byte, error) {
	warned := false
	for ctx.Err() == nil {
		resp, err := w.cli.Get(ctx, w.key(k))
		if err != nil {
			if !warned {
				w.log.Warn("waiting for etcd", "error", err)
				warned = true
			}
			sleep(ctx, 200*time.Millisecond)
			continue
		}
		if len(resp.Kvs) > 0 {
			return resp.Kvs[0].Value, nil
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range w.cli.Watch(wctx, w.key(k), clientv3.WithRev(resp.Header.Revision+1)) {
			for _, e := range wr.Events {
				if e.Type == clientv3.EventTypePut {
					cancel()
					return e.Kv.Value, nil
				}
			}
		}
		cancel()
		sleep(ctx, 200*time.Millisecond)
	}
	return nil, ctx.Err()
}

// loadSpec waits for the job spec and builds the job from it.
func (w *worker) loadSpec(ctx context.Context) error {
	v, err := w.await(ctx, job.KeySpec)
	if err != nil {
		return fmt.Errorf("worker: no job spec for %q: %w", w.cfg.Job, err)
	}
	if err := job.Decode(job.KeySpec, v, &w.spec); err != nil {
		return err
	}
	if w.spec.Protocol != job.ProtocolVersion {
		return fmt.Errorf("worker: %w: protocol %d, this build speaks %d", ErrSpec, w.spec.Protocol, job.ProtocolVersion)
	}
	if w.spec.CodeHash != job.CodeHash() {
		return fmt.Errorf("worker: %w: job was started by build %s, this is build %s; run the same bmojo binary everywhere",
			ErrSpec, w.spec.CodeHash, job.CodeHash())
	}
	j, err := job.Parse("job spec", []byte(w.spec.YAML))
	if err != nil {
		return fmt.Errorf("worker: %w: %w", ErrSpec, err)
	}
	w.job = j
	return nil
}

func (w *worker) build() error {
	mc, err := w.job.ModelConfig()
	if err != nil {
		return err
	}
	trainDS, err := data.Load(w.job.Data, data.SplitTrain)
	if err != nil {
		return fmt.Errorf("worker: data: %w", err)
	}
	valDS, err := data.Load(w.job.Data, data.SplitVal)
	if err != nil {
		return fmt.Errorf("worker: data: %w", err)
	}
	// Any worker may become rank 0, which writes the checkpoints.
	if err := os.MkdirAll(w.job.CheckpointDir, 0o755); err != nil {
		return fmt.Errorf("worker: checkpoint dir: %w", err)
	}
	if err := train.CheckWritable(w.job.CheckpointDir); err != nil {
		return err
	}
	trainS, err := data.NewSampler(trainDS, mc.SeqLen, w.job.Seed)
	if err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	valS, err := data.EvalWindows(valDS, mc.SeqLen)
	if err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	if w.dev, err = device.Open(w.cfg.Device, device.Options{Logger: w.log.Named("device")}); err != nil {
		return fmt.Errorf("worker: %w", err)
	}
	m, err := model.New[float32](w.dev.Backend, mc, w.job.Seed)
	if err != nil {
		return err
	}
	w.eng = &train.Engine{M: m, Opt: model.NewOptimizer(m, w.job.Optim()), Train: trainS, Val: valS,
		GB: w.job.BatchSize, EvalBatches: w.job.EvalBatches}
	w.log.Info("model", "params", w.eng.M.Layout.ParamCount(), "preset", w.job.Preset, "device", w.dev.Desc, "threads", runtime.GOMAXPROCS(0))
	return nil
}

// gpuStats samples the worker's GPU through NVML (nil on the CPU or when
// NVML cannot read it), found by UUID: CUDA_VISIBLE_DEVICES and
// CUDA_DEVICE_ORDER renumber CUDA's devices but not NVML's.
func (w *worker) gpuStats() *job.GPUStats {
	if w.dev == nil || w.dev.UUID == "" {
		return nil
	}
	t, err := gpu.Sample(w.dev.UUID)
	if err != nil {
		return nil
	}
	s := job.GPUStats(t) // the same fields: a field added to one fails the build
	return &s
}

// deviceDesc names the worker's compute device for membership records.
func (w *worker) deviceDesc() string {
	if w.dev == nil {
		return "cpu"
	}
	return w.dev.Desc
}

// register creates members/<id> on a fresh lease, refusing an id that is
// already registered.
func (w *worker) register(ctx context.Context) error {
	lease, err := w.cli.Grant(ctx, int64(w.cfg.LeaseTTL))
	if err != nil {
		return fmt.Errorf("worker: etcd lease: %w", err)
	}
	w.leaseID.Store(int64(lease.ID))
	// Keep the lease alive from now on: the wait below may outlast its TTL.
	w.bg.Go(func() { w.holdLease(ctx) })
	// A record left by a killed process of this id lapses with its lease
	// (etcd keeps leases across its own restarts): wait that long before
	// calling it a live duplicate.
	deadline := time.Now().Add(time.Duration(2*w.cfg.LeaseTTL+1) * time.Second)
	for {
		err := w.putMember(ctx)
		if err == nil {
			break
		}
		if !errors.Is(err, ErrDuplicateID) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	w.log.Info("registered", "endpoint", w.addr, "host", w.cfg.Host, "local_endpoint", w.localEndpoint, "lease_ttl_s", w.cfg.LeaseTTL)
	return nil
}

func (w *worker) putMember(ctx context.Context) error {
	rec := job.Member{ID: w.cfg.ID, Endpoint: w.addr, Device: w.deviceDesc(), PID: os.Getpid(),
		SpecHash: w.spec.Hash, CodeHash: job.CodeHash(), Protocol: job.ProtocolVersion,
		Registered: time.Now().UTC().Format(time.RFC3339Nano), Host: w.cfg.Host, LocalEndpoint: w.localEndpoint}
	k := w.key(job.KeyMembers + w.cfg.ID)
	resp, err := w.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, job.Encode(rec), clientv3.WithLease(clientv3.LeaseID(w.leaseID.Load())))).
		Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return fmt.Errorf("worker: register: %w", err)
	}
	if !resp.Succeeded {
		var other job.Member
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			_ = job.Decode(k, kvs[0].Value, &other)
		}
		return fmt.Errorf("worker: %w: %q is held by pid %d at %s; give this worker another --id",
			ErrDuplicateID, w.cfg.ID, other.PID, other.Endpoint)
	}
	return nil
}

// holdLease keeps the current lease (w.leaseID) alive until ctx ends.
//
// etcd's client gives a lease up when no keep-alive answer came for a TTL,
// which happens when etcd restarts: its connection comes back too late.
// But a restarted etcd extends every lease by its TTL, so the lease is
// often still alive: holdLease then keeps it alive again, and the worker
// stays a member through an etcd outage shorter than the TTL. A lease that
// is really gone makes keepRegistered register on a new one, which
// holdLease then follows.
func (w *worker) holdLease(ctx context.Context) {
	for ctx.Err() == nil {
		id := clientv3.LeaseID(w.leaseID.Load())
		if ka, err := w.cli.KeepAlive(ctx, id); err == nil {
			for range ka { // drain; closes when ctx ends or the client gives the lease up
			}
		}
		if ctx.Err() != nil {
			return
		}
		w.log.Debug("lease keep-alive ended; keeping it alive again", "lease", id)
		sleep(ctx, 100*time.Millisecond)
	}
}

// keepRegistered re-creates the member key if the coordinator removed it
// (this worker was reported as failed while alive) or the lease was lost.
func (w *worker) keepRegistered(ctx context.Context) {
	k := w.key(job.KeyMembers + w.cfg.ID)
	for ctx.Err() == nil {
		wc := w.cli.Watch(clientv3.WithRequireLeader(ctx), k)
		for resp := range wc {
			for _, ev := range resp.Events {
				if ev.Type != clientv3.EventTypeDelete {
					continue
				}
				w.log.Warn("membership removed; registering again")
				for ctx.Err() == nil {
					if _, err := w.cli.KeepAliveOnce(ctx, clientv3.LeaseID(w.leaseID.Load())); err != nil {
						if lease, err := w.cli.Grant(ctx, int64(w.cfg.LeaseTTL)); err == nil {
							w.leaseID.Store(int64(lease.ID)) // holdLease follows it
						}
					}
					if err := w.putMember(ctx); err == nil || errors.Is(err, ErrDuplicateID) {
						break
					}
					sleep(ctx, 200*time.Millisecond)
				}
			}
		}
		sleep(ctx, 200*time.Millisecond) // the watch broke (etcd restarting): watch again
	}
}

// listenLocal opens the local ring's listener (Config.LocalListen, by
// default main's IP with a free port) and works out the endpoint peers
// dial: the advertised host with that listener's port.
func (w *worker) listenLocal(main string) error {
	addr := w.cfg.LocalListen
	if addr == "" {
		host, _, err := net.SplitHostPort(main)
		if err != nil {
			return fmt.Errorf("worker: local listener: %w", err)
		}
		addr = net.JoinHostPort(host, "0")
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("worker: listen on %s (the local ring's listener, --local-listen): %w", addr, err)
	}
	host, _, err := net.SplitHostPort(w.addr)
	if err == nil {
		var port string
		if _, port, err = net.SplitHostPort(lis.Addr().String()); err == nil {
			w.localEndpoint = net.JoinHostPort(host, port)
		}
	}
	if err != nil {
		lis.Close()
		return fmt.Errorf("worker: local ring endpoint from %s and %s: %w", w.addr, lis.Addr(), err)
	}
	w.ringMu.Lock()
	w.localLis, w.localAddr = lis, lis.Addr().String()
	w.ringMu.Unlock()
	return nil
}

func (w *worker) closeRing() {
	w.ringMu.Lock()
	defer w.ringMu.Unlock()
	if w.ring != nil {
		_ = w.ring.Close()
		w.ring = nil
	}
}

// put writes a key, retrying while etcd is unavailable.
func (w *worker) put(ctx context.Context, k, v string) error {
	for {
		_, err := w.cli.Put(ctx, w.key(k), v)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		w.log.Warn("etcd put failed; retrying", "key", k, "error", err)
		sleep(ctx, 250*time.Millisecond)
	}
}

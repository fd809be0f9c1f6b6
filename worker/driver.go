package worker

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/train"
)

// This file drives the Machine (state.go): it feeds it what etcd, the work
// it runs and the clock say, and carries out its actions. All protocol
// decisions are the machine's; everything here is I/O.

// fatalEvent ends the loop with err: the work could not run at all (the
// data, a shape, the device), which no new ring can mend.
type fatalEvent struct{ err error }

func (fatalEvent) isEvent() {}

// epochRing is the ring this worker trains in, once connected.
type epochRing struct {
	info   job.Ring
	rank   int
	red    *ringReducer
	t0     time.Time // connected
	tokens int       // trained by this worker in this epoch
	// consumed is every rank's report of what it read in the newest step
	// (ledger.go).
	consumed []job.Consumed
}

// loop runs the machine until the job is done (nil), the machine stops on
// a protocol error, or ctx ends.
func (w *worker) loop(ctx context.Context) error {
	m, err := NewMachine(MachineConfig{ID: w.cfg.ID, Endpoint: w.addr, Steps: w.job.Steps,
		EvalEvery: w.job.EvalEvery, CheckpointEvery: w.job.CheckpointEvery, Step: w.eng.Step})
	if err != nil {
		return err
	}
	events := make(chan Event, 16)
	results := make(chan Event, 1) // one piece of work runs at a time
	w.bg.Go(func() { w.watch(ctx, events) })
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	m.Step(Registered{At: time.Now()})
	m.Step(Tick{Now: time.Now()})
	for {
		for _, a := range m.Actions() {
			if exit, err := w.execute(ctx, a, results); exit || err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case ev := <-events:
			m.Step(ev)
		case ev := <-results:
			if f, ok := ev.(fatalEvent); ok {
				return f.err
			}
			m.Step(ev)
		case now := <-tick.C:
			m.Step(Tick{Now: now})
		}
	}
}

// execute carries out one action. Work (Connect, Train, Evaluate) runs on a
// goroutine of its own and reports on results; the rest is done here.
func (w *worker) execute(ctx context.Context, a Action, results chan<- Event) (exit bool, err error) {
	run := func(f func() Event) {
		w.bg.Go(func() {
			ev := f()
			select {
			case results <- ev:
			case <-ctx.Done():
			}
		})
	}
	switch a := a.(type) {
	case CloseRing:
		w.closeRing()
	case PutReady:
		w.log.Debug("ready", "epoch", a.Epoch, "step", a.Step)
		return false, w.put(ctx, job.ReadyKey(a.Epoch, w.cfg.ID), job.Encode(job.Ready{Epoch: a.Epoch, Step: a.Step}))
	case Connect:
		run(func() Event { return w.connect(ctx, a) })
	case Train:
		ep := w.cur
		run(func() Event { return w.trainStep(ep) })
	case Evaluate:
		ep := w.cur
		run(func() Event { return w.evaluate(ep) })
	case Record:
		w.record(a)
	case Fence:
		w.log.Debug("writes fenced", "epoch", a.Epoch, "ring_revision", a.Rev)
		w.commits.setFence(a.Rev)
	case Progress:
		w.lastVal = a.Val
		w.commits.add(job.KeyProgress, job.Encode(w.progressRecord(a.Step)))
	case Checkpoint:
		w.ckpt.start(a.Epoch, a.Val)
	case Report:
		w.log.Warn("peer failed", "epoch", a.Epoch, "suspect", a.Suspect, "error", a.Err)
		rep := job.Report{Epoch: a.Epoch, Reporter: w.cfg.ID, Suspect: a.Suspect, Error: a.Err}
		return false, w.put(ctx, job.KeyReports+w.cfg.ID, job.Encode(rep))
	case Finish:
		w.lastVal = a.Val
		w.ckpt.wait() // a checkpoint still writing would make start skip the last one
		w.ckpt.start(w.cur.info.Epoch, a.Val)
		w.ckpt.wait()
		// done goes last, fenced like the rest: if this ring is no longer
		// the current one, the next ring's rank 0 finishes instead.
		w.commits.add(job.KeyProgress, job.Encode(w.progressRecord(a.Step)))
		if err := w.commits.flush(ctx); err != nil {
			w.log.Warn("not finishing the job: the ledger and progress could not be committed", "step", a.Step, "error", err)
			return false, nil
		}
		w.commits.add(job.KeyDone, job.Encode(job.Done{Step: a.Step, ValLoss: a.Val, Loss: w.last.Loss}))
		if err := w.commits.flush(ctx); err != nil {
			w.log.Warn("done could not be committed", "step", a.Step, "error", err)
		}
	case SetHealth:
		w.log.Debug("health", "ready", a.Ready, "live", a.Live, "reason", a.Reason)
		if w.cfg.Health != nil {
			w.cfg.Health(a.Ready, a.Live, a.Reason)
		}
	case Exit:
		w.log.Info("job done", "step", w.eng.Step)
		return true, nil
	case Fatal:
		return true, a.Err
	}
	return false, nil
}

// connect opens the ring of a.Start.Epoch (flat, or hierarchical: see
// collective) and, if asked, takes part in the state transfer.
func (w *worker) connect(ctx context.Context, a Connect) Event {
	r, rank, st := a.Ring, a.Rank, a.Start
	coll, scheme, err := w.collective(ctx, r, rank)
	if err != nil {
		if errors.Is(err, errListen) {
			return fatalEvent{err}
		}
		return w.failed(r, err)
	}
	w.ringMu.Lock()
	w.ring = coll
	w.ringMu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = coll.Connect(cctx)
	cancel()
	if err != nil {
		return w.failed(r, err)
	}
	if st.Sync {
		if err := w.broadcast(ctx, coll, st); err != nil {
			return w.failed(r, err)
		}
	}
	w.cur = &epochRing{info: r, rank: rank, t0: time.Now(),
		red: &ringReducer{ctx: ctx, ring: coll, rank: rank, size: len(r.Members), be: w.eng.M.Backend(), syncCopies: w.cfg.SyncCopies}}
	// The network hop's transport: the flat ring's, or the cross-host one's.
	var hop string
	switch c := coll.(type) {
	case *allreduce.Ring:
		hop, _ = c.Transport()
	case *allreduce.Hier:
		hop, _ = c.Cross.Transport()
	}
	w.log.Info("epoch started", "epoch", r.Epoch, "rank", rank, "step", w.eng.Step, "ring_size", len(r.Members),
		"allreduce", scheme, "to_successor", hop, "synced", st.Sync, "reason", r.Reason)
	return Connected{Epoch: r.Epoch, Step: w.eng.Step, At: time.Now()}
}

// The geometry of a GPU-resident ring's hops (allreduce.TransportCUDAIPC).
// Each chunk costs a fixed wait for the device (about 0.1 ms with two
// processes on one GPU), so device hops take chunks 32 times the host
// path's 256 KiB, and four queues reduce four of them at once. Measured
// with bench allreduce on one H100 (two and four processes, 256 MiB):
// 67 and 36 GB/s busbw, against 3.1 and 1.5 at 256 KiB chunks and 13 and
// 6.8 on host shared memory (docs/allreduce.md). Each receiver holds
// queues × slots chunks on its GPU (128 MiB), and the hop's file as much
// in /dev/shm.
const (
	deviceChunkBytes = 8 << 20
	deviceShmQueues  = 4
	deviceShmSlots   = 4
)

// dataPath sets how cfg's ring (the flat ring, or with flat false a
// hierarchy's ring inside a host) carries its chunks.
func (w *worker) dataPath(cfg *allreduce.Config, ms []job.RingMember, flat bool) {
	dm, _ := commDevice(w.eng.M.Backend())
	setDataPath(cfg, ms, flat, dm, w.cfg.DataSockets, w.cfg.HostRing)
}

// setDataPath is dataPath's policy. Every rank decides the same from the
// ring record, as both ends of a hop and the chunk size require (the
// handshake refuses a chunk mismatch):
//   - a flat ring whose members span hosts, with dataSockets: data
//     sockets on every hop (its same-host hops give up shared memory; a
//     ring whose hosts hold equal numbers is hierarchical instead);
//   - else, on a device (dm non-nil) with every member on a GPU and not
//     hostRing: same-host hops offer device slots (CUDA IPC) with the
//     device geometry, so the reducer keeps the gradients on the GPU (a
//     hierarchy's ring inside the host too: only each rank's 1/L of the
//     gradient then visits host memory); a hop that cannot have them
//     stays on host shared memory or gRPC, as with "auto";
//   - else cfg's default, "auto".
func setDataPath(cfg *allreduce.Config, ms []job.RingMember, flat bool, dm allreduce.DeviceMem, dataSockets, hostRing bool) {
	switch {
	case flat && dataSockets && spansHosts(ms):
		cfg.Transport = allreduce.TransportSocket
	case dm != nil && !hostRing && allGPUs(ms):
		cfg.Transport, cfg.Device = allreduce.TransportCUDAIPC, dm
		cfg.ChunkBytes, cfg.ShmQueues, cfg.ShmSlots = deviceChunkBytes, deviceShmQueues, deviceShmSlots
	}
}

// spansHosts reports whether the ring's members name more than one host
// (members without one count as one host of their own).
func spansHosts(ms []job.RingMember) bool {
	for _, m := range ms {
		if m.Host == "" || m.Host != ms[0].Host {
			return true
		}
	}
	return false
}

// commDevice is the device memory a GPU-resident ring runs on: the
// backend's communication stream where it has one (kernels/cuda), so the
// ring's copies and reductions overlap backward instead of queueing behind
// it.
func commDevice(be kernels.Backend[float32]) (allreduce.DeviceMem, bool) {
	if c, ok := be.(interface {
		CommBackend() kernels.Backend[float32]
	}); ok {
		dm, ok := c.CommBackend().(allreduce.DeviceMem)
		return dm, ok
	}
	dm, ok := be.(allreduce.DeviceMem)
	return dm, ok
}

// allGPUs reports whether every member of the ring trains on a GPU.
func allGPUs(ms []job.RingMember) bool {
	for _, m := range ms {
		if m.Device == "" || m.Device == "cpu" {
			return false
		}
	}
	return len(ms) > 0
}

// errListen marks a listener that could not be opened again: no new ring
// mends that.
var errListen = errors.New("all-reduce listener")

// collective builds (unconnected) the all-reduce of ring r for rank:
// hierarchical (allreduce.Hier) when the job allows it (job.Job.AllReduce)
// and the members' hosts make it possible (hierLayout), else one flat ring.
// scheme says which, for the log: "flat", or "hier HxL".
//
// The flat ring and the ring across hosts serve on the worker's endpoint,
// the ring of the host's workers on its local endpoint (a second
// listener). Both sub-rings carry the ring's epoch, so frames of another
// epoch are refused as on the flat ring, and with TLS each slot of each
// sub-ring is bound to the member the ring record places there. The ring
// across hosts always uses the network (gRPC streams, or data sockets with
// --data-sockets: its members are on other hosts, whatever the kernel
// says); the local ring takes shared memory when its members share a
// machine.
func (w *worker) collective(ctx context.Context, r job.Ring, rank int) (allreduce.Collective, string, error) {
	base := allreduce.Default()
	base.Epoch, base.HopTimeout, base.Logger = r.Epoch, w.cfg.HopTimeout, w.log
	base.MaxElems = 3*w.eng.M.Layout.Total + 2 // the largest collective: the state transfer (broadcast)
	// ring makes a config for the members at idx (ring ranks), this worker
	// at position me, dialling them at addr.
	ring := func(idx []int, me int, addr func(job.RingMember) string) allreduce.Config {
		cfg := base
		cfg.Rank = me
		cfg.Peers = make([]string, len(idx))
		for i, g := range idx {
			cfg.Peers[i] = addr(r.Members[g])
		}
		if c := w.cfg.TLS; c != nil {
			cfg.ServerTLS, cfg.ClientTLS = c.Server(), c.Client()
			cfg.VerifyPeer = func(slot int, cert *x509.Certificate) error {
				if slot < 0 || slot >= len(idx) {
					return fmt.Errorf("no slot %d in a ring of %d", slot, len(idx))
				}
				return pki.Check(cert, pki.RoleWorker, r.Members[idx[slot]].ID)
			}
		}
		return cfg
	}
	endpoint := func(m job.RingMember) string { return m.Endpoint }
	lay, why := hierLayout(r.Members)
	mode := w.job.AllReduce
	if mode == job.AllReduceFlat || why != "" {
		if mode == job.AllReduceHier {
			w.log.Warn("the job asks for a hierarchical all-reduce; this ring cannot have one, using a flat ring", "epoch", r.Epoch, "reason", why)
		}
		all := make([]int, len(r.Members))
		for i := range all {
			all[i] = i
		}
		cfg := ring(all, rank, endpoint)
		w.dataPath(&cfg, r.Members, true)
		lis, err := w.takeListener(ctx, &w.lis, cfg.Peers[rank])
		if err != nil {
			return nil, "", err
		}
		fl, err := allreduce.New(cfg, lis)
		if err != nil {
			lis.Close()
			return nil, "", err
		}
		return fl, "flat", nil
	}
	localIdx, crossIdx, localRank, crossRank := lay.subRings(rank)
	lcfg := ring(localIdx, localRank, func(m job.RingMember) string { return m.LocalEndpoint })
	w.dataPath(&lcfg, r.Members, false)
	ccfg := ring(crossIdx, crossRank, endpoint)
	ccfg.Transport = allreduce.TransportGRPC
	if w.cfg.DataSockets {
		ccfg.Transport = allreduce.TransportSocket
	}
	llis, err := w.takeListener(ctx, &w.localLis, w.localAddr)
	if err != nil {
		return nil, "", err
	}
	clis, err := w.takeListener(ctx, &w.lis, r.Members[rank].Endpoint)
	if err != nil {
		llis.Close()
		return nil, "", err
	}
	local, err := allreduce.New(lcfg, llis)
	if err != nil {
		llis.Close()
		clis.Close()
		return nil, "", err
	}
	cross, err := allreduce.New(ccfg, clis)
	if err != nil {
		local.Close()
		clis.Close()
		return nil, "", err
	}
	return &allreduce.Hier{Local: local, Cross: cross}, fmt.Sprintf("hier %dx%d", lay.Hosts, lay.PerHost), nil
}

// takeListener hands over *held (the listener opened at start) or, once a
// ring has taken and closed it, listens at addr again.
func (w *worker) takeListener(ctx context.Context, held *net.Listener, addr string) (net.Listener, error) {
	w.ringMu.Lock()
	lis := *held
	*held = nil
	w.ringMu.Unlock()
	if lis != nil {
		return lis, nil
	}
	lis, err := listenRetry(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("worker: %w: %w", errListen, err)
	}
	return lis, nil
}

// failed turns a collective's error into a Failed event naming the member
// the ring blamed.
func (w *worker) failed(r job.Ring, err error) Event {
	ev := Failed{Epoch: r.Epoch, Err: err.Error()}
	var pe *allreduce.PeerError
	if errors.As(err, &pe) && pe.Rank >= 0 && pe.Rank < len(r.Members) {
		ev.Suspect = r.Members[pe.Rank].ID
	}
	w.log.Warn("epoch ended", "epoch", r.Epoch, "step", w.eng.Step, "error", err)
	return ev
}

// trainStep runs one step of the engine in ring ep and publishes this
// worker's stats.
func (w *worker) trainStep(ep *epochRing) Event {
	ts := time.Now()
	ids := make([]string, len(ep.info.Members))
	for i, m := range ep.info.Members {
		ids[i] = m.ID
	}
	red := &ledgerReducer{ringReducer: ep.red, ids: ids, mine: job.Consumed{ID: w.cfg.ID, Rank: ep.rank}}
	st, err := w.eng.TrainStep(red)
	red.wait() // the batch is refilled next step
	if errors.Is(err, train.ErrStep) {
		return fatalEvent{err}
	}
	if err != nil {
		return w.failed(ep.info, err)
	}
	if st.Skipped {
		w.log.Warn("non-finite loss or gradient; step skipped", "step", w.eng.Step-1, "loss", st.Loss, "grad_norm", st.GradNorm)
	}
	now := time.Now()
	ep.consumed = red.got
	ep.tokens += st.Rows * w.eng.M.Cfg.SeqLen
	w.last, w.lastTPS = st, float64(ep.tokens*len(ep.info.Members))/now.Sub(ep.t0).Seconds()
	if now.Sub(w.lastStats) >= time.Second || w.eng.Step == w.job.Steps {
		w.lastStats = now
		w.commits.add(job.KeyStats+w.cfg.ID, job.Encode(job.WorkerStats{
			ID: w.cfg.ID, Rank: ep.rank, Epoch: ep.info.Epoch, Step: w.eng.Step, Device: w.deviceDesc(),
			StepSeconds: now.Sub(ts).Seconds(), DataSeconds: st.Data.Seconds(), ComputeSec: st.Compute.Seconds(),
			WaitSeconds: st.Wait.Seconds(), OptimSeconds: st.Optim.Seconds(),
			CommSeconds: st.Comm.Seconds(), ExposedSeconds: st.Exposed.Seconds(),
			TokensPerS: float64(st.Rows*w.eng.M.Cfg.SeqLen) / now.Sub(ts).Seconds(), Loss: st.Loss, GradNorm: st.GradNorm,
			Skipped: w.eng.Skipped, CheckpointSec: w.ckpt.lastSeconds(), UpdatedUnix: unix(now),
			GPU: w.gpuStats(), ArrivalUnix: unix(st.Arrive),
		}))
	}
	return StepDone{Epoch: ep.info.Epoch, Step: w.eng.Step, At: now}
}

// evaluate runs the validation pass in ring ep.
func (w *worker) evaluate(ep *epochRing) Event {
	val, err := w.eng.Evaluate(ep.red)
	if errors.Is(err, train.ErrStep) {
		return fatalEvent{err}
	}
	if err != nil {
		return w.failed(ep.info, err)
	}
	w.log.Info("eval", "epoch", ep.info.Epoch, "rank", ep.rank, "step", w.eng.Step, "train_loss", round4(w.last.Loss),
		"val_loss", round4(val), "tokens_per_s", math.Round(w.lastTPS))
	return EvalDone{Epoch: ep.info.Epoch, Step: w.eng.Step, Val: val, At: time.Now()}
}

// record holds the ledger entry of the step that ended at a.Step: every
// rank's report of what it read, gathered in the step's collective. Rank 0
// commits it with the progress record; the others keep it (committer).
func (w *worker) record(a Record) {
	e := job.LedgerEntry{Step: a.Step - 1, Epoch: a.Epoch, Workers: w.cur.consumed, Loss: w.last.Loss,
		Time: unix(time.Now()), Writer: w.cfg.ID}
	w.commits.addLedger(e.Step, job.Encode(e), a.Primary)
	if a.Primary {
		w.commits.add(job.KeyProgress, job.Encode(w.progressRecord(a.Step)))
	}
}

func (w *worker) progressRecord(step int) job.Progress {
	return job.Progress{Step: step, Steps: w.job.Steps, Epoch: w.cur.info.Epoch, Loss: w.last.Loss, ValLoss: w.lastVal,
		TokensPerS: w.lastTPS, Workers: len(w.cur.info.Members), Skipped: w.eng.Skipped, UpdatedUnix: unix(time.Now())}
}

// watch feeds the machine the ring, start and done records: a snapshot at
// one revision, then watches from the next; when a watch breaks (etcd
// restarting, the history compacted), a new snapshot and new watches.
func (w *worker) watch(ctx context.Context, out chan<- Event) {
	send := func(ev Event) bool {
		select {
		case out <- ev:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for ctx.Err() == nil {
		rev, evs, err := w.snapshot(ctx)
		if err != nil {
			w.log.Debug("etcd snapshot failed; retrying", "error", err)
			sleep(ctx, 200*time.Millisecond)
			continue
		}
		for _, ev := range evs {
			if !send(ev) {
				return
			}
		}
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		chans := []clientv3.WatchChan{
			w.cli.Watch(wctx, w.key(job.KeyRing), clientv3.WithRev(rev+1)),
			w.cli.Watch(wctx, w.key(job.KeyStart), clientv3.WithPrefix(), clientv3.WithRev(rev+1)),
			w.cli.Watch(wctx, w.key(job.KeyDone), clientv3.WithRev(rev+1)),
		}
		w.follow(ctx, chans, send)
		cancel()
		sleep(ctx, 200*time.Millisecond)
	}
}

// snapshot reads the ring, start and done records at one revision.
func (w *worker) snapshot(ctx context.Context) (int64, []Event, error) {
	var evs []Event
	resp, err := w.cli.Get(ctx, w.key(job.KeyRing))
	if err != nil {
		return 0, nil, err
	}
	rev := resp.Header.Revision
	kvs := resp.Kvs
	sresp, err := w.cli.Get(ctx, w.key(job.KeyStart), clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		return 0, nil, err
	}
	kvs = append(kvs, sresp.Kvs...)
	dresp, err := w.cli.Get(ctx, w.key(job.KeyDone), clientv3.WithRev(rev))
	if err != nil {
		return 0, nil, err
	}
	kvs = append(kvs, dresp.Kvs...)
	for _, kv := range kvs {
		if ev := w.decode(string(kv.Key), kv.Value, kv.ModRevision); ev != nil {
			evs = append(evs, ev)
		}
	}
	return rev, evs, nil
}

// follow forwards watch events until one of the watches ends.
func (w *worker) follow(ctx context.Context, chans []clientv3.WatchChan, send func(Event) bool) {
	for {
		var resp clientv3.WatchResponse
		var ok bool
		select {
		case <-ctx.Done():
			return
		case resp, ok = <-chans[0]:
		case resp, ok = <-chans[1]:
		case resp, ok = <-chans[2]:
		}
		if !ok || resp.Err() != nil {
			if ok {
				w.log.Debug("etcd watch ended; reading a new snapshot", "error", resp.Err())
			}
			return
		}
		for _, e := range resp.Events {
			if e.Type != clientv3.EventTypePut {
				continue
			}
			if ev := w.decode(string(e.Kv.Key), e.Kv.Value, e.Kv.ModRevision); ev != nil && !send(ev) {
				return
			}
		}
	}
}

// decode turns a ring, start or done record (at mod revision rev) into the
// machine's event (nil for a record that does not decode: it is logged and
// skipped).
func (w *worker) decode(key string, value []byte, rev int64) Event {
	k := key[len(w.prefix):]
	var err error
	var ev Event
	switch {
	case k == job.KeyRing:
		var r job.Ring
		if err = job.Decode(k, value, &r); err == nil {
			ev = RingSeen{Ring: r, Rev: rev}
		}
	case k == job.KeyDone:
		ev = DoneSeen{}
	case strings.HasPrefix(k, job.KeyStart) && len(k) > len(job.KeyStart):
		var st job.Start
		if err = job.Decode(k, value, &st); err == nil {
			ev = StartSeen{Start: st}
		}
	default:
		return nil
	}
	if err != nil {
		w.log.Warn("skipping a record that does not decode", "key", k, "error", err)
		return nil
	}
	return ev
}

func unix(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

func round4(x float64) float64 { return math.Round(x*1e4) / 1e4 }

package worker

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/internal/cluster"
	"github.com/bmojo/bmojo/internal/data"
	"github.com/bmojo/bmojo/internal/train"
	"github.com/bmojo/bmojo/kernels"
)

// runEpoch connects the ring of epoch r, synchronises state if asked, and
// trains until the job ends, the epoch is superseded, or a peer fails.
func (w *worker) runEpoch(ctx context.Context, r cluster.Ring, rank int, st cluster.Start) error {
	log := w.log.With("epoch", r.Epoch, "rank", rank)
	peers := make([]string, len(r.Members))
	for i, m := range r.Members {
		peers[i] = m.Endpoint
	}
	cfg := allreduce.Default()
	cfg.Rank, cfg.Peers, cfg.Epoch, cfg.HopTimeout, cfg.Logger = rank, peers, r.Epoch, w.cfg.HopTimeout, w.log
	lis := w.lis
	w.lis = nil
	if lis == nil {
		var err error
		if lis, err = listenRetry(ctx, peers[rank]); err != nil {
			return &fatalError{err}
		}
	}
	ring, err := allreduce.New(cfg, lis)
	if err != nil {
		lis.Close()
		return err
	}
	w.ringMu.Lock()
	w.ring, w.ringInfo = ring, r
	w.ringMu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = ring.Connect(cctx)
	cancel()
	if err != nil {
		return w.peerFailed(ctx, r, err)
	}
	if st.Sync {
		if err := w.broadcast(ctx, ring, r, st); err != nil {
			return w.peerFailed(ctx, r, err)
		}
	}
	if w.step != st.Step {
		return &fatalError{fmt.Errorf("worker: epoch %d starts at step %d but this worker is at step %d and no sync was ordered",
			r.Epoch, st.Step, w.step)}
	}
	log.Info("epoch started", "step", w.step, "ring_size", len(peers), "synced", st.Sync, "reason", r.Reason)
	buckets := w.buckets()
	t0, tokens0 := time.Now(), 0
	var lastStats time.Time
	finished := false
	for w.step < w.job.Steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		select {
		case nr := <-w.latest:
			w.latest <- nr
			if nr.Epoch > r.Epoch {
				return fmt.Errorf("superseded by epoch %d", nr.Epoch)
			}
		default:
		}
		var tm stepTimes
		ts := time.Now()
		loss, rows, err := w.trainStep(ring, buckets, rank, len(peers), &tm)
		if err != nil {
			return w.peerFailed(ctx, r, err)
		}
		to := time.Now()
		res := w.opt.Apply()
		optim := time.Since(to)
		if res.Skipped || math.IsNaN(loss) || math.IsInf(loss, 0) {
			w.skipped++
			log.Warn("non-finite loss or gradient; step skipped", "step", w.step, "loss", loss, "grad_norm", res.GradNorm)
		}
		w.step++
		tokens0 += rows * w.m.T
		tps := float64(tokens0*len(peers)) / time.Since(t0).Seconds()
		var val float64
		last := w.step == w.job.Steps
		if now := time.Now(); now.Sub(lastStats) >= time.Second || last {
			lastStats = now
			w.commits.add(cluster.KeyStats+w.cfg.ID, cluster.Encode(cluster.WorkerStats{
				ID: w.cfg.ID, Rank: rank, Epoch: r.Epoch, Step: w.step, Device: w.deviceDesc(),
				StepSeconds: now.Sub(ts).Seconds(), DataSeconds: tm.data.Seconds(), ComputeSec: tm.compute.Seconds(),
				WaitSeconds: tm.wait.Seconds(), OptimSeconds: optim.Seconds(),
				TokensPerS: float64(rows*w.m.T) / now.Sub(ts).Seconds(), Loss: loss, GradNorm: res.GradNorm,
				Skipped: w.skipped, CheckpointSec: w.ckpt.lastSeconds(), UpdatedUnix: float64(now.UnixNano()) / 1e9,
				GPU: w.gpuStats(), ArrivalUnix: float64(tm.arrive.UnixNano()) / 1e9,
			}))
		}
		if (w.job.EvalEvery > 0 && w.step%w.job.EvalEvery == 0) || last {
			if val, err = w.evaluate(ring, rank, len(peers)); err != nil {
				return w.peerFailed(ctx, r, err)
			}
			log.Info("eval", "step", w.step, "train_loss", round4(loss), "val_loss", round4(val), "tokens_per_s", math.Round(tps))
		}
		if rank == 0 {
			entry := cluster.LedgerEntry{Step: w.step - 1, Epoch: r.Epoch, Ranges: map[string]cluster.Range{}, Loss: loss,
				Time: float64(time.Now().UnixNano()) / 1e9}
			for i, m := range r.Members {
				s, c, _ := data.BatchRange(w.step-1, w.job.BatchSize, i, len(peers))
				entry.Ranges[m.ID] = cluster.Range{Start: s, Count: c}
			}
			w.commits.add(cluster.LedgerKey(w.step-1), cluster.Encode(entry))
			w.commits.add(cluster.KeyProgress, cluster.Encode(cluster.Progress{Step: w.step, Steps: w.job.Steps, Epoch: r.Epoch,
				Loss: loss, ValLoss: val, TokensPerS: tps, Workers: len(peers), Skipped: w.skipped,
				UpdatedUnix: float64(time.Now().UnixNano()) / 1e9}))
			if (w.job.CheckpointEvery > 0 && w.step%w.job.CheckpointEvery == 0) || last {
				w.ckpt.start(r.Epoch, val)
			}
			if last {
				w.ckpt.wait()
				w.commits.flush(ctx)
				w.commits.add(cluster.KeyDone, cluster.Encode(cluster.Done{Step: w.step, ValLoss: val, Loss: loss}))
				w.commits.flush(ctx)
				finished = true
			}
		}
	}
	if rank == 0 && !finished {
		// Resumed at the final step (done was never written): write it now.
		w.commits.add(cluster.KeyDone, cluster.Encode(cluster.Done{Step: w.step}))
		w.commits.flush(ctx)
	}
	return nil
}

// peerFailed turns a collective's error into a report naming the suspect,
// so the coordinator re-forms the ring without waiting for a lease to lapse.
func (w *worker) peerFailed(ctx context.Context, r cluster.Ring, err error) error {
	var pe *allreduce.PeerError
	if errors.As(err, &pe) && pe.Rank >= 0 && pe.Rank < len(r.Members) && r.Members[pe.Rank].ID != w.cfg.ID {
		rep := cluster.Report{Epoch: r.Epoch, Reporter: w.cfg.ID, Suspect: r.Members[pe.Rank].ID, Error: err.Error()}
		w.log.Warn("peer failed", "epoch", r.Epoch, "suspect", rep.Suspect, "error", err)
		_ = w.put(ctx, cluster.KeyReports+w.cfg.ID, cluster.Encode(rep))
	}
	// The ring stays open until the next epoch arrives: closing it now would
	// break our neighbours' streams before the abort reaches them, and they
	// would blame us instead of the failed rank.
	return err
}

// bucket is a contiguous run of the flat gradient vector all-reduced as one
// collective: one per layer, plus the embedding and final norm.
type bucket struct {
	off, n int
	host   []float32
	h      *allreduce.Handle
}

// buckets splits the gradient vector by layer. Layout order is embedding,
// norm_f, layer 0..L-1, and backward finishes layers last-first, so bucket
// i+1 holds layer i and bucket 0 (embedding, norm_f, plus one slot for the
// loss) is the last to be ready.
func (w *worker) buckets() []*bucket {
	l := w.m.Layout
	starts := []int{0}
	layer := 0
	for _, t := range l.Tensors {
		if t.Name == fmt.Sprintf("layers.%d.norm1.weight", layer) {
			starts = append(starts, t.Offset)
			layer++
		}
	}
	starts = append(starts, l.Total)
	bs := make([]*bucket, len(starts)-1)
	for i := range bs {
		n := starts[i+1] - starts[i]
		extra := 0
		if i == 0 {
			extra = 1
		}
		bs[i] = &bucket{off: starts[i], n: n, host: make([]float32, n+extra)}
	}
	return bs
}

// trainStep computes this rank's share of the global batch and leaves the
// averaged gradient of the whole batch in the model. Gradients are scaled
// by rows/GB before the sum, so the result is the gradient of the global
// mean loss whatever the split (docs/model.md §6).
// stepTimes splits one step's wall time (cluster.WorkerStats).
type stepTimes struct {
	data, compute, wait time.Duration
	arrive              time.Time // the last bucket entered the ring
}

func (w *worker) trainStep(ring *allreduce.Ring, bs []*bucket, rank, size int, tm *stepTimes) (loss float64, rows int, err error) {
	GB, T := w.job.BatchSize, w.m.Cfg.SeqLen
	start, count, err := data.BatchRange(w.step, GB, rank, size)
	if err != nil {
		return 0, 0, &fatalError{err}
	}
	be := w.m.Backend()
	scale := float64(count) / float64(GB)
	send := func(b *bucket) {
		be.Download(b.host[:b.n], be.Slice(w.m.Grads, b.off, b.n))
		if scale != 1 {
			for i := range b.host[:b.n] {
				b.host[i] *= float32(scale)
			}
		}
		b.h = ring.Start(b.host, allreduce.Sum)
	}
	w.m.ZeroGrads()
	var local float64
	t0 := time.Now()
	if count > 0 {
		if err := w.m.Prepare(count, T); err != nil {
			return 0, 0, &fatalError{err}
		}
		if cap(w.tokens) < count*T {
			w.tokens, w.targets = make([]int32, count*T), make([]int32, count*T)
		}
		tokens, targets := w.tokens[:count*T], w.targets[:count*T]
		if err := w.train.Fill(0, start, count, tokens, targets); err != nil {
			return 0, 0, &fatalError{err}
		}
		tm.data = time.Since(t0)
		l, err := w.m.Forward(tokens, targets)
		if err != nil {
			return 0, 0, &fatalError{err}
		}
		// The reported loss is the language-model cross-entropy (what the
		// validation loss measures); a non-finite auxiliary loss still
		// marks the step as skipped.
		local = l.CE
		if math.IsNaN(l.Total) || math.IsInf(l.Total, 0) {
			local = l.Total
		}
		bs[0].host[bs[0].n] = float32(local * scale)
		err = w.m.BackwardHook(func(layer int) {
			if layer >= 0 {
				send(bs[layer+1])
			} else {
				send(bs[0])
			}
		})
		if err != nil {
			return 0, 0, &fatalError{err}
		}
	} else {
		// More ranks than sequences: contribute zeros.
		bs[0].host[bs[0].n] = 0
		for i := len(bs) - 1; i >= 0; i-- {
			send(bs[i])
		}
	}
	t1 := time.Now()
	tm.compute, tm.arrive = t1.Sub(t0)-tm.data, t1
	defer func() { tm.wait = time.Since(t1) }()
	var firstErr error
	for _, b := range bs {
		if err := b.h.Wait(context.Background()); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	if firstErr != nil {
		return 0, 0, firstErr
	}
	for _, b := range bs {
		be.Upload(be.Slice(w.m.Grads, b.off, b.n), b.host[:b.n])
	}
	return float64(bs[0].host[bs[0].n]), count, be.Err()
}

// evaluate splits the validation windows over the ranks and sums.
func (w *worker) evaluate(ring *allreduce.Ring, rank, size int) (float64, error) {
	n := w.val.NumWindows()
	if w.job.EvalBatches > 0 {
		n = min(n, w.job.EvalBatches*w.job.BatchSize)
	}
	start, count, err := data.BatchRange(0, n, rank, size)
	if err != nil {
		return 0, &fatalError{err}
	}
	if w.m.B == 0 {
		if err := w.m.Prepare(1, w.m.Cfg.SeqLen); err != nil {
			return 0, &fatalError{err}
		}
	}
	sum, cnt, err := train.EvalSum(w.m, w.val, start, count)
	if err != nil {
		return 0, &fatalError{err}
	}
	buf := []float32{float32(sum), float32(cnt)}
	if err := ring.AllReduce(context.Background(), buf, allreduce.Sum); err != nil {
		return 0, err
	}
	if buf[1] == 0 {
		return 0, &fatalError{errors.New("worker: eval: no labelled tokens")}
	}
	return float64(buf[0]) / float64(buf[1]), nil
}

// broadcast copies the source member's parameters, optimizer moments and
// counters to every rank: all ranks sum a buffer that is zero except on the
// source, which is exact.
func (w *worker) broadcast(ctx context.Context, ring *allreduce.Ring, r cluster.Ring, st cluster.Start) error {
	be := w.m.Backend()
	P := w.m.Layout.Total
	buf := make([]float32, 3*P+2)
	if st.Source == w.cfg.ID {
		be.Download(buf[:P], w.m.Params)
		be.Download(buf[P:2*P], w.opt.M)
		be.Download(buf[2*P:3*P], w.opt.V)
		buf[3*P], buf[3*P+1] = float32(w.opt.Step), float32(w.skipped)
	}
	if err := ring.AllReduce(ctx, buf, allreduce.Sum); err != nil {
		return err
	}
	upload := func(dst kernels.Buffer, src []float32) { be.Upload(dst, src) }
	upload(w.m.Params, buf[:P])
	upload(w.opt.M, buf[P:2*P])
	upload(w.opt.V, buf[2*P:3*P])
	w.opt.Step, w.skipped = int(buf[3*P]), int(buf[3*P+1])
	w.step = st.Step
	w.log.Info("state synchronised", "source", st.Source, "step", st.Step, "floats", len(buf))
	return be.Err()
}

func round4(x float64) float64 { return math.Round(x*1e4) / 1e4 }

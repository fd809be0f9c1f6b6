package worker

import (
	"context"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/train"
)

// runEpoch connects the ring of epoch r, synchronises state if asked, and
// trains until the job ends, the epoch is superseded, or a peer fails.
func (w *worker) runEpoch(ctx context.Context, r job.Ring, rank int, st job.Start) error {
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
	if w.eng.Step != st.Step {
		return &fatalError{fmt.Errorf("worker: epoch %d starts at step %d but this worker is at step %d and no sync was ordered",
			r.Epoch, st.Step, w.eng.Step)}
	}
	log.Info("epoch started", "step", w.eng.Step, "ring_size", len(peers), "synced", st.Sync, "reason", r.Reason)
	red := &ringReducer{ctx: ctx, ring: ring, rank: rank, size: len(peers), be: w.eng.M.Backend()}
	t0, tokens0 := time.Now(), 0
	var lastStats time.Time
	finished := false
	for w.eng.Step < w.job.Steps {
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
		ts := time.Now()
		tm, err := w.eng.TrainStep(red)
		if errors.Is(err, train.ErrStep) {
			return &fatalError{err}
		}
		if err != nil {
			return w.peerFailed(ctx, r, err)
		}
		loss, rows := tm.Loss, tm.Rows
		if tm.Skipped {
			log.Warn("non-finite loss or gradient; step skipped", "step", w.eng.Step-1, "loss", loss, "grad_norm", tm.GradNorm)
		}
		tokens0 += rows * w.eng.M.Cfg.SeqLen
		tps := float64(tokens0*len(peers)) / time.Since(t0).Seconds()
		var val float64
		last := w.eng.Step == w.job.Steps
		if now := time.Now(); now.Sub(lastStats) >= time.Second || last {
			lastStats = now
			w.commits.add(job.KeyStats+w.cfg.ID, job.Encode(job.WorkerStats{
				ID: w.cfg.ID, Rank: rank, Epoch: r.Epoch, Step: w.eng.Step, Device: w.deviceDesc(),
				StepSeconds: now.Sub(ts).Seconds(), DataSeconds: tm.Data.Seconds(), ComputeSec: tm.Compute.Seconds(),
				WaitSeconds: tm.Wait.Seconds(), OptimSeconds: tm.Optim.Seconds(),
				TokensPerS: float64(rows*w.eng.M.Cfg.SeqLen) / now.Sub(ts).Seconds(), Loss: loss, GradNorm: tm.GradNorm,
				Skipped: w.eng.Skipped, CheckpointSec: w.ckpt.lastSeconds(), UpdatedUnix: float64(now.UnixNano()) / 1e9,
				GPU: w.gpuStats(), ArrivalUnix: float64(tm.Arrive.UnixNano()) / 1e9,
			}))
		}
		if (w.job.EvalEvery > 0 && w.eng.Step%w.job.EvalEvery == 0) || last {
			if val, err = w.eng.Evaluate(red); errors.Is(err, train.ErrStep) {
				return &fatalError{err}
			} else if err != nil {
				return w.peerFailed(ctx, r, err)
			}
			log.Info("eval", "step", w.eng.Step, "train_loss", round4(loss), "val_loss", round4(val), "tokens_per_s", math.Round(tps))
		}
		if rank == 0 {
			entry := job.LedgerEntry{Step: w.eng.Step - 1, Epoch: r.Epoch, Ranges: map[string]job.Range{}, Loss: loss,
				Time: float64(time.Now().UnixNano()) / 1e9}
			for i, m := range r.Members {
				s, c, _ := data.BatchRange(w.eng.Step-1, w.job.BatchSize, i, len(peers))
				entry.Ranges[m.ID] = job.Range{Start: s, Count: c}
			}
			w.commits.add(job.LedgerKey(w.eng.Step-1), job.Encode(entry))
			w.commits.add(job.KeyProgress, job.Encode(job.Progress{Step: w.eng.Step, Steps: w.job.Steps, Epoch: r.Epoch,
				Loss: loss, ValLoss: val, TokensPerS: tps, Workers: len(peers), Skipped: w.eng.Skipped,
				UpdatedUnix: float64(time.Now().UnixNano()) / 1e9}))
			if (w.job.CheckpointEvery > 0 && w.eng.Step%w.job.CheckpointEvery == 0) || last {
				w.ckpt.start(r.Epoch, val)
			}
			if last {
				w.ckpt.wait()
				w.commits.flush(ctx)
				w.commits.add(job.KeyDone, job.Encode(job.Done{Step: w.eng.Step, ValLoss: val, Loss: loss}))
				w.commits.flush(ctx)
				finished = true
			}
		}
	}
	if rank == 0 && !finished {
		// Resumed at the final step (done was never written): write it now.
		w.commits.add(job.KeyDone, job.Encode(job.Done{Step: w.eng.Step}))
		w.commits.flush(ctx)
	}
	return nil
}

// peerFailed turns a collective's error into a report naming the suspect,
// so the coordinator re-forms the ring without waiting for a lease to lapse.
func (w *worker) peerFailed(ctx context.Context, r job.Ring, err error) error {
	var pe *allreduce.PeerError
	if errors.As(err, &pe) && pe.Rank >= 0 && pe.Rank < len(r.Members) && r.Members[pe.Rank].ID != w.cfg.ID {
		rep := job.Report{Epoch: r.Epoch, Reporter: w.cfg.ID, Suspect: r.Members[pe.Rank].ID, Error: err.Error()}
		w.log.Warn("peer failed", "epoch", r.Epoch, "suspect", rep.Suspect, "error", err)
		_ = w.put(ctx, job.KeyReports+w.cfg.ID, job.Encode(rep))
	}
	// The ring stays open until the next epoch arrives: closing it now would
	// break our neighbours' streams before the abort reaches them, and they
	// would blame us instead of the failed rank.
	return err
}

// ringReducer is the train.Reducer of one epoch's ring: each layer's
// gradient range is downloaded, scaled and all-reduced as soon as backward
// finishes it, and uploaded back once every range has arrived. Host buffers
// are kept between steps, one per range in backward's order.
type ringReducer struct {
	ctx        context.Context
	ring       *allreduce.Ring
	rank, size int
	be         kernels.Backend[float32]

	bufs    []*bucket // by call order within a step
	started int
}

type bucket struct {
	dev  kernels.Buffer
	host []float32
	h    *allreduce.Handle
}

func (r *ringReducer) Rank() int { return r.rank }
func (r *ringReducer) Size() int { return r.size }

func (r *ringReducer) Start(g kernels.Buffer, scale float32) {
	if r.started == len(r.bufs) {
		r.bufs = append(r.bufs, &bucket{})
	}
	b := r.bufs[r.started]
	r.started++
	if len(b.host) != g.Len() {
		b.host = make([]float32, g.Len())
	}
	b.dev = g
	r.be.Download(b.host, g)
	if scale != 1 {
		for i := range b.host {
			b.host[i] *= scale
		}
	}
	b.h = r.ring.Start(b.host, allreduce.Sum)
}

func (r *ringReducer) Finish() error {
	started := r.bufs[:r.started]
	r.started = 0
	var firstErr error
	for _, b := range started {
		if err := b.h.Wait(r.ctx); err != nil && firstErr == nil {
			firstErr = err
		}
	}
	if firstErr != nil {
		return firstErr
	}
	for _, b := range started {
		r.be.Upload(b.dev, b.host)
	}
	return nil
}

// Sum all-reduces xs, each as two float32 (the value rounded, and what the
// rounding lost) so that the sums keep about 48 bits; one replica's sums are
// its values, exactly.
func (r *ringReducer) Sum(xs []float64) ([]float64, error) {
	if r.size == 1 {
		return xs, nil
	}
	buf := make([]float32, 2*len(xs))
	for i, x := range xs {
		hi := float32(x)
		buf[2*i], buf[2*i+1] = hi, float32(x-float64(hi))
	}
	if err := r.ring.AllReduce(r.ctx, buf, allreduce.Sum); err != nil {
		return nil, err
	}
	out := make([]float64, len(xs))
	for i := range out {
		out[i] = float64(buf[2*i]) + float64(buf[2*i+1])
	}
	return out, nil
}

// broadcast copies the source member's parameters, optimizer moments and
// counters to every rank: all ranks sum a buffer that is zero except on the
// source, which is exact.
func (w *worker) broadcast(ctx context.Context, ring *allreduce.Ring, r job.Ring, st job.Start) error {
	be := w.eng.M.Backend()
	P := w.eng.M.Layout.Total
	buf := make([]float32, 3*P+2)
	if st.Source == w.cfg.ID {
		be.Download(buf[:P], w.eng.M.Params)
		be.Download(buf[P:2*P], w.eng.Opt.M)
		be.Download(buf[2*P:3*P], w.eng.Opt.V)
		buf[3*P], buf[3*P+1] = float32(w.eng.Opt.Step), float32(w.eng.Skipped)
	}
	if err := ring.AllReduce(ctx, buf, allreduce.Sum); err != nil {
		return err
	}
	upload := func(dst kernels.Buffer, src []float32) { be.Upload(dst, src) }
	upload(w.eng.M.Params, buf[:P])
	upload(w.eng.Opt.M, buf[P:2*P])
	upload(w.eng.Opt.V, buf[2*P:3*P])
	w.eng.Opt.Step, w.eng.Skipped = int(buf[3*P]), int(buf[3*P+1])
	w.eng.Step = st.Step
	w.log.Info("state synchronised", "source", st.Source, "step", st.Step, "floats", len(buf))
	return be.Err()
}

func round4(x float64) float64 { return math.Round(x*1e4) / 1e4 }

package worker

import (
	"context"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels"
)

// ringReducer is the train.Reducer of one epoch's ring (flat or
// hierarchical: allreduce.Collective): each layer's
// gradient range is downloaded, scaled and all-reduced as soon as backward
// finishes it, and uploaded back once every range has arrived. Host buffers
// are kept between steps, one per range in backward's order.
type ringReducer struct {
	ctx        context.Context
	ring       allreduce.Collective
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

func (r *ringReducer) Rank() int  { return r.rank }
func (r *ringReducer) Err() error { return r.ring.Err() }
func (r *ringReducer) Size() int  { return r.size }

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
func (w *worker) broadcast(ctx context.Context, ring allreduce.Collective, st job.Start) error {
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

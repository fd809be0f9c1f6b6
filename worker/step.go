package worker

import (
	"context"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/train"
)

// ringReducer is the train.Reducer of one epoch's ring (flat or
// hierarchical: allreduce.Collective): each layer's gradient range is
// copied to host memory, scaled and all-reduced as soon as backward
// finishes it, and copied back once its sum has arrived. Host buffers are
// kept between steps, one per range in backward's order.
//
// Two paths move the ranges; both start the same collectives on the same
// values in the same order, so their sums are bit for bit the same:
//
//   - the reference (syncCopies, or a backend without kernels.AsyncCopier):
//     Start downloads on the training goroutine, which waits for every op
//     queued so far (on a GPU, the device idles meanwhile), scales and
//     starts the collective; Finish waits for all of them, then uploads.
//   - the overlapped one: Start queues an async download and returns, so
//     backward goes on queueing; one goroutine per range waits for its
//     copy, scales it, and starts its collective once the previous range's
//     has started (every rank must start them in the same order). Finish
//     queues each range's async upload as its sum arrives, then waits for
//     the uploads to land.
//
// A third path skips the host: where the collective reduces device memory
// itself (a flat ring whose same-host hops carry device slots over CUDA
// IPC: allreduce.Ring.DeviceNative; or a hierarchy whose rings inside the
// host do, which moves only this rank's segment through host memory),
// Start scales the range on the device and starts the device collective
// on it; the reducer copies nothing to the host or back. Its sums follow the ring's order too, but come from the GPU's adds
// and scale, so they match the host paths' to rounding only where the
// scale is not 1 (TestReducerDevicePathCUDA).
//
// Either way it times the collectives (CommTimes): the step's
// communication, of which TrainStep's wait in Finish after the last range
// arrived is the part backward did not hide.
type ringReducer struct {
	ctx        context.Context
	ring       allreduce.Collective
	rank, size int
	be         kernels.Backend[float32]
	// syncCopies keeps the reference path where the backend could copy
	// asynchronously (the worker with --overlap-copies=false, tests, bench
	// step --copies sync).
	syncCopies bool

	bufs    []*bucket // by call order within a step
	started int
	last    chan struct{} // overlapped path: closed once the last range's collective has started
	comm    time.Duration // CommTimes of the last Finish
	ready   time.Time
	spans   [][2]time.Time // Spans of the last Finish
}

type bucket struct {
	dev  kernels.Buffer
	host []float32
	// started is closed once h is set (the collective started); ended once
	// the collective has finished and t1 is set. ready is when the range
	// reached host memory; t0..t1 the time its collective was in flight
	// (queued behind earlier ones, or running).
	h              *allreduce.Handle
	onDevice       bool // reduced in place on the device (deviceCollective)
	started, ended chan struct{}
	ready, t0, t1  time.Time
}

var _ train.CommTimer = (*ringReducer)(nil)

// NewStepReducer returns the Reducer of a worker's training step: rank of
// a size-rank collective coll (connected), summing gradients that live on
// be, through the overlapped path where be has one unless syncCopies.
// bmojo bench step --workers times the worker's own reduction with it.
func NewStepReducer(ctx context.Context, coll allreduce.Collective, rank, size int, be kernels.Backend[float32], syncCopies bool) train.Reducer {
	return &ringReducer{ctx: ctx, ring: coll, rank: rank, size: size, be: be, syncCopies: syncCopies}
}

func (r *ringReducer) Rank() int  { return r.rank }
func (r *ringReducer) Err() error { return r.ring.Err() }
func (r *ringReducer) Size() int  { return r.size }

// CommTimes implements train.CommTimer for the step the last Finish ended:
// how long at least one of its collectives was in flight, and when the
// last range reached host memory (the overlapped path on a GPU: when
// backward's kernels, which the host queues ahead of the device, had
// produced it).
func (r *ringReducer) CommTimes() (comm time.Duration, ready time.Time) { return r.comm, r.ready }

// deviceCollective is a collective that can reduce device memory in place:
// an allreduce.Ring whose same-host hops carry device slots (cuda-ipc).
type deviceCollective interface {
	StartDevice(buf kernels.Buffer, op allreduce.Op) *allreduce.Handle
	DeviceNative() bool
}

func (r *ringReducer) Start(g kernels.Buffer, scale float32) {
	if r.started == len(r.bufs) {
		r.bufs = append(r.bufs, &bucket{})
	}
	b := r.bufs[r.started]
	r.started++
	b.dev = g
	b.started, b.ended = make(chan struct{}), make(chan struct{})
	if dc, ok := r.ring.(deviceCollective); ok && dc.DeviceNative() {
		// The GPU-resident path: the gradient never leaves the device. The
		// scale and the collective's copies queue behind the kernels that
		// produced g, on the same stream.
		if scale != 1 {
			r.be.Scale(g, float64(scale))
		}
		b.ready, b.onDevice = time.Now(), true
		r.launch(b, func() *allreduce.Handle { return dc.StartDevice(g, allreduce.Sum) })
		return
	}
	b.onDevice = false
	if len(b.host) != g.Len() {
		b.host = make([]float32, g.Len())
	}
	if ac, ok := r.be.(kernels.AsyncCopier[float32]); ok && !r.syncCopies {
		r.startOverlapped(ac, b, scale)
		return
	}
	r.be.Download(b.host, g)
	b.ready = time.Now()
	scaleHost(b.host, scale)
	r.launch(b, nil)
}

// startOverlapped queues b's download and hands the rest to a goroutine.
// A failed copy is recorded by the backend, which TrainStep checks after
// Finish (as after the reference path's Download); the collective still
// runs, so the other ranks are not left waiting for it.
func (r *ringReducer) startOverlapped(ac kernels.AsyncCopier[float32], b *bucket, scale float32) {
	wait := ac.DownloadAsync(b.host, b.dev)
	prev := r.last
	r.last = b.started
	go func() {
		_ = wait()
		b.ready = time.Now()
		scaleHost(b.host, scale)
		if prev != nil {
			<-prev
		}
		r.launch(b, nil)
	}()
}

// launch starts b's collective (start, else the host collective of b.host)
// and notes when it ends.
func (r *ringReducer) launch(b *bucket, start func() *allreduce.Handle) {
	b.t0 = time.Now()
	if start != nil {
		b.h = start()
	} else {
		b.h = r.ring.Start(b.host, allreduce.Sum)
	}
	close(b.started)
	go func() {
		<-b.h.Done()
		b.t1 = time.Now()
		close(b.ended)
	}()
}

func scaleHost(x []float32, scale float32) {
	if scale != 1 {
		for i := range x {
			x[i] *= scale
		}
	}
}

func (r *ringReducer) Finish() error {
	started := r.bufs[:r.started]
	r.started, r.last = 0, nil
	ac, overlapped := r.be.(kernels.AsyncCopier[float32])
	overlapped = overlapped && !r.syncCopies
	var uploads []func() error
	var firstErr error
	r.ready = time.Time{}
	for _, b := range started {
		<-b.started // overlapped: the copy is done and the collective started
		r.ready = later(r.ready, b.ready)
		if err := b.h.Wait(r.ctx); err != nil && firstErr == nil {
			firstErr = err
		}
		if overlapped && firstErr == nil && !b.onDevice {
			uploads = append(uploads, ac.UploadAsync(b.dev, b.host))
		}
	}
	for _, up := range uploads { // the sums are on the device
		_ = up() // a failure is recorded by the backend, as Upload's
	}
	r.comm, r.spans = inFlight(started)
	if firstErr != nil {
		return firstErr
	}
	if !overlapped {
		for _, b := range started {
			if !b.onDevice {
				r.be.Upload(b.dev, b.host)
			}
		}
	}
	return nil
}

// inFlight is how long at least one of the buckets' collectives was in
// flight, and each one's interval. A collective still running (its wait
// ended with the context) counts until now.
func inFlight(bs []*bucket) (time.Duration, [][2]time.Time) {
	spans := make([][2]time.Time, len(bs))
	for i, b := range bs {
		spans[i] = [2]time.Time{b.t0, time.Now()}
		select {
		case <-b.h.Done():
			<-b.ended
			spans[i][1] = b.t1
		default:
		}
	}
	return union(spans), spans
}

// Spans is the in-flight interval of each collective of the step the last
// Finish ended, in start order (one per gradient range).
func (r *ringReducer) Spans() [][2]time.Time { return r.spans }

// ReplicaStep is one replica's timing of one step of data-parallel
// training: when backward produced its last gradient range (Arrive), when
// Finish returned (End), and its collectives' in-flight intervals (Spans,
// in start order; every replica starts the same collectives in the same
// order).
type ReplicaStep struct {
	Arrive, End time.Time
	Spans       [][2]time.Time
}

// Overlap measures one step's communication across its replicas without
// counting skew, the time a replica waits for a slower one, which no
// overlap can hide. A collective makes progress only once every replica
// has started it, so its communication starts at the latest start; the
// step's communication is exposed only after the last replica's backward
// has ended. It returns, summed over the replicas, the time at least one
// collective was in flight counted that way (comm), and how long each
// Finish went on after the last replica's backward (exposed).
func Overlap(rs []ReplicaStep) (comm, exposed time.Duration) {
	if len(rs) == 0 {
		return 0, 0
	}
	var last time.Time
	n := len(rs[0].Spans)
	for _, r := range rs {
		last = later(last, r.Arrive)
		n = min(n, len(r.Spans))
	}
	starts := make([]time.Time, n)
	for k := range starts {
		for _, r := range rs {
			starts[k] = later(starts[k], r.Spans[k][0])
		}
	}
	for _, r := range rs {
		spans := make([][2]time.Time, n)
		for k := range spans {
			spans[k] = [2]time.Time{starts[k], later(starts[k], r.Spans[k][1])}
		}
		comm += union(spans)
		exposed += max(0, r.End.Sub(last))
	}
	return comm, exposed
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// union is the length of the union of the intervals [s[0], s[1]], given in
// order of their starts (collectives run in start order, so one pass in
// that order merges them).
func union(spans [][2]time.Time) time.Duration {
	var total time.Duration
	var lo, hi time.Time
	for i, s := range spans {
		if i > 0 && !s[0].After(hi) {
			hi = later(hi, s[1])
			continue
		}
		total += hi.Sub(lo)
		lo, hi = s[0], s[1]
	}
	return total + hi.Sub(lo)
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

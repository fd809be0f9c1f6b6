package allreduce

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/bmojo/bmojo/kernels"
)

// Collective is what a data-parallel worker needs of an all-reduce, and
// what both a flat *Ring and a hierarchical *Hier provide: connect, reduce
// buffers asynchronously (Start, in the same order on every rank) or
// synchronously, say whether it is still usable, and close.
type Collective interface {
	// Connect sets up the streams to the neighbours; ctx bounds it.
	Connect(ctx context.Context) error
	// Start begins an all-reduce of buf in place and returns at once.
	Start(buf []float32, op Op) *Handle
	// AllReduce reduces buf in place across every rank.
	AllReduce(ctx context.Context, buf []float32, op Op) error
	// Err is nil while collectives can still succeed.
	Err() error
	// Size is the number of ranks the collective spans.
	Size() int
	// Close stops it; collectives in flight fail.
	Close() error
}

var (
	_ Collective = (*Ring)(nil)
	_ Collective = (*Hier)(nil)
)

// Hier is one rank of a hierarchical all-reduce, for ranks spread over H
// hosts with the same number L of ranks on each: Local is the ring of the
// L ranks on this rank's host (shared memory between them where they share
// a machine), Cross the ring of the H ranks that have this rank's local
// index on every host (the network). A collective
//
//  1. reduce-scatters the buffer inside the host (Local): this rank ends
//     with its segment, Local.Owned(len(buf)), summed over the host;
//  2. all-reduces that segment across the hosts (Cross): the L segments
//     travel at once, on L different rings;
//  3. all-gathers the segments inside the host (Local).
//
// Each byte of the buffer crosses the network 2(H−1)/H/L times per rank,
// where a flat ring over all H·L ranks sends it 2(HL−1)/HL times over its
// slowest link; inside the host it moves 2(L−1)/L times, as in a flat ring
// of L. Every rank ends with the same bits: the reduce-scatter leaves one
// value per segment on the host (its owner's), the cross-host ring leaves
// its members (the owners of that segment on every host) bitwise
// identical, Avg divides those identical sums once by H·L on each of them,
// and the all-gather copies the owners' bits verbatim.
//
// Ranks are numbered host-major: rank = Cross rank · L + Local rank, which
// is how the errors of both rings are reported (*PeerError.Rank), so a
// caller whose rank order lists each host's ranks together, hosts in Cross
// order, maps them straight back to its members.
//
// Collectives run one at a time in Start order; the phases of one run one
// after another. A failure of either ring fails the collective, and the
// other ring is broken at once too with an abort that blames none of its
// ranks (the failed ring's error names the culprit), so every rank of every
// host stops within about a hop time; like a Ring, a Hier is then broken
// for good.
type Hier struct {
	Local, Cross *Ring

	mu      sync.Mutex
	queue   []*Handle
	running bool // a drain goroutine runs the queue
	nextOp  uint64
	failed  error
}

// Size is the number of ranks the collective spans.
func (h *Hier) Size() int {
	if h.Local == nil || h.Cross == nil {
		return 0
	}
	return h.Local.Size() * h.Cross.Size()
}

// Rank is this rank's number in the whole collective (host-major).
func (h *Hier) Rank() int {
	if h.Local == nil || h.Cross == nil {
		return 0
	}
	return h.Cross.rank*h.Local.n + h.Local.rank
}

// Slice is the element range [lo,hi) of an n-element buffer that this rank
// reduces across hosts: its segment of the host's reduce-scatter.
func (h *Hier) Slice(n int) (lo, hi int) { return h.Local.Owned(n) }

// globalRank maps rank r of ring (Local or Cross) to the collective's rank.
func (h *Hier) globalRank(ring *Ring, r int) int {
	if r < 0 || r >= ring.n {
		return -1
	}
	if ring == h.Local {
		return h.Cross.rank*h.Local.n + r
	}
	return r*h.Local.n + h.Local.rank
}

// wrap turns an error of ring into one of the collective: a *PeerError
// naming a rank of the ring becomes one naming that rank's global number
// (the ring's own error stays in the chain); any other error (a failure
// outside this ring, ErrClosed, ctx) is wrapped as it is.
func (h *Hier) wrap(ring *Ring, op uint64, what string, err error) error {
	name := "local ring"
	if ring == h.Cross {
		name = "ring across hosts"
	}
	where := fmt.Sprintf("hierarchical, %s (%s rank %d of %d)", what, name, ring.rank, ring.n)
	var pe *PeerError
	if errors.As(err, &pe) && pe.Rank >= 0 && pe.Rank < ring.n {
		return &PeerError{Rank: h.globalRank(ring, pe.Rank), Via: h.globalRank(ring, pe.Via), Op: op, Step: -1, Chunk: -1,
			Err: fmt.Errorf("%s: %w", where, err)}
	}
	return fmt.Errorf("allreduce: rank %d: %s: %w", h.Rank(), where, err)
}

// Connect connects both rings at once (every rank must call it); errors
// name global ranks, as the collectives' do. ctx bounds it.
func (h *Hier) Connect(ctx context.Context) error {
	if h.Local == nil || h.Cross == nil {
		return fmt.Errorf("allreduce: hierarchical all-reduce needs a local and a cross-host ring: %w", ErrConfig)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i, r := range []*Ring{h.Local, h.Cross} {
		wg.Go(func() {
			if err := r.Connect(ctx); err != nil {
				errs[i] = h.wrap(r, 0, "connect", err)
				cancel() // the other ring cannot be used either
			}
		})
	}
	wg.Wait()
	// The first ring to fail is the one that says why; the other one
	// mostly reports the cancellation.
	for _, err := range errs {
		var pe *PeerError
		if errors.As(err, &pe) {
			return err
		}
	}
	return errors.Join(errs...)
}

// Close closes both rings (graceful when idle, as Ring.Close); the other
// ranks should close theirs at about the same time.
func (h *Hier) Close() error {
	var errs [2]error
	var wg sync.WaitGroup
	for i, r := range []*Ring{h.Local, h.Cross} {
		if r != nil {
			wg.Go(func() { errs[i] = r.Close() })
		}
	}
	wg.Wait()
	return errors.Join(errs[:]...)
}

// Err is nil while the collective can still reduce, else why not: its own
// failure, or either ring's.
func (h *Hier) Err() error {
	h.mu.Lock()
	failed := h.failed
	h.mu.Unlock()
	switch {
	case failed != nil:
		return failed
	case h.Local == nil || h.Cross == nil:
		return fmt.Errorf("allreduce: hierarchical all-reduce needs a local and a cross-host ring: %w", ErrConfig)
	}
	if err := h.Local.Err(); err != nil {
		return h.wrap(h.Local, 0, "broken", err)
	}
	if err := h.Cross.Err(); err != nil {
		return h.wrap(h.Cross, 0, "broken", err)
	}
	return nil
}

// Start begins a hierarchical all-reduce of buf in place and returns at
// once; buf belongs to the collective until the handle is done.
// Collectives run in Start order; every rank must start the same ones
// (lengths and ops) in the same order.
func (h *Hier) Start(buf []float32, op Op) *Handle {
	return h.enqueue(&Handle{rank: h.Rank(), buf: buf, kind: op, done: make(chan struct{})})
}

// enqueue numbers hd and queues it behind the collectives started before.
func (h *Hier) enqueue(hd *Handle) *Handle {
	h.mu.Lock()
	h.nextOp++
	hd.op = h.nextOp
	if h.Local == nil || h.Cross == nil {
		h.mu.Unlock()
		hd.err = fmt.Errorf("allreduce: hierarchical all-reduce needs a local and a cross-host ring: %w", ErrConfig)
		close(hd.done)
		return hd
	}
	h.queue = append(h.queue, hd)
	if !h.running {
		// One goroutine runs the queue and ends when it is empty, so an
		// idle Hier holds none (it has no Close of its own to stop one).
		h.running = true
		go h.drain()
	}
	h.mu.Unlock()
	return hd
}

// StartDevice is Start on device memory, for a Hier whose local ring
// carries device slots (DeviceNative): the reduce-scatter and the
// all-gather inside the host run on the GPU, and only this rank's segment
// (1/L of the buffer) visits host memory, for the ring across hosts.
// Elsewhere the local phases run on host copies (Ring.StartDevice).
func (h *Hier) StartDevice(buf kernels.Buffer, op Op) *Handle {
	if h.Local == nil || h.Local.cfg.Device == nil || buf == nil {
		hd := &Handle{rank: h.Rank(), done: make(chan struct{})}
		hd.err = fmt.Errorf("allreduce: a hierarchical device collective needs a local ring with Config.Device and a buffer: %w", ErrConfig)
		close(hd.done)
		return hd
	}
	h.Local.cfg.Device.Join() // after the kernels that produced buf
	return h.enqueue(&Handle{rank: h.Rank(), dev: buf, kind: op, done: make(chan struct{})})
}

// DeviceNative reports whether StartDevice keeps the phases inside the
// host on the GPU (Ring.DeviceNative of the local ring).
func (h *Hier) DeviceNative() bool { return h.Local != nil && h.Local.DeviceNative() }

func (h *Hier) drain() {
	for {
		h.mu.Lock()
		if len(h.queue) == 0 {
			h.running = false
			h.mu.Unlock()
			return
		}
		hd := h.queue[0]
		h.queue = h.queue[1:]
		h.mu.Unlock()
		hd.err = h.run(hd)
		close(hd.done)
	}
}

// AllReduce reduces buf in place across every rank of every host. If ctx
// ends first both rings are aborted (the other ranks fail too) and
// AllReduce returns once the buffer is no longer in use.
func (h *Hier) AllReduce(ctx context.Context, buf []float32, op Op) error {
	hd := h.Start(buf, op)
	select {
	case <-hd.done:
		return hd.err
	case <-ctx.Done():
		err := fmt.Errorf("allreduce: rank %d hierarchical op %d abandoned by caller: %w", hd.rank, hd.op, ctx.Err())
		h.Local.fail(err)
		h.Cross.fail(err)
		<-hd.done
		return hd.err
	}
}

// breakBoth records err as the collective's failure and breaks both rings
// (a ring that has failed already keeps its own error). The other ring's
// members wait for this rank in collectives of theirs: they learn now,
// rather than at a hop deadline, through an abort that blames none of
// them.
func (h *Hier) breakBoth(err error) {
	h.mu.Lock()
	if h.failed == nil {
		h.failed = err
	}
	h.mu.Unlock()
	h.Local.failOutside(err)
	h.Cross.failOutside(err)
}

// run runs one collective's three phases.
func (h *Hier) run(hd *Handle) error {
	if err := h.Err(); err != nil {
		// One ring may still be whole, and its other members waiting
		// for this rank: break it too.
		h.breakBoth(err)
		return err
	}
	length := len(hd.buf)
	if hd.dev != nil {
		length = hd.dev.Len()
	}
	lo, hi := h.Local.Owned(length)
	phase := func(ring *Ring, what string, sub *Handle) error {
		other := h.Cross
		if ring == h.Cross {
			other = h.Local
		}
		var err error
		select {
		case <-sub.done: // the ring's own hop deadlines bound it
			if sub.err != nil {
				err = h.wrap(ring, hd.op, what, sub.err)
			}
		case <-other.failedCh:
			// The other ring broke while this one works (a neighbour
			// there died, or heard of a failure): this collective cannot
			// complete, and the other ring's error is the one that may
			// name the culprit.
			err = h.wrap(other, hd.op, what+", while the other ring broke", other.failure())
			h.breakBoth(err)
			<-sub.done
		}
		if err != nil {
			h.breakBoth(err)
		}
		return err
	}
	if hd.dev != nil {
		return h.runDevice(hd, lo, hi, phase)
	}
	buf := hd.buf
	if err := phase(h.Local, "reduce-scatter inside the host", h.Local.StartReduceScatter(buf, Sum)); err != nil {
		return err
	}
	mine := buf[lo:hi]
	if err := phase(h.Cross, fmt.Sprintf("all-reduce across hosts of elements %d..%d", lo, hi), h.Cross.Start(mine, Sum)); err != nil {
		return err
	}
	if hd.kind == Avg {
		// Once, on sums that are the same bits on every member of the
		// cross-host ring, so their quotients are too.
		n := float32(h.Size())
		for i := range mine {
			mine[i] /= n
		}
	}
	return phase(h.Local, "all-gather inside the host", h.Local.StartAllGather(buf))
}

// runDevice is run for a device buffer: the phases inside the host on the
// device (or on host copies where the local ring has no device slots),
// this rank's segment through host memory for the ring across hosts.
func (h *Hier) runDevice(hd *Handle, lo, hi int, phase func(*Ring, string, *Handle) error) error {
	dm := h.Local.cfg.Device
	if err := phase(h.Local, "reduce-scatter inside the host", h.Local.startDevice(hd.dev, Sum, partReduceScatter, false)); err != nil {
		return err
	}
	seg := dm.Slice(hd.dev, lo, hi-lo)
	mine := make([]float32, hi-lo)
	dm.Download(mine, seg)
	if err := dm.Fence(); err != nil {
		err = fmt.Errorf("allreduce: rank %d hierarchical op %d: downloading elements %d..%d: %w", h.Rank(), hd.op, lo, hi, err)
		h.breakBoth(err)
		return err
	}
	if err := phase(h.Cross, fmt.Sprintf("all-reduce across hosts of elements %d..%d", lo, hi), h.Cross.Start(mine, Sum)); err != nil {
		return err
	}
	if hd.kind == Avg {
		n := float32(h.Size()) // as run: once, on bits every owner shares
		for i := range mine {
			mine[i] /= n
		}
	}
	dm.Upload(seg, mine) // queued before the all-gather's reads, on the same stream
	return phase(h.Local, "all-gather inside the host", h.Local.startDevice(hd.dev, Sum, partAllGather, false))
}

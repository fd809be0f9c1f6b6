package allreduce

import (
	"context"
	"fmt"
)

// Hier is one rank of a hierarchical all-reduce, for ranks spread over
// hosts with the same number of ranks on each: Local is the ring of the
// ranks on this rank's host (shared memory between them, Transport "auto"),
// Cross the ring of the ranks that have this rank's local index on every
// host (the network). A collective
//
//  1. all-reduces the whole buffer inside the host (Local);
//  2. all-reduces this rank's slice of it, 1/L of the buffer for L ranks
//     per host, across the hosts (Cross): the L slices travel at once, on
//     L different rings;
//  3. gathers the slices back inside the host: each rank zeroes what is
//     not its slice and Local sums (x + 0 is x exactly).
//
// Each byte of the buffer crosses the network 2(H−1)/H/L times for H hosts,
// where a flat ring over all H·L ranks sends it 2(HL−1)/HL times over its
// slowest link. Inside the host it moves twice as much as a reduce-scatter
// plus all-gather would (two whole-buffer all-reduces), over the fast
// path. Every rank ends with the same bits: a ring leaves its members
// bitwise identical, the slices are reduced by rings whose members hold
// the same inputs, and the gather copies them exactly.
//
// A Hier does not own its rings: the caller connects and closes them. Like
// a Ring, it is broken for good after any failure of either ring.
type Hier struct {
	Local, Cross *Ring
}

// Size is the number of ranks the collective spans.
func (h *Hier) Size() int { return h.Local.Size() * h.Cross.Size() }

// Slice is the element range [lo,hi) of an n-element buffer that this rank
// reduces across hosts: its local rank's share, balanced as the ring's
// segments are.
func (h *Hier) Slice(n int) (lo, hi int) {
	return balanced(n, h.Local.Size(), h.Local.rank)
}

// AllReduce reduces buf in place across every rank of every host. Every
// rank must run the same collectives, with the same lengths and ops, in
// the same order.
func (h *Hier) AllReduce(ctx context.Context, buf []float32, op Op) error {
	if h.Local == nil || h.Cross == nil {
		return fmt.Errorf("allreduce: hierarchical all-reduce needs a local and a cross-host ring: %w", ErrConfig)
	}
	if err := h.Local.AllReduce(ctx, buf, Sum); err != nil {
		return fmt.Errorf("allreduce: hierarchical, inside the host: %w", err)
	}
	lo, hi := h.Slice(len(buf))
	if err := h.Cross.AllReduce(ctx, buf[lo:hi], Sum); err != nil {
		return fmt.Errorf("allreduce: hierarchical, across hosts (elements %d..%d): %w", lo, hi, err)
	}
	if h.Local.Size() > 1 {
		clear(buf[:lo])
		clear(buf[hi:])
		if err := h.Local.AllReduce(ctx, buf, Sum); err != nil {
			return fmt.Errorf("allreduce: hierarchical, gathering the host's slices: %w", err)
		}
	}
	if op == Avg {
		n := float32(h.Size())
		for i := range buf {
			buf[i] /= n
		}
	}
	return nil
}

//go:build cuda

package cuda

import (
	"sort"
	"sync"

	"github.com/bmojo/bmojo/kernels"
)

// Matrix products read bfloat16 copies of their float32 inputs (bf16 mode,
// ops_matmul.go). A model multiplies the same matrices many times between
// writes: every weight in the forward and again in the backward of a step,
// every saved activation in its forward product and again in the weight
// gradient. The shadow table keeps those copies ("shadows") so that each
// range is converted once per write instead of once per product, the way a
// mixed-precision framework keeps bf16 weights and activations.
//
// Validity is tracked on the calling goroutine, in the order ops are issued
// (the stream runs them in that order): every buffer argument that the op's
// contract (kernels.Op) does not declare read-only (kernels.In) may be
// written, and invalidates the shadows it overlaps (Backend.check).

// span is one float32 range: a buffer or a view of one.
type span struct {
	ptr devptr
	n   int
}

// span is the range f covers.
func (f *floats) span() span { return span{f.ptr, f.n} }

// overlaps reports whether the two ranges share a float.
func (a span) overlaps(b span) bool {
	return a.n > 0 && b.n > 0 && a.ptr < b.ptr+devptr(4*b.n) && b.ptr < a.ptr+devptr(4*a.n)
}

// shadow is the bf16 copy of one range. valid belongs to the calling side;
// a (the storage, 2n bytes) to the device thread, which allocates it at
// the first conversion.
type shadow struct {
	valid bool
	n     int // float32 values of the source
	a     *allocation
}

// shadowTable is a Device's shadows, grouped by the allocation of their
// source (allocation.id): when the garbage collector frees a source, its
// shadows go too (drop), and their storage returns to the cache with them.
type shadowTable struct {
	mu     sync.Mutex
	owners map[uint64]map[span]*shadow
	// conversions counts the lookups that found a shadow stale.
	conversions int
}

// lookup returns the shadow of f, creating it, and whether it must be
// (re)converted; the caller queues that conversion before any product that
// reads the shadow, so the shadow counts as valid from here on.
func (t *shadowTable) lookup(f *floats) (s *shadow, convert bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.owners == nil {
		t.owners = map[uint64]map[span]*shadow{}
	}
	m := t.owners[f.owner.id]
	if m == nil {
		m = map[span]*shadow{}
		t.owners[f.owner.id] = m
	}
	k := f.span()
	s = m[k]
	if s == nil {
		s = &shadow{n: f.n}
		m[k] = s
	}
	convert = !s.valid
	if convert {
		t.conversions++
	}
	s.valid = true
	return s, convert
}

// produce returns the shadow of f if products read f through one (nil
// otherwise), marked valid: the calling op, which writes f, writes the bf16
// copy too (a *shadow launch argument), so the next product converts
// nothing. Call it after the op's checks, which invalidated f's shadow.
func (t *shadowTable) produce(f *floats) *shadow {
	if f == nil || f.owner == nil || f.n == 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.owners[f.owner.id][f.span()]
	if s != nil {
		s.valid = true
	}
	return s
}

// storage returns the device address of s's bf16 copy, allocating it at
// first use; 0 when there is no memory for it (the kernel then skips the
// copy, and the product that reads s finds no storage and converts).
// Device thread only.
func (d *Device) storage(s *shadow) devptr {
	if s.a == nil {
		a, err := d.mem.tryAlloc(2 * int64(s.n))
		if err != nil {
			return 0
		}
		s.a = a
	}
	return s.a.ptr
}

// innerCopy is the shadow of a range inside a buffer that an op writes
// whole, off and n in floats from the buffer's start: a weight inside the
// flat parameter buffer that AdamWSteps updates.
type innerCopy struct {
	off, n int
	s      *shadow
}

// inside returns the shadows of the ranges inside f that each lie within
// one of segs, in order and not overlapping, marked valid: AdamWSteps,
// which writes f, writes their bf16 copies too (produce for the ranges of
// a flat buffer). Call it after the op's checks, which invalidated them;
// the others stay invalid.
func (t *shadowTable) inside(f *floats, segs []kernels.AdamWSegment) []innerCopy {
	if f == nil || f.owner == nil || f.n == 0 {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var in []innerCopy
	fs := f.span()
	for k, s := range t.owners[f.owner.id] {
		if k.n == 0 || k.ptr < fs.ptr || k.ptr+devptr(4*k.n) > fs.ptr+devptr(4*fs.n) || (k.ptr-fs.ptr)%4 != 0 {
			continue
		}
		off := int(k.ptr-fs.ptr) / 4
		i := sort.Search(len(segs), func(i int) bool { return segs[i].Off+segs[i].N > off })
		if i < len(segs) && segs[i].Off <= off && off+k.n <= segs[i].Off+segs[i].N {
			in = append(in, innerCopy{off, k.n, s})
		}
	}
	sort.Slice(in, func(i, j int) bool { return in[i].off < in[j].off || in[i].off == in[j].off && in[i].n > in[j].n })
	kept, end := in[:0], 0
	for _, c := range in {
		if c.off >= end { // overlapping ones stay invalid: one copy per element
			kept = append(kept, c)
			c.s.valid = true
			end = c.off + c.n
		}
	}
	return kept
}

// touch invalidates the shadows that overlap f (it may be written).
func (t *shadowTable) touch(f *floats) {
	if f == nil || f.owner == nil || f.n == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, s := range t.owners[f.owner.id] {
		if s.valid && k.overlaps(f.span()) {
			s.valid = false
		}
	}
}

// forget invalidates every shadow.
func (t *shadowTable) forget() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, m := range t.owners {
		for _, s := range m {
			s.valid = false
		}
	}
}

// drop forgets the shadows of allocation id (freed by the collector).
func (t *shadowTable) drop(id uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.owners, id)
}

// dropAll forgets every shadow, so that their storage can be collected
// (the allocator does this before it reports out of memory).
func (t *shadowTable) dropAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.owners = nil
}

func (t *shadowTable) stats() InputCopyStats {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := InputCopyStats{Conversions: t.conversions}
	for _, m := range t.owners {
		for k := range m {
			st.Copies++
			st.Bytes += 2 * int64(k.n)
		}
	}
	return st
}

// InputCopies reports the bf16 copies of product inputs the device keeps.
func (d *Device) InputCopies() InputCopyStats { return d.shadows.stats() }

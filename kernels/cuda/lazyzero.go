//go:build cuda

package cuda

import "sync"

// Backward ops accumulate into their gradients (kernels.Backend), so the
// model zeroes each gradient buffer right before its first writer. Most
// first writers are matrix products, which can overwrite instead (cuBLAS
// beta = 0) for free. Zero therefore only records the range; the next op
// that touches it either takes it as an output it overwrites (passed
// through fresh) or, for any other use, gets the memset queued before its
// own work (Backend.check). The table lives on the calling goroutines, in
// issue order.

// zeroTable is a Device's deferred zeroings, by allocation id.
type zeroTable struct {
	mu     sync.Mutex
	owners map[uint64][]span
}

// add records that f must read as zeros from now on.
func (t *zeroTable) add(f *floats) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.owners == nil {
		t.owners = map[uint64][]span{}
	}
	t.owners[f.owner.id] = append(t.owners[f.owner.id], f.span())
}

// drop forgets the zeroings of allocation id (freed by the collector).
func (t *zeroTable) drop(id uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.owners, id)
}

// take removes the deferred zeroings that overlap f and returns them; exact
// reports whether one of them covers f exactly (f may then be overwritten
// instead of zeroed). A take that finds nothing costs one map lookup.
func (t *zeroTable) take(f *floats) (flush []span, exact bool) {
	if f == nil || f.owner == nil || f.n == 0 {
		return nil, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	l := t.owners[f.owner.id]
	if len(l) == 0 {
		return nil, false
	}
	keep, fs := l[:0], f.span()
	for _, k := range l {
		switch {
		case k == fs:
			exact = true
		case k.overlaps(fs):
			flush = append(flush, k)
		default:
			keep = append(keep, k)
		}
	}
	if len(keep) == 0 {
		delete(t.owners, f.owner.id)
	} else {
		t.owners[f.owner.id] = keep
	}
	return flush, exact
}

// zeroNow queues the memsets of ranges.
func (b *Backend) zeroNow(ranges []span) {
	for _, k := range ranges {
		b.queue("zero", func() error { return b.d.drv.memset32(k.ptr, int64(k.n)) })
	}
}

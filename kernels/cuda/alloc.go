//go:build cuda

package cuda

import (
	"fmt"
	"runtime"
	"sync"
)

// cache is the caching device-memory allocator: cuMemAlloc is slow and
// synchronises the device, so blocks are kept by (rounded) size and handed
// out again. A block returns to the cache when the garbage collector finds
// the last buffer of its allocation unreachable. All work on one stream
// makes reuse safe: a later kernel using the block runs after every earlier
// kernel that used it.
type cache struct {
	drv  driver
	free map[int64][]devptr
	held int64 // bytes obtained from cuMemAlloc and not yet freed
	peak int64

	mu      sync.Mutex // pending is filled by GC cleanups on other goroutines
	pending []block
}

type block struct {
	ptr  devptr
	size int64
}

// allocation owns one block; views (floats, ints) keep it alive.
type allocation struct{ ptr devptr }

func newCache(drv driver) *cache { return &cache{drv: drv, free: map[int64][]devptr{}} }

// roundSize buckets sizes: 512 B steps up to 1 MiB, then 2 MiB steps, so a
// freed block fits the next request of a similar size.
func roundSize(n int64) int64 {
	if n <= 1<<20 {
		return (n + 511) &^ 511
	}
	return (n + (2<<20 - 1)) &^ (2<<20 - 1)
}

// alloc returns a block of at least n bytes. Device thread only.
func (c *cache) alloc(n int64) (*allocation, error) {
	c.drain()
	size := roundSize(n)
	var ptr devptr
	if l := c.free[size]; len(l) > 0 {
		ptr = l[len(l)-1]
		c.free[size] = l[:len(l)-1]
	} else {
		p, err := c.drv.malloc(size)
		if err != nil {
			// Give the cached blocks back and try once more.
			c.releaseCached()
			p, err = c.drv.malloc(size)
		}
		if err != nil {
			free, total := c.drv.memInfo()
			return nil, fmt.Errorf("cuda: out of device memory allocating %s (%s free of %s; this process holds %s): %w",
				mib(size), mib(free), mib(total), mib(c.held), err)
		}
		ptr = p
		c.held += size
		c.peak = max(c.peak, c.held)
	}
	a := &allocation{ptr: ptr}
	runtime.AddCleanup(a, c.put, block{ptr, size})
	return a, nil
}

// put queues a block for reuse; called by the GC on any goroutine.
func (c *cache) put(b block) {
	c.mu.Lock()
	c.pending = append(c.pending, b)
	c.mu.Unlock()
}

func (c *cache) drain() {
	c.mu.Lock()
	p := c.pending
	c.pending = nil
	c.mu.Unlock()
	for _, b := range p {
		c.free[b.size] = append(c.free[b.size], b.ptr)
	}
}

// releaseCached frees every cached block (after the stream is idle).
func (c *cache) releaseCached() {
	_ = c.drv.sync()
	c.drain()
	for size, l := range c.free {
		for _, p := range l {
			if c.drv.free(p) == nil {
				c.held -= size
			}
		}
	}
	c.free = map[int64][]devptr{}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

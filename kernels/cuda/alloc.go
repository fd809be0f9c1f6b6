//go:build cuda

package cuda

import (
	"fmt"
	"runtime"
	"sync"
	"time"
)

// cache is the caching device-memory allocator: cuMemAlloc is slow and
// synchronises the device, so blocks are kept by (rounded) size and handed
// out again. A block returns to the cache when the garbage collector finds
// the last buffer of its allocation unreachable. All work on one stream
// makes reuse safe: a later kernel using the block runs after every earlier
// kernel that used it.
type cache struct {
	drv   driver
	free  map[int64][]devptr
	held  int64 // bytes obtained from cuMemAlloc and not yet freed
	peak  int64
	grown int64 // bytes handed out since the last collection
	gcAt  int64 // collect when grown passes this (0 = derive from the device size)
	// reserveAt overrides the memory tryAlloc leaves free when set (tests).
	reserveAt int64

	mu      sync.Mutex // pending is filled by GC cleanups on other goroutines
	pending []block
	nextID  uint64

	// freed, when set, hears of every allocation the collector frees (on
	// the collector's goroutine); pressure is called before the allocator
	// collects to retry after out of memory (device thread).
	freed    func(id uint64)
	pressure func()
}

type block struct {
	ptr  devptr
	size int64
	id   uint64
}

// allocation owns one block; views (floats, ints) keep it alive. It is at
// least 16 bytes on purpose: Go packs smaller pointer-free objects together
// (the tiny allocator) and runs their cleanups only when every neighbour is
// dead too. id is unique for the device's lifetime: tables that follow
// buffers (shadow.go, lazyzero.go) key on it, never on a reusable address.
type allocation struct {
	ptr  devptr
	size int64
	id   uint64
}

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
func (c *cache) alloc(n int64) (*allocation, error) { return c.get(n, true) }

// tryAlloc is alloc for memory that is nice to have (a kept bf16 copy): it
// fails at once instead of collecting and retrying, and rather than take the
// device's last free memory (the driver and cuBLAS need some of it, and an
// activation is worth more than a copy) it leaves a reserve free.
func (c *cache) tryAlloc(n int64) (*allocation, error) {
	size := roundSize(n)
	c.drain()
	if len(c.free[size]) == 0 {
		free, total := c.drv.memInfo()
		// A thirty-second of the device, at least 1 GiB (reserveAt in tests).
		reserve := max(1<<30, total/32)
		if c.reserveAt > 0 {
			reserve = c.reserveAt
		}
		if free-size < reserve {
			return nil, fmt.Errorf("cuda: keeping %s free of device memory for required buffers (%s free)", mib(reserve), mib(free))
		}
	}
	return c.get(n, false)
}

func (c *cache) get(n int64, retry bool) (*allocation, error) {
	c.drain()
	size := roundSize(n)
	if len(c.free[size]) == 0 && c.grown+size > c.threshold() {
		// The Go collector does not see device memory: buffers dropped by
		// their owners (an op's temporaries, activations of an old shape)
		// come back only after a collection. Before growing, collect if
		// this many bytes were handed out since the last one, so the cache
		// holds at most about the live buffers plus the threshold (the
		// millisecond lets the cleanups run; this happens every few GiB).
		c.collect(time.Millisecond)
	}
	var ptr devptr
	if l := c.free[size]; len(l) > 0 {
		ptr = l[len(l)-1]
		c.free[size] = l[:len(l)-1]
		c.grown += size
	} else {
		p, err := c.drv.malloc(size)
		for try := 0; err != nil && retry && try < 3; try++ {
			// Collect, give every cached block back and try again; the
			// kept bf16 copies of product inputs go first.
			if c.pressure != nil {
				c.pressure()
			}
			c.collect(time.Duration(try+1) * 5 * time.Millisecond)
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
		c.grown += size
		c.peak = max(c.peak, c.held)
	}
	c.nextID++
	a := &allocation{ptr: ptr, size: size, id: c.nextID}
	runtime.AddCleanup(a, c.put, block{ptr, size, c.nextID})
	return a, nil
}

// put queues a block for reuse; called by the GC on any goroutine.
func (c *cache) put(b block) {
	c.mu.Lock()
	c.pending = append(c.pending, b)
	c.mu.Unlock()
	if c.freed != nil {
		c.freed(b.id)
	}
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

// threshold is how many bytes handed out since the last collection make the
// next growth collect first: a sixteenth of the device, at least 1 GiB.
func (c *cache) threshold() int64 {
	if c.gcAt == 0 {
		_, total := c.drv.memInfo()
		c.gcAt = max(1<<30, total/16)
	}
	return c.gcAt
}

// collect runs the Go collector so that unreachable buffers queue their
// blocks, waits up to wait for the cleanups to run, and takes the blocks.
func (c *cache) collect(wait time.Duration) {
	runtime.GC()
	if wait > 0 {
		time.Sleep(wait)
	}
	c.drain()
	c.grown = 0
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

//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/bmojo/bmojo/kernels"
)

// Async copies (kernels.AsyncCopier). Download waits on the device thread
// for every queued kernel, then copies: the caller blocks, and the GPU idles
// until it queues more. A data-parallel worker downloads every layer's
// gradients in the middle of backward, so that cost came once per layer.
//
// DownloadAsync instead records an event on the main stream and queues the
// copy on a second stream (the copy stream) behind it, into page-locked
// staging memory, which the GPU's copy engine writes while later kernels
// run; the device thread goes straight on. The waiter thread, a second
// locked OS thread with the context current, waits for the copy's end;
// the caller's wait then copies the staging block into the caller's slice
// (on whatever goroutine waits, so in parallel with backward) and returns
// the block to the pool.
//
// UploadAsync copies the caller's slice into a staging block on the device
// thread, at its place in the op order, and queues the upload on the main
// stream: from page-locked memory it does not synchronise the stream as an
// upload from Go memory does. The waiter sees the stream pass a fence after
// it; then the block returns to the pool and the caller's wait returns.
//
// Staging blocks are C memory, never Go's: the driver keeps using them after
// the call that hands them over, which Go memory must not be (cgo's pointer
// rules), and they stay put. The pool keeps them by rounded size (the same
// ranges come back every step) until the Device closes.

var _ kernels.AsyncCopier[float32] = (*Backend)(nil)

// staging is one page-locked host block.
type staging struct {
	p     unsafe.Pointer
	bytes int64
}

// floats is the first n floats of the block.
func (s *staging) floats(n int) []float32 { return unsafe.Slice((*float32)(s.p), n) }

// stagingPool is a Device's staging blocks by rounded size (roundSize).
type stagingPool struct {
	mu   sync.Mutex
	free map[int64][]*staging
	held int64 // bytes of page-locked memory obtained
	out  int   // blocks handed out and not yet put back
}

// get returns a block of at least bytes. Device thread (allocating needs
// the context).
func (p *stagingPool) get(drv driver, bytes int64) (*staging, error) {
	size := roundSize(bytes)
	p.mu.Lock()
	defer p.mu.Unlock()
	if l := p.free[size]; len(l) > 0 {
		s := l[len(l)-1]
		p.free[size] = l[:len(l)-1]
		p.out++
		return s, nil
	}
	ptr, err := drv.hostAlloc(size)
	if err != nil {
		return nil, fmt.Errorf("allocating %s of page-locked staging memory (%s held): %w", mib(size), mib(p.held), err)
	}
	p.held += size
	p.out++
	return &staging{p: ptr, bytes: size}, nil
}

// put returns s to the pool; any goroutine.
func (p *stagingPool) put(s *staging) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.free == nil {
		p.free = map[int64][]*staging{}
	}
	p.free[s.bytes] = append(p.free[s.bytes], s)
	p.out--
}

// release frees the pooled blocks (device thread, at Close). Blocks still
// handed out (copies never waited for) are left alone: the copy engine may
// still write them.
func (p *stagingPool) release(drv driver) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for size, l := range p.free {
		for _, s := range l {
			_ = drv.hostFree(s.p)
			p.held -= size
		}
	}
	p.free = nil
}

// StagingStats reports the page-locked host memory of async copies: bytes
// held, and blocks handed out that no wait has returned yet (0 between
// steps).
func (d *Device) StagingStats() (bytes int64, outstanding int) {
	d.staging.mu.Lock()
	defer d.staging.mu.Unlock()
	return d.staging.held, d.staging.out
}

// recorded is the wait of a copy that did not run because the backend has
// failed: it returns the recorded error, without touching the device.
func (b *Backend) recorded() func() error {
	b.mu.Lock()
	err := b.err
	b.mu.Unlock()
	if err == nil { // every failed check records why; this is a safety net
		err = errors.New("kernels/cuda: copy not run")
	}
	return func() error { return err }
}

// firstErr is the error recorded first (nil while none is): what a wait
// returns once its copy is done, or has failed and recorded why.
func (b *Backend) firstErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// awaitThen hands the token ev to the waiter thread, which waits for the
// device to pass it and calls then with the result (or with why the waiter
// could not bind the context, without waiting). Device thread.
func (d *Device) awaitThen(ev any, then func(error)) {
	d.waits <- func(bound error) {
		err := bound
		if err == nil {
			err = d.drv.await(ev)
		}
		then(err)
	}
}

// DownloadAsync implements kernels.AsyncCopier: Download without waiting
// for the queued work. Its reference is Download.
func (b *Backend) DownloadAsync(dst []float32, src kernels.Buffer) func() error {
	c := b.check(kernels.OpDownload, []int{len(dst)}, src)
	if !c.ok {
		return b.recorded()
	}
	if len(dst) == 0 {
		return func() error { return nil }
	}
	s, n := c.f[0], len(dst)
	bytes := int64(4 * n)
	var st *staging
	done := make(chan error, 1)
	b.d.post(func() {
		var ev any
		var err error
		if st, err = b.d.staging.get(b.d.drv, bytes); err == nil {
			if ev, err = b.d.drv.dtohAsync(st.p, s.ptr, bytes); err != nil {
				b.d.staging.put(st)
				st = nil
			}
		}
		if err != nil {
			b.failf("download: %v", err)
			done <- err
			return
		}
		b.d.awaitThen(ev, func(err error) {
			// src's block must not go back to the cache (and be written by
			// a new buffer's first op) before the copy has read it.
			runtime.KeepAlive(s)
			if err != nil {
				b.failf("download: %v", err)
			}
			done <- err
		})
	})
	return sync.OnceValue(func() error {
		if err := <-done; err != nil {
			// A block whose copy failed may still be written: it is not
			// reused.
			return b.firstErr()
		}
		copy(dst, st.floats(n))
		b.d.staging.put(st)
		return b.firstErr()
	})
}

// UploadAsync implements kernels.AsyncCopier: Upload without waiting for
// the device thread. Its reference is Upload. wait returns once the stream
// has passed the copy (the values are on the device), when the staging
// block goes back to the pool.
func (b *Backend) UploadAsync(dst kernels.Buffer, src []float32) func() error {
	c := b.check(kernels.OpUpload, []int{len(src)}, dst)
	if !c.ok {
		return b.recorded()
	}
	if len(src) == 0 {
		return func() error { return nil }
	}
	d, n := c.f[0], len(src)
	bytes := int64(4 * n)
	done := make(chan error, 1)
	b.d.post(func() {
		var st *staging
		var ev any
		err := b.d.timedRun("upload", "", func() error {
			var err error
			if st, err = b.d.staging.get(b.d.drv, bytes); err != nil {
				return err
			}
			copy(st.floats(n), src)
			if err := b.d.drv.htod(d.ptr, st.p, bytes); err != nil {
				b.d.staging.put(st)
				return err
			}
			if ev, err = b.d.drv.fence(); err != nil { // no token to wait for: wait for the stream here
				if err := b.d.drv.sync(); err != nil {
					return err // the block may still be read: not reused
				}
				b.d.staging.put(st)
				st = nil
			}
			return nil
		})
		if err != nil || st == nil {
			if err != nil {
				b.failf("upload: %v", err)
			}
			done <- err
			return
		}
		b.d.awaitThen(ev, func(err error) {
			if err != nil {
				b.failf("upload: %v", err) // the block may still be read: not reused
			} else {
				b.d.staging.put(st)
			}
			done <- err
		})
	})
	return sync.OnceValue(func() error {
		<-done
		return b.firstErr()
	})
}

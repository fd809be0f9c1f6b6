//go:build cuda

package cuda

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/bmojo/bmojo/kernels"
)

// floats is a device buffer of float32 (or a view of one).
type floats struct {
	ptr   devptr
	n     int
	owner *allocation
}

// Len implements kernels.Buffer.
func (f *floats) Len() int { return f.n }

// ints is a device buffer of int32.
type ints struct {
	ptr   devptr
	n     int
	owner *allocation
}

// Len implements kernels.IntBuffer.
func (f *ints) Len() int { return f.n }

// Backend is kernels.Backend[float32] on one Device. Ops validate shapes on
// the calling goroutine and queue their kernels on the device's stream; the
// first failure is kept and reported by Err.
type Backend struct {
	d  *Device
	mu sync.Mutex
	// err is the first failure recorded.
	err error
	// status is device memory where kernels report bad data they find
	// (a token outside the vocabulary, a selected position outside the
	// sequence): word 0 a code, words 1 and 2 the value and its index.
	status *ints
}

var _ kernels.Backend[float32] = (*Backend)(nil)

const statusWords = 4

// Status codes written by kernels (csrc/common.cuh keeps the same list).
var statusMessages = map[int32]string{
	1: "embedding: token %d at row %d is outside the vocabulary",
	2: "attention: sel holds position %d (entry %d), outside the sequence",
	3: "cross_entropy: target %d at row %d is outside the vocabulary",
	4: "select_chunks: chunk %d of sequence %d has fewer than S positions",
}

// Name implements kernels.Backend.
func (b *Backend) Name() string { return "cuda" }

// Device returns the device the backend runs on.
func (b *Backend) Device() *Device { return b.d }

// MatMulBF16 tells the conformance suite that matrix products round their
// inputs to bfloat16 (tensor cores) and accumulate in float32.
func (b *Backend) MatMulBF16() bool { return b.d.opt.MatMul == "bf16" }

func (b *Backend) failf(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err == nil {
		b.err = fmt.Errorf("kernels/cuda: "+format, args...)
	}
}

func (b *Backend) failed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err != nil
}

// Err implements kernels.Backend: it waits for the queued work, then
// reports the first failure, including bad data a kernel found.
func (b *Backend) Err() error {
	if b.failed() {
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.err
	}
	var st [statusWords]int32
	var err error
	b.d.do(func() {
		err = b.d.drv.dtoh(unsafe.Pointer(&st[0]), b.status.ptr, 4*statusWords)
	})
	if err != nil {
		b.failf("the GPU failed running queued kernels: %v", err)
	} else if st[0] != 0 {
		msg, ok := statusMessages[st[0]]
		if !ok {
			msg = fmt.Sprintf("kernel status code %d (value %%d, index %%d)", st[0])
		}
		b.failf(msg, st[1], st[2])
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// run executes f on the device thread unless an error is recorded already,
// recording what f returns under op.
func (b *Backend) run(op string, f func() error) {
	if b.failed() {
		return
	}
	var err error
	b.d.do(func() { err = f() })
	if err != nil {
		b.failf("%s: %v", op, err)
	}
}

// queue hands f to the device thread without waiting for it: ops that only
// enqueue GPU work return at once, so the caller runs ahead of the device
// thread (a round trip to it cost about 19 µs per op on an H200 host). f
// must not read memory the caller may change after queue returns. What f
// returns is recorded under op and reported by Err.
func (b *Backend) queue(op string, f func() error) { b.queueKernel(op, "", f) }

// queueKernel is queue for work that is one launch of kernel (timed per
// kernel when asked: Device.StartTiming).
func (b *Backend) queueKernel(op, kernel string, f func() error) {
	if b.failed() {
		return
	}
	b.d.post(func() {
		if err := b.d.timedRun(op, kernel, f); err != nil {
			b.failf("%s: %v", op, err)
		}
	})
}

// launch queues one kernel for op.
func (b *Backend) launch(op, kernel string, grid, block dim, shmem int, args ...any) {
	b.queueKernel(op, kernel, func() error { return b.d.launch(kernel, grid, block, shmem, args...) })
}

// Alloc implements kernels.Backend.
func (b *Backend) Alloc(n int) kernels.Buffer {
	ptr, owner, n := b.alloc(n)
	return &floats{ptr: ptr, n: n, owner: owner}
}

// AllocInt implements kernels.Backend.
func (b *Backend) AllocInt(n int) kernels.IntBuffer {
	ptr, owner, n := b.alloc(n)
	return &ints{ptr: ptr, n: n, owner: owner}
}

// scratch returns a float buffer of n words that an op fills before it
// reads them, so it is not zeroed. The emulation fills it with NaN instead,
// so that tests catch a kernel reading a word nobody wrote.
func (b *Backend) scratch(n int) *floats {
	ptr, owner, n := b.allocWords(n, true)
	return &floats{ptr: ptr, n: n, owner: owner}
}

// alloc returns n zeroed 4-byte words from the device's cache (n is 0
// after a failure, recorded for Err).
func (b *Backend) alloc(n int) (devptr, *allocation, int) { return b.allocWords(n, false) }

// allocWords is alloc, leaving the words as they are when raw.
func (b *Backend) allocWords(n int, raw bool) (devptr, *allocation, int) {
	if n < 0 {
		b.failf("alloc: negative length %d", n)
		return 0, nil, 0
	}
	if n == 0 {
		return 0, nil, 0
	}
	var a *allocation
	b.run("alloc", func() error {
		var err error
		if a, err = b.d.mem.alloc(int64(n) * 4); err != nil {
			return err
		}
		if raw {
			if Emulated {
				return b.d.drv.fill32(a.ptr, int64(n), 0x7fc00000) // NaN
			}
			return nil
		}
		return b.d.drv.memset32(a.ptr, int64(n))
	})
	if a == nil {
		return 0, nil, n
	}
	return a.ptr, a, n
}

// Slice implements kernels.Backend.
func (b *Backend) Slice(x kernels.Buffer, off, n int) kernels.Buffer {
	f, ok := x.(*floats)
	if !ok || f == nil {
		b.failf("slice: buffer is a %T, not a cuda buffer", x)
		return &floats{}
	}
	if off < 0 || n < 0 || off+n > f.n {
		b.failf("slice: [%d, %d+%d) is outside a buffer of %d", off, off, n, f.n)
		return &floats{}
	}
	return &floats{ptr: f.ptr + devptr(4*off), n: n, owner: f.owner}
}

// Upload implements kernels.Backend.
func (b *Backend) Upload(dst kernels.Buffer, src []float32) {
	c := b.check("upload")
	d := c.buf("dst", dst, len(src), "len(src)")
	if c.ok && len(src) > 0 {
		b.copyIn(d.ptr, unsafe.Pointer(&src[0]), len(src))
	}
}

// Download implements kernels.Backend; it waits for the queued work.
func (b *Backend) Download(dst []float32, src kernels.Buffer) {
	c := b.check("download")
	s := c.in("src", src, len(dst), "len(dst)")
	if c.ok && len(dst) > 0 {
		b.copyOut(unsafe.Pointer(&dst[0]), s.ptr, len(dst))
	}
}

// UploadInt implements kernels.Backend.
func (b *Backend) UploadInt(dst kernels.IntBuffer, src []int32) {
	c := b.check("upload")
	d := c.ints("dst", dst, len(src), "len(src)")
	if c.ok && len(src) > 0 {
		b.copyIn(d.ptr, unsafe.Pointer(&src[0]), len(src))
	}
}

// DownloadInt implements kernels.Backend.
func (b *Backend) DownloadInt(dst []int32, src kernels.IntBuffer) {
	c := b.check("download")
	s := c.ints("src", src, len(dst), "len(dst)")
	if c.ok && len(dst) > 0 {
		b.copyOut(unsafe.Pointer(&dst[0]), s.ptr, len(dst))
	}
}

// copyIn queues a copy of n 4-byte words from host memory; the driver
// stages pageable memory before returning, so src may be reused at once.
func (b *Backend) copyIn(dst devptr, src unsafe.Pointer, n int) {
	b.run("upload", func() error { return b.d.drv.htod(dst, src, int64(4*n)) })
}

// copyOut copies n 4-byte words to host memory after the queued work.
func (b *Backend) copyOut(dst unsafe.Pointer, src devptr, n int) {
	b.run("download", func() error { return b.d.drv.dtoh(dst, src, int64(4*n)) })
}

// Zero implements kernels.Backend.
func (b *Backend) Zero(x kernels.Buffer) {
	c := b.check("zero")
	f, _ := c.optFresh("x", x, lenOf(x), "len(x)") // a pending Zero of x merges
	if c.ok && f == nil {
		c.failf("x is nil")
	}
	if !c.ok || f.n == 0 {
		return
	}
	b.d.zeros.add(f) // done by the next op that uses f (lazyzero.go)
}

// Copy implements kernels.Backend.
func (b *Backend) Copy(dst, src kernels.Buffer) {
	c := b.check("copy")
	s := c.anyIn("src", src)
	d := c.buf("dst", dst, s.Len(), "len(src)")
	if !c.ok || s.n == 0 {
		return
	}
	b.queue("copy", func() error { return b.d.drv.dtod(d.ptr, s.ptr, int64(4*s.n)) })
}

// checker validates the arguments of one op; after the first mismatch the
// remaining checks are skipped and ok stays false.
type checker struct {
	b  *Backend
	op string
	ok bool
	// reading is set while in and anyIn check a read-only argument; every
	// other buffer argument may be written and invalidates the bf16
	// shadows it overlaps (shadow.go).
	reading bool
	// freshing is set while optFresh checks an output; overwrite reports
	// that it was pending a Zero.
	freshing, overwrite bool
}

func (b *Backend) check(op string) *checker { return &checker{b: b, op: op, ok: !b.failed()} }

func (c *checker) failf(format string, args ...any) {
	if c.ok {
		c.ok = false
		c.b.failf("%s: "+format, append([]any{c.op}, args...)...)
	}
}

func (c *checker) cond(ok bool, format string, args ...any) {
	if !ok {
		c.failf(format, args...)
	}
}

// dims rejects negative dimensions before they are multiplied into lengths.
func (c *checker) dims(names string, vals ...int) {
	for _, v := range vals {
		if v < 0 {
			c.failf("negative dimension in %s=%v", names, vals)
			return
		}
	}
}

var noFloats = &floats{}

// boolInt is a kernel's int flag.
func boolInt(v bool) int {
	if v {
		return 1
	}
	return 0
}

// lenOf is x.Len(), or 0 for a nil x.
func lenOf(x kernels.Buffer) int {
	if x == nil {
		return 0
	}
	if f, ok := x.(*floats); ok && f == nil {
		return 0
	}
	return x.Len()
}

// any returns x as a device buffer of any length.
func (c *checker) any(name string, x kernels.Buffer) *floats {
	if !c.ok {
		return noFloats
	}
	f, ok := x.(*floats)
	if !ok || f == nil {
		if x == nil {
			c.failf("%s is nil", name)
		} else {
			c.failf("%s is a %T, not a cuda buffer", name, x)
		}
		return noFloats
	}
	if !c.reading {
		c.b.d.shadows.touch(f)
	}
	// A deferred Zero of f (lazyzero.go) is done now, before this op's
	// work, unless the op takes f as an output it overwrites (fresh).
	flush, exact := c.b.d.zeros.take(f)
	if exact {
		if c.freshing {
			c.overwrite = true
		} else {
			flush = append(flush, f.span())
		}
	}
	c.b.zeroNow(flush)
	return f
}

// optFresh is opt for a gradient output the op accumulates into, and
// overwrite reports that x is pending a Zero (which is dropped): the op
// must then write x instead of adding to it.
func (c *checker) optFresh(name string, x kernels.Buffer, want int, expr string) (f *floats, overwrite bool) {
	c.freshing, c.overwrite = true, false
	defer func() { c.freshing = false }()
	f = c.opt(name, x, want, expr)
	return f, c.overwrite && f != nil
}

// in is buf for an argument the op only reads.
func (c *checker) in(name string, x kernels.Buffer, want int, expr string) *floats {
	c.reading = true
	defer func() { c.reading = false }()
	return c.buf(name, x, want, expr)
}

// anyIn is any for an argument the op only reads.
func (c *checker) anyIn(name string, x kernels.Buffer) *floats {
	c.reading = true
	defer func() { c.reading = false }()
	return c.any(name, x)
}

// buf returns x after checking it is a device buffer of want elements.
func (c *checker) buf(name string, x kernels.Buffer, want int, expr string) *floats {
	f := c.any(name, x)
	if c.ok && f.n != want {
		c.failf("%s has %d elements, want %s=%d", name, f.n, expr, want)
	}
	return f
}

// opt is buf for optional buffers: nil gives a nil *floats (a null
// pointer in the kernel).
func (c *checker) opt(name string, x kernels.Buffer, want int, expr string) *floats {
	if x == nil || !c.ok {
		return nil
	}
	if f, ok := x.(*floats); ok && f == nil {
		return nil
	}
	return c.buf(name, x, want, expr)
}

// ints returns x after checking it is a device int buffer of want elements.
func (c *checker) ints(name string, x kernels.IntBuffer, want int, expr string) *ints {
	if !c.ok {
		return &ints{}
	}
	f, ok := x.(*ints)
	if !ok || f == nil {
		if x == nil {
			c.failf("%s is nil", name)
		} else {
			c.failf("%s is a %T, not a cuda int buffer", name, x)
		}
		return &ints{}
	}
	if f.n != want {
		c.failf("%s has %d elements, want %s=%d", name, f.n, expr, want)
	}
	return f
}

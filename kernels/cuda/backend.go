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
	// adamw is AdamWSteps' tile table (device thread only).
	adamw adamWTable
	// comm: this backend queues on the device's communication stream
	// (CommBackend), not the compute stream.
	comm bool
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

func (b *Backend) failf(format string, args ...any) { b.fail(fmt.Errorf(format, args...)) }

// fail records err unless an error is recorded already.
func (b *Backend) fail(err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err == nil {
		b.err = fmt.Errorf("kernels/cuda: %w", err)
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
	b.d.do(func() { err = b.onStream(f)() })
	if err != nil {
		b.failf("%s: %v", op, err)
	}
}

// onStream is f run with the driver queueing on this backend's stream.
// Device thread.
func (b *Backend) onStream(f func() error) func() error {
	if !b.comm {
		return f
	}
	return func() error {
		b.d.drv.useComm(true)
		defer b.d.drv.useComm(false)
		return f()
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
		if err := b.d.timedRun(op, kernel, b.onStream(f)); err != nil {
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

// Slice implements kernels.Backend. It only checks (no bookkeeping): a
// view reads and writes nothing, and a Zero pending on x stays pending.
func (b *Backend) Slice(x kernels.Buffer, off, n int) kernels.Buffer {
	c := b.validate(kernels.OpSlice, []int{off, n}, x)
	if !c.ok {
		return &floats{}
	}
	f := c.f[0]
	return &floats{ptr: f.ptr + devptr(4*off), n: n, owner: f.owner}
}

// Upload implements kernels.Backend.
func (b *Backend) Upload(dst kernels.Buffer, src []float32) {
	c := b.check(kernels.OpUpload, []int{len(src)}, dst)
	if c.ok && len(src) > 0 {
		b.copyIn(c.f[0].ptr, unsafe.Pointer(&src[0]), len(src))
	}
}

// Download implements kernels.Backend; it waits for the queued work.
func (b *Backend) Download(dst []float32, src kernels.Buffer) {
	c := b.check(kernels.OpDownload, []int{len(dst)}, src)
	if c.ok && len(dst) > 0 {
		b.copyOut(unsafe.Pointer(&dst[0]), c.f[0].ptr, len(dst))
	}
}

// UploadInt implements kernels.Backend.
func (b *Backend) UploadInt(dst kernels.IntBuffer, src []int32) {
	c := b.check(kernels.OpUploadInt, []int{len(src)}, dst)
	if c.ok && len(src) > 0 {
		b.copyIn(c.i[0].ptr, unsafe.Pointer(&src[0]), len(src))
	}
}

// DownloadInt implements kernels.Backend.
func (b *Backend) DownloadInt(dst []int32, src kernels.IntBuffer) {
	c := b.check(kernels.OpDownloadInt, []int{len(dst)}, src)
	if c.ok && len(dst) > 0 {
		b.copyOut(unsafe.Pointer(&dst[0]), c.i[0].ptr, len(dst))
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
	c := b.check(kernels.OpZero, nil, fresh(x)) // a pending Zero of x merges
	if !c.ok || c.f[0].n == 0 {
		return
	}
	b.d.zeros.add(c.f[0]) // done by the next op that uses it (lazyzero.go)
}

// Copy implements kernels.Backend.
func (b *Backend) Copy(dst, src kernels.Buffer) {
	c := b.check(kernels.OpCopy, nil, dst, src)
	if !c.ok || c.f[1].n == 0 {
		return
	}
	d, s := c.f[0], c.f[1]
	b.queue("copy", func() error { return b.d.drv.dtod(d.ptr, s.ptr, int64(4*s.n)) })
}

// checker is one op call checked against its contract (kernels.Op.Check):
// its buffers in the op's argument order, nil for an absent or unused one,
// with the bookkeeping of shadow.go and lazyzero.go done. ok is false once
// a check failed; the failure is recorded under the op's name.
type checker struct {
	b  *Backend
	op *kernels.Op
	ok bool
	f  []*floats // float arguments
	i  []*ints   // int arguments
	// over[i] reports that argument i, passed as fresh, was pending a Zero,
	// which is dropped: the op must write it instead of adding to it.
	over  []bool
	fresh []bool
}

// freshArg marks an argument passed through fresh.
type freshArg struct{ kernels.Buffer }

// fresh marks an output that the op's kernels can write instead of adding
// to: a Zero pending on exactly that buffer is then dropped rather than
// done, and checker.over says so.
func fresh(x kernels.Buffer) kernels.Buffer { return freshArg{x} }

// check checks a call of op with dims (the values of op.Dims) and args (its
// buffer arguments in order, IntBuffers included, outputs the op can
// overwrite through fresh), then does the bookkeeping of every buffer:
// those the op only reads first, so that a Zero pending on a buffer that
// is read and written is done rather than dropped, then the rest in order.
// A buffer that is not only read may be written, and invalidates the bf16
// copies it overlaps (shadow.go). A deferred Zero (lazyzero.go) overlapping
// any buffer is done before the op, except one covering exactly a fresh
// output, which is dropped.
func (b *Backend) check(op *kernels.Op, dims []int, args ...kernels.Buffer) *checker {
	c := b.validate(op, dims, args...)
	if !c.ok {
		return c
	}
	for _, reads := range []bool{true, false} {
		for i, f := range c.f {
			if f == nil || (op.Args[i].Dir == kernels.In) != reads {
				continue
			}
			if !reads {
				b.d.shadows.touch(f)
			}
			flush, exact := b.d.zeros.take(f)
			if exact && c.fresh[i] && !reads {
				c.over[i] = true
			} else if exact {
				flush = append(flush, f.span())
			}
			b.zeroNow(flush)
		}
	}
	return c
}

// validate is check without the bookkeeping.
func (b *Backend) validate(op *kernels.Op, dims []int, args ...kernels.Buffer) *checker {
	n := len(args)
	c := &checker{b: b, op: op, f: make([]*floats, n), i: make([]*ints, n), over: make([]bool, n), fresh: make([]bool, n)}
	if b.failed() {
		return c
	}
	lens := make([]int, n)
	for i, a := range args {
		if fa, ok := a.(freshArg); ok {
			args[i], c.fresh[i] = fa.Buffer, true
		}
		lens[i] = kernels.Nil
		if !isNil(args[i]) {
			lens[i] = args[i].Len()
		}
	}
	if err := op.Check(dims, lens); err != nil {
		b.fail(err)
		return c
	}
	for i, a := range args {
		if lens[i] == kernels.Nil || !op.Uses(i, dims) {
			continue
		}
		var ok bool
		kind := "buffer"
		if op.Args[i].Int {
			c.i[i], ok = a.(*ints)
			kind = "int buffer"
		} else {
			c.f[i], ok = a.(*floats)
		}
		if !ok {
			c.failf("%s is a %T, not a cuda %s", op.Args[i].Name, a, kind)
			return c
		}
	}
	c.ok = true
	return c
}

// isNil reports whether x is nil, or a nil device buffer.
func isNil(x kernels.Buffer) bool {
	switch f := x.(type) {
	case nil:
		return true
	case *floats:
		return f == nil
	case *ints:
		return f == nil
	}
	return false
}

// failf records what is wrong with a call the contract allows (a limit of
// the CUDA kernels, overlapping buffers) under the op's name.
func (c *checker) failf(format string, args ...any) {
	c.ok = false
	c.b.failf("%s: "+format, append([]any{c.op.Name}, args...)...)
}

// cond is failf unless ok.
func (c *checker) cond(ok bool, format string, args ...any) {
	if !ok {
		c.failf(format, args...)
	}
}

// boolInt is a kernel's int flag.
func boolInt(v bool) int {
	if v {
		return 1
	}
	return 0
}

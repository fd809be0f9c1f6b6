// Package cpu owns the tuned CPU backend of kernels.Backend: the one that
// trains on machines without a GPU, and the float64 backend of gradient
// checks. It is not the specification: the readable float64 reference is
// kernels/kerneltest/naive.go, and the conformance suite (kernels/kerneltest)
// holds this backend to it as it holds the CUDA one. Buffers are host
// slices; ops run goroutine-parallel over rows, channels or heads with
// runtime.GOMAXPROCS(0) workers, with blocked gonum products.
//
// It must not know about models, training or I/O, and it never panics or
// logs on bad input: every call is checked against its contract
// (kernels.Contract), and the first failure is recorded and reported by Err.
package cpu

import (
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"

	"github.com/bmojo/bmojo/kernels"
)

// Buf is the host buffer of a Backend[F]. Slices of it (Backend.Slice)
// share memory with it.
type Buf[F kernels.Float] []F

// Len returns the number of elements.
func (b Buf[F]) Len() int { return len(b) }

// IntBuf is the host int32 buffer of every Backend.
type IntBuf []int32

// Len returns the number of elements.
func (b IntBuf) Len() int { return len(b) }

// Backend is the CPU backend. The zero value is not usable; call New.
type Backend[F kernels.Float] struct {
	mu  sync.Mutex
	err error
}

// New returns a CPU backend computing in F.
func New[F kernels.Float]() *Backend[F] { return &Backend[F]{} }

var _ kernels.Backend[float32] = (*Backend[float32])(nil)
var _ kernels.Backend[float64] = (*Backend[float64])(nil)

// Name implements kernels.Backend.
func (be *Backend[F]) Name() string { return "cpu" }

// Err implements kernels.Backend.
func (be *Backend[F]) Err() error {
	be.mu.Lock()
	defer be.mu.Unlock()
	return be.err
}

// failf records the first error; later ones are dropped because the first
// bad shape usually causes the rest.
func (be *Backend[F]) failf(format string, args ...any) {
	be.fail(fmt.Errorf(format, args...))
}

// fail records err as failf does.
func (be *Backend[F]) fail(err error) {
	be.mu.Lock()
	defer be.mu.Unlock()
	if be.err == nil {
		be.err = fmt.Errorf("kernels/cpu: %w", err)
	}
}

// checker is one op call checked against its contract (kernels.Op.Check):
// its buffers as host slices in the op's argument order, nil for an absent
// or unused one. ok is false once a check failed; the failure is recorded
// under the op's name.
type checker[F kernels.Float] struct {
	be *Backend[F]
	op *kernels.Op
	ok bool
	f  [][]F     // float arguments
	i  [][]int32 // int arguments
}

// check checks a call of op with dims (the values of op.Dims) and args (its
// buffer arguments, IntBuffers included, in order).
func (be *Backend[F]) check(op *kernels.Op, dims []int, args ...kernels.Buffer) *checker[F] {
	c := &checker[F]{be: be, op: op}
	lens := make([]int, len(args))
	for i, a := range args {
		lens[i] = kernels.Nil
		if a != nil {
			lens[i] = a.Len()
		}
	}
	if err := op.Check(dims, lens); err != nil {
		be.fail(err)
		return c
	}
	c.f, c.i = make([][]F, len(args)), make([][]int32, len(args))
	for i, a := range args {
		if a == nil || !op.Uses(i, dims) {
			continue
		}
		if op.Args[i].Int {
			s, ok := a.(IntBuf)
			if !ok {
				c.failf("%s is a %T, not a cpu.IntBuf", op.Args[i].Name, a)
				return c
			}
			c.i[i] = s
			continue
		}
		s, ok := a.(Buf[F])
		if !ok {
			c.failf("%s is a %T, not a cpu.Buf", op.Args[i].Name, a)
			return c
		}
		c.f[i] = s
	}
	c.ok = true
	return c
}

// failf records what is wrong with a call the contract allows (bad data,
// overlapping buffers) under the op's name.
func (c *checker[F]) failf(format string, args ...any) {
	c.ok = false
	c.be.failf("%s: "+format, append([]any{c.op.Name}, args...)...)
}

// minParallelWork is the approximate number of scalar operations below
// which starting goroutines costs more than it saves.
const minParallelWork = 1 << 15

// workers returns how many goroutines an op of n items costing work
// operations each should use.
func workers(n, work int) int {
	w := runtime.GOMAXPROCS(0)
	if w > n {
		w = n
	}
	if w < 1 || float64(n)*float64(work) < minParallelWork {
		return 1
	}
	return w
}

// parallel runs fn over [0,n) split into one contiguous range per worker.
// fn receives its worker index so it can own per-worker scratch.
func parallel(n, work int, fn func(w, lo, hi int)) {
	nw := workers(n, work)
	if nw <= 1 {
		if n > 0 {
			fn(0, 0, n)
		}
		return
	}
	var wg sync.WaitGroup
	for w := 0; w < nw; w++ {
		lo, hi := w*n/nw, (w+1)*n/nw
		if lo == hi {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(w, lo, hi)
		}()
	}
	wg.Wait()
}

// parallelDyn hands out items [0,n) one at a time, for work whose per-item
// cost varies (causal attention rows, kv groups).
func parallelDyn(n, work int, fn func(w, i int)) {
	nw := workers(n, work)
	if nw <= 1 {
		for i := 0; i < n; i++ {
			fn(0, i)
		}
		return
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	next := 0
	for w := 0; w < nw; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= n {
					return
				}
				fn(w, i)
			}
		}()
	}
	wg.Wait()
}

// as32 and as64 reinterpret a []F whose underlying type is float32/float64,
// so gonum's BLAS can run on named float types too.
func as32[F kernels.Float](s []F) []float32 {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&s[0])), len(s))
}

func as64[F kernels.Float](s []F) []float64 {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Slice((*float64)(unsafe.Pointer(&s[0])), len(s))
}

func is32[F kernels.Float]() bool { var z F; return unsafe.Sizeof(z) == 4 }

// Alloc implements kernels.Backend.
func (be *Backend[F]) Alloc(n int) kernels.Buffer {
	if n < 0 {
		be.failf("alloc: negative length %d", n)
		n = 0
	}
	return Buf[F](make([]F, n))
}

// AllocInt implements kernels.Backend.
func (be *Backend[F]) AllocInt(n int) kernels.IntBuffer {
	if n < 0 {
		be.failf("alloc_int: negative length %d", n)
		n = 0
	}
	return IntBuf(make([]int32, n))
}

// Slice implements kernels.Backend. The view's capacity is clipped so an
// append through it can never write past the view.
func (be *Backend[F]) Slice(b kernels.Buffer, off, n int) kernels.Buffer {
	c := be.check(kernels.OpSlice, []int{off, n}, b)
	if !c.ok {
		return Buf[F](nil)
	}
	return Buf[F](c.f[0][off : off+n : off+n])
}

// Upload implements kernels.Backend.
func (be *Backend[F]) Upload(dst kernels.Buffer, src []F) {
	if c := be.check(kernels.OpUpload, []int{len(src)}, dst); c.ok {
		copy(c.f[0], src)
	}
}

// Download implements kernels.Backend.
func (be *Backend[F]) Download(dst []F, src kernels.Buffer) {
	if c := be.check(kernels.OpDownload, []int{len(dst)}, src); c.ok {
		copy(dst, c.f[0])
	}
}

// UploadInt implements kernels.Backend.
func (be *Backend[F]) UploadInt(dst kernels.IntBuffer, src []int32) {
	if c := be.check(kernels.OpUploadInt, []int{len(src)}, dst); c.ok {
		copy(c.i[0], src)
	}
}

// DownloadInt implements kernels.Backend.
func (be *Backend[F]) DownloadInt(dst []int32, src kernels.IntBuffer) {
	if c := be.check(kernels.OpDownloadInt, []int{len(dst)}, src); c.ok {
		copy(dst, c.i[0])
	}
}

// Zero implements kernels.Backend.
func (be *Backend[F]) Zero(x kernels.Buffer) {
	if c := be.check(kernels.OpZero, nil, x); c.ok {
		clear(c.f[0])
	}
}

// Copy implements kernels.Backend.
func (be *Backend[F]) Copy(dst, src kernels.Buffer) {
	if c := be.check(kernels.OpCopy, nil, dst, src); c.ok {
		copy(c.f[0], c.f[1])
	}
}

// CopyColumns implements kernels.Backend.
func (be *Backend[F]) CopyColumns(dst, src kernels.Buffer, Rw, n, dCols, dc, sCols, sc int) {
	c := be.check(kernels.OpCopyColumns, []int{Rw, n, dCols, dc, sCols, sc}, dst, src)
	if !c.ok {
		return
	}
	d, s := c.f[0], c.f[1]
	if overlap(d, s) {
		c.failf("dst and src overlap")
		return
	}
	if n == 0 {
		return
	}
	for r := range Rw {
		copy(d[r*dCols+dc:r*dCols+dc+n], s[r*sCols+sc:r*sCols+sc+n])
	}
}

// overlap reports whether a and b share an element.
func overlap[F kernels.Float](a, b []F) bool {
	if len(a) == 0 || len(b) == 0 {
		return false
	}
	pa, pb := uintptr(unsafe.Pointer(unsafe.SliceData(a))), uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	sz := unsafe.Sizeof(a[0])
	return pa < pb+uintptr(len(b))*sz && pb < pa+uintptr(len(a))*sz
}

// Accumulate implements kernels.Backend.
func (be *Backend[F]) Accumulate(dst, src kernels.Buffer) {
	c := be.check(kernels.OpAccumulate, nil, dst, src)
	if !c.ok {
		return
	}
	d, s := c.f[0], c.f[1]
	parallel(len(d), 1, func(_, lo, hi int) {
		dd, ss := d[lo:hi], s[lo:hi]
		for i := range dd {
			dd[i] += ss[i]
		}
	})
}

// Scale implements kernels.Backend.
func (be *Backend[F]) Scale(x kernels.Buffer, s float64) {
	c := be.check(kernels.OpScale, nil, x)
	if !c.ok {
		return
	}
	xs, f := c.f[0], F(s)
	parallel(len(xs), 1, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			xs[i] *= f
		}
	})
}

// SumSquares implements kernels.Backend. Each worker sums its own range and
// the partial sums are added in worker order, so the result is
// deterministic for a given GOMAXPROCS.
func (be *Backend[F]) SumSquares(x kernels.Buffer) float64 {
	c := be.check(kernels.OpSumSquares, nil, x)
	if !c.ok {
		return math.NaN()
	}
	xs := c.f[0]
	part := make([]float64, runtime.GOMAXPROCS(0))
	parallel(len(xs), 1, func(w, lo, hi int) {
		var s float64
		for _, v := range xs[lo:hi] {
			s += float64(v) * float64(v)
		}
		part[w] = s
	})
	var s float64
	for _, p := range part {
		s += p
	}
	return s
}

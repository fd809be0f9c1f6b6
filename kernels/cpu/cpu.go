// Package cpu owns the pure-Go reference implementation of kernels.Backend:
// the executable specification every other backend is checked against
// (kernels/kerneltest). Buffers are host slices; ops run goroutine-parallel
// over rows, channels or heads with runtime.GOMAXPROCS(0) workers.
//
// It must not know about models, training or I/O, and it never panics or
// logs on bad input: the first failure is recorded and reported by Err.
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

// Backend is the CPU reference backend. The zero value is not usable; call New.
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
	be.mu.Lock()
	defer be.mu.Unlock()
	if be.err == nil {
		be.err = fmt.Errorf("kernels/cpu: "+format, args...)
	}
}

// checker validates the arguments of one op call; every method records the
// first mismatch under the op's name and later calls become no-ops.
type checker[F kernels.Float] struct {
	be *Backend[F]
	op string
	ok bool
}

func (be *Backend[F]) check(op string) *checker[F] { return &checker[F]{be: be, op: op, ok: true} }

func (c *checker[F]) failf(format string, args ...any) {
	if c.ok {
		c.ok = false
		c.be.failf("%s: "+format, append([]any{c.op}, args...)...)
	}
}

// dims rejects negative (or, where required, zero) dimensions before they
// are multiplied into buffer lengths.
func (c *checker[F]) dims(names string, vals ...int) {
	for _, v := range vals {
		if v < 0 {
			c.failf("negative dimension in %s=%v", names, vals)
			return
		}
	}
}

func (c *checker[F]) cond(ok bool, format string, args ...any) {
	if !ok {
		c.failf(format, args...)
	}
}

// buf returns b's slice after checking it is a Buf[F] of want elements.
func (c *checker[F]) buf(name string, b kernels.Buffer, want int, expr string) []F {
	if !c.ok {
		return nil
	}
	if b == nil {
		c.failf("%s is nil", name)
		return nil
	}
	s, ok := b.(Buf[F])
	if !ok {
		c.failf("%s is a %T, not a cpu.Buf", name, b)
		return nil
	}
	if len(s) != want {
		c.failf("%s has %d elements, want %s=%d", name, len(s), expr, want)
		return nil
	}
	return s
}

// opt is buf for optional buffers (gradient outputs, unused paths): nil
// stays nil.
func (c *checker[F]) opt(name string, b kernels.Buffer, want int, expr string) []F {
	if b == nil || !c.ok {
		return nil
	}
	return c.buf(name, b, want, expr)
}

func (c *checker[F]) ints(name string, b kernels.IntBuffer, want int, expr string) []int32 {
	if !c.ok {
		return nil
	}
	if b == nil {
		c.failf("%s is nil", name)
		return nil
	}
	s, ok := b.(IntBuf)
	if !ok {
		c.failf("%s is a %T, not a cpu.IntBuf", name, b)
		return nil
	}
	if len(s) != want {
		c.failf("%s has %d elements, want %s=%d", name, len(s), expr, want)
		return nil
	}
	return s
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
	s, ok := b.(Buf[F])
	if !ok {
		be.failf("slice: buffer is a %T, not a cpu.Buf", b)
		return Buf[F](nil)
	}
	if off < 0 || n < 0 || off+n > len(s) {
		be.failf("slice: [%d:%d+%d] out of range for %d elements", off, off, n, len(s))
		return Buf[F](nil)
	}
	return s[off : off+n : off+n]
}

// Upload implements kernels.Backend.
func (be *Backend[F]) Upload(dst kernels.Buffer, src []F) {
	c := be.check("upload")
	d := c.buf("dst", dst, len(src), "len(src)")
	copy(d, src)
}

// Download implements kernels.Backend.
func (be *Backend[F]) Download(dst []F, src kernels.Buffer) {
	c := be.check("download")
	s := c.buf("src", src, len(dst), "len(dst)")
	copy(dst, s)
}

// UploadInt implements kernels.Backend.
func (be *Backend[F]) UploadInt(dst kernels.IntBuffer, src []int32) {
	c := be.check("upload_int")
	d := c.ints("dst", dst, len(src), "len(src)")
	copy(d, src)
}

// DownloadInt implements kernels.Backend.
func (be *Backend[F]) DownloadInt(dst []int32, src kernels.IntBuffer) {
	c := be.check("download_int")
	s := c.ints("src", src, len(dst), "len(dst)")
	copy(dst, s)
}

// Zero implements kernels.Backend.
func (be *Backend[F]) Zero(x kernels.Buffer) {
	c := be.check("zero")
	if x == nil {
		c.failf("x is nil")
		return
	}
	xs := c.buf("x", x, x.Len(), "x.Len()")
	clear(xs)
}

// Copy implements kernels.Backend.
func (be *Backend[F]) Copy(dst, src kernels.Buffer) {
	c := be.check("copy")
	if src == nil {
		c.failf("src is nil")
		return
	}
	s := c.buf("src", src, src.Len(), "src.Len()")
	d := c.buf("dst", dst, len(s), "src.Len()")
	copy(d, s)
}

// CopyColumns implements kernels.Backend.
func (be *Backend[F]) CopyColumns(dst, src kernels.Buffer, Rw, n, dCols, dc, sCols, sc int) {
	c := be.check("copy_columns")
	c.dims("Rw,n,dCols,dc,sCols,sc", Rw, n, dCols, dc, sCols, sc)
	c.cond(dc+n <= dCols, "dst columns [%d,%d) are outside its %d", dc, dc+n, dCols)
	c.cond(sc+n <= sCols, "src columns [%d,%d) are outside its %d", sc, sc+n, sCols)
	d := c.buf("dst", dst, Rw*dCols, "Rw·dCols")
	s := c.buf("src", src, Rw*sCols, "Rw·sCols")
	c.cond(!overlap(d, s), "dst and src overlap")
	if !c.ok || n == 0 {
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
	c := be.check("accumulate")
	if src == nil {
		c.failf("src is nil")
		return
	}
	s := c.buf("src", src, src.Len(), "src.Len()")
	d := c.buf("dst", dst, len(s), "src.Len()")
	if !c.ok {
		return
	}
	parallel(len(d), 1, func(_, lo, hi int) {
		dd, ss := d[lo:hi], s[lo:hi]
		for i := range dd {
			dd[i] += ss[i]
		}
	})
}

// Scale implements kernels.Backend.
func (be *Backend[F]) Scale(x kernels.Buffer, s float64) {
	c := be.check("scale")
	if x == nil {
		c.failf("x is nil")
		return
	}
	xs := c.buf("x", x, x.Len(), "x.Len()")
	f := F(s)
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
	c := be.check("sum_squares")
	if x == nil {
		c.failf("x is nil")
		return math.NaN()
	}
	xs := c.buf("x", x, x.Len(), "x.Len()")
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

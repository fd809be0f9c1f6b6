//go:build cuda

package cuda

import (
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/kernels/kerneltest"
)

var (
	devs   = map[string]*Device{}
	devsMu sync.Mutex
)

// openDevice opens GPU 0 once per matmul precision for the whole test run.
func openDevice(t testing.TB, matmul string) *Device {
	t.Helper()
	devsMu.Lock()
	defer devsMu.Unlock()
	if d, ok := devs[matmul]; ok {
		return d
	}
	d, err := Open(0, Options{MatMul: matmul})
	if err != nil {
		t.Fatalf("opening GPU 0: %v", err)
	}
	i := d.Info()
	t.Logf("GPU 0: %s, sm_%d%d, %d SMs, %.1f GiB, driver API %d, %s", i.Name, i.ComputeMajor, i.ComputeMinor, i.SMs, float64(i.MemTotal)/(1<<30), i.Driver, i.CuBLAS)
	devs[matmul] = d
	return d
}

// The conformance suite (kerneltest's naive float64 references), with the production
// precision (bf16 tensor-core matmuls) and with fp32 matmuls.
func TestConformanceBF16(t *testing.T) {
	d := openDevice(t, "bf16")
	kerneltest.Run(t, func() kernels.Backend[float32] { return d.Backend() })
}

func TestConformanceFP32(t *testing.T) {
	d := openDevice(t, "fp32")
	kerneltest.Run(t, func() kernels.Backend[float32] { return d.Backend() })
}

// A failed kernel argument check must not poison later work on the device.
func TestErrorIsPerBackend(t *testing.T) {
	d := openDevice(t, "bf16")
	bad := d.Backend()
	bad.Copy(bad.Alloc(3), bad.Alloc(4))
	if bad.Err() == nil {
		t.Fatal("no error for a length mismatch")
	}
	good := d.Backend()
	x := good.Alloc(3)
	good.Upload(x, []float32{1, 2, 3})
	if s := good.SumSquares(x); s != 14 || good.Err() != nil {
		t.Fatalf("SumSquares = %v (err %v), want 14", s, good.Err())
	}
}

// Out of memory names the size asked and what is free.
func TestOutOfMemory(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.Backend()
	be.Alloc(1 << 40) // 4 TiB
	err := be.Err()
	if err == nil {
		t.Fatal("a 4 TiB allocation succeeded")
	}
	t.Log(err)
	for _, want := range []string{"out of device memory", "4194304.0 MiB", "free of"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

// TestDroppedBuffersReused: device memory is invisible to the Go collector,
// so the cache collects after a set growth; buffers dropped by their owners
// (an op's temporaries) must come back instead of piling up until the GPU
// is full (a 130m training run once ran out of 140 GiB by step 190).
func TestDroppedBuffersReused(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.Backend()
	var held0 int64
	d.do(func() { held0, d.mem.gcAt = d.mem.held, 4<<20 })
	defer d.do(func() { d.mem.gcAt = 0 })
	for i := 0; i < 64; i++ {
		be.Alloc(1 << 18) // 1 MiB, dropped at once
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
	var held int64
	d.do(func() { held = d.mem.held })
	if grew := held - held0; grew > 16<<20 {
		t.Errorf("64 dropped 1 MiB buffers left the cache holding %d MiB more (want ≤ 16 MiB)", grew>>20)
	}
}

// TestMatMulInputCopiesNoMemory: with no memory to spare for kept copies,
// products convert into scratch every time and still compute the same.
func TestMatMulInputCopiesNoMemory(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.NewBackend()
	const Rw, K = 29, 40
	tb := newTestBufs(be, 9)
	up := tb.up
	x, w := up(Rw*K), up(K*K)
	want, got := be.Alloc(Rw*K), be.Alloc(Rw*K)
	be.MatMul(want, x, w, Rw, K, K, false)
	be.ForgetInputCopies()
	x2, w2 := up(Rw*K), up(K*K)
	be.Copy(x2, x)
	be.Copy(w2, w)
	// Nothing is spare, and no cached block can be reused.
	d.do(func() { d.mem.reserveAt = 1 << 50; d.mem.releaseCached() })
	defer d.do(func() { d.mem.reserveAt = 0 })
	for range 3 {
		be.MatMul(got, x2, w2, Rw, K, K, false)
	}
	be.Err()
	for _, b := range []kernels.Buffer{x2, w2} {
		f := b.(*floats)
		if s := d.shadows.owners[f.owner.id][f.span()]; s == nil || s.a != nil {
			t.Fatalf("the copy of a product input: %+v, want one without storage", s)
		}
	}
	tb.same(t, "the product", got, want)
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestMatMulInputCopies: products keep bf16 copies of their inputs and
// reuse them until an op writes any part of the input; the results are
// those of products that convert every time.
func TestMatMulInputCopies(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	const Rw, K = 37, 24
	tb := newTestBufs(be, 3)
	host, up := tb.host, tb.up
	conversions := func() int { return be.InputCopies().Conversions }
	buf := up(2 * Rw * K)
	x := be.Slice(buf, 0, Rw*K)
	w1, w2 := up(K*K), up(K*K)
	o1, o2, ref, tmp := be.Alloc(Rw*K), be.Alloc(Rw*K), be.Alloc(Rw*K), be.Alloc(Rw*K)
	g, rstd := up(K), be.Alloc(Rw)

	c0 := conversions()
	be.MatMul(o1, x, w1, Rw, K, K, false)            // converts x and w1
	be.MatMul(o2, x, w2, Rw, K, K, false)            // converts w2 only
	be.SiLU(tmp, x)                                  // reads x: the copy stays
	be.MatMulBackward(tmp, nil, o1, x, w1, Rw, K, K) // converts dout = o1
	be.MatMul(o1, x, w1, Rw, K, K, false)
	if got := conversions() - c0; got != 4 {
		t.Errorf("four distinct inputs took %d conversions, want 4", got)
	}
	if st := be.InputCopies(); st.Copies < 3 || st.Bytes < 2*int64(Rw*K+2*K*K) {
		t.Errorf("copies %+v, want at least x, w1 and w2", st)
	}

	// Each writer changes x (or w1); the next product must see the change.
	writers := []struct {
		name  string
		write func()
	}{
		{"Scale of the whole buffer", func() { be.Scale(buf, 1.5) }},
		{"Upload into the view", func() { be.Upload(x, host(Rw*K)) }},
		{"a product writing over part of x", func() { be.MatMul(be.Slice(buf, K, Rw*K), o2, w2, Rw, K, K, false) }},
		{"RMSNorm into x", func() { be.RMSNorm(x, rstd, o2, g, Rw, K) }},
		{"Copy into x", func() { be.Copy(x, o2) }},
		{"Accumulate into x", func() { be.Accumulate(x, o2) }},
		{"a backward accumulating into x", func() { be.MatMulBackward(x, nil, o2, o1, w2, Rw, K, K) }},
		{"AdamW on w1", func() {
			be.AdamWStep(w1, up(K*K), be.Alloc(K*K), be.Alloc(K*K), kernels.AdamW{LR: 0.1, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, Step: 1})
		}},
		{"AdamWSteps over w1", func() {
			be.AdamWSteps(w1, up(K*K), be.Alloc(K*K), be.Alloc(K*K), []kernels.AdamWSegment{{Off: 3, N: K}},
				kernels.AdamW{LR: 0.1, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, Step: 1})
		}},
	}
	for _, wr := range writers {
		be.MatMul(o1, x, w1, Rw, K, K, false) // copies of x and w1 are current
		wr.write()
		be.MatMul(o1, x, w1, Rw, K, K, false)
		be.ForgetInputCopies()
		be.MatMul(ref, x, w1, Rw, K, K, false)
		tb.same(t, "after "+wr.name+" (a stale copy?)", o1, ref)
	}

	// Producers write the copy of an output that products read: after the
	// first round, the products convert nothing, and read current values.
	src, src2 := up(Rw*K), up(Rw*K)
	cw, alog, bmat := up(K*4), up(K*4), up(Rw*4)
	producers := []struct {
		name string
		make func(dst, in kernels.Buffer)
	}{
		{"RMSNorm", func(dst, in kernels.Buffer) { be.RMSNorm(dst, rstd, in, g, Rw, K) }},
		{"RMSNormBackward", func(dst, in kernels.Buffer) { be.Zero(dst); be.RMSNormBackward(dst, nil, in, src2, g, rstd, Rw, K) }},
		{"SwiGLU", func(dst, in kernels.Buffer) { be.SwiGLU(dst, in, src2) }},
		{"SwiGLUBackward", func(dst, in kernels.Buffer) { be.Zero(dst); be.SwiGLUBackward(nil, dst, in, src2, src2) }},
		{"ShiftRows", func(dst, in kernels.Buffer) { be.ShiftRows(dst, in, 1, Rw, K) }},
		{"RoPEBackward", func(dst, in kernels.Buffer) { be.Zero(dst); be.RoPEBackward(dst, in, 1, Rw, 1, K, 1e4) }},
		{"SiLU", func(dst, in kernels.Buffer) { be.SiLU(dst, in) }},
		{"Conv1dSiLU", func(dst, in kernels.Buffer) { be.Conv1dSiLU(be.Alloc(Rw*K), dst, in, cw, g, 1, Rw, K, 4) }},
		{"SwiGLUPacked", func(dst, in kernels.Buffer) {
			gu := be.Alloc(2 * Rw * K) // gate = in, up = src2
			be.CopyColumns(gu, in, Rw, K, 2*K, 0, K, 0)
			be.CopyColumns(gu, src2, Rw, K, 2*K, K, K, 0)
			be.SwiGLUPacked(dst, gu, Rw, K)
		}},
		{"SwiGLUPackedBackward", func(dst, in kernels.Buffer) {
			be.Zero(dst)
			be.SwiGLUPackedBackward(dst, be.Slice(in, 0, Rw*K/2), src2, Rw, K/2)
		}},
		{"Conv1dBackward", func(dst, in kernels.Buffer) {
			be.Zero(dst)
			be.Conv1dBackward(dst, nil, nil, in, src2, cw, 1, Rw, K, 4)
		}},
		{"InnovationBackward", func(dst, in kernels.Buffer) {
			be.Zero(dst)
			be.InnovationBackward(dst, be.Slice(in, 0, Rw), src2, in, Rw, K)
		}},
		{"SelectiveScan", func(dst, in kernels.Buffer) {
			be.SelectiveScan(dst, in, src2, g, alog, bmat, bmat, g, src2, 1, Rw, K, 4)
		}},
	}
	for _, p := range producers {
		dst := be.Alloc(Rw * K)
		p.make(dst, src)
		be.MatMul(o1, dst, w2, Rw, K, K, false) // the product's first use: converts
		before := conversions()
		p.make(dst, o2)
		be.MatMul(o1, dst, w2, Rw, K, K, false)
		if got := conversions() - before; got != 0 {
			t.Errorf("%s: the product converted %d inputs, want 0 (the producer writes the copy)", p.name, got)
		}
		be.ForgetInputCopies()
		be.MatMul(ref, dst, w2, Rw, K, K, false)
		tb.same(t, p.name+" (a stale or wrong copy?)", o1, ref)
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestDeferredZero: Zero is carried out by the next op that uses the
// buffer, or skipped when that op overwrites it; every use sees zeros.
func TestDeferredZero(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	const Rw, K = 21, 16
	tb := newTestBufs(be, 7)
	up := tb.up
	x, w, dout, src := up(Rw*K), up(K*K), up(Rw*K), up(Rw*K)
	half := Rw / 2 * K
	ops := []struct {
		name string
		op   func(dst kernels.Buffer)
	}{
		{"nothing", func(kernels.Buffer) {}},
		{"MatMul accumulating", func(dst kernels.Buffer) { be.MatMul(dst, x, w, Rw, K, K, true) }},
		{"MatMulBackward into dx", func(dst kernels.Buffer) { be.MatMulBackward(dst, nil, dout, x, w, Rw, K, K) }},
		{"MatMulBackward twice", func(dst kernels.Buffer) {
			be.MatMulBackward(dst, nil, dout, x, w, Rw, K, K)
			be.MatMulBackward(dst, nil, src, x, w, Rw, K, K)
		}},
		{"Accumulate", func(dst kernels.Buffer) { be.Accumulate(dst, src) }},
		{"MatMulAdd into it", func(dst kernels.Buffer) { be.MatMulAdd(dst, src, x, w, Rw, K, K) }},
		{"MatMulAdd of itself", func(dst kernels.Buffer) { be.MatMulAdd(dst, dst, x, w, Rw, K, K) }},
		{"MatMulAdd from it", func(dst kernels.Buffer) {
			o := be.Alloc(Rw * K)
			be.MatMulAdd(o, dst, x, w, Rw, K, K)
			be.Copy(dst, o)
		}},
		{"SiLUBackward", func(dst kernels.Buffer) { be.SiLUBackward(dst, dout, x) }},
		{"SiLUMatMulBackward", func(dst kernels.Buffer) { be.SiLUMatMulBackward(dst, src, dout, w, x, Rw, K, K) }},
		{"SiLUMatMulBackward of its own dr", func(dst kernels.Buffer) {
			be.Accumulate(dst, src)
			be.SiLUMatMulBackward(dst, dst, dout, w, x, Rw, K, K)
		}},
		{"SelectiveScanBackward into dx", func(dst kernels.Buffer) {
			be.SelectiveScanBackward(dst, nil, nil, nil, nil, nil, nil, nil, dout, x, src, be.Slice(w, 0, K), be.Slice(w, 0, K*4),
				be.Slice(src, 0, Rw*4), be.Slice(dout, 0, Rw*4), be.Slice(w, K, K), x, 1, Rw, K, 4)
		}},
		{"SelectiveScanBackward into ddt and dz", func(dst kernels.Buffer) {
			dz := be.Alloc(Rw * K)
			be.Zero(dz)
			be.SelectiveScanBackward(nil, dst, nil, nil, nil, nil, nil, dz, dout, x, src, be.Slice(w, 0, K), be.Slice(w, 0, K*4),
				be.Slice(src, 0, Rw*4), be.Slice(dout, 0, Rw*4), be.Slice(w, K, K), x, 1, Rw, K, 4)
			be.Accumulate(dst, dz)
		}},
		{"InnovationBackward", func(dst kernels.Buffer) { be.InnovationBackward(dst, be.Slice(src, 0, Rw), x, dout, Rw, K) }},
		{"Conv1dBackward into dx", func(dst kernels.Buffer) { be.Conv1dBackward(dst, nil, nil, dout, x, be.Slice(w, 0, K*4), 1, Rw, K, 4) }},
		{"Scale", func(dst kernels.Buffer) { be.Scale(dst, 3) }},
		{"SwiGLUBackward into dgate", func(dst kernels.Buffer) { be.SwiGLUBackward(dst, nil, dout, x, src) }},
		{"SwiGLUBackward into dup", func(dst kernels.Buffer) { be.SwiGLUBackward(nil, dst, dout, x, src) }},
		{"SwiGLUBackward into both", func(dst kernels.Buffer) { be.SwiGLUBackward(dst, dst, dout, x, src) }},
		{"RoPEBackward", func(dst kernels.Buffer) { be.RoPEBackward(dst, dout, 1, Rw, 1, K, 1e4) }},
		{"RoPEBackward of itself", func(dst kernels.Buffer) { be.RoPEBackward(dst, dst, 1, Rw, 1, K, 1e4) }},
		{"Zero again, then Accumulate", func(dst kernels.Buffer) { be.Zero(dst); be.Accumulate(dst, src) }},
		{"a product into half of it", func(dst kernels.Buffer) {
			be.MatMul(be.Slice(dst, 0, half), be.Slice(x, 0, half), w, Rw/2, K, K, true)
		}},
		{"Zero of half, then MatMulBackward", func(dst kernels.Buffer) {
			be.Accumulate(dst, src)
			be.Zero(be.Slice(dst, half, Rw*K-half))
			be.MatMulBackward(dst, nil, dout, x, w, Rw, K, K)
		}},
	}
	for _, o := range ops {
		dst := up(Rw * K) // garbage the Zero must clear
		be.Zero(dst)
		o.op(dst)
		ref := be.Alloc(Rw * K) // allocated as zeros
		o.op(ref)
		tb.same(t, "Zero, then "+o.name, dst, ref)
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// testBufs makes and reads the device buffers of a test.
type testBufs struct {
	be  *Backend
	rng *rand.Rand
}

func newTestBufs(be *Backend, seed uint64) *testBufs {
	return &testBufs{be: be, rng: rand.New(rand.NewPCG(seed, seed+1))}
}

// host returns n standard normal values.
func (tb *testBufs) host(n int) []float32 {
	h := make([]float32, n)
	for i := range h {
		h[i] = float32(tb.rng.NormFloat64())
	}
	return h
}

// up returns a device buffer of n standard normal values.
func (tb *testBufs) up(n int) kernels.Buffer {
	b := tb.be.Alloc(n)
	tb.be.Upload(b, tb.host(n))
	return b
}

func (tb *testBufs) get(b kernels.Buffer) []float32 {
	h := make([]float32, b.Len())
	tb.be.Download(h, b)
	return h
}

// same fails t unless got and want hold identical values.
func (tb *testBufs) same(t *testing.T, what string, got, want kernels.Buffer) {
	t.Helper()
	a, r := tb.get(got), tb.get(want)
	for i := range a {
		if a[i] != r[i] {
			t.Fatalf("%s: element %d is %v, want %v", what, i, a[i], r[i])
		}
	}
}

// TestRMSNormBackwardShapes checks RMSNorm and its backward against the CPU
// reference where the conformance suite does not reach: many rows per warp
// and block (dg summed beside dx), widths past a warp and a block, and a d
// too wide for dg's shared-memory sums (its own kernel then), with dx or dg
// nil.
func TestRMSNormBackwardShapes(t *testing.T) {
	d := openDevice(t, "fp32")
	for _, sc := range []struct{ Rw, d int }{{1, 5}, {37, 768}, {3000, 300}, {20 * max(1, d.Info().SMs), 1100}, {9, 13000}} {
		for _, which := range []string{"both", "dx", "dg"} {
			rng := rand.New(rand.NewPCG(uint64(sc.Rw), uint64(sc.d)))
			r := func(n int) []float32 {
				v := make([]float32, n)
				for i := range v {
					v[i] = float32(rng.NormFloat64())
				}
				return v
			}
			x, g, dout, px, pg := r(sc.Rw*sc.d), r(sc.d), r(sc.Rw*sc.d), r(sc.Rw*sc.d), r(sc.d)
			run := func(be kernels.Backend[float32]) [][]float32 {
				up := func(v []float32) kernels.Buffer { b := be.Alloc(len(v)); be.Upload(b, v); return b }
				xb, gb := up(x), up(g)
				u, rstd := be.Alloc(len(x)), be.Alloc(sc.Rw)
				be.RMSNorm(u, rstd, xb, gb, sc.Rw, sc.d)
				var dx, dg kernels.Buffer
				if which != "dg" {
					dx = up(px)
				}
				if which != "dx" {
					dg = up(pg)
				}
				be.RMSNormBackward(dx, dg, up(dout), xb, gb, rstd, sc.Rw, sc.d)
				return downloadAll(t, be, u, rstd, dx, dg)
			}
			got, want := run(d.Backend()), run(cpu.New[float32]())
			for i := range want {
				if want[i] == nil {
					continue
				}
				if rel := relErr(got[i], want[i]); !(rel <= 2e-5) {
					t.Errorf("Rw=%d d=%d %s: output %d rel err %.3g", sc.Rw, sc.d, which, i, rel)
				}
			}
		}
	}
}

// downloadAll returns the contents of bufs (nil for a nil buffer) after
// checking be recorded no error.
func downloadAll(t *testing.T, be kernels.Backend[float32], bufs ...kernels.Buffer) [][]float32 {
	t.Helper()
	res := make([][]float32, len(bufs))
	for i, b := range bufs {
		if b != nil {
			res[i] = make([]float32, b.Len())
			be.Download(res[i], b)
		}
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
	return res
}

// relErr is max|got − want| / max|want| (NaN when got has a NaN).
func relErr(got, want []float32) float64 {
	var mx, md float64
	for i := range want {
		mx = max(mx, math.Abs(float64(want[i])))
		d := math.Abs(float64(got[i] - want[i]))
		if math.IsNaN(d) {
			return math.NaN()
		}
		md = max(md, d)
	}
	return md / max(mx, 1e-30)
}

// Timing cuBLASLt's candidates on a product's first call must leave the
// product computed once: an accumulating product is timed on a copy of its
// output. The choice is reported (Device.GemmTunings).
func TestGemmTuning(t *testing.T) {
	if Emulated {
		t.Skip("cuBLASLt algorithm tuning needs a GPU (the emulation multiplies in loops)")
	}
	d := openDevice(t, "bf16")
	be := d.NewBackend()
	const Rw, N, K = 2048, 384, 96 // a shape no other test uses: tuned here
	tb := newTestBufs(be, 9)
	xh, wh, preh := tb.host(Rw*K), tb.host(N*K), tb.host(Rw*N)
	for _, v := range [][]float32{xh, wh} {
		for i := range v {
			v[i] = kernels.RoundBF16(v[i]) // exact products: only the sum order differs
		}
	}
	x, w, out := be.Alloc(Rw*K), be.Alloc(N*K), be.Alloc(Rw*N)
	be.Upload(x, xh)
	be.Upload(w, wh)
	be.Upload(out, preh)
	be.MatMul(out, x, w, Rw, N, K, true)
	got := tb.get(out)
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
	bad := 0
	for r := range Rw {
		for n := range N {
			want := float64(preh[r*N+n])
			for k := range K {
				want += float64(xh[r*K+k]) * float64(wh[n*K+k])
			}
			if d := math.Abs(float64(got[r*N+n]) - want); d > 1e-4*(1+math.Abs(want)) {
				if bad < 3 {
					t.Errorf("out[%d,%d] = %g, want %g: the product was not added exactly once", r, n, got[r*N+n], want)
				}
				bad++
			}
		}
	}
	var seen *GemmTuning
	for _, tu := range d.GemmTunings() {
		if tu.M == N && tu.N == Rw && tu.K == K && tu.Accumulate {
			seen = &tu
		}
	}
	switch {
	case seen == nil:
		t.Errorf("no tuning reported for the %d×%d×%d product: %+v", N, Rw, K, d.GemmTunings())
	case seen.Candidates > 1 && seen.Note == "" && (seen.ChosenMs <= 0 || seen.ChosenMs > seen.HeuristicMs):
		t.Errorf("tuning %+v: the kept algorithm must be timed and no slower than the first guess", *seen)
	default:
		t.Logf("tuning of %d×%d×%d +=: %+v", N, Rw, K, *seen)
	}
}

// SiLUMatMulBackward's 16-byte paths (whole tiles of aligned rows, which
// the conformance suite's guarded views never are) against the CPU:
// writing a pending Zero, adding, dr aliasing dx, and a view at an odd
// offset that must take the scalar path.
func TestSiLUMatMulBackwardShapes(t *testing.T) {
	d := openDevice(t, "bf16")
	for _, sc := range []struct {
		name     string
		Rw, N, K int
		mode     string // "add", "zero" (dx pending a Zero), "own" (dr is dx)
		offset   int    // elements before each buffer's view
	}{
		{"tiles", 192, 80, 384, "add", 0},
		{"zero", 130, 48, 256, "zero", 0},
		{"own", 128, 32, 136, "own", 0},
		{"odd view", 128, 80, 256, "add", 1},
		{"last tile one row short", 127, 80, 256, "zero", 0},
	} {
		rng := rand.New(rand.NewPCG(uint64(sc.Rw), uint64(sc.K)))
		r := func(n int, bf bool) []float32 {
			v := make([]float32, n)
			for i := range v {
				v[i] = float32(rng.NormFloat64())
				if bf {
					v[i] = kernels.RoundBF16(v[i]) // exact products
				}
			}
			return v
		}
		x, dr, pre := r(sc.Rw*sc.K, false), r(sc.Rw*sc.K, false), r(sc.Rw*sc.K, false)
		dout, w := r(sc.Rw*sc.N, true), r(sc.N*sc.K, true)
		const guard = 4 * 128 // floats after dx: a row past its end
		var dxAll kernels.Buffer
		run := func(be kernels.Backend[float32]) [][]float32 {
			up := func(v []float32) kernels.Buffer {
				b := be.Slice(be.Alloc(len(v)+sc.offset), sc.offset, len(v))
				be.Upload(b, v)
				return b
			}
			dxAll = be.Alloc(sc.offset + len(pre) + guard)
			be.Upload(dxAll, make([]float32, sc.offset+len(pre)+guard))
			dx := be.Slice(dxAll, sc.offset, len(pre))
			be.Upload(dx, pre)
			drb := up(dr)
			switch sc.mode {
			case "zero":
				be.Zero(dx)
			case "own":
				drb = dx
			}
			be.SiLUMatMulBackward(dx, drb, up(dout), up(w), up(x), sc.Rw, sc.N, sc.K)
			return downloadAll(t, be, dx)
		}
		gbe := d.Backend()
		got := run(gbe)
		all := downloadAll(t, gbe, dxAll)[0]
		for i, v := range all[sc.offset+len(pre):] {
			if v != 0 {
				t.Errorf("%s: element %d past dx's end written: %g", sc.name, i, v)
				break
			}
		}
		want := run(cpu.New[float32]())
		if rel := relErr(got[0], want[0]); !(rel <= 1e-5) {
			t.Errorf("%s (%d×%d×%d): rel err %.3g", sc.name, sc.Rw, sc.N, sc.K, rel)
		}
	}
}

// Package kerneltest owns the conformance suite every kernels.Backend must
// pass: each op runs on seeded random inputs with odd shapes, outputs are
// passed as views with guard zones that must stay untouched, and results are
// compared with plain float64 implementations written here (naive.go).
// Backward ops are checked against central finite differences of those
// naive forwards, including the accumulate (+=) convention.
//
// The suite walks kernels.Contract: an op declared there without a test
// here or a row in Tolerances fails the suite. A "Contract" subtest calls
// every op with the lengths its contract wants, then with each argument
// wrong in turn, and checks that the backend accepts the first and reports
// the contract's own error for the others; an "Errors" subtest checks that
// bad data and shapes are recorded by Err rather than panicking. The suite
// never imports a backend; a backend's test calls Run (float32) or Run64
// (float64), and RunAsync for the optional kernels.AsyncCopier (async.go).
//
// The inputs are drawn from -kerneltest.seed (see seedFlag).
package kerneltest

import (
	"flag"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// seedFlag is the seed of the suite's random inputs. The default draws the
// same inputs on every run; 0 draws a new seed each run. The suite logs
// the seed it used (go test -v, or any failure), so that a failure can be
// replayed with -kerneltest.seed=N.
var seedFlag = flag.Uint64("kerneltest.seed", 20240611,
	"seed of the kernel conformance suite's random inputs; 0 draws a new one (logged either way)")

// runSeed returns the seed of one run of the suite.
func runSeed() uint64 {
	s := *seedFlag
	for s == 0 {
		s = rand.Uint64()
	}
	return s
}

// fdEps is the central-difference step on the float64 naive forwards.
const fdEps = 1e-6

// sentinel fills guard zones; any write into them shows up as a change.
const sentinel = -1234.5

const guardLen = 5

// Run runs the conformance suite against a float32 backend; newBackend is
// called once per subtest.
func Run(t *testing.T, newBackend func() kernels.Backend[float32]) {
	runSuite(t, newBackend, false)
}

// Run64 runs the same suite against a float64 backend with tight
// tolerances (the CPU backend's exactness check).
func Run64(t *testing.T, newBackend func() kernels.Backend[float64]) {
	runSuite(t, newBackend, true)
}

// runSuite runs one subtest per op of kernels.Contract, in its order.
func runSuite[F kernels.Float](t *testing.T, newBackend func() kernels.Backend[F], wide bool) {
	seed := runSeed()
	t.Logf("kerneltest: seed %d (replay with -kerneltest.seed=%d)", seed, seed)
	tests := map[string]func(*harness[F]){}
	for _, op := range suite[F]() {
		tests[op.name] = op.fn
	}
	for _, op := range kernels.Contract {
		t.Run(op.Method, func(t *testing.T) {
			fn, ok := tests[op.Method]
			if !ok {
				t.Fatalf("%s is in kernels.Contract but has no conformance test: add one to suite()", op.Method)
			}
			row, ok := kernels.Tolerances[op.Method]
			if !ok {
				t.Fatalf("%s is in kernels.Contract but has no row in kernels.Tolerances", op.Method)
			}
			tl := row.F32
			if wide {
				tl = row.F64
			}
			h := &harness[F]{
				t:   t,
				be:  newBackend(),
				rng: rand.New(rand.NewPCG(seed, uint64(len(op.Method)))),
				tol: tl,
			}
			if bt, ok := kernels.BF16Tolerances[op.Method]; ok && h.attnBF16() {
				h.tol = bt
			}
			fn(h)
			h.done()
		})
	}
	t.Run("Stale", func(t *testing.T) {
		for _, msg := range stale(suite[F]()) {
			t.Error(msg)
		}
	})
	t.Run("Contract", func(t *testing.T) { runContract(t, newBackend) })
	t.Run("Errors", func(t *testing.T) { runErrors(t, newBackend) })
}

// stale lists the tests and tolerance rows that name no op of
// kernels.Contract (a renamed or removed op left them behind).
func stale[F kernels.Float](tests []opTest[F]) []string {
	ops := map[string]bool{}
	for _, op := range kernels.Contract {
		ops[op.Method] = true
	}
	var msgs []string
	for _, tc := range tests {
		if !ops[tc.name] {
			msgs = append(msgs, fmt.Sprintf("conformance test %s tests no op of kernels.Contract", tc.name))
		}
	}
	rows := slices.Concat(slices.Sorted(maps.Keys(kernels.Tolerances)), slices.Sorted(maps.Keys(kernels.BF16Tolerances)))
	for _, name := range rows {
		if !ops[name] {
			msgs = append(msgs, fmt.Sprintf("tolerance row %s is for no op of kernels.Contract", name))
		}
	}
	return msgs
}

type guard struct {
	name  string
	whole kernels.Buffer
	n     int
}

// harness is the state of one subtest: the backend under test, the seeded
// generator and the guarded buffers to verify at the end.
type harness[F kernels.Float] struct {
	t      *testing.T
	be     kernels.Backend[F]
	rng    *rand.Rand
	tol    kernels.Tol
	guards []guard
}

// randn returns n normal values times scale, rounded to F so the naive
// reference sees exactly what the backend sees.
func (h *harness[F]) randn(n int, scale float64) []float64 {
	x := make([]float64, n)
	for i := range x {
		x[i] = float64(F(h.rng.NormFloat64() * scale))
	}
	return x
}

// mmIn returns n normal values for a matrix-product input, representable in
// bfloat16 when the backend rounds to it.
func (h *harness[F]) mmIn(n int) []float64 {
	x := h.randn(n, 1)
	if r, ok := h.be.(kernels.BF16MatMul); ok && r.MatMulBF16() {
		for i, v := range x {
			x[i] = float64(kernels.RoundBF16(float32(v)))
		}
	}
	return x
}

func (h *harness[F]) attnBF16() bool {
	r, ok := h.be.(kernels.BF16Attention)
	return ok && r.AttentionBF16()
}

// attnIn returns n normal values for an attention input, representable in
// bfloat16 when the backend's attention rounds to it.
func (h *harness[F]) attnIn(n int) []float64 {
	x := h.randn(n, 1)
	if h.attnBF16() {
		for i, v := range x {
			x[i] = float64(kernels.RoundBF16(float32(v)))
		}
	}
	return x
}

func (h *harness[F]) uniform(n int, lo, hi float64) []float64 {
	x := make([]float64, n)
	for i := range x {
		x[i] = float64(F(lo + (hi-lo)*h.rng.Float64()))
	}
	return x
}

// buf returns a view of len(data) elements holding data, inside an
// allocation whose guard zones (and nothing else) hold sentinel.
func (h *harness[F]) buf(name string, data []float64) kernels.Buffer {
	n := len(data)
	whole := h.be.Alloc(n + 2*guardLen)
	fill := make([]F, n+2*guardLen)
	for i := range fill {
		fill[i] = sentinel
	}
	for i, v := range data {
		fill[guardLen+i] = F(v)
	}
	h.be.Upload(whole, fill)
	h.guards = append(h.guards, guard{name, whole, n})
	return h.be.Slice(whole, guardLen, n)
}

// out returns a guarded output view pre-filled with sentinel, so an
// element the op forgets to write fails the comparison.
func (h *harness[F]) out(name string, n int) kernels.Buffer {
	d := make([]float64, n)
	for i := range d {
		d[i] = sentinel
	}
	return h.buf(name, d)
}

func (h *harness[F]) ints(data []int32) kernels.IntBuffer {
	b := h.be.AllocInt(len(data))
	h.be.UploadInt(b, data)
	return b
}

func (h *harness[F]) load(b kernels.Buffer) []float64 {
	tmp := make([]F, b.Len())
	h.be.Download(tmp, b)
	out := make([]float64, len(tmp))
	for i, v := range tmp {
		out[i] = float64(v)
	}
	return out
}

// done checks every guard zone and that the backend recorded no error.
func (h *harness[F]) done() {
	h.t.Helper()
	for _, g := range h.guards {
		all := h.load(g.whole)
		for i, v := range all {
			if (i < guardLen || i >= guardLen+g.n) && v != sentinel {
				h.t.Errorf("%s: guard element %d of %d-element view overwritten: %v", g.name, i-guardLen, g.n, v)
				break
			}
		}
	}
	if err := h.be.Err(); err != nil {
		h.t.Errorf("backend error: %v", err)
	}
}

// near compares got with want under the subtest's tolerance and reports at
// most a few mismatches.
func (h *harness[F]) near(name string, got, want []float64) {
	h.t.Helper()
	if len(got) != len(want) {
		h.t.Errorf("%s: got %d elements, want %d", name, len(got), len(want))
		return
	}
	bad := 0
	for i := range got {
		d := math.Abs(got[i] - want[i])
		if !(d <= h.tol.Abs+h.tol.Rel*math.Abs(want[i])) {
			if bad < 4 {
				h.t.Errorf("%s[%d] = %.10g, want %.10g (diff %.3g)", name, i, got[i], want[i], d)
			}
			bad++
		}
	}
	if bad > 4 {
		h.t.Errorf("%s: %d of %d elements out of tolerance", name, bad, len(got))
	}
}

// grad checks one accumulated gradient: buffer g was pre-filled with pre,
// and must now hold pre + ∂L/∂x, L = Σ dout⊙fwd(), estimated by central
// differences over x (which fwd reads).
func (h *harness[F]) grad(name string, g kernels.Buffer, pre []float64, x, dout []float64, fwd func() []float64) {
	h.t.Helper()
	got := h.load(g)
	for i := range got {
		got[i] -= pre[i]
	}
	h.near("d"+name, got, fd(x, dout, fwd))
}

// fd estimates ∂(Σ dout⊙fwd())/∂x by central differences.
func fd(x, dout []float64, fwd func() []float64) []float64 {
	loss := func() float64 {
		var s float64
		for i, v := range fwd() {
			s += dout[i] * v
		}
		return s
	}
	g := make([]float64, len(x))
	for i := range x {
		old := x[i]
		x[i] = old + fdEps
		lp := loss()
		x[i] = old - fdEps
		lm := loss()
		x[i] = old
		g[i] = (lp - lm) / (2 * fdEps)
	}
	return g
}

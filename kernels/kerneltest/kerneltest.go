// Package kerneltest owns the conformance suite every kernels.Backend must
// pass: each op runs on seeded random inputs with odd shapes, outputs are
// passed as views with guard zones that must stay untouched, and results are
// compared with plain float64 implementations written here (naive.go).
// Backward ops are checked against central finite differences of those
// naive forwards, including the accumulate (+=) convention.
//
// A final "Errors" subtest checks that bad shapes are recorded by Err
// rather than panicking. The suite never imports a backend; a backend's
// test calls Run (float32) or Run64 (float64).
package kerneltest

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// tol is a mixed tolerance: |got−want| ≤ abs + rel·|want|.
type tol struct {
	abs, rel float64
}

// tolerance is one row of the table: float32 and float64 tolerances of an op
// and why they are what they are.
type tolerance struct {
	f32, f64 tol
	why      string
}

// tolerances is the single tolerance table of the suite, keyed by subtest
// (op) name. Backward entries compare against finite differences (step
// fdEps in float64), whose own error is ~1e-9 and bounds the float64 rows.
var tolerances = map[string]tolerance{
	"Zero":                  {tol{0, 0}, tol{0, 0}, "exact"},
	"Copy":                  {tol{0, 0}, tol{0, 0}, "exact"},
	"CopyColumns":           {tol{0, 0}, tol{0, 0}, "exact"},
	"MatMulAdd":             {tol{1e-5, 1e-5}, tol{1e-12, 1e-12}, "MatMul's: dot products of up to 129 terms, one add"},
	"Accumulate":            {tol{0, 0}, tol{0, 0}, "one rounded add, reproduced by the reference"},
	"Scale":                 {tol{0, 1.2e-7}, tol{0, 2.3e-16}, "one rounding; s may be rounded to F first or not (1 ulp)"},
	"Slice":                 {tol{0, 0}, tol{0, 0}, "views and round trips are exact"},
	"SumSquares":            {tol{0, 1e-12}, tol{0, 1e-12}, "float64 accumulation; only summation order differs"},
	"Embedding":             {tol{0, 0}, tol{0, 0}, "a gather is exact"},
	"EmbeddingBackward":     {tol{1e-6, 1e-5}, tol{1e-8, 1e-7}, "finite differences of a linear map; float32 sums of a few terms"},
	"RMSNorm":               {tol{1e-6, 1e-5}, tol{1e-13, 1e-12}, "float64 reduction, one float32 rounding of out"},
	"RMSNormBackward":       {tol{1e-5, 1e-4}, tol{1e-7, 1e-6}, "finite differences; rstd is stored in F"},
	"MatMul":                {tol{1e-5, 1e-5}, tol{1e-12, 1e-12}, "float32 dot products of up to 129 terms"},
	"MatMulBackward":        {tol{1e-5, 1e-4}, tol{1e-7, 1e-6}, "finite differences of a bilinear map"},
	"Conv1d":                {tol{1e-6, 1e-5}, tol{1e-13, 1e-12}, "float32 sums of K+1 terms"},
	"Conv1dBackward":        {tol{1e-5, 1e-4}, tol{1e-7, 1e-6}, "finite differences; float32 accumulation over B·T"},
	"SiLU":                  {tol{1e-7, 1e-6}, tol{1e-15, 1e-14}, "float64 math, one float32 rounding"},
	"SiLUBackward":          {tol{1e-6, 1e-5}, tol{1e-8, 1e-7}, "finite differences"},
	"SiLUMatMulBackward":    {tol{1e-5, 1e-4}, tol{1e-12, 1e-11}, "float32 dot products of up to 80 terms, then SiLUBackward's float64 factor"},
	"SelectiveScan":         {tol{1e-5, 1e-5}, tol{1e-12, 1e-11}, "float64 state; error is the float32 rounding of inputs and out"},
	"SelectiveScanBackward": {tol{1e-4, 1e-3}, tol{1e-7, 1e-6}, "finite differences through T exponentials and products"},
	"RoPE":                  {tol{1e-6, 1e-5}, tol{1e-13, 1e-12}, "float64 angles, one float32 rounding"},
	"RoPEBackward":          {tol{1e-5, 1e-4}, tol{1e-7, 1e-6}, "finite differences of a rotation"},
	"Attention":             {tol{2e-5, 1e-4}, tol{1e-12, 1e-11}, "float32 dot products; LSE merge vs one softmax differs by rounding only"},
	"AttentionBackward":     {tol{1e-4, 1e-3}, tol{1e-7, 1e-6}, "finite differences of softmax; float32 scores and probabilities"},
	"ShiftRows":             {tol{0, 0}, tol{0, 0}, "a copy is exact"},
	"Innovation":            {tol{1e-6, 1e-5}, tol{1e-13, 1e-12}, "float64 mean of squares, one float32 rounding"},
	"InnovationBackward":    {tol{1e-5, 1e-4}, tol{1e-7, 1e-6}, "finite differences of a quadratic"},
	"SelectChunks":          {tol{0, 0}, tol{0, 0}, "selection is discrete"},
	"SwiGLU":                {tol{1e-6, 1e-5}, tol{1e-14, 1e-13}, "float64 math, one float32 rounding"},
	"SwiGLUBackward":        {tol{1e-5, 1e-4}, tol{1e-8, 1e-7}, "finite differences"},
	"CrossEntropy":          {tol{1e-5, 1e-5}, tol{1e-12, 1e-12}, "float64 log-sum-exp, one float32 rounding"},
	"CrossEntropyBackward":  {tol{1e-5, 1e-4}, tol{1e-7, 1e-6}, "finite differences of log-sum-exp"},
	"AdamWStep":             {tol{1e-6, 1e-5}, tol{1e-14, 1e-13}, "float64 update; moments stored in F between steps"},
}

// bf16Tolerances replace the float32 rows of the attention ops on a backend
// whose attention runs its matrix products on bf16 tensor cores
// (BF16Attention). Its inputs are then drawn bf16-representable, so Q·Kᵀ and
// dO·Vᵀ are exact, but the probabilities P and score gradients dS are
// rounded to bf16 (relative error ≤ 2⁻⁹) as operands of P·V, Pᵀ·dO, dS·K and
// dSᵀ·Q. A wrong fragment index or mask shows up as errors of order 1.
var bf16Tolerances = map[string]tol{
	"Attention":         {3e-3, 3e-3},
	"AttentionBackward": {1e-2, 1e-2},
}

// seed makes every run draw the same inputs.
const seed = 20240611

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
// tolerances (the CPU reference's exactness check).
func Run64(t *testing.T, newBackend func() kernels.Backend[float64]) {
	runSuite(t, newBackend, true)
}

func runSuite[F kernels.Float](t *testing.T, newBackend func() kernels.Backend[F], wide bool) {
	for _, op := range suite[F]() {
		t.Run(op.name, func(t *testing.T) {
			row, ok := tolerances[op.name]
			if !ok {
				t.Fatalf("no tolerance entry for %s", op.name)
			}
			tl := row.f32
			if wide {
				tl = row.f64
			}
			h := &harness[F]{
				t:   t,
				be:  newBackend(),
				rng: rand.New(rand.NewPCG(seed, uint64(len(op.name)))),
				tol: tl,
			}
			if bt, ok := bf16Tolerances[op.name]; ok && h.attnBF16() {
				h.tol = bt
			}
			op.fn(h)
			h.done()
		})
	}
	t.Run("Errors", func(t *testing.T) { runErrors(t, newBackend) })
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
	tol    tol
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

// BF16MatMul is implemented by backends whose matrix products round their
// inputs to bfloat16 (tensor cores) and accumulate in float32. The suite
// then draws matrix-product inputs that bfloat16 represents exactly, so the
// products are exact and the float32 tolerance still holds; the effect of
// the rounding itself is checked at model level (model.md §5).
type BF16MatMul interface{ MatMulBF16() bool }

// mmIn returns n normal values for a matrix-product input, representable in
// bfloat16 when the backend rounds to it.
func (h *harness[F]) mmIn(n int) []float64 {
	x := h.randn(n, 1)
	if r, ok := h.be.(BF16MatMul); ok && r.MatMulBF16() {
		for i, v := range x {
			x[i] = float64(kernels.RoundBF16(float32(v)))
		}
	}
	return x
}

// BF16Attention is implemented by backends whose attention rounds the
// operands of its matrix products to bfloat16 and accumulates in float32
// (flash-attention on tensor cores). The suite then draws attention inputs
// that bfloat16 represents exactly and compares with bf16Tolerances.
type BF16Attention interface{ AttentionBF16() bool }

func (h *harness[F]) attnBF16() bool {
	r, ok := h.be.(BF16Attention)
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
		if !(d <= h.tol.abs+h.tol.rel*math.Abs(want[i])) {
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

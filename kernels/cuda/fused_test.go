//go:build cuda

package cuda

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// The fused ops against the unfused ops they replace, on the same device:
// the same float arithmetic in the same order, so the results must be
// identical, not just within tolerance (docs/kernels.md).

// TestAdamWStepsMatchesAdamWStep: one launch over every segment gives
// exactly what one AdamWStep per segment gives, over several steps (with
// and without gradient scaling), leaving the gaps between segments alone.
func TestAdamWStepsMatchesAdamWStep(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	tb := newTestBufs(be, 11)
	const n = 3*adamWTile + 517
	segs := []kernels.AdamWSegment{
		{Off: 0, N: 7, WeightDecay: 0},
		{Off: 7, N: 2*adamWTile + 1, WeightDecay: 0.1}, // three tiles
		{Off: 2*adamWTile + 20, N: 300, WeightDecay: 0},
		{Off: 2*adamWTile + 320, N: n - (2*adamWTile + 320), WeightDecay: 0.05},
	}
	init := [4][]float32{tb.host(n), tb.host(n), tb.host(n), tb.host(n)} // param, grad, m, v
	for i := range init[3] {
		init[3][i] *= init[3][i] // v ≥ 0
	}
	load := func() (p, g, m, v kernels.Buffer) {
		bufs := [4]kernels.Buffer{}
		for i := range bufs {
			bufs[i] = be.Alloc(n)
			be.Upload(bufs[i], init[i])
		}
		return bufs[0], bufs[1], bufs[2], bufs[3]
	}
	p1, g1, m1, v1 := load()
	p2, g2, m2, v2 := load()
	for step := 1; step <= 3; step++ {
		h := kernels.AdamW{LR: 3e-3, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, Step: step}
		if step == 2 {
			h.GradScale = 0.3
		}
		be.AdamWSteps(p1, g1, m1, v1, segs, h)
		for _, s := range segs {
			hs := h
			hs.WeightDecay = s.WeightDecay
			sl := func(b kernels.Buffer) kernels.Buffer { return be.Slice(b, s.Off, s.N) }
			be.AdamWStep(sl(p2), sl(g2), sl(m2), sl(v2), hs)
		}
	}
	for i, pair := range [][2]kernels.Buffer{{p1, p2}, {m1, m2}, {v1, v2}, {g1, g2}} {
		tb.same(t, []string{"param", "m", "v", "grad"}[i], pair[0], pair[1])
	}
	gap := tb.get(be.Slice(p1, 2*adamWTile+8, 12))
	for i, x := range gap {
		if x != init[0][2*adamWTile+8+i] {
			t.Fatalf("element %d between segments changed: %v, was %v", 2*adamWTile+8+i, x, init[0][2*adamWTile+8+i])
		}
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestAdamWStepsWritesWeightCopies: AdamWSteps writes the bf16 copies the
// products keep of weights inside the flat parameter buffer, so the next
// products convert none of them, and read the updated values; a weight
// across two segments is left to its product to convert.
func TestAdamWStepsWritesWeightCopies(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	tb := newTestBufs(be, 14)
	const Rw, K = 19, 32
	n := 4*K*K + 2*adamWTile + 40 // four K×K weights, one spanning tiles
	flat, grad, m, v := tb.up(n), tb.up(n), be.Alloc(n), be.Alloc(n)
	segs := []kernels.AdamWSegment{{Off: 0, N: 2 * K * K, WeightDecay: 0.1}, {Off: 2 * K * K, N: n - 2*K*K}}
	ws := []kernels.Buffer{
		be.Slice(flat, 5, K*K),           // inside segment 0
		be.Slice(flat, 2*K*K-K*K/2, K*K), // across the segments: converted by its product
		be.Slice(flat, 2*K*K+3, K*K),     // inside segment 1
		be.Slice(flat, n-K*K, K*K),       // segment 1's end
	}
	x := tb.up(Rw * K)
	outs, refs := make([]kernels.Buffer, len(ws)), make([]kernels.Buffer, len(ws))
	for i := range ws {
		outs[i], refs[i] = be.Alloc(Rw*K), be.Alloc(Rw*K)
		be.MatMul(outs[i], x, ws[i], Rw, K, K, false) // the products keep copies of x and the weights
	}
	for step := 1; step <= 2; step++ {
		be.AdamWSteps(flat, grad, m, v, segs, kernels.AdamW{LR: 0.05, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, Step: step})
		c0 := be.InputCopies().Conversions
		for i := range ws {
			be.MatMul(outs[i], x, ws[i], Rw, K, K, false)
		}
		if got := be.InputCopies().Conversions - c0; got != 1 {
			t.Errorf("step %d: the products converted %d weights, want 1 (the one across two segments)", step, got)
		}
		be.ForgetInputCopies()
		for i := range ws {
			be.MatMul(refs[i], x, ws[i], Rw, K, K, false)
			tb.same(t, "a product after AdamWSteps (a stale or wrong copy?)", outs[i], refs[i])
		}
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestConv1dSiLUMatchesUnfused: out is Conv1d's and act SiLU's of it, bit
// for bit, at every conv window instance (K = 4, 7, 16, 32).
func TestConv1dSiLUMatchesUnfused(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	tb := newTestBufs(be, 12)
	for _, K := range []int{4, 7, 16, 32} {
		const B, T, E = 2, 37, 300
		x, w, bias := tb.up(B*T*E), tb.up(E*K), tb.up(E)
		out, act, ref, refAct := be.Alloc(B*T*E), be.Alloc(B*T*E), be.Alloc(B*T*E), be.Alloc(B*T*E)
		be.Conv1dSiLU(out, act, x, w, bias, B, T, E, K)
		be.Conv1d(ref, x, w, bias, B, T, E, K)
		be.SiLU(refAct, ref)
		tb.same(t, "out", out, ref)
		tb.same(t, "act", act, refAct)
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestSwiGLUPackedMatchesUnfused: the packed forward and backward give
// SwiGLU's and SwiGLUBackward's values on the halves, bit for bit, with
// the backward accumulating and, after a Zero, overwriting.
func TestSwiGLUPackedMatchesUnfused(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	tb := newTestBufs(be, 13)
	for _, c := range []struct{ Rw, F int }{{37, 300}, {5, 7}, {64, 256}} {
		Rw, F := c.Rw, c.F
		gu, dh, pre := tb.up(2*Rw*F), tb.up(Rw*F), tb.up(2*Rw*F)
		gate, up := be.Alloc(Rw*F), be.Alloc(Rw*F)
		be.CopyColumns(gate, gu, Rw, F, F, 0, 2*F, 0)
		be.CopyColumns(up, gu, Rw, F, F, 0, 2*F, F)
		h, ref := be.Alloc(Rw*F), be.Alloc(Rw*F)
		be.SwiGLUPacked(h, gu, Rw, F)
		be.SwiGLU(ref, gate, up)
		tb.same(t, "h", h, ref)

		for _, zero := range []bool{false, true} {
			dgu, dgate, dup := be.Alloc(2*Rw*F), be.Alloc(Rw*F), be.Alloc(Rw*F)
			be.Copy(dgu, pre)
			be.CopyColumns(dgate, pre, Rw, F, F, 0, 2*F, 0)
			be.CopyColumns(dup, pre, Rw, F, F, 0, 2*F, F)
			if zero {
				be.Zero(dgu)
				be.Zero(dgate)
				be.Zero(dup)
			}
			be.SwiGLUPackedBackward(dgu, dh, gu, Rw, F)
			be.SwiGLUBackward(dgate, dup, dh, gate, up)
			joined := be.Alloc(2 * Rw * F)
			be.CopyColumns(joined, dgate, Rw, F, 2*F, 0, F, 0)
			be.CopyColumns(joined, dup, Rw, F, 2*F, F, F, 0)
			tb.same(t, "dgu", dgu, joined)
		}
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

//go:build cuda

package cuda

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// TestAttentionTensorCores checks the tensor-core attention (bf16 device)
// against the fp32 CUDA-core kernels (fp32 device) at head dims and lengths
// the conformance suite does not reach: D = 64, 40, 17, several key tiles,
// fading and memory keys, repeated memory positions and offset views.
func TestAttentionTensorCores(t *testing.T) {
	tc, ref := openDevice(t, "bf16").Backend(), openDevice(t, "fp32").Backend()
	cases := []struct {
		name string
		s    kernels.AttnShape
		dup  bool
		off  int
	}{
		{"d64_all", kernels.AttnShape{B: 2, T: 300, H: 4, G: 2, D: 64, Wc: 70, Wf: 50, C: 40, S: 5, M: 12, Delta: 3}, false, 0},
		{"d40_mem_dup", kernels.AttnShape{B: 1, T: 257, H: 3, G: 1, D: 40, Wc: 100, Wf: 0, C: 64, S: 8, M: 40, Delta: 1}, true, 0},
		{"d17_causal_off", kernels.AttnShape{B: 1, T: 200, H: 2, G: 2, D: 17, Wc: 200, Wf: 0}, false, 3},
		{"d64_off", kernels.AttnShape{B: 1, T: 190, H: 2, G: 1, D: 64, Wc: 64, Wf: 64, C: 32, S: 4, M: 20, Delta: 2}, false, 1},
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range cases {
		s := c.s
		nq, nk := s.B*s.T*s.H*s.D, s.B*s.T*s.G*s.D
		rnd := func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = kernels.RoundBF16(float32(rng.NormFloat64() * 1.5))
			}
			return x
		}
		q, k, v, kf, vf, qm, km, dout := rnd(nq), rnd(nk), rnd(nk), rnd(nk), rnd(nk), rnd(nq), rnd(nk), rnd(nq)
		var sel []int32
		if s.M > 0 {
			nC := s.T / s.C
			for b := 0; b < s.B; b++ {
				for ch := 0; ch < nC; ch++ {
					p := make([]int32, s.S)
					for i := range p {
						p[i] = int32(ch*s.C + rng.IntN(s.C))
						if !c.dup {
							p[i] = int32(ch*s.C + i*s.C/s.S + rng.IntN(s.C/s.S))
						}
					}
					if rng.IntN(4) == 0 {
						p[0] = -1
					}
					sel = append(sel, p...)
				}
			}
		}
		run := func(be kernels.Backend[float32]) map[string][]float32 {
			up := func(x []float32) kernels.Buffer {
				w := be.Alloc(len(x) + c.off)
				v := be.Slice(w, c.off, len(x))
				be.Upload(v, x)
				return v
			}
			Q, K, V := up(q), up(k), up(v)
			var KF, VF, QM, KM kernels.Buffer
			if s.Wf > 0 {
				KF, VF = up(kf), up(vf)
			}
			var SEL kernels.IntBuffer
			if s.M > 0 {
				QM, KM = up(qm), up(km)
				SEL = be.AllocInt(len(sel))
				be.UploadInt(SEL, sel)
			}
			O, L := be.Alloc(nq), be.Alloc(s.B*s.T*s.H)
			be.Attention(O, L, Q, K, V, KF, VF, QM, KM, SEL, s)
			z := func(n int) kernels.Buffer { b := be.Alloc(n); be.Zero(b); return b }
			dq, dk, dv := z(nq), z(nk), z(nk)
			var dkf, dvf, dqm, dkm kernels.Buffer
			if s.Wf > 0 {
				dkf, dvf = z(nk), z(nk)
			}
			if s.M > 0 {
				dqm, dkm = z(nq), z(nk)
			}
			be.AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, up(dout), O, L, Q, K, V, KF, VF, QM, KM, SEL, s)
			if err := be.Err(); err != nil {
				t.Fatal(err)
			}
			res := map[string][]float32{}
			for name, b := range map[string]kernels.Buffer{"out": O, "lse": L, "dq": dq, "dk": dk, "dv": dv, "dkf": dkf, "dvf": dvf, "dqm": dqm, "dkm": dkm} {
				if b == nil {
					continue
				}
				x := make([]float32, b.Len())
				be.Download(x, b)
				res[name] = x
			}
			return res
		}
		a, r := run(tc), run(ref)
		for name, x := range r {
			y := a[name]
			worst, wi := 0.0, 0
			for i := range x {
				d := math.Abs(float64(y[i]-x[i])) / (1 + math.Abs(float64(x[i])))
				if !(d <= worst) {
					worst, wi = d, i
				}
			}
			var xy, xx, yy float64
			for i := range x {
				xy += float64(x[i]) * float64(y[i])
				xx += float64(x[i]) * float64(x[i])
				yy += float64(y[i]) * float64(y[i])
			}
			t.Logf("%s %s worst %.3g at %d (%v vs %v) cos %.6f", c.name, name, worst, wi, y[wi], x[wi], xy/math.Sqrt(xx*yy))
			if !(worst < 2e-2) {
				t.Errorf("%s %s worst %.3g", c.name, name, worst)
			}
		}
	}
}

// TestAttentionKeptCopies: the tensor-core attention reads the kept bf16
// copies of q, k, v (shadow.go) when D needs no padding; after RoPE rewrites
// k (and writes its copy) and Scale rewrites v (dropping its copy), both
// passes compute what fresh buffers give.
func TestAttentionKeptCopies(t *testing.T) {
	be := openDevice(t, "bf16").NewBackend()
	s := kernels.AttnShape{B: 1, T: 150, H: 2, G: 1, D: 64, Wc: 48, Wf: 32}
	nq, nk := s.B*s.T*s.H*s.D, s.B*s.T*s.G*s.D
	tb := newTestBufs(be, 11)
	up, get := tb.up, tb.get
	q, k0, k, v, kf, vf, dout := up(nq), up(nk), up(nk), up(nk), up(nk), up(nk), up(nq)
	o, l := be.Alloc(nq), be.Alloc(s.B*s.T*s.H)
	w, p1, p2 := up(s.H*s.D*s.H*s.D), be.Alloc(nq), be.Alloc(nq)
	rows, hd := s.B*s.T, s.H*s.D
	pass := func(q, k, v, kf, vf kernels.Buffer) [][]float32 {
		be.Attention(o, l, q, k, v, kf, vf, nil, nil, nil, s)
		be.MatMul(p1, o, w, rows, hd, hd, false) // o's copy: written by Attention after the first pass
		dq, dk, dv, dkf, dvf := be.Alloc(nq), be.Alloc(nk), be.Alloc(nk), be.Alloc(nk), be.Alloc(nk)
		be.AttentionBackward(dq, dk, dv, dkf, dvf, nil, nil, dout, o, l, q, k, v, kf, vf, nil, nil, nil, s)
		return [][]float32{get(o), get(dq), get(dk), get(dv), get(dkf)}
	}
	pass(q, k, v, kf, vf) // makes the copies
	be.RoPE(k, k0, s.B, s.T, s.G, s.D, 1e4)
	be.Scale(v, 0.5)
	c0 := be.InputCopies().Conversions
	got := pass(q, k, v, kf, vf)
	if n := be.InputCopies().Conversions - c0; n != 1 {
		t.Errorf("the second pass converted %d inputs, want 1 (v; RoPE and Attention write the others' copies)", n)
	}
	be.ForgetInputCopies()
	be.MatMul(p2, o, w, rows, hd, hd, false)
	tb.same(t, "product of the attention output (a stale copy?)", p1, p2)
	fresh := func(x kernels.Buffer) kernels.Buffer { y := be.Alloc(x.Len()); be.Copy(y, x); return y }
	want := pass(fresh(q), fresh(k), fresh(v), fresh(kf), fresh(vf))
	for i, name := range []string{"out", "dq", "dk", "dv", "dkf"} {
		for j := range got[i] {
			if got[i][j] != want[i][j] {
				t.Fatalf("%s: element %d is %v, want %v (a stale copy)", name, j, got[i][j], want[i][j])
			}
		}
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestAttentionBackwardDeferredZero: gradients pending a Zero are
// overwritten by the launches that write them whole (dq, the context dk, dv
// and the fading dkf, dvf) and zeroed for the rest, including the memory
// gradients as views of dq and dk (the model's layout) and as their own
// buffers. Each case must give exactly what freshly allocated zeros give.
func TestAttentionBackwardDeferredZero(t *testing.T) {
	for _, mode := range []string{"bf16", "fp32"} {
		be := openDevice(t, mode).NewBackend()
		s := kernels.AttnShape{B: 2, T: 160, H: 2, G: 1, D: 64, Wc: 40, Wf: 24, C: 32, S: 4, M: 12, Delta: 1}
		nq, nk := s.B*s.T*s.H*s.D, s.B*s.T*s.G*s.D
		tb := newTestBufs(be, 13)
		up, get := tb.up, tb.get
		q, k, v, kf, vf, qm, km, dout := up(nq), up(nk), up(nk), up(nk), up(nk), up(nq), up(nk), up(nq)
		var sel []int32
		for b := 0; b < s.B; b++ {
			for ch := 0; ch < s.T/s.C; ch++ {
				for i := 0; i < s.S; i++ {
					sel = append(sel, int32(ch*s.C+i*s.C/s.S+tb.rng.IntN(s.C/s.S)))
				}
			}
		}
		SEL := be.AllocInt(len(sel))
		be.UploadInt(SEL, sel)
		o, l := be.Alloc(nq), be.Alloc(s.B*s.T*s.H)
		be.Attention(o, l, q, k, v, kf, vf, qm, km, SEL, s)
		names := []string{"dq", "dk", "dv", "dkf", "dvf", "dqm", "dkm"}
		// grads: dq, dk, dv, dkf, dvf, dqm, dkm; alias: the memory ones are dq, dk.
		run := func(zeroed, alias bool, which int) [][]float32 {
			g := []kernels.Buffer{up(nq), up(nk), up(nk), up(nk), up(nk), up(nq), up(nk)}
			for i, x := range g {
				if which >= 0 && i != which {
					g[i] = nil
				} else if zeroed {
					be.Zero(x)
				} else {
					g[i] = be.Alloc(x.Len())
				}
			}
			if alias {
				g[5], g[6] = g[0], g[1]
			}
			be.AttentionBackward(g[0], g[1], g[2], g[3], g[4], g[5], g[6], dout, o, l, q, k, v, kf, vf, qm, km, SEL, s)
			out := make([][]float32, len(g))
			for i, x := range g {
				if x != nil {
					out[i] = get(x)
				}
			}
			return out
		}
		for _, alias := range []bool{true, false} {
			for which := -1; which < len(names); which++ {
				if alias && which >= 5 {
					continue
				}
				got, want := run(true, alias, which), run(false, alias, which)
				for i := range got {
					for j := range got[i] {
						if got[i][j] != want[i][j] {
							t.Fatalf("%s, alias %v, only %d: %s element %d is %v, want %v", mode, alias, which, names[i], j, got[i][j], want[i][j])
						}
					}
				}
			}
		}
		if err := be.Err(); err != nil {
			t.Fatal(err)
		}
	}
}

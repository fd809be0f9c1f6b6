package cpu_test

import (
	"math"
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
)

// parallelCase runs one op on shapes large enough to take the parallel
// paths (the conformance suite's odd shapes mostly run inline) and returns
// every buffer it wrote.
type parallelCase struct {
	name string
	run  func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer
}

// bufs makes seeded random buffers so both runs of a case see equal inputs.
type bufs struct {
	be  *cpu.Backend[float32]
	rng *rand.Rand
}

func (r *bufs) f(n int, scale float64) kernels.Buffer { return randBuf(r.be, r.rng, n, scale) }

func (r *bufs) i(n, hi int) kernels.IntBuffer {
	v := make([]int32, n)
	for j := range v {
		v[j] = int32(r.rng.IntN(hi))
	}
	b := r.be.AllocInt(n)
	r.be.UploadInt(b, v)
	return b
}

var parallelCases = []parallelCase{
	{"Accumulate/Scale", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		x, y := r.f(100003, 1), r.f(100003, 1)
		be.Accumulate(x, y)
		be.Scale(x, 0.3)
		s := be.Alloc(1)
		be.Upload(s, []float32{float32(be.SumSquares(x))})
		return []kernels.Buffer{x, s}
	}},
	{"Embedding", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		tok, tab, out, dtab := r.i(512, 50), r.f(50*64, 1), be.Alloc(512*64), r.f(50*64, 1)
		be.Embedding(out, tab, tok, 512, 64)
		be.EmbeddingBackward(dtab, r.f(512*64, 1), tok, 512, 64)
		return []kernels.Buffer{out, dtab}
	}},
	{"RMSNorm", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		x, g, out, rstd := r.f(512*64, 1), r.f(64, 1), be.Alloc(512*64), be.Alloc(512)
		be.RMSNorm(out, rstd, x, g, 512, 64)
		dx, dg := r.f(512*64, 1), r.f(64, 1)
		be.RMSNormBackward(dx, dg, r.f(512*64, 1), x, g, rstd, 512, 64)
		return []kernels.Buffer{out, rstd, dx, dg}
	}},
	{"MatMul", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		x, w, out := r.f(300*96, 1), r.f(130*96, 1), r.f(300*130, 1)
		be.MatMul(out, x, w, 300, 130, 96, true)
		dx, dw := r.f(300*96, 1), r.f(130*96, 1)
		be.MatMulBackward(dx, dw, r.f(300*130, 1), x, w, 300, 130, 96)
		return []kernels.Buffer{out, dx, dw}
	}},
	{"Conv1d", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		const B, T, E, K = 2, 256, 64, 4
		x, w, bias, out := r.f(B*T*E, 1), r.f(E*K, 1), r.f(E, 1), be.Alloc(B*T*E)
		be.Conv1d(out, x, w, bias, B, T, E, K)
		dx, dw, db := r.f(B*T*E, 1), r.f(E*K, 1), r.f(E, 1)
		be.Conv1dBackward(dx, dw, db, r.f(B*T*E, 1), x, w, B, T, E, K)
		return []kernels.Buffer{out, dx, dw, db}
	}},
	{"Elementwise", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		const n = 50000
		x, u, o1, o2, d1, d2, d3 := r.f(n, 2), r.f(n, 1), be.Alloc(n), be.Alloc(n), r.f(n, 1), r.f(n, 1), r.f(n, 1)
		be.SiLU(o1, x)
		be.SiLUBackward(d1, u, x)
		be.SwiGLU(o2, x, u)
		be.SwiGLUBackward(d2, d3, r.f(n, 1), x, u)
		return []kernels.Buffer{o1, o2, d1, d2, d3}
	}},
	{"SelectiveScan", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		const B, T, E, N = 2, 64, 40, 8
		x, dt, dtb, alog := r.f(B*T*E, 1), r.f(B*T*E, 0.5), r.f(E, 1), r.f(E*N, 0.5)
		bm, cm, dsk, z, out := r.f(B*T*N, 1), r.f(B*T*N, 1), r.f(E, 1), r.f(B*T*E, 1), be.Alloc(B*T*E)
		be.SelectiveScan(out, x, dt, dtb, alog, bm, cm, dsk, z, B, T, E, N)
		g := []kernels.Buffer{r.f(B*T*E, 1), r.f(B*T*E, 1), r.f(E, 1), r.f(E*N, 1), r.f(B*T*N, 1), r.f(B*T*N, 1), r.f(E, 1), r.f(B*T*E, 1)}
		be.SelectiveScanBackward(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], r.f(B*T*E, 1), x, dt, dtb, alog, bm, cm, dsk, z, B, T, E, N)
		return append(g, out)
	}},
	{"RoPE", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		const n = 2 * 64 * 4 * 16
		out, dx := be.Alloc(n), r.f(n, 1)
		be.RoPE(out, r.f(n, 1), 2, 64, 4, 16, 10000)
		be.RoPEBackward(dx, r.f(n, 1), 2, 64, 4, 16, 10000)
		return []kernels.Buffer{out, dx}
	}},
	{"Attention", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		s := kernels.AttnShape{B: 2, T: 64, H: 4, G: 2, D: 16, Wc: 16, Wf: 8, C: 8, S: 2, M: 6, Delta: 2}
		nq, nk := s.B*s.T*s.H*s.D, s.B*s.T*s.G*s.D
		q, k, v, kf, vf, qm, km := r.f(nq, 1), r.f(nk, 1), r.f(nk, 1), r.f(nk, 1), r.f(nk, 1), r.f(nq, 1), r.f(nk, 1)
		sel := r.i(s.B*(s.T/s.C)*s.S, s.C) // positions inside chunk 0 are valid, if not typical
		out, lse := be.Alloc(nq), be.Alloc(s.B*s.T*s.H)
		be.Attention(out, lse, q, k, v, kf, vf, qm, km, sel, s)
		g := []kernels.Buffer{r.f(nq, 1), r.f(nk, 1), r.f(nk, 1), r.f(nk, 1), r.f(nk, 1), r.f(nq, 1), r.f(nk, 1)}
		be.AttentionBackward(g[0], g[1], g[2], g[3], g[4], g[5], g[6], r.f(nq, 1), out, lse, q, k, v, kf, vf, qm, km, sel, s)
		// The aliased form: memory scores read q, k and add into dq, dk.
		a := []kernels.Buffer{r.f(nq, 1), r.f(nk, 1), r.f(nk, 1)}
		be.Attention(out, lse, q, k, v, kf, vf, q, k, sel, s)
		be.AttentionBackward(a[0], a[1], a[2], nil, nil, a[0], a[1], r.f(nq, 1), out, lse, q, k, v, kf, vf, q, k, sel, s)
		return append(append(g, a...), out, lse)
	}},
	{"Innovation/ShiftRows", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		const Rw, d = 512, 64
		u, p, e, dp, sh := r.f(Rw*d, 1), r.f(Rw*d, 1), be.Alloc(Rw), r.f(Rw*d, 1), be.Alloc(Rw*d)
		be.Innovation(e, u, p, Rw, d)
		be.InnovationBackward(dp, r.f(Rw, 1), u, p, Rw, d)
		be.ShiftRows(sh, u, 4, Rw/4, d)
		return []kernels.Buffer{e, dp, sh}
	}},
	{"CrossEntropy/AdamW", func(be *cpu.Backend[float32], r *bufs) []kernels.Buffer {
		const Rw, V = 256, 300
		lg, tg, loss, dl := r.f(Rw*V, 2), r.i(Rw, V), be.Alloc(Rw), r.f(Rw*V, 1)
		be.CrossEntropy(loss, lg, tg, Rw, V)
		be.CrossEntropyBackward(dl, lg, tg, 0.01, Rw, V)
		p, g, m, v := r.f(50000, 1), r.f(50000, 1), r.f(50000, 0.1), be.Alloc(50000)
		be.AdamWStep(p, g, m, v, kernels.AdamW{LR: 1e-3, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, Step: 1})
		return []kernels.Buffer{loss, dl, p, m, v}
	}},
}

// TestParallelMatchesSerial runs each case with one worker and with four;
// only summation order may differ. Run it with -race to check the work
// splitting (it is what makes the parallel paths run under the detector).
func TestParallelMatchesSerial(t *testing.T) {
	for _, c := range parallelCases {
		t.Run(c.name, func(t *testing.T) {
			results := make([][][]float32, 2)
			for k, procs := range []int{1, 4} {
				prev := runtime.GOMAXPROCS(procs)
				be := cpu.New[float32]()
				outs := c.run(be, &bufs{be, rand.New(rand.NewPCG(7, 8))})
				runtime.GOMAXPROCS(prev)
				if err := be.Err(); err != nil {
					t.Fatal(err)
				}
				for _, o := range outs {
					h := make([]float32, o.Len())
					be.Download(h, o)
					results[k] = append(results[k], h)
				}
			}
			for i := range results[0] {
				for j, a := range results[0][i] {
					b := results[1][i][j]
					if d := math.Abs(float64(a - b)); !(d <= 1e-5+1e-5*math.Abs(float64(a))) {
						t.Fatalf("output %d[%d]: 1 worker %v, 4 workers %v", i, j, a, b)
					}
				}
			}
		})
	}
}

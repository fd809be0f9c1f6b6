package cpu_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
)

func randBuf(be *cpu.Backend[float32], rng *rand.Rand, n int, scale float64) kernels.Buffer {
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(rng.NormFloat64() * scale)
	}
	b := be.Alloc(n)
	be.Upload(b, x)
	return b
}

// matmulSizes are the size classes of the model's linear layers at d=256
// (Rw = B·T = 4096): square, up-projection, down-projection.
var matmulSizes = []struct{ Rw, N, K int }{
	{4096, 256, 256},
	{4096, 768, 256},
	{4096, 256, 768},
}

func BenchmarkMatMul(b *testing.B) {
	for _, s := range matmulSizes {
		b.Run(fmt.Sprintf("%dx%dx%d", s.Rw, s.N, s.K), func(b *testing.B) {
			be := cpu.New[float32]()
			rng := rand.New(rand.NewPCG(1, 2))
			x, w, out := randBuf(be, rng, s.Rw*s.K, 1), randBuf(be, rng, s.N*s.K, 1), be.Alloc(s.Rw*s.N)
			b.SetBytes(0)
			for b.Loop() {
				be.MatMul(out, x, w, s.Rw, s.N, s.K, false)
			}
			b.ReportMetric(2*float64(s.Rw*s.N*s.K)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}

func BenchmarkMatMulBackward(b *testing.B) {
	s := matmulSizes[0]
	be := cpu.New[float32]()
	rng := rand.New(rand.NewPCG(1, 2))
	x, w, dout := randBuf(be, rng, s.Rw*s.K, 1), randBuf(be, rng, s.N*s.K, 1), randBuf(be, rng, s.Rw*s.N, 1)
	dx, dw := be.Alloc(s.Rw*s.K), be.Alloc(s.N*s.K)
	for b.Loop() {
		be.MatMulBackward(dx, dw, dout, x, w, s.Rw, s.N, s.K)
	}
	b.ReportMetric(4*float64(s.Rw*s.N*s.K)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
}

// The "small" model (docs/model.md §1): B=4, T=512, d=256, E=512, N=16.
const sB, sT, sE, sN = 4, 512, 512, 16

type scanBufs struct{ x, dt, dtBias, Alog, Bm, Cm, Dskip, z, out kernels.Buffer }

func newScanBufs(be *cpu.Backend[float32]) scanBufs {
	rng := rand.New(rand.NewPCG(3, 4))
	s := scanBufs{
		x: randBuf(be, rng, sB*sT*sE, 1), dt: randBuf(be, rng, sB*sT*sE, 0.5), dtBias: randBuf(be, rng, sE, 1),
		Bm: randBuf(be, rng, sB*sT*sN, 1), Cm: randBuf(be, rng, sB*sT*sN, 1), Dskip: randBuf(be, rng, sE, 1),
		z: randBuf(be, rng, sB*sT*sE, 1), out: be.Alloc(sB * sT * sE),
	}
	alog := make([]float32, sE*sN)
	for i := range alog {
		alog[i] = float32(math.Log(float64(i%sN + 1)))
	}
	s.Alog = be.Alloc(sE * sN)
	be.Upload(s.Alog, alog)
	return s
}

func BenchmarkSelectiveScan(b *testing.B) {
	be := cpu.New[float32]()
	s := newScanBufs(be)
	b.Run("forward", func(b *testing.B) {
		for b.Loop() {
			be.SelectiveScan(s.out, s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, sB, sT, sE, sN)
		}
	})
	b.Run("backward", func(b *testing.B) {
		g := newScanBufs(be)
		for b.Loop() {
			be.SelectiveScanBackward(g.x, g.dt, g.dtBias, g.Alog, g.Bm, g.Cm, g.Dskip, g.z, s.out,
				s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, sB, sT, sE, sN)
		}
	})
	if err := be.Err(); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkAttention(b *testing.B) {
	s := kernels.AttnShape{B: 4, T: 512, H: 4, G: 4, D: 64, Wc: 128, Wf: 128, C: 128, S: 8, M: 128, Delta: 3}
	be := cpu.New[float32]()
	rng := rand.New(rand.NewPCG(5, 6))
	nq, nk := s.B*s.T*s.H*s.D, s.B*s.T*s.G*s.D
	q, k, v := randBuf(be, rng, nq, 1), randBuf(be, rng, nk, 1), randBuf(be, rng, nk, 1)
	kf, vf := randBuf(be, rng, nk, 1), randBuf(be, rng, nk, 1)
	nC := s.T / s.C
	selv := make([]int32, s.B*nC*s.S)
	for i := range selv {
		c := i / s.S % nC
		selv[i] = int32(c*s.C + (i%s.S)*s.C/s.S)
	}
	sel := be.AllocInt(len(selv))
	be.UploadInt(sel, selv)
	out, lse := be.Alloc(nq), be.Alloc(s.B*s.T*s.H)
	b.Run("forward", func(b *testing.B) {
		for b.Loop() {
			be.Attention(out, lse, q, k, v, kf, vf, q, k, sel, s)
		}
	})
	b.Run("backward", func(b *testing.B) {
		dq, dk, dv, dkf, dvf := be.Alloc(nq), be.Alloc(nk), be.Alloc(nk), be.Alloc(nk), be.Alloc(nk)
		for b.Loop() {
			be.AttentionBackward(dq, dk, dv, dkf, dvf, dq, dk, out, out, lse, q, k, v, kf, vf, q, k, sel, s)
		}
	})
	if err := be.Err(); err != nil {
		b.Fatal(err)
	}
}

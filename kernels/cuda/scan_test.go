//go:build cuda

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
)

// TestScanShapes checks the selective scan, forward and backward, against
// the CPU reference at shapes the conformance suite does not reach: several
// time segments and tiles, channel groups with a partial last one, the
// N ≤ 16 fast path and the generic one (N = 20, 100).
func TestScanShapes(t *testing.T) {
	d := openDevice(t, "fp32")
	for _, sh := range [][4]int{{1, 300, 40, 16}, {2, 200, 5, 3}, {2, 130, 37, 9}, {1, 64, 33, 16}, {1, 1000, 64, 16}, {2, 77, 20, 20}, {1, 90, 17, 100}} {
		B, T, E, N := sh[0], sh[1], sh[2], sh[3]
		t.Run(fmt.Sprint(sh), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, uint64(T*E+N)))
			r := func(n int, s float64) []float32 {
				v := make([]float32, n)
				for i := range v {
					v[i] = float32(rng.NormFloat64() * s)
				}
				return v
			}
			alog := r(E*N, 0.5)
			for i := range alog {
				alog[i] += float32(math.Log(float64(i%N + 1)))
			}
			ins := [][]float32{r(B*T*E, 1), r(B*T*E, 0.5), r(E, 0.5), alog, r(B*T*N, 1), r(B*T*N, 1), r(E, 1), r(B*T*E, 1)}
			dout := r(B*T*E, 1)
			sizes := []int{B * T * E, B * T * E, E, E * N, B * T * N, B * T * N, E, B * T * E}
			names := []string{"dx", "ddt", "ddtBias", "dAlog", "dBm", "dCm", "dDskip", "dz"}
			pre := make([][]float32, 8)
			for i := range pre {
				pre[i] = r(sizes[i], 1)
			}
			run := func(be kernels.Backend[float32]) ([]float32, [][]float32) {
				up := func(v []float32) kernels.Buffer { b := be.Alloc(len(v)); be.Upload(b, v); return b }
				bufs := make([]kernels.Buffer, 8)
				grads := make([]kernels.Buffer, 8)
				for i := range bufs {
					bufs[i] = up(ins[i])
					grads[i] = up(pre[i])
				}
				out := be.Alloc(B * T * E)
				be.SelectiveScan(out, bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6], bufs[7], B, T, E, N)
				be.SelectiveScanBackward(grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7], up(dout),
					bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6], bufs[7], B, T, E, N)
				o := make([]float32, B*T*E)
				be.Download(o, out)
				gs := make([][]float32, 8)
				for i := range gs {
					gs[i] = make([]float32, sizes[i])
					be.Download(gs[i], grads[i])
				}
				if err := be.Err(); err != nil {
					t.Fatal(err)
				}
				return o, gs
			}
			o1, g1 := run(d.Backend())
			o2, g2 := run(cpu.New[float32]())
			cmp := func(name string, a, b []float32) {
				var mx, md float64
				for i := range b {
					mx = max(mx, math.Abs(float64(b[i])))
					md = max(md, math.Abs(float64(a[i]-b[i])))
				}
				rel := md / max(mx, 1e-30)
				t.Logf("%s: max|cpu| %.3g, rel err %.3g", name, mx, rel)
				if rel > 1e-4 || math.IsNaN(rel) {
					t.Errorf("%s: rel err %.3g", name, rel)
				}
			}
			cmp("out", o1, o2)
			for i := range g1 {
				cmp(names[i], g1[i], g2[i])
			}
		})
	}
}

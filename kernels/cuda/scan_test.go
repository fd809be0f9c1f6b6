//go:build cuda

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
)

// TestScanShapes checks the selective scan, forward and backward, against
// the CPU reference at shapes the conformance suite does not reach: several
// time segments and tiles, channel groups with a partial last one, the
// N ≤ 16 fast path and the generic one (N = 20, 100). The fast path's
// backward runs whole sequences per block (scanFastWhole) or time segments;
// the shapes cover both (the emulation has 2 SMs, so eb·B ≥ 4 walks; two
// shapes are scaled to fill the device's SMs), with
// T not a multiple of the sub-chunk or segment and E not of 32, T within one
// sub-chunk, some gradients nil, and dx aliasing ddt (which the walk leaves
// to the segments).
func TestScanShapes(t *testing.T) {
	d := openDevice(t, "fp32")
	type scanCase struct {
		B, T, E, N int
		nils       []int // gradients passed as nil (indices into names below)
		alias      bool  // ddt is dx
		zeroed     bool  // gradients pending a Zero (lazyzero.go): the first writer overwrites
	}
	cases := []scanCase{
		{B: 1, T: 300, E: 40, N: 16}, {B: 2, T: 200, E: 5, N: 3}, {B: 2, T: 130, E: 37, N: 9},
		{B: 1, T: 64, E: 33, N: 16}, {B: 1, T: 1000, E: 64, N: 16}, {B: 2, T: 77, E: 20, N: 20},
		{B: 1, T: 90, E: 17, N: 100},
		{B: 4, T: 333, E: 70, N: 16}, {B: 3, T: 5, E: 33, N: 16}, {B: 2, T: 9, E: 64, N: 1},
		{B: 3, T: 150, E: 45, N: 16, nils: []int{0, 3, 4}}, {B: 3, T: 150, E: 45, N: 12, nils: []int{1, 2, 5, 6, 7}},
		{B: 2, T: 100, E: 64, N: 16, alias: true},
	}
	// Shapes that walk whole sequences on this device too (a GPU has many
	// more SMs than the emulation): just enough sequences to fill it.
	fill := func(E int) int {
		eb := (E + scanFastCh - 1) / scanFastCh
		return (2*max(1, d.Info().SMs) + eb - 1) / eb
	}
	cases = append(cases, scanCase{B: fill(70), T: 150, E: 70, N: 16}, scanCase{B: fill(45), T: 37, E: 45, N: 12, nils: []int{0, 4}},
		scanCase{B: fill(40), T: 70, E: 40, N: 16, zeroed: true}, scanCase{B: 1, T: 130, E: 40, N: 16, zeroed: true},
		scanCase{B: 2, T: 50, E: 20, N: 20, zeroed: true})
	names := []string{"dx", "ddt", "ddtBias", "dAlog", "dBm", "dCm", "dDskip", "dz"}
	var walks, segs int
	for _, sc := range cases {
		B, T, E, N := sc.B, sc.T, sc.E, sc.N
		eb := (E + scanFastCh - 1) / scanFastCh
		if N <= scanFastN {
			if scanFastWhole(eb, B, d.Info().SMs) && !sc.alias {
				walks++
			} else {
				segs++
			}
		}
		t.Run(fmt.Sprintf("%v_%v_%v_%v_nil%v_alias%v_zeroed%v", B, T, E, N, sc.nils, sc.alias, sc.zeroed), func(t *testing.T) {
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
			pre := make([][]float32, 8)
			for i := range pre {
				pre[i] = r(sizes[i], 1)
			}
			isNil := make([]bool, 8)
			for _, i := range sc.nils {
				isNil[i] = true
			}
			run := func(be kernels.Backend[float32], zero bool) ([]float32, [][]float32) {
				up := func(v []float32) kernels.Buffer { b := be.Alloc(len(v)); be.Upload(b, v); return b }
				bufs := make([]kernels.Buffer, 8)
				grads := make([]kernels.Buffer, 8)
				for i := range bufs {
					bufs[i] = up(ins[i])
					if !isNil[i] {
						if zero { // garbage, then a Zero the scan should honour
							grads[i] = up(pre[i])
							be.Zero(grads[i])
						} else if sc.zeroed { // the reference starts from zeros
							grads[i] = be.Alloc(sizes[i])
						} else {
							grads[i] = up(pre[i])
						}
					}
				}
				if sc.alias {
					grads[1] = grads[0]
				}
				out := be.Alloc(B * T * E)
				be.SelectiveScan(out, bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6], bufs[7], B, T, E, N)
				be.SelectiveScanBackward(grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7], up(dout),
					bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], bufs[5], bufs[6], bufs[7], B, T, E, N)
				o := make([]float32, B*T*E)
				be.Download(o, out)
				gs := make([][]float32, 8)
				for i := range gs {
					if grads[i] != nil {
						gs[i] = make([]float32, sizes[i])
						be.Download(gs[i], grads[i])
					}
				}
				if err := be.Err(); err != nil {
					t.Fatal(err)
				}
				return o, gs
			}
			o1, g1 := run(d.Backend(), sc.zeroed)
			o2, g2 := run(cpu.New[float32](), false)
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
				if (g1[i] == nil) != (g2[i] == nil) {
					t.Fatalf("%s: nil on one backend only", names[i])
				}
				if g1[i] != nil {
					cmp(names[i], g1[i], g2[i])
				}
			}
		})
	}
	// Both backward paths of the fast path must have run.
	if walks < 2 || segs < 4 {
		t.Errorf("N ≤ 16 shapes cover %d whole-sequence and %d segmented backward passes; want ≥ 2 and ≥ 4", walks, segs)
	}
}

// TestScanBackwardCopies: the whole-sequence scan backward writes the bf16
// copies of dz and ddt that products read (in_proj's and dt_proj's
// backward), so those products convert nothing and read current values.
func TestScanBackwardCopies(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.NewBackend()
	tb := newTestBufs(be, 21)
	const T, E, N = 70, 40, 16
	B := (2*max(1, d.Info().SMs) + 1) / 2 // eb = 2 channel groups: fills the device
	if !scanFastWhole((E+scanFastCh-1)/scanFastCh, B, d.Info().SMs) {
		t.Fatalf("B=%d does not take the whole-sequence path", B)
	}
	n := B * T * E
	x, dt, z, dout := tb.up(n), tb.up(n), tb.up(n), tb.up(n)
	dtb, alog, dsk := tb.up(E), tb.up(E*N), tb.up(E)
	bm, cm := tb.up(B*T*N), tb.up(B*T*N)
	dz, ddt := be.Alloc(n), be.Alloc(n)
	w, o, ref := tb.up(E*E), be.Alloc(n), be.Alloc(n)
	backward := func() {
		be.Zero(dz)
		be.Zero(ddt)
		be.SelectiveScanBackward(nil, ddt, nil, nil, nil, nil, nil, dz, dout, x, dt, dtb, alog, bm, cm, dsk, z, B, T, E, N)
	}
	for _, g := range []struct {
		name string
		buf  kernels.Buffer
	}{{"dz", dz}, {"ddt", ddt}} {
		backward()
		be.MatMul(o, g.buf, w, B*T, E, E, false) // makes the kept copy
		be.Scale(dout, 0.5)
		backward() // writes the copy
		c0 := be.InputCopies().Conversions
		be.MatMul(o, g.buf, w, B*T, E, E, false)
		if c := be.InputCopies().Conversions - c0; c != 0 {
			t.Errorf("%s: the product converted %d inputs, want 0", g.name, c)
		}
		be.ForgetInputCopies()
		be.MatMul(ref, g.buf, w, B*T, E, E, false)
		tb.same(t, g.name+" copy", o, ref)
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
}

// TestConvShapes checks the causal conv, forward and backward, against the
// CPU reference at shapes the conformance suite does not reach: every
// register window (K from 1 to 32), row segments that start and end inside
// sequences and cross their boundaries (rows from 1 to more than the grid
// has threads), sequences shorter than K, E not a multiple of 32, and dx
// pending a Zero. Wider than 32 taps is a clear error.
func TestConvShapes(t *testing.T) {
	d := openDevice(t, "fp32")
	rows := 64 * 32 * max(1, d.Info().SMs) // more than one row per segment of every kernel
	cases := []struct{ B, T, E, K int }{
		{1, 1, 5, 4}, {3, 2, 7, 4}, {2, 37, 33, 1}, {2, 37, 33, 2}, {4, 50, 40, 3}, {2, 300, 70, 4},
		{3, 41, 45, 5}, {2, 90, 64, 8}, {1, 200, 33, 9}, {2, 61, 20, 16}, {1, 150, 17, 17}, {2, 80, 12, 32},
		{rows / 300, 300, 48, 4}, {rows / 7, 7, 40, 4}, {rows / 100, 100, 33, 8},
	}
	for _, sc := range cases {
		B, T, E, K := sc.B, sc.T, sc.E, sc.K
		for _, zeroed := range []bool{false, true} {
			t.Run(fmt.Sprintf("%v_%v_%v_%v_zeroed%v", B, T, E, K, zeroed), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(B*T), uint64(E*K)))
				r := func(n int) []float32 {
					v := make([]float32, n)
					for i := range v {
						v[i] = float32(rng.NormFloat64())
					}
					return v
				}
				n := B * T * E
				x, w, bias, dout := r(n), r(E*K), r(E), r(n)
				pre := [][]float32{r(n), r(E * K), r(E)}
				run := func(be kernels.Backend[float32], zero bool) [][]float32 {
					up := func(v []float32) kernels.Buffer { b := be.Alloc(len(v)); be.Upload(b, v); return b }
					out := be.Alloc(n)
					be.Conv1d(out, up(x), up(w), up(bias), B, T, E, K)
					dx, dw, db := up(pre[0]), up(pre[1]), up(pre[2])
					if zero {
						be.Zero(dx)
					}
					be.Conv1dBackward(dx, dw, db, up(dout), up(x), up(w), B, T, E, K)
					return downloadAll(t, be, out, dx, dw, db)
				}
				got := run(d.Backend(), zeroed)
				if zeroed {
					clear(pre[0])
				}
				want := run(cpu.New[float32](), false)
				for i, name := range []string{"out", "dx", "dw", "dbias"} {
					if rel := relErr(got[i], want[i]); !(rel <= 1e-5) {
						t.Errorf("%s: rel err %.3g", name, rel)
					}
				}
			})
		}
	}
	be := d.Backend()
	be.Conv1d(be.Alloc(66), be.Alloc(66), be.Alloc(66), be.Alloc(2), 1, 33, 2, 33)
	if err := be.Err(); err == nil || !strings.Contains(err.Error(), "K=33") {
		t.Errorf("K=33: error %v, want one naming K=33", err)
	}
}

package kerneltest

import (
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

type opTest[F kernels.Float] struct {
	name string
	fn   func(h *harness[F])
}

// suite lists one subtest per op of kernels.Contract, named by its method
// (the key of its row in Tolerances).
func suite[F kernels.Float]() []opTest[F] {
	return []opTest[F]{
		{"Upload", testUpload[F]},
		{"Download", testDownload[F]},
		{"UploadInt", testUploadInt[F]},
		{"DownloadInt", testDownloadInt[F]},
		{"Zero", testZero[F]},
		{"Copy", testCopy[F]},
		{"CopyColumns", testCopyColumns[F]},
		{"Accumulate", testAccumulate[F]},
		{"Scale", testScale[F]},
		{"Slice", testSlice[F]},
		{"SumSquares", testSumSquares[F]},
		{"Embedding", testEmbedding[F]},
		{"EmbeddingBackward", testEmbeddingBackward[F]},
		{"RMSNorm", testRMSNorm[F]},
		{"RMSNormBackward", testRMSNormBackward[F]},
		{"MatMul", testMatMul[F]},
		{"MatMulAdd", testMatMulAdd[F]},
		{"MatMulBackward", testMatMulBackward[F]},
		{"Conv1d", testConv1d[F]},
		{"Conv1dBackward", testConv1dBackward[F]},
		{"Conv1dSiLU", testConv1dSiLU[F]},
		{"SiLU", testSiLU[F]},
		{"SiLUBackward", testSiLUBackward[F]},
		{"SiLUMatMulBackward", testSiLUMatMulBackward[F]},
		{"SelectiveScan", testScan[F]},
		{"SelectiveScanBackward", testScanBackward[F]},
		{"RoPE", testRoPE[F]},
		{"RoPEBackward", testRoPEBackward[F]},
		{"Attention", testAttention[F]},
		{"AttentionBackward", testAttentionBackward[F]},
		{"ShiftRows", testShiftRows[F]},
		{"Innovation", testInnovation[F]},
		{"InnovationBackward", testInnovationBackward[F]},
		{"SelectChunks", testSelectChunks[F]},
		{"SwiGLU", testSwiGLU[F]},
		{"SwiGLUBackward", testSwiGLUBackward[F]},
		{"SwiGLUPacked", testSwiGLUPacked[F]},
		{"SwiGLUPackedBackward", testSwiGLUPackedBackward[F]},
		{"CrossEntropy", testCrossEntropy[F]},
		{"CrossEntropyBackward", testCrossEntropyBackward[F]},
		{"AdamWStep", testAdamW[F]},
		{"AdamWSteps", testAdamWSteps[F]},
	}
}

// testUpload writes into a view; the guard zones around it must stay.
func testUpload[F kernels.Float](h *harness[F]) {
	a := h.randn(23, 1)
	y := h.out("y", 23)
	src := make([]F, len(a))
	for i, v := range a {
		src[i] = F(v)
	}
	h.be.Upload(y, src)
	h.near("upload", h.load(y), a)
}

// testDownload reads a view into the middle of a host slice, whose other
// elements must stay.
func testDownload[F kernels.Float](h *harness[F]) {
	a := h.randn(23, 1)
	dst := make([]F, 2+len(a)+2)
	for i := range dst {
		dst[i] = sentinel
	}
	h.be.Download(dst[2:2+len(a)], h.buf("x", a))
	got := make([]float64, len(dst))
	for i, v := range dst {
		got[i] = float64(v)
	}
	want := slices.Concat([]float64{sentinel, sentinel}, a, []float64{sentinel, sentinel})
	h.near("download", got, want)
}

func testUploadInt[F kernels.Float](h *harness[F]) {
	want := []int32{4, -1, 7, 1 << 30}
	b := h.be.AllocInt(len(want))
	h.be.UploadInt(b, want)
	got := make([]int32, len(want))
	h.be.DownloadInt(got, b)
	if !slices.Equal(got, want) {
		h.t.Errorf("int round trip: got %v, want %v", got, want)
	}
}

// testDownloadInt reads into the middle of a host slice, whose other
// elements must stay.
func testDownloadInt[F kernels.Float](h *harness[F]) {
	b := h.ints([]int32{3, -2, 5})
	got := []int32{9, 9, 9, 9, 9}
	h.be.DownloadInt(got[1:4], b)
	if want := []int32{9, 3, -2, 5, 9}; !slices.Equal(got, want) {
		h.t.Errorf("int download: got %v, want %v", got, want)
	}
}

func testZero[F kernels.Float](h *harness[F]) {
	y := h.buf("y", h.randn(23, 1))
	h.be.Zero(y)
	h.near("zero", h.load(y), make([]float64, 23))
}

func testCopy[F kernels.Float](h *harness[F]) {
	a := h.randn(23, 1)
	y := h.out("y", 23)
	h.be.Copy(y, h.buf("x", a))
	h.near("copy", h.load(y), a)
}

func testCopyColumns[F kernels.Float](h *harness[F]) {
	// Split columns [3,8) of a [Rw,9] matrix into [Rw,5], then join them
	// back into columns [1,6) of a [Rw,7] one whose other columns stay.
	for _, Rw := range []int{1, 37, 1031} {
		x, y := h.randn(Rw*9, 1), h.randn(Rw*7, 1)
		a := h.out("a", Rw*5)
		h.be.CopyColumns(a, h.buf("x", x), Rw, 5, 5, 0, 9, 3)
		yb := h.buf("y", y)
		h.be.CopyColumns(yb, a, Rw, 5, 7, 1, 5, 0)
		wantA, wantY := make([]float64, Rw*5), append([]float64(nil), y...)
		for r := range Rw {
			for j := range 5 {
				wantA[r*5+j] = x[r*9+3+j]
				wantY[r*7+1+j] = x[r*9+3+j]
			}
		}
		h.near("split", h.load(a), wantA)
		h.near("join", h.load(yb), wantY)
	}
	// Wider than a GPU block of threads.
	const Rw, n, sCols, sc = 3, 300, 700, 50
	x := h.randn(Rw*sCols, 1)
	a := h.out("wide", Rw*n)
	h.be.CopyColumns(a, h.buf("x_wide", x), Rw, n, n, 0, sCols, sc)
	want := make([]float64, Rw*n)
	for r := range Rw {
		copy(want[r*n:(r+1)*n], x[r*sCols+sc:r*sCols+sc+n])
	}
	h.near("wide", h.load(a), want)
}

func testAccumulate[F kernels.Float](h *harness[F]) {
	for _, n := range []int{23, 100003} {
		a, b := h.randn(n, 1), h.randn(n, 1)
		y := h.buf("y", a)
		h.be.Accumulate(y, h.buf("b", b))
		want := make([]float64, n)
		for i := range want {
			want[i] = float64(F(a[i] + b[i]))
		}
		h.near("accumulate", h.load(y), want)
	}
}

func testScale[F kernels.Float](h *harness[F]) {
	for _, n := range []int{23, 100003} {
		a := h.randn(n, 1)
		y := h.buf("y", a)
		h.be.Scale(y, 0.3)
		want := make([]float64, n)
		for i := range want {
			want[i] = float64(F(a[i] * float64(F(0.3))))
		}
		h.near("scale", h.load(y), want)
	}
}

// testSlice covers views of views and the host round trips every other
// subtest relies on.
func testSlice[F kernels.Float](h *harness[F]) {
	a := h.randn(23, 1)
	x := h.buf("x", a)
	v := h.be.Slice(h.be.Slice(x, 3, 10), 2, 4)
	h.near("slice", h.load(v), a[5:9])
	// Writes through a view land in the parent.
	h.be.Zero(v)
	want := append([]float64(nil), a...)
	clear(want[5:9])
	h.near("write_through_view", h.load(x), want)
	ints := []int32{4, -1, 7}
	ib := h.ints(ints)
	got := make([]int32, 3)
	h.be.DownloadInt(got, ib)
	for i := range ints {
		if got[i] != ints[i] {
			h.t.Errorf("int round trip: got %v, want %v", got, ints)
			break
		}
	}
}

func testSumSquares[F kernels.Float](h *harness[F]) {
	for _, n := range []int{1, 37, 100003} {
		a := h.randn(n, 1)
		var want float64
		for _, v := range a {
			want += v * v
		}
		h.near("sum_squares", []float64{h.be.SumSquares(h.buf("x", a))}, []float64{want})
	}
}

func randTokens[F kernels.Float](h *harness[F], n, V int) []int32 {
	t := make([]int32, n)
	for i := range t {
		t[i] = int32(h.rng.IntN(V))
	}
	return t
}

func testEmbedding[F kernels.Float](h *harness[F]) {
	const Rw, d, V = 7, 13, 9
	table := h.randn(V*d, 1)
	tok := randTokens(h, Rw, V)
	out := h.out("out", Rw*d)
	h.be.Embedding(out, h.buf("table", table), h.ints(tok), Rw, d)
	h.near("out", h.load(out), naiveEmbedding(table, tok, Rw, d))
}

func testEmbeddingBackward[F kernels.Float](h *harness[F]) {
	const Rw, d, V = 7, 13, 4 // V < Rw forces repeated tokens
	table := h.randn(V*d, 1)
	tok := randTokens(h, Rw, V)
	dout := h.randn(Rw*d, 1)
	pre := h.randn(V*d, 1)
	dt := h.buf("dtable", pre)
	h.be.EmbeddingBackward(dt, h.buf("dout", dout), h.ints(tok), Rw, d)
	h.grad("table", dt, pre, table, dout, func() []float64 { return naiveEmbedding(table, tok, Rw, d) })
}

func testRMSNorm[F kernels.Float](h *harness[F]) {
	const Rw, d = 7, 13
	x, g := h.randn(Rw*d, 1), h.randn(d, 1)
	out, rstd := h.out("out", Rw*d), h.out("rstd", Rw)
	h.be.RMSNorm(out, rstd, h.buf("x", x), h.buf("g", g), Rw, d)
	wo, wr := naiveRMSNorm(x, g, Rw, d)
	h.near("out", h.load(out), wo)
	h.near("rstd", h.load(rstd), wr)
}

func testRMSNormBackward[F kernels.Float](h *harness[F]) {
	const Rw, d = 7, 13
	x, g := h.randn(Rw*d, 1), h.randn(d, 1)
	dout := h.randn(Rw*d, 1)
	_, rstd := naiveRMSNorm(x, g, Rw, d)
	preX, preG := h.randn(Rw*d, 1), h.randn(d, 1)
	dx, dg := h.buf("dx", preX), h.buf("dg", preG)
	h.be.RMSNormBackward(dx, dg, h.buf("dout", dout), h.buf("x", x), h.buf("g", g), h.buf("rstd", rstd), Rw, d)
	fwd := func() []float64 { o, _ := naiveRMSNorm(x, g, Rw, d); return o }
	h.grad("x", dx, preX, x, dout, fwd)
	h.grad("g", dg, preG, g, dout, fwd)
}

func testMatMulAdd[F kernels.Float](h *harness[F]) {
	for _, c := range []struct {
		name     string
		Rw, N, K int
		inPlace  bool // r is out
	}{{"odd", 7, 5, 13, false}, {"blocked", 131, 65, 66, false}, {"in_place", 67, 70, 129, true}} {
		x, w, r := h.mmIn(c.Rw*c.K), h.mmIn(c.N*c.K), h.randn(c.Rw*c.N, 1)
		rb := h.buf(c.name+"/r", r)
		out := rb
		if !c.inPlace {
			out = h.out(c.name+"/out", c.Rw*c.N)
		}
		h.be.MatMulAdd(out, rb, h.buf("x", x), h.buf("w", w), c.Rw, c.N, c.K)
		want := naiveMatMul(x, w, c.Rw, c.N, c.K)
		for i := range want {
			want[i] += r[i]
		}
		h.near(c.name, h.load(out), want)
		if !c.inPlace {
			h.near(c.name+"/r unchanged", h.load(rb), r)
		}
	}
}

func testMatMul[F kernels.Float](h *harness[F]) {
	cases := []struct {
		name     string
		Rw, N, K int
		acc      bool
	}{
		{"odd", 7, 5, 13, false},
		{"odd_accumulate", 7, 5, 13, true},
		{"blocked", 67, 70, 129, false},
		{"blocked_accumulate", 131, 65, 66, true},
		{"single_row", 1, 9, 3, false},
	}
	for _, c := range cases {
		x, w := h.mmIn(c.Rw*c.K), h.mmIn(c.N*c.K)
		pre := h.randn(c.Rw*c.N, 1)
		var out kernels.Buffer
		if c.acc {
			out = h.buf(c.name+"/out", pre)
		} else {
			out = h.out(c.name+"/out", c.Rw*c.N)
		}
		h.be.MatMul(out, h.buf("x", x), h.buf("w", w), c.Rw, c.N, c.K, c.acc)
		want := naiveMatMul(x, w, c.Rw, c.N, c.K)
		if c.acc {
			for i := range want {
				want[i] += pre[i]
			}
		}
		h.near(c.name, h.load(out), want)
	}
}

func testMatMulBackward[F kernels.Float](h *harness[F]) {
	const Rw, N, K = 7, 5, 13
	x, w := h.mmIn(Rw*K), h.mmIn(N*K)
	dout := h.mmIn(Rw * N)
	preX, preW := h.randn(Rw*K, 1), h.randn(N*K, 1)
	dx, dw := h.buf("dx", preX), h.buf("dw", preW)
	h.be.MatMulBackward(dx, dw, h.buf("dout", dout), h.buf("x", x), h.buf("w", w), Rw, N, K)
	fwd := func() []float64 { return naiveMatMul(x, w, Rw, N, K) }
	h.grad("x", dx, preX, x, dout, fwd)
	h.grad("w", dw, preW, w, dout, fwd)
	// A nil gradient output is skipped.
	dx2 := h.buf("dx2", preX)
	h.be.MatMulBackward(dx2, nil, h.buf("dout", dout), h.buf("x", x), h.buf("w", w), Rw, N, K)
	h.grad("x(nil dw)", dx2, preX, x, dout, fwd)

	// A weight gradient summing many rows into a few outputs, as a thin
	// layer's does.
	// Inputs are scaled by 1/16 (still bf16-exact) so that float32
	// summation error stays far inside the tolerance over 8192 terms.
	const LR, LN, LK = 8192, 80, 48
	lx, ldout := h.mmIn(LR*LK), h.mmIn(LR*LN)
	for _, v := range [][]float64{lx, ldout} {
		for i := range v {
			v[i] /= 16
		}
	}
	lpre := h.randn(LN*LK, 1)
	ldw := h.buf("long/dw", lpre)
	h.be.MatMulBackward(nil, ldw, h.buf("long/dout", ldout), h.buf("long/x", lx), h.buf("long/w", h.mmIn(LN*LK)), LR, LN, LK)
	want := slices.Clone(lpre)
	for r := range LR {
		for n := range LN {
			g := ldout[r*LN+n]
			for k := range LK {
				want[n*LK+k] += g * lx[r*LK+k]
			}
		}
	}
	h.near("long/dw", h.load(ldw), want)
}

func testConv1d[F kernels.Float](h *harness[F]) {
	const B, T, E, K = 2, 11, 5, 4
	x, w, bias := h.randn(B*T*E, 1), h.randn(E*K, 1), h.randn(E, 1)
	out := h.out("out", B*T*E)
	h.be.Conv1d(out, h.buf("x", x), h.buf("w", w), h.buf("bias", bias), B, T, E, K)
	h.near("out", h.load(out), naiveConv1d(x, w, bias, B, T, E, K))
}

func testConv1dBackward[F kernels.Float](h *harness[F]) {
	const B, T, E, K = 2, 11, 5, 4
	x, w, bias := h.randn(B*T*E, 1), h.randn(E*K, 1), h.randn(E, 1)
	dout := h.randn(B*T*E, 1)
	preX, preW, preB := h.randn(B*T*E, 1), h.randn(E*K, 1), h.randn(E, 1)
	dx, dw, db := h.buf("dx", preX), h.buf("dw", preW), h.buf("dbias", preB)
	h.be.Conv1dBackward(dx, dw, db, h.buf("dout", dout), h.buf("x", x), h.buf("w", w), B, T, E, K)
	fwd := func() []float64 { return naiveConv1d(x, w, bias, B, T, E, K) }
	h.grad("x", dx, preX, x, dout, fwd)
	h.grad("w", dw, preW, w, dout, fwd)
	h.grad("bias", db, preB, bias, dout, fwd)
}

// testConv1dSiLU holds out to Conv1d and act to SiLU of out as stored
// (rounded to F), as the unfused Conv1d then SiLU compute it.
func testConv1dSiLU[F kernels.Float](h *harness[F]) {
	for _, c := range []struct {
		name       string
		B, T, E, K int
	}{{"odd", 2, 11, 5, 4}, {"wide_k6", 1, 9, 300, 6}} {
		B, T, E, K := c.B, c.T, c.E, c.K
		x, w, bias := h.randn(B*T*E, 1), h.randn(E*K, 1), h.randn(E, 1)
		out, act := h.out(c.name+"/out", B*T*E), h.out(c.name+"/act", B*T*E)
		h.be.Conv1dSiLU(out, act, h.buf(c.name+"/x", x), h.buf(c.name+"/w", w), h.buf(c.name+"/bias", bias), B, T, E, K)
		want := naiveConv1d(x, w, bias, B, T, E, K)
		h.near(c.name+"/out", h.load(out), want)
		for i, v := range want {
			want[i] = naiveSiLU(float64(F(v)))
		}
		h.near(c.name+"/act", h.load(act), want)
	}
}

func testSiLU[F kernels.Float](h *harness[F]) {
	x := h.randn(37, 3)
	out := h.out("out", 37)
	h.be.SiLU(out, h.buf("x", x))
	h.near("out", h.load(out), mapSiLU(x))
}

func testSiLUBackward[F kernels.Float](h *harness[F]) {
	x, dout, pre := h.randn(37, 3), h.randn(37, 1), h.randn(37, 1)
	dx := h.buf("dx", pre)
	h.be.SiLUBackward(dx, h.buf("dout", dout), h.buf("x", x))
	h.grad("x", dx, pre, x, dout, func() []float64 { return mapSiLU(x) })
}

func testSiLUMatMulBackward[F kernels.Float](h *harness[F]) {
	for _, c := range []struct {
		name     string
		Rw, N, K int
		own      bool // dr is dx itself
	}{
		{"odd", 7, 5, 13, false},
		{"tiles", 131, 80, 300, false}, // partial row and column tiles, n in three chunks
		{"aligned", 130, 48, 256, false},
		{"one_column", 65, 17, 1, false},
		{"dr_is_dx", 70, 33, 136, true},
	} {
		dout, w := h.mmIn(c.Rw*c.N), h.mmIn(c.N*c.K)
		x, dr, pre := h.randn(c.Rw*c.K, 2), h.randn(c.Rw*c.K, 1), h.randn(c.Rw*c.K, 1)
		dx := h.buf(c.name+"/dx", pre)
		drb := h.buf(c.name+"/dr", dr)
		if c.own {
			dr, drb = pre, dx
		}
		h.be.SiLUMatMulBackward(dx, drb, h.buf(c.name+"/dout", dout), h.buf(c.name+"/w", w), h.buf(c.name+"/x", x), c.Rw, c.N, c.K)
		want := make([]float64, c.Rw*c.K)
		for r := range c.Rw {
			for k := range c.K {
				i := r*c.K + k
				dh := dr[i]
				for n := range c.N {
					dh += dout[r*c.N+n] * w[n*c.K+k]
				}
				s := 1 / (1 + math.Exp(-x[i]))
				want[i] = pre[i] + dh*s*(1+x[i]*(1-s))
			}
		}
		h.near(c.name, h.load(dx), want)
	}
}

func testSwiGLU[F kernels.Float](h *harness[F]) {
	gate, up := h.randn(37, 3), h.randn(37, 1)
	out := h.out("h", 37)
	h.be.SwiGLU(out, h.buf("gate", gate), h.buf("up", up))
	h.near("h", h.load(out), naiveSwiGLU(gate, up))
}

func testSwiGLUBackward[F kernels.Float](h *harness[F]) {
	gate, up, dh := h.randn(37, 3), h.randn(37, 1), h.randn(37, 1)
	preG, preU := h.randn(37, 1), h.randn(37, 1)
	dg, du := h.buf("dgate", preG), h.buf("dup", preU)
	h.be.SwiGLUBackward(dg, du, h.buf("dh", dh), h.buf("gate", gate), h.buf("up", up))
	fwd := func() []float64 { return naiveSwiGLU(gate, up) }
	h.grad("gate", dg, preG, gate, dh, fwd)
	h.grad("up", du, preU, up, dh, fwd)
}

// naiveSwiGLUPacked is SwiGLU on the halves of each row of gu [Rw,2F].
func naiveSwiGLUPacked(gu []float64, Rw, F int) []float64 {
	out := make([]float64, Rw*F)
	for r := range Rw {
		copy(out[r*F:(r+1)*F], naiveSwiGLU(gu[r*2*F:r*2*F+F], gu[r*2*F+F:(r+1)*2*F]))
	}
	return out
}

func testSwiGLUPacked[F kernels.Float](h *harness[F]) {
	for _, c := range []struct {
		name  string
		Rw, F int
	}{{"odd", 5, 7}, {"wide", 3, 300}, {"aligned", 4, 64}} {
		gu := h.randn(c.Rw*2*c.F, 2)
		out := h.out(c.name+"/h", c.Rw*c.F)
		h.be.SwiGLUPacked(out, h.buf(c.name+"/gu", gu), c.Rw, c.F)
		h.near(c.name, h.load(out), naiveSwiGLUPacked(gu, c.Rw, c.F))
	}
}

func testSwiGLUPackedBackward[F kernels.Float](h *harness[F]) {
	for _, c := range []struct {
		name  string
		Rw, F int
	}{{"odd", 5, 7}, {"wide", 2, 300}} {
		gu, dh, pre := h.randn(c.Rw*2*c.F, 2), h.randn(c.Rw*c.F, 1), h.randn(c.Rw*2*c.F, 1)
		dgu := h.buf(c.name+"/dgu", pre)
		h.be.SwiGLUPackedBackward(dgu, h.buf(c.name+"/dh", dh), h.buf(c.name+"/gu", gu), c.Rw, c.F)
		h.grad(c.name+"/gu", dgu, pre, gu, dh, func() []float64 { return naiveSwiGLUPacked(gu, c.Rw, c.F) })
	}
}

// scanInputs are Mamba-like: Alog near log(1..N), Δ around softplus(−1).
type scanInputs struct {
	x, dt, dtBias, Alog, Bm, Cm, Dskip, z []float64
}

const scanB, scanT, scanE, scanN = 2, 11, 5, 3

func newScanInputs[F kernels.Float](h *harness[F]) *scanInputs {
	B, T, E, N := scanB, scanT, scanE, scanN
	alog := h.randn(E*N, 0.1)
	for i := range alog {
		alog[i] = float64(F(alog[i] + math.Log(float64(i%N+1))))
	}
	return &scanInputs{
		x: h.randn(B*T*E, 1), dt: h.randn(B*T*E, 0.5), dtBias: h.uniform(E, -2, 0),
		Alog: alog, Bm: h.randn(B*T*N, 1), Cm: h.randn(B*T*N, 1), Dskip: h.randn(E, 1), z: h.randn(B*T*E, 1),
	}
}

func (s *scanInputs) fwd() []float64 {
	return naiveScan(s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, scanB, scanT, scanE, scanN)
}

func testScan[F kernels.Float](h *harness[F]) {
	s := newScanInputs(h)
	out := h.out("out", scanB*scanT*scanE)
	h.be.SelectiveScan(out, h.buf("x", s.x), h.buf("dt", s.dt), h.buf("dtBias", s.dtBias), h.buf("Alog", s.Alog),
		h.buf("Bm", s.Bm), h.buf("Cm", s.Cm), h.buf("Dskip", s.Dskip), h.buf("z", s.z), scanB, scanT, scanE, scanN)
	h.near("out", h.load(out), s.fwd())
}

func testScanBackward[F kernels.Float](h *harness[F]) {
	s := newScanInputs(h)
	dout := h.randn(scanB*scanT*scanE, 1)
	ins := []struct {
		name string
		x    []float64
	}{{"x", s.x}, {"dt", s.dt}, {"dtBias", s.dtBias}, {"Alog", s.Alog}, {"Bm", s.Bm}, {"Cm", s.Cm}, {"Dskip", s.Dskip}, {"z", s.z}}
	pres := make([][]float64, len(ins))
	grads := make([]kernels.Buffer, len(ins))
	bufs := make([]kernels.Buffer, len(ins))
	for i, in := range ins {
		pres[i] = h.randn(len(in.x), 1)
		grads[i] = h.buf("d"+in.name, pres[i])
		bufs[i] = h.buf(in.name, in.x)
	}
	g, b := grads, bufs
	h.be.SelectiveScanBackward(g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], h.buf("dout", dout),
		b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], scanB, scanT, scanE, scanN)
	for i, in := range ins {
		h.grad(in.name, grads[i], pres[i], in.x, dout, s.fwd)
	}
}

func testRoPE[F kernels.Float](h *harness[F]) {
	const B, T, nh, D = 2, 11, 3, 6
	x := h.randn(B*T*nh*D, 1)
	out := h.out("out", len(x))
	h.be.RoPE(out, h.buf("x", x), B, T, nh, D, 10000)
	want := naiveRoPE(x, B, T, nh, D, 10000)
	h.near("out", h.load(out), want)
	// In place, as the model applies it to q and k.
	xb := h.buf("x_inplace", x)
	h.be.RoPE(xb, xb, B, T, nh, D, 10000)
	h.near("out_inplace", h.load(xb), want)
}

func testRoPEBackward[F kernels.Float](h *harness[F]) {
	const B, T, nh, D = 2, 11, 3, 6
	x, dout, pre := h.randn(B*T*nh*D, 1), h.randn(B*T*nh*D, 1), h.randn(B*T*nh*D, 1)
	dx := h.buf("dx", pre)
	h.be.RoPEBackward(dx, h.buf("dout", dout), B, T, nh, D, 10000)
	h.grad("x", dx, pre, x, dout, func() []float64 { return naiveRoPE(x, B, T, nh, D, 10000) })
}

// attnCase is one attention configuration; alias passes q, k as qm, km.
type attnCase struct {
	name  string
	s     kernels.AttnShape
	alias bool
	holes bool // some sel entries are −1 ("none")
}

var attnCases = []attnCase{
	{name: "all_paths", s: kernels.AttnShape{B: 2, T: 11, H: 4, G: 2, D: 6, Wc: 4, Wf: 3, C: 3, S: 2, M: 3, Delta: 2}},
	{name: "no_fading", s: kernels.AttnShape{B: 2, T: 11, H: 4, G: 2, D: 6, Wc: 4, Wf: 0, C: 3, S: 2, M: 3, Delta: 2}},
	{name: "no_memory", s: kernels.AttnShape{B: 2, T: 11, H: 4, G: 2, D: 6, Wc: 4, Wf: 3, C: 3, S: 2, M: 0, Delta: 2}},
	{name: "window_only", s: kernels.AttnShape{B: 1, T: 11, H: 2, G: 2, D: 4, Wc: 3, Wf: 0, M: 0}},
	{name: "aliased_memory_qk", s: kernels.AttnShape{B: 2, T: 11, H: 4, G: 2, D: 6, Wc: 4, Wf: 3, C: 3, S: 2, M: 3, Delta: 2}, alias: true},
	{name: "mqa_holes_big_memory", s: kernels.AttnShape{B: 1, T: 13, H: 3, G: 1, D: 4, Wc: 2, Wf: 2, C: 3, S: 2, M: 5, Delta: 1}, holes: true},
	{name: "delta3_mixed_groups", s: kernels.AttnShape{B: 1, T: 14, H: 3, G: 2, D: 4, Wc: 3, Wf: 1, C: 2, S: 1, M: 2, Delta: 3}},
}

type attnInputs struct {
	c                       attnCase
	q, k, v, kf, vf, qm, km []float64
	sel                     []int32
}

func newAttnInputs[F kernels.Float](h *harness[F], c attnCase) *attnInputs {
	s := c.s
	nq, nk := s.B*s.T*s.H*s.D, s.B*s.T*s.G*s.D
	in := &attnInputs{c: c, q: h.attnIn(nq), k: h.attnIn(nk), v: h.attnIn(nk)}
	if s.Wf > 0 {
		in.kf, in.vf = h.attnIn(nk), h.attnIn(nk)
	}
	if s.M > 0 {
		if c.alias {
			in.qm, in.km = in.q, in.k
		} else {
			in.qm, in.km = h.attnIn(nq), h.attnIn(nk)
		}
		nC := s.T / s.C
		for b := 0; b < s.B; b++ {
			for ch := 0; ch < nC; ch++ {
				// S distinct ascending positions of the chunk.
				perm := h.rng.Perm(s.C)[:s.S]
				picked := make([]int32, s.S)
				for i, p := range perm {
					picked[i] = int32(ch*s.C + p)
				}
				sortInt32(picked)
				for i := range picked {
					if c.holes && h.rng.IntN(3) == 0 {
						picked[i] = -1
					}
				}
				in.sel = append(in.sel, picked...)
			}
		}
	}
	return in
}

func sortInt32(x []int32) {
	for i := 1; i < len(x); i++ {
		for j := i; j > 0 && x[j] < x[j-1]; j-- {
			x[j], x[j-1] = x[j-1], x[j]
		}
	}
}

func (in *attnInputs) fwd() (out, lse []float64) {
	return naiveAttention(in.q, in.k, in.v, in.kf, in.vf, in.qm, in.km, in.sel, in.c.s)
}

// bufs uploads the inputs; with alias the memory buffers are q and k.
func (in *attnInputs) bufs(h interface {
	buf(string, []float64) kernels.Buffer
	ints([]int32) kernels.IntBuffer
}) (q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer) {
	q, k, v = h.buf("q", in.q), h.buf("k", in.k), h.buf("v", in.v)
	if in.kf != nil {
		kf, vf = h.buf("kf", in.kf), h.buf("vf", in.vf)
	}
	if in.qm != nil {
		if in.c.alias {
			qm, km = q, k
		} else {
			qm, km = h.buf("qm", in.qm), h.buf("km", in.km)
		}
		sel = h.ints(in.sel)
	}
	return
}

// testAttention is also docs/model.md §5's check that the LSE-merged attention
// equals a naive masked softmax over the concatenated key set.
func testAttention[F kernels.Float](h *harness[F]) {
	for _, c := range attnCases {
		in := newAttnInputs(h, c)
		s := c.s
		out, lse := h.out(c.name+"/out", s.B*s.T*s.H*s.D), h.out(c.name+"/lse", s.B*s.T*s.H)
		q, k, v, kf, vf, qm, km, sel := in.bufs(h)
		h.be.Attention(out, lse, q, k, v, kf, vf, qm, km, sel, s)
		wo, wl := in.fwd()
		h.near(c.name+"/out", h.load(out), wo)
		h.near(c.name+"/lse", h.load(lse), wl)
	}
}

func testAttentionBackward[F kernels.Float](h *harness[F]) {
	for _, c := range attnCases {
		in := newAttnInputs(h, c)
		s := c.s
		nq := s.B * s.T * s.H * s.D
		wo, wl := in.fwd()
		dout := h.attnIn(nq)
		q, k, v, kf, vf, qm, km, sel := in.bufs(h)
		type gin struct {
			name string
			x    []float64
			pre  []float64
			g    kernels.Buffer
		}
		mk := func(name string, x []float64) *gin {
			if x == nil {
				return nil
			}
			pre := h.randn(len(x), 1)
			return &gin{name, x, pre, h.buf(c.name+"/d"+name, pre)}
		}
		gq, gk, gv := mk("q", in.q), mk("k", in.k), mk("v", in.v)
		gkf, gvf := mk("kf", in.kf), mk("vf", in.vf)
		var gqm, gkm *gin
		if !c.alias {
			gqm, gkm = mk("qm", in.qm), mk("km", in.km)
		}
		buf := func(g *gin) kernels.Buffer {
			if g == nil {
				return nil
			}
			return g.g
		}
		dqm, dkm := buf(gqm), buf(gkm)
		if c.alias && s.M > 0 {
			dqm, dkm = gq.g, gk.g
		}
		h.be.AttentionBackward(gq.g, gk.g, gv.g, buf(gkf), buf(gvf), dqm, dkm, h.buf("dout", dout),
			h.buf("out", wo), h.buf("lse", wl), q, k, v, kf, vf, qm, km, sel, s)
		fwd := func() []float64 { o, _ := in.fwd(); return o }
		for _, g := range []*gin{gq, gk, gv, gkf, gvf, gqm, gkm} {
			if g != nil {
				h.grad(c.name+"/"+g.name, g.g, g.pre, g.x, dout, fwd)
			}
		}
	}
}

func testShiftRows[F kernels.Float](h *harness[F]) {
	const B, T, d = 2, 5, 3
	x := h.randn(B*T*d, 1)
	out := h.out("out", len(x))
	h.be.ShiftRows(out, h.buf("x", x), B, T, d)
	h.near("out", h.load(out), naiveShiftRows(x, B, T, d))
	xb := h.buf("x_inplace", x)
	h.be.ShiftRows(xb, xb, B, T, d)
	h.near("out_inplace", h.load(xb), naiveShiftRows(x, B, T, d))
}

func testInnovation[F kernels.Float](h *harness[F]) {
	const Rw, d = 7, 13
	u, p := h.randn(Rw*d, 1), h.randn(Rw*d, 1)
	e := h.out("e", Rw)
	h.be.Innovation(e, h.buf("u", u), h.buf("p", p), Rw, d)
	h.near("e", h.load(e), naiveInnovation(u, p, Rw, d))
}

func testInnovationBackward[F kernels.Float](h *harness[F]) {
	const Rw, d = 7, 13
	u, p, de, pre := h.randn(Rw*d, 1), h.randn(Rw*d, 1), h.randn(Rw, 1), h.randn(Rw*d, 1)
	dp := h.buf("dp", pre)
	h.be.InnovationBackward(dp, h.buf("de", de), h.buf("u", u), h.buf("p", p), Rw, d)
	h.grad("p", dp, pre, p, de, func() []float64 { return naiveInnovation(u, p, Rw, d) })
}

func testSelectChunks[F kernels.Float](h *harness[F]) {
	cases := []struct {
		name       string
		B, T, C, S int
		levels     int // e takes this many distinct values; few levels force ties
	}{
		{"ties_trailing_chunk", 2, 11, 3, 2, 3},
		{"distinct", 3, 16, 4, 3, 0},
		{"all_equal", 1, 8, 4, 2, 1},
		{"select_all", 1, 6, 3, 3, 2},
	}
	for _, c := range cases {
		e := h.randn(c.B*c.T, 1)
		if c.levels > 0 {
			for i := range e {
				e[i] = float64(h.rng.IntN(c.levels))
			}
		}
		nC := c.T / c.C
		sel := h.be.AllocInt(c.B * nC * c.S)
		h.be.SelectChunks(sel, h.buf("e", e), c.B, c.T, c.C, c.S)
		got := make([]int32, c.B*nC*c.S)
		h.be.DownloadInt(got, sel)
		want := naiveSelect(e, c.B, c.T, c.C, c.S)
		for i := range want {
			if got[i] != want[i] {
				h.t.Errorf("%s: sel = %v, want %v (e = %v)", c.name, got, want, e)
				break
			}
		}
	}
}

func ceTargets[F kernels.Float](h *harness[F], Rw, V int) []int32 {
	tg := randTokens(h, Rw, V)
	tg[2], tg[5] = -1, -1 // ignored rows
	return tg
}

func testCrossEntropy[F kernels.Float](h *harness[F]) {
	const Rw, V = 7, 11
	logits := h.randn(Rw*V, 3)
	tg := ceTargets(h, Rw, V)
	loss := h.out("loss", Rw)
	h.be.CrossEntropy(loss, h.buf("logits", logits), h.ints(tg), Rw, V)
	h.near("loss", h.load(loss), naiveCrossEntropy(logits, tg, Rw, V))
}

func testCrossEntropyBackward[F kernels.Float](h *harness[F]) {
	const Rw, V, scale = 7, 11, 0.2
	logits, pre := h.randn(Rw*V, 3), h.randn(Rw*V, 1)
	tg := ceTargets(h, Rw, V)
	dl := h.buf("dlogits", pre)
	h.be.CrossEntropyBackward(dl, h.buf("logits", logits), h.ints(tg), scale, Rw, V)
	dout := make([]float64, Rw)
	for i := range dout {
		dout[i] = scale
	}
	h.grad("logits", dl, pre, logits, dout, func() []float64 { return naiveCrossEntropy(logits, tg, Rw, V) })
}

func testAdamW[F kernels.Float](h *harness[F]) {
	const n = 29
	p, m, v := h.randn(n, 1), h.randn(n, 0.1), h.uniform(n, 0, 0.01)
	pb, mb, vb := h.buf("param", p), h.buf("m", m), h.buf("v", v)
	for step := 1; step <= 4; step++ {
		g := h.randn(n, 1)
		hp := kernels.AdamW{LR: 1e-2, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, Step: step}
		if step%2 == 0 {
			hp.GradScale = 0.37 // clipping
		}
		gb := h.buf("grad", g)
		h.be.AdamWStep(pb, gb, mb, vb, hp)
		naiveAdamW(p, g, m, v, hp)
		h.near("grad unchanged", h.load(gb), g)
	}
	h.near("param", h.load(pb), p)
	h.near("m", h.load(mb), m)
	h.near("v", h.load(vb), v)
}

// testAdamWSteps runs AdamWStep's math over segments of one flat buffer,
// with a gap between two segments that must stay as it is, and a segment
// longer than a GPU tile (4096).
func testAdamWSteps[F kernels.Float](h *harness[F]) {
	const n = 9001
	segs := []kernels.AdamWSegment{{Off: 0, N: 13, WeightDecay: 0.1}, {Off: 13, N: 5000}, {Off: 5020, N: n - 5020, WeightDecay: 0.1}}
	p, m, v := h.randn(n, 1), h.randn(n, 0.1), h.uniform(n, 0, 0.01)
	pb, mb, vb := h.buf("param", p), h.buf("m", m), h.buf("v", v)
	for step := 1; step <= 3; step++ {
		g := h.randn(n, 1)
		hp := kernels.AdamW{LR: 1e-2, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 7, Step: step} // WeightDecay unused
		if step == 2 {
			hp.GradScale = 0.37
		}
		h.be.AdamWSteps(pb, h.buf("grad", g), mb, vb, segs, hp)
		for _, s := range segs {
			e := s.Off + s.N
			hs := hp
			hs.WeightDecay = s.WeightDecay
			naiveAdamW(p[s.Off:e], g[s.Off:e], m[s.Off:e], v[s.Off:e], hs)
		}
	}
	h.near("param", h.load(pb), p)
	h.near("m", h.load(mb), m)
	h.near("v", h.load(vb), v)
}

// runErrors checks that bad shapes are recorded, named and reported by Err
// instead of panicking; every case uses a fresh backend.
func runErrors[F kernels.Float](t *testing.T, newBackend func() kernels.Backend[F]) {
	cases := []struct {
		name string
		op   func(be kernels.Backend[F])
		want string // substrings of the error
	}{
		{"matmul_short_x", func(be kernels.Backend[F]) {
			be.MatMul(be.Alloc(6), be.Alloc(5), be.Alloc(6), 2, 3, 2, false)
		}, "matmul"},
		{"matmul_nil_w", func(be kernels.Backend[F]) {
			be.MatMul(be.Alloc(6), be.Alloc(4), nil, 2, 3, 2, false)
		}, "matmul"},
		{"negative_dim", func(be kernels.Backend[F]) {
			be.RMSNorm(be.Alloc(4), be.Alloc(2), be.Alloc(4), be.Alloc(2), -2, 2)
		}, "rmsnorm"},
		{"slice_out_of_range", func(be kernels.Backend[F]) {
			be.Slice(be.Alloc(4), 3, 2)
		}, "slice"},
		{"token_out_of_range", func(be kernels.Backend[F]) {
			tok := be.AllocInt(1)
			be.UploadInt(tok, []int32{9})
			be.Embedding(be.Alloc(2), be.Alloc(6), tok, 1, 2)
		}, "embedding"},
		{"attention_missing_fading", func(be kernels.Backend[F]) {
			s := kernels.AttnShape{B: 1, T: 2, H: 1, G: 1, D: 2, Wc: 1, Wf: 1}
			be.Attention(be.Alloc(4), be.Alloc(2), be.Alloc(4), be.Alloc(4), be.Alloc(4), nil, nil, nil, nil, nil, s)
		}, "attention"},
		{"attention_sel_out_of_range", func(be kernels.Backend[F]) {
			s := kernels.AttnShape{B: 1, T: 2, H: 1, G: 1, D: 2, Wc: 1, C: 1, S: 1, M: 1, Delta: 1}
			sel := be.AllocInt(2)
			be.UploadInt(sel, []int32{0, 5})
			q := be.Alloc(4)
			be.Attention(be.Alloc(4), be.Alloc(2), q, q, q, nil, nil, q, q, sel, s)
		}, "sel"},
		{"scan_short_Bm", func(be kernels.Backend[F]) {
			be.SelectiveScan(be.Alloc(4), be.Alloc(4), be.Alloc(4), be.Alloc(2), be.Alloc(2), be.Alloc(1), be.Alloc(2), be.Alloc(2), be.Alloc(4), 1, 2, 2, 1)
		}, "Bm"},
		{"select_too_many", func(be kernels.Backend[F]) {
			be.SelectChunks(be.AllocInt(4), be.Alloc(4), 1, 4, 2, 3)
		}, "select_chunks"},
		{"attention_zero_head_width", func(be kernels.Backend[F]) {
			s := kernels.AttnShape{B: 1, T: 2, H: 1, G: 1, D: 0, Wc: 1}
			be.Attention(be.Alloc(0), be.Alloc(2), be.Alloc(0), be.Alloc(0), be.Alloc(0), nil, nil, nil, nil, nil, s)
		}, "attention"},
		{"copy_length_mismatch", func(be kernels.Backend[F]) {
			be.Copy(be.Alloc(3), be.Alloc(4))
		}, "copy"},
		{"matmul_add_r_overlaps", func(be kernels.Backend[F]) {
			o := be.Alloc(8)
			be.MatMulAdd(be.Slice(o, 0, 4), be.Slice(o, 2, 4), be.Alloc(4), be.Alloc(4), 2, 2, 2)
		}, "r overlaps out"},
		{"copy_columns_outside", func(be kernels.Backend[F]) {
			be.CopyColumns(be.Alloc(6), be.Alloc(8), 2, 2, 3, 2, 4, 0)
		}, "dst columns [2,4)"},
		{"copy_columns_overlap", func(be kernels.Backend[F]) {
			x := be.Alloc(8)
			be.CopyColumns(be.Slice(x, 0, 4), be.Slice(x, 2, 6), 2, 1, 2, 0, 3, 1)
		}, "overlap"},
		{"adamw_step0", func(be kernels.Backend[F]) {
			be.AdamWStep(be.Alloc(1), be.Alloc(1), be.Alloc(1), be.Alloc(1), kernels.AdamW{Step: 0})
		}, "adamw"},
		{"adamw_steps_segment_outside", func(be kernels.Backend[F]) {
			x := be.Alloc(4)
			be.AdamWSteps(x, x, x, x, []kernels.AdamWSegment{{Off: 2, N: 3}}, kernels.AdamW{Step: 1})
		}, "adamw_steps: segment 0 [2, 2+3) is outside the buffers of 4"},
		{"adamw_steps_overlap", func(be kernels.Backend[F]) {
			x := be.Alloc(4)
			be.AdamWSteps(x, x, x, x, []kernels.AdamWSegment{{Off: 0, N: 3}, {Off: 1, N: 1}}, kernels.AdamW{Step: 1})
		}, "adamw_steps: segment 1 starts at 1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			be := newBackend()
			c.op(be)
			err := be.Err()
			if err == nil {
				t.Fatalf("no error recorded")
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not mention %q", err, c.want)
			}
		})
	}
}

//go:build cuda

package model

import (
	"math"
	"testing"

	"github.com/bmojo/bmojo/kernels/cuda"
)

// TestCUDALabelledHead checks the labelled head on the GPU: with sparse
// targets, a model computing the head only at the labelled positions has
// the loss, gradients and labelled logits of the same model computing it
// everywhere (bf16 products: within rounding, not bitwise).
func TestCUDALabelledHead(t *testing.T) {
	dev, err := cuda.Open(0, cuda.Options{})
	if err != nil {
		t.Fatalf("opening GPU 0: %v", err)
	}
	defer dev.Close()
	c, err := Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	B, T := 2, 67
	full, err := New[float32](dev.Backend(), c, 7)
	if err != nil {
		t.Fatal(err)
	}
	lab, err := New[float32](dev.Backend(), c, 7)
	if err != nil {
		t.Fatal(err)
	}
	lab.LabelledHead = true
	tokens, _ := randomBatch(3, B, T, c.VocabSize)
	targets := sparseTargets(4, B*T, c.VocabSize, 5)
	var ls [2]Loss
	for i, m := range []*Model[float32]{full, lab} {
		if err := m.Prepare(B, T); err != nil {
			t.Fatal(err)
		}
		if ls[i], err = m.Forward(tokens, targets); err != nil {
			t.Fatal(err)
		}
		m.ZeroGrads()
		if err := m.Backward(); err != nil {
			t.Fatal(err)
		}
	}
	if lab.head == nil {
		t.Fatal("the labelled head was not used")
	}
	if rel := math.Abs(ls[0].Total-ls[1].Total) / ls[0].Total; rel > 1e-5 || ls[0].Labelled != ls[1].Labelled {
		t.Fatalf("loss %+v with the full head, %+v with the labelled one (rel %.2e)", ls[0], ls[1], rel)
	}
	gf, gl := full.GradsHost(), lab.GradsHost()
	for _, ts := range full.Layout.Tensors {
		a, b := gf[ts.Offset:ts.Offset+ts.Size()], gl[ts.Offset:ts.Offset+ts.Size()]
		if cos, ok := cosine(a, b); !ok || cos < 0.99999 {
			t.Errorf("%s: gradient cosine %.7f between the heads (|full| %.3g, |labelled| %.3g)", ts.Name, cos, norm(a), norm(b))
		}
	}
	rf, pf := full.LabelledLogits()
	rl, pl := lab.LabelledLogits()
	if len(pf) != len(pl) || len(rf) != len(rl) {
		t.Fatalf("%d and %d labelled rows", len(pf), len(pl))
	}
	worst := 0.0
	for i := range rf {
		worst = max(worst, math.Abs(float64(rf[i]-rl[i])))
	}
	if worst > 1e-3 {
		t.Fatalf("labelled logits differ by %.3g", worst)
	}
}

package model

import (
	"math/rand/v2"
	"testing"
)

// sparseTargets labels about one position in every `every`, as MQAR does.
func sparseTargets(seed uint64, n, V, every int) []int32 {
	r := rand.New(rand.NewPCG(seed, 3))
	t := make([]int32, n)
	for i := range t {
		t[i] = -1
		if r.IntN(every) == 0 {
			t[i] = int32(r.IntN(V))
		}
	}
	return t
}

// TestLabelledHead checks that computing the head only at the labelled
// positions changes nothing: the loss, every gradient and the labelled
// rows of the logits equal the full head's, for every mixer, with the
// head's rows padded (R < B·T) and unpadded (R = B·T).
func TestLabelledHead(t *testing.T) {
	for _, mixers := range [][]string{
		{MixerBMOJO, MixerBMOJO}, {MixerMamba, MixerAttention}, {MixerAttention},
	} {
		for _, B := range []int{2, 16} { // B·T = 38 (R = B·T) and 304 (R = 256)
			c := gradConfig(mixers...)
			full := newModel[float64](t, c, 4, B, gradT)
			lab := newModel[float64](t, c, 4, B, gradT)
			lab.LabelledHead = true
			tokens, _ := randomBatch(8, B, gradT, c.VocabSize)
			targets := sparseTargets(9, B*gradT, c.VocabSize, 6)
			var ls [2]Loss
			for i, m := range []*Model[float64]{full, lab} {
				l, err := m.Forward(tokens, targets)
				if err != nil {
					t.Fatal(err)
				}
				m.ZeroGrads()
				if err := m.Backward(); err != nil {
					t.Fatal(err)
				}
				ls[i] = l
			}
			if lab.head == nil || (B == 16) != (lab.head.R < B*gradT) {
				t.Fatalf("%v B=%d: the labelled head was not used as planned (%+v)", mixers, B, lab.head)
			}
			if d := ls[0].Total - ls[1].Total; d > 1e-12 || d < -1e-12 || ls[0].Labelled != ls[1].Labelled {
				t.Fatalf("%v B=%d: loss %+v with the full head, %+v with the labelled one", mixers, B, ls[0], ls[1])
			}
			if d := maxAbsDiff(full.GradsHost(), lab.GradsHost()); d > 1e-12 {
				t.Fatalf("%v B=%d: gradients differ by %g", mixers, B, d)
			}
			fl, ll := full.Logits(), lab.Logits()
			rows, pos := lab.LabelledLogits()
			frows, fpos := full.LabelledLogits()
			if len(pos) != ls[0].Labelled || len(fpos) != len(pos) {
				t.Fatalf("%v B=%d: %d and %d labelled rows, want %d", mixers, B, len(pos), len(fpos), ls[0].Labelled)
			}
			if d := maxAbsDiff(rows, frows); d > 1e-12 {
				t.Fatalf("%v B=%d: labelled logits differ by %g", mixers, B, d)
			}
			V := c.VocabSize
			for p, y := range targets {
				for j := range V {
					want := fl[p*V+j]
					if y < 0 {
						want = 0
					}
					if d := ll[p*V+j] - want; d > 1e-12 || d < -1e-12 {
						t.Fatalf("%v B=%d: Logits()[%d,%d] = %g, want %g", mixers, B, p, j, ll[p*V+j], want)
					}
				}
			}
		}
	}
}

// TestPrepareAlternating checks that a model switching between batch
// shapes (reusing each shape's activations) computes what a model
// prepared once for each shape computes.
func TestPrepareAlternating(t *testing.T) {
	c := gradConfig(MixerBMOJO, MixerBMOJO)
	shapes := [][2]int{{2, gradT}, {3, 8}, {2, gradT}, {1, 12}, {3, 8}}
	m := newModel[float64](t, c, 4, 2, gradT)
	m.KeepShapes = 3
	for i, s := range shapes {
		B, T := s[0], s[1]
		fresh := newModel[float64](t, c, 4, B, T)
		if err := m.Prepare(B, T); err != nil {
			t.Fatal(err)
		}
		tokens, targets := randomBatch(uint64(10+i), B, T, c.VocabSize)
		var ls [2]float64
		for j, mm := range []*Model[float64]{m, fresh} {
			l, err := mm.Forward(tokens, targets)
			if err != nil {
				t.Fatal(err)
			}
			mm.ZeroGrads()
			if err := mm.Backward(); err != nil {
				t.Fatal(err)
			}
			ls[j] = l.Total
		}
		if ls[0] != ls[1] {
			t.Fatalf("shape %v: loss %g after switching shapes, %g fresh", s, ls[0], ls[1])
		}
		if d := maxAbsDiff(m.GradsHost(), fresh.GradsHost()); d != 0 {
			t.Fatalf("shape %v: gradients differ by %g", s, d)
		}
	}
	if len(m.prepared) != 3 {
		t.Fatalf("%d activation sets kept, want 3 (one per shape)", len(m.prepared))
	}
	m.KeepShapes = 0
	if err := m.Prepare(4, 8); err != nil {
		t.Fatal(err)
	}
	if len(m.prepared) != 1 {
		t.Fatalf("%d activation sets kept with KeepShapes 0, want only the current one", len(m.prepared))
	}
}

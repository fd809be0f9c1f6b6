package model

import (
	"math"
	"testing"
)

// A transformer's FLOPs per token is the textbook 6·P + 12·L·d·k̄ with the
// causal mean k̄ = (T+1)/2 when the window covers the sequence.
func TestFLOPsPerTokenTransformer(t *testing.T) {
	c, err := Preset("transformer-tiny")
	if err != nil {
		t.Fatal(err)
	}
	T := c.SeqLen
	if c.Window < T {
		t.Skipf("window %d < T %d", c.Window, T)
	}
	l := NewLayout(c)
	lin := 0
	for _, ts := range l.Tensors {
		if ts.Decay && len(ts.Shape) == 2 {
			lin += ts.Size()
		}
	}
	want := 6*float64(lin+c.VocabSize*c.DModel) + float64(c.NLayer)*12*float64(c.NHead*c.HeadDim)*float64(T+1)/2
	if got := FLOPsPerToken(c, T); got != want {
		t.Fatalf("FLOPsPerToken = %g, want %g", got, want)
	}
	if b, _ := Preset("bmojo-130m"); FLOPsPerToken(b, 2048) < 6*1e8 {
		t.Fatalf("bmojo-130m: %g FLOPs/token, below 6·100M", FLOPsPerToken(b, 2048))
	}
}

// B'MOJO counts W_k and W_v twice (context and fading keys) and the
// predictor without an input gradient: the difference from the plain 6·P
// count is exactly those terms.
func TestFLOPsPerTokenBMOJOProducts(t *testing.T) {
	c, err := Preset("bmojo-small")
	if err != nil {
		t.Fatal(err)
	}
	if c.FadingWindow == 0 || !c.HasMemory() || c.InnovationLoss == 0 {
		t.Fatalf("bmojo-small should have a fading window, memory and an innovation loss: %+v", c)
	}
	base := c
	base.FadingWindow = 0
	d, kv := float64(c.DModel), float64(c.NKVHead*c.HeadDim)
	wantExtra := float64(c.NLayer) * 6 * 2 * kv * d
	// Without the fading window the keys differ too; compare at T = 1,
	// where every query sees only itself.
	if got := FLOPsPerToken(c, 1) - FLOPsPerToken(base, 1); math.Abs(got-wantExtra) > 1e-6*wantExtra {
		t.Errorf("fading k/v products add %g FLOPs/token, want %g", got, wantExtra)
	}
	noAux := c
	noAux.InnovationLoss = 0
	if got, want := FLOPsPerToken(c, 1)-FLOPsPerToken(noAux, 1), float64(c.NLayer)*2*d*d; math.Abs(got-want) > 1e-6*want {
		t.Errorf("the predictor's weight gradient adds %g FLOPs/token, want %g", got, want)
	}
}

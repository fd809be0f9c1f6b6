package model

import "testing"

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

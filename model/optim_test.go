package model

import "testing"

// TestDecayRuns: one AdamW call per run of neighbouring tensors with the same
// decay covers every parameter exactly once with that tensor's decay.
func TestDecayRuns(t *testing.T) {
	for _, name := range []string{"bmojo-tiny", "hybrid-small", "mamba-130m"} {
		c, err := Preset(name)
		if err != nil {
			t.Fatal(err)
		}
		l := NewLayout(c)
		runs := decayRuns(l)
		covered := make([]int, l.Total)
		for i, r := range runs {
			if i > 0 && runs[i-1].decay == r.decay {
				t.Errorf("%s: runs %d and %d both have decay %v (not merged)", name, i-1, i, r.decay)
			}
			for j := r.off; j < r.off+r.n; j++ {
				covered[j]++
			}
		}
		for _, ts := range l.Tensors {
			for _, r := range runs {
				if ts.Offset >= r.off && ts.Offset < r.off+r.n && r.decay != ts.Decay {
					t.Errorf("%s: %s (decay %v) in a run with decay %v", name, ts.Name, ts.Decay, r.decay)
				}
			}
		}
		for j, k := range covered {
			if k != 1 {
				t.Fatalf("%s: parameter %d covered %d times", name, j, k)
			}
		}
		t.Logf("%s: %d tensors in %d AdamW calls", name, len(l.Tensors), len(runs))
	}
}

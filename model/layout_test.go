package model

import (
	"fmt"
	"testing"
)

// TestLayerRangesPartition: LayerRange(-1), LayerRange(0), ... tile the flat
// parameter vector in order, and layer i's range starts at its first tensor
// (data-parallel training reduces the gradient by these ranges).
func TestLayerRangesPartition(t *testing.T) {
	for _, preset := range []string{"bmojo-tiny", "hybrid-tiny", "mamba-tiny", "transformer-tiny"} {
		c, err := Preset(preset)
		if err != nil {
			t.Fatal(err)
		}
		l := NewLayout(c)
		next := 0
		for i := -1; i < c.NLayer; i++ {
			off, n := l.LayerRange(i)
			if off != next || n <= 0 {
				t.Fatalf("%s: layer %d covers [%d,%d), want it to start at %d", preset, i, off, off+n, next)
			}
			if i >= 0 {
				first, ok := l.Lookup(fmt.Sprintf("layers.%d.norm1.weight", i))
				if !ok || first.Offset != off {
					t.Fatalf("%s: layer %d starts at %d, its norm1.weight at %d", preset, i, off, first.Offset)
				}
			}
			next = off + n
		}
		if next != l.Total {
			t.Fatalf("%s: ranges end at %d, the vector has %d", preset, next, l.Total)
		}
	}
}

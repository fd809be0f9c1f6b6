package model

import (
	"fmt"
	"strings"
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

// TestHostileSizesRefused: sizes that would overflow or ask for an absurd
// allocation are an error naming the field, never a panic.
func TestHostileSizesRefused(t *testing.T) {
	base, err := Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		tweak func(*Config)
		want  string
	}{
		{"d_model 2^40", func(c *Config) { c.DModel = 1 << 40 }, "d_model must be at most"},
		{"vocab 2^40", func(c *Config) { c.VocabSize = 1 << 40 }, "vocab_size must be at most"},
		{"seq_len 2^40", func(c *Config) { c.SeqLen = 1 << 40 }, "seq_len must be at most"},
		{"too many parameters", func(c *Config) { c.VocabSize, c.DModel = 1<<22, 1<<16 }, "parameters is more than"},
	} {
		c := base
		tc.tweak(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

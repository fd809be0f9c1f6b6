package model

import (
	"math/rand/v2"
	"testing"

	"github.com/bmojo/bmojo/kernels/cpu"
)

// BenchmarkTrainStep times one training step (forward, backward, AdamW) of
// a preset on the CPU reference; run with -cpu 1,2,... for the scaling and
// read tokens/s from the custom metric.
func BenchmarkTrainStep(b *testing.B) {
	for _, tc := range []struct {
		preset string
		batch  int
	}{{"bmojo-tiny", 8}, {"bmojo", 2}} {
		b.Run(tc.preset, func(b *testing.B) {
			c, err := Preset(tc.preset)
			if err != nil {
				b.Fatal(err)
			}
			m, err := New[float32](cpu.New[float32](), c, 1)
			if err != nil {
				b.Fatal(err)
			}
			if err := m.Prepare(tc.batch, c.SeqLen); err != nil {
				b.Fatal(err)
			}
			o := NewOptimizer(m, DefaultOptim(1e-3, 1000))
			r := rand.New(rand.NewPCG(1, 2))
			n := tc.batch * c.SeqLen
			tokens, targets := make([]int32, n), make([]int32, n)
			for i := range tokens {
				tokens[i], targets[i] = int32(r.IntN(c.VocabSize)), int32(r.IntN(c.VocabSize))
			}
			b.ResetTimer()
			for range b.N {
				m.ZeroGrads()
				if _, err := m.Forward(tokens, targets); err != nil {
					b.Fatal(err)
				}
				if err := m.Backward(); err != nil {
					b.Fatal(err)
				}
				o.Apply()
			}
			b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}

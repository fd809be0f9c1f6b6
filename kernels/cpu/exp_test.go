package cpu

import (
	"math"
	"testing"
)

func TestExpFast(t *testing.T) {
	for x := -750.0; x <= 700; x += 0.0137 {
		got, want := expFast(x), math.Exp(x)
		if want < 1e-300 {
			if got > 1e-300 {
				t.Fatalf("expFast(%v) = %v, want ~0", x, got)
			}
			continue
		}
		if r := math.Abs(got-want) / want; r > 2e-8 {
			t.Fatalf("expFast(%v) = %v, want %v (rel %.2g)", x, got, want, r)
		}
	}
}

var sinkF float64

func BenchmarkExp(b *testing.B) {
	b.Run("math", func(b *testing.B) {
		x, s := -0.3, 0.0
		for b.Loop() {
			s += math.Exp(x)
			x -= 1e-9
		}
		sinkF = s
	})
	b.Run("fast", func(b *testing.B) {
		x, s := -0.3, 0.0
		for b.Loop() {
			s += expFast(x)
			x -= 1e-9
		}
		sinkF = s
	})
}

func BenchmarkExpVec(b *testing.B) {
	a := make([]float64, 16)
	for i := range a {
		a[i] = -float64(i + 1)
	}
	dst := make([]float64, 16)
	b.Run("math", func(b *testing.B) {
		s := 0.01
		for b.Loop() {
			for i := range dst {
				dst[i] = math.Exp(s * a[i])
			}
			s += 1e-9
		}
	})
	b.Run("fast", func(b *testing.B) {
		s := 0.01
		for b.Loop() {
			expScaled(dst, a, s, 0)
			s += 1e-9
		}
	})
}

package cpu

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// dot is the pure-Go reduction that vdot (gonum Sdot) replaced.
func dot[F kernels.Float](x, y []F) F {
	var s0, s1, s2, s3 F
	i := 0
	for ; i+4 <= len(x); i += 4 {
		s0 += x[i] * y[i]
		s1 += x[i+1] * y[i+1]
		s2 += x[i+2] * y[i+2]
		s3 += x[i+3] * y[i+3]
	}
	for ; i < len(x); i++ {
		s0 += x[i] * y[i]
	}
	return (s0 + s1) + (s2 + s3)
}

var sink32 float32

func BenchmarkDot64(b *testing.B) {
	x, y := make([]float32, 64), make([]float32, 64)
	for i := range x {
		x[i], y[i] = float32(i), float32(64-i)
	}
	b.Run("go", func(b *testing.B) {
		for b.Loop() {
			sink32 += dot(x, y)
		}
	})
	b.Run("gonum", func(b *testing.B) {
		for b.Loop() {
			sink32 += blasImpl.Sdot(64, x, 1, y, 1)
		}
	})
	b.Run("axpy_go", func(b *testing.B) {
		for b.Loop() {
			a := sink32
			for i, v := range x {
				y[i] += a * v
			}
		}
	})
	b.Run("axpy_gonum", func(b *testing.B) {
		for b.Loop() {
			blasImpl.Saxpy(64, sink32, x, 1, y, 1)
		}
	})
}

package allreduce

import "testing"

// Per-element loops of the data path, 1 MiB chunks (the default).
func BenchmarkLoops(b *testing.B) {
	const n = 1 << 18
	src := make([]float32, n)
	dst := make([]float32, n)
	for i := range src {
		src[i] = float32(i) * 0.37
	}
	wire := make([]byte, 2*n)
	b.Run("addF32", func(b *testing.B) {
		b.SetBytes(4 * n)
		for i := 0; i < b.N; i++ {
			addF32(dst, src)
		}
	})
	b.Run("toBF16", func(b *testing.B) {
		b.SetBytes(4 * n)
		for i := 0; i < b.N; i++ {
			toBF16(wire, src)
		}
	})
	b.Run("addBF16", func(b *testing.B) {
		b.SetBytes(4 * n)
		for i := 0; i < b.N; i++ {
			applyRun(dst, wire, 2, true)
		}
	})
}

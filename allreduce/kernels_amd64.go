package allreduce

import "golang.org/x/sys/cpu"

// useAVX2 selects the assembly loops; tests flip it to check them against
// the Go reference loops.
var useAVX2 = cpu.X86.HasAVX2

//go:noescape
func addF32AVX2(dst, src *float32, n int)

//go:noescape
func addBF16EmitAVX2(dst *float32, ws *uint16, n int)

//go:noescape
func copyBF16AVX2(dst *float32, ws *uint16, n int)

//go:noescape
func toBF16AVX2(dst *uint16, src *float32, n int)

//go:noescape
func finishBF16AVX2(dst *float32, ws *uint16, n int, div float32)

// The wrappers run the assembly on the largest multiple of 8 elements and
// leave the rest (returned) to the Go loop.

func addF32Fast(dst, src []float32) int {
	n := len(dst) &^ 7
	if !useAVX2 || n == 0 {
		return 0
	}
	_ = src[n-1]
	addF32AVX2(&dst[0], &src[0], n)
	return n
}

func addBF16EmitFast(dst []float32, ws []uint16) int {
	n := len(dst) &^ 7
	if !useAVX2 || n == 0 {
		return 0
	}
	_ = ws[n-1]
	addBF16EmitAVX2(&dst[0], &ws[0], n)
	return n
}

func copyBF16Fast(dst []float32, ws []uint16) int {
	n := len(dst) &^ 7
	if !useAVX2 || n == 0 {
		return 0
	}
	_ = ws[n-1]
	copyBF16AVX2(&dst[0], &ws[0], n)
	return n
}

func toBF16Fast(dst []uint16, src []float32) int {
	n := len(src) &^ 7
	if !useAVX2 || n == 0 {
		return 0
	}
	_ = dst[n-1]
	toBF16AVX2(&dst[0], &src[0], n)
	return n
}

// finishBF16Fast: div 0 means Sum (no division).
func finishBF16Fast(dst []float32, ws []uint16, div float32) int {
	n := len(dst) &^ 7
	if !useAVX2 || n == 0 {
		return 0
	}
	_ = ws[n-1]
	finishBF16AVX2(&dst[0], &ws[0], n, div)
	return n
}

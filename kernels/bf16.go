package kernels

import "math"

// RoundBF16 rounds v to the nearest bfloat16 (ties to even) and returns it
// as a float32: what tensor cores see of a float32 matrix-product input.
// The conformance suite and the CUDA emulation's matrix product share it.
func RoundBF16(v float32) float32 {
	u := math.Float32bits(v)
	u += 0x7fff + (u>>16)&1
	return math.Float32frombits(u &^ 0xffff)
}

package cpu_test

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/kernels/kerneltest"
)

func TestConformance32(t *testing.T) {
	kerneltest.Run(t, func() kernels.Backend[float32] { return cpu.New[float32]() })
}

// TestConformance64 holds the reference to float64 finite differences at
// tight tolerances: any formula error shows up here, not only rounding.
func TestConformance64(t *testing.T) {
	kerneltest.Run64(t, func() kernels.Backend[float64] { return cpu.New[float64]() })
}

package cpu_test

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/kernels/kerneltest"
)

func TestAsyncCopies(t *testing.T) {
	kerneltest.RunAsync(t, func() kernels.Backend[float32] { return cpu.New[float32]() })
}

func TestAsyncCopies64(t *testing.T) {
	kerneltest.RunAsync(t, func() kernels.Backend[float64] { return cpu.New[float64]() })
}

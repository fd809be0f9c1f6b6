//go:build cuda

package worker

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cuda"
)

// openShared opens one device for the test's replicas (a backend each):
// the emulation runs kernels on global state, so two devices of one
// process must not launch at once.
func openShared(t *testing.T) func(int) kernels.Backend[float32] {
	d, err := cuda.Open(0, cuda.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Close() })
	return func(int) kernels.Backend[float32] { return d.Backend() }
}

// TestReducerPathsBitIdenticalCUDA is TestReducerPathsBitIdentical on the
// CUDA backend (the emulation with cudaemu), where the overlapped path
// copies on the copy stream and waits on the waiter thread: both paths
// leave the bits of the CPU backend's reference (the sums are made on the
// host either way).
func TestReducerPathsBitIdenticalCUDA(t *testing.T) {
	gpu := openShared(t)
	checkReducerPaths(t, []reducerPath{
		{"cpu sync", true, cpuBackend},
		{"cuda sync", true, gpu},
		{"cuda overlapped", false, gpu},
	})
}

// TestTrainStepOverlapBitIdenticalCUDA is TestTrainStepOverlapBitIdentical
// on the CUDA backend: bit for bit on the emulation. On a real GPU float
// atomics make backward differ from run to run in its last bits, so there
// the ranks of each path are held to each other within 1e-6 (the clipping
// factor may differ by an ulp); TestReducerPathsBitIdenticalCUDA holds the
// reduction itself to the bits of the reference.
func TestTrainStepOverlapBitIdenticalCUDA(t *testing.T) {
	tol := 1e-6
	if cuda.Emulated {
		tol = 0
	}
	checkTrainStepPaths(t, openShared(t), tol)
}

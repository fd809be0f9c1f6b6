//go:build !cuda

package cuda

import (
	"errors"
	"testing"
)

// Without -tags cuda the GPU suite cannot run: say so rather than pass.
func TestConformanceBF16(t *testing.T) {
	if _, err := Open(0, Options{}); !errors.Is(err, ErrNotBuilt) {
		t.Fatalf("Open in a CPU-only build: %v, want ErrNotBuilt", err)
	}
	t.Skip("built without -tags cuda: the CUDA conformance suite did not run (see kernels/cuda/cuda_test.go)")
}

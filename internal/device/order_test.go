package device

import (
	"strings"
	"testing"

	"github.com/bmojo/bmojo/internal/gpu"
)

// TestCudaOrder: GPUs keeps NVML's devices that CUDA shows, in CUDA's
// order, and names a CUDA device NVML does not list.
func TestCudaOrder(t *testing.T) {
	all := []gpu.GPU{{Index: 0, UUID: "GPU-a"}, {Index: 1, UUID: "GPU-b"}, {Index: 2, UUID: "GPU-c"}}
	got, err := cudaOrder(all, []string{"GPU-c", "GPU-a"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Index != 2 || got[1].Index != 0 {
		t.Errorf("CUDA order c, a: got %+v", got)
	}
	if got, err := cudaOrder(all, nil); err != nil || len(got) != 0 {
		t.Errorf("no CUDA device: got %+v, %v", got, err)
	}
	if _, err := cudaOrder(all, []string{"GPU-a", "GPU-x"}); err == nil || !strings.Contains(err.Error(), "GPU-x") {
		t.Errorf("unknown UUID: error %v, want one naming GPU-x", err)
	}
}

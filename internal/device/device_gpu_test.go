//go:build cuda && !cudaemu

package device

import (
	"os"
	"os/exec"
	"testing"

	"github.com/bmojo/bmojo/kernels/cuda"
)

// TestGPUsMatchCUDA: element i of GPUs is the device cuda:i opens (same
// UUID), so telemetry and worker placement name the GPU that computes.
func TestGPUsMatchCUDA(t *testing.T) {
	gpus, err := GPUs()
	if err != nil {
		t.Fatalf("GPUs: %v", err)
	}
	if len(gpus) == 0 {
		t.Skip("no GPU visible")
	}
	for i, g := range gpus {
		d, err := cuda.Open(i, cuda.Options{})
		if err != nil {
			t.Fatalf("cuda:%d: %v", i, err)
		}
		if u := d.Info().UUID; u != g.UUID {
			t.Errorf("cuda:%d is %s, GPUs lists %s (%s)", i, u, g.UUID, g.Name)
		}
		t.Logf("cuda:%d = NVML %d, %s, %s", i, g.Index, g.Name, g.UUID)
		_ = d.Close()
	}
}

// TestGPUsFollowCudaVisibleDevices runs TestGPUsMatchCUDA again in a child
// process that sees only the last GPU (by UUID, as CUDA_VISIBLE_DEVICES
// takes it): GPUs must then list that one, as cuda:0.
func TestGPUsFollowCudaVisibleDevices(t *testing.T) {
	if os.Getenv("BMOJO_CHILD_WANT") != "" {
		gpus, err := GPUs()
		if err != nil {
			t.Fatal(err)
		}
		if len(gpus) != 1 || gpus[0].UUID != os.Getenv("BMOJO_CHILD_WANT") {
			t.Fatalf("with CUDA_VISIBLE_DEVICES=%s GPUs lists %v", os.Getenv("CUDA_VISIBLE_DEVICES"), gpus)
		}
		return
	}
	gpus, err := GPUs()
	if err != nil || len(gpus) == 0 {
		t.Skipf("no GPU visible (%v)", err)
	}
	last := gpus[len(gpus)-1]
	cmd := exec.Command(os.Args[0], "-test.run", "^TestGPUsFollowCudaVisibleDevices$", "-test.v")
	cmd.Env = append(os.Environ(), "CUDA_VISIBLE_DEVICES="+last.UUID, "BMOJO_CHILD_WANT="+last.UUID)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child with CUDA_VISIBLE_DEVICES=%s: %v\n%s", last.UUID, err, out)
	}
	t.Logf("with CUDA_VISIBLE_DEVICES=%s: GPUs lists it alone, as cuda:0", last.UUID)
}

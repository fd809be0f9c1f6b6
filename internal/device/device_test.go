package device

import (
	"testing"

	"github.com/bmojo/bmojo/kernels/cuda"
)

func TestParse(t *testing.T) {
	for spec, want := range map[string]string{"": "auto", "auto": "auto", "cpu": "cpu", "cuda": "cuda", "cuda:3": "cuda"} {
		if k, _, err := Parse(spec); err != nil || k != want {
			t.Errorf("Parse(%q) = %q, %v; want %q", spec, k, err, want)
		}
	}
	for _, bad := range []string{"tpu", "cuda:x", "cuda:-1"} {
		if _, _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

// In a CPU-only build auto picks the CPU, and asking for a GPU is an error
// that says the binary lacks GPU support.
func TestOpenWithoutCUDA(t *testing.T) {
	if cuda.Built {
		t.Skip("built with -tags cuda")
	}
	o, err := Open("auto", Options{})
	if err != nil || o.Kind != "cpu" {
		t.Fatalf("auto: %+v, %v; want the CPU", o, err)
	}
	if _, err := Open("cuda:0", Options{}); err == nil {
		t.Fatal("cuda:0 opened in a CPU-only build")
	}
}

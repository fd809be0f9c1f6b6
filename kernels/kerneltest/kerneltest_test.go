package kerneltest

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// TestCoverage fails without any backend when an op of kernels.Contract
// has no conformance test or no tolerance row, or when a test or row names
// no op (runSuite fails the same way on every backend).
func TestCoverage(t *testing.T) {
	tests := map[string]bool{}
	for _, tc := range suite[float32]() {
		tests[tc.name] = true
	}
	for _, op := range kernels.Contract {
		if !tests[op.Method] {
			t.Errorf("%s is in kernels.Contract but has no conformance test: add one to suite()", op.Method)
		}
		if _, ok := kernels.Tolerances[op.Method]; !ok {
			t.Errorf("%s is in kernels.Contract but has no row in kernels.Tolerances", op.Method)
		}
	}
	for _, msg := range stale(suite[float32]()) {
		t.Error(msg)
	}
}

// TestSeedFlag: the default seed is the fixed one the suite always used,
// and 0 draws a fresh non-zero seed.
func TestSeedFlag(t *testing.T) {
	old := *seedFlag
	defer func() { *seedFlag = old }()
	*seedFlag = 20240611
	if s := runSeed(); s != 20240611 {
		t.Errorf("seed %d, want the flag's 20240611", s)
	}
	*seedFlag = 0
	if a, b := runSeed(), runSeed(); a == 0 || a == b {
		t.Errorf("-kerneltest.seed=0 gave seeds %d and %d, want two fresh non-zero ones", a, b)
	}
}

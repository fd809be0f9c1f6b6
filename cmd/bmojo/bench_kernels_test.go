package main

import (
	"strings"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/model"
)

// benchTiny runs bench kernels' cases at the bmojo-tiny preset, shortened,
// with gpu standing in for the GPU backend.
func benchTiny(t *testing.T, gpu kernels.Backend[float32]) []kernelRow {
	t.Helper()
	c, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	c.SeqLen = 64
	rows, err := benchKernels(gpu, cpu.New[float32](), c, 1, 1)
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

// Every case finds its op's tolerance row, and two CPU backends agree
// within it.
func TestBenchKernelsTolerances(t *testing.T) {
	rows := benchTiny(t, cpu.New[float32]())
	if err := checkRows(rows); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Tol <= 0 && !strings.HasPrefix(r.Op, "dispatch") {
			t.Errorf("%s: tolerance %g, want > 0", r.Op, r.Tol)
		}
	}
}

// wrongNorm is a backend whose RMSNorm is 1% off.
type wrongNorm struct{ kernels.Backend[float32] }

func (w wrongNorm) RMSNorm(out, rstd, x, g kernels.Buffer, Rw, d int) {
	w.Backend.RMSNorm(out, rstd, x, g, Rw, d)
	w.Backend.Scale(out, 1.01)
}

// A kernel outside its tolerance fails bench kernels, which names it, its
// error and its tolerance.
func TestBenchKernelsFailsAboveTolerance(t *testing.T) {
	rows := benchTiny(t, wrongNorm{cpu.New[float32]()})
	err := checkRows(rows)
	if err == nil {
		t.Fatal("a 1% error in RMSNorm passed")
	}
	for _, want := range []string{"1 of", "RMSNorm: rel err 0.01 above its tolerance 2."} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}

package profile

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/kernels/kerneltest"
)

// The wrapper must be transparent: the whole conformance suite passes
// through it, and it counts what ran.
func TestTransparent(t *testing.T) {
	var last *Backend[float32]
	kerneltest.Run(t, func() kernels.Backend[float32] {
		last = Wrap[float32](cpu.New[float32]())
		return last
	})
	if len(last.Rows()) == 0 {
		t.Fatal("no op timed")
	}
}

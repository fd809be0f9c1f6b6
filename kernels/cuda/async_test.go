//go:build cuda

package cuda

import (
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/kerneltest"
)

// The async copies' conformance (kernels.AsyncCopier): the same bits as
// Download and Upload at the same point of the op order.
func TestAsyncCopies(t *testing.T) {
	d := openDevice(t, "bf16")
	kerneltest.RunAsync(t, func() kernels.Backend[float32] { return d.Backend() })
}

// TestStagingReused: a step's copies take their staging blocks back from
// the pool, so the page-locked memory never passes what one step's copies
// need at once, and none is left handed out once every wait has returned; a
// device closed right after async uploads (whose blocks the waiter thread
// still holds) closes.
func TestStagingReused(t *testing.T) {
	d, err := Open(0, Options{})
	if err != nil {
		t.Fatal(err)
	}
	b := d.NewBackend()
	sizes := []int{5000, 300, 1 << 20, 300}
	g := b.Alloc(2 << 20)
	step := func() {
		host := make([][]float32, len(sizes))
		var waits []func() error
		off := 0
		for i, n := range sizes {
			host[i] = make([]float32, n)
			waits = append(waits, b.DownloadAsync(host[i], b.Slice(g, off, n)))
			off += n
		}
		for _, w := range waits {
			if err := w(); err != nil {
				t.Fatal(err)
			}
		}
		waits = waits[:0]
		off = 0
		for i, n := range sizes {
			waits = append(waits, b.UploadAsync(b.Slice(g, off, n), host[i]))
			off += n
		}
		for _, w := range waits {
			if err := w(); err != nil {
				t.Fatal(err)
			}
		}
	}
	// At most one step's downloads (or its uploads) hold blocks at once,
	// and each step finds the blocks of the last in the pool.
	var most int64
	for _, n := range sizes {
		most += roundSize(int64(4 * n))
	}
	for i := range 4 {
		step()
		d.settle() // the waiter has seen every upload's fence
		if held, out := d.StagingStats(); held > most || out != 0 {
			t.Errorf("after step %d: %d bytes of staging held (the most one step needs is %d), %d blocks out; want none out", i+1, held, most, out)
		}
	}
	if err := b.Err(); err != nil {
		t.Fatal(err)
	}
	step()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
}

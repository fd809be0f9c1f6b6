package gpu

import (
	"errors"
	"testing"
)

// With no driver Discover must say so (not panic, not return an empty list
// silently); on a GPU machine it lists at least one device with a name.
func TestDiscover(t *testing.T) {
	gpus, err := Discover()
	if errors.Is(err, ErrNoDriver) {
		t.Skipf("no NVIDIA driver on this machine: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gpus {
		t.Log(g)
		if g.Name == "" || g.MemTotal == 0 {
			t.Errorf("device %d: name %q, memory %d: NVML gave nothing", g.Index, g.Name, g.MemTotal)
		}
		if _, err := Sample(g.UUID); err != nil {
			t.Error(err)
		}
	}
}

package localrun

import (
	"strings"
	"testing"

	"github.com/bmojo/bmojo/internal/device"
)

func TestCheckpointDirLockedOnce(t *testing.T) {
	dir := t.TempDir()
	unlock, err := lockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lockDir(dir); err == nil || !strings.Contains(err.Error(), "in use by another bmojo train") {
		t.Fatalf("second lock: %v, want an in-use error", err)
	}
	unlock()
	unlock2, err := lockDir(dir)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock2()
}

// Without GPUs every worker gets the spec as given (auto falls back to the
// CPU inside the worker, saying so); a named GPU is shared by everyone.
func TestWorkerDevices(t *testing.T) {
	if gpus, err := device.GPUs(); err == nil && len(gpus) > 0 {
		t.Skip("this machine has GPUs")
	}
	for _, tt := range []struct {
		spec string
		want string
	}{{"", "auto"}, {"auto", "auto"}, {"cpu", "cpu"}, {"cuda", "cuda"}, {"cuda:1", "cuda:1"}} {
		got := WorkerDevices(tt.spec, 3)
		if len(got) != 3 {
			t.Fatalf("%q: %d devices for 3 workers", tt.spec, len(got))
		}
		for i, d := range got {
			if d != tt.want {
				t.Errorf("%q: worker %d gets %q, want %q", tt.spec, i, d, tt.want)
			}
		}
	}
}

package monitor

import (
	"testing"
)

func TestETA(t *testing.T) {
	tests := []struct {
		name    string
		samples []Sample
		steps   int
		want    float64
		ok      bool
	}{
		{"no samples", nil, 100, 0, false},
		{"one sample", []Sample{{100, 10}}, 100, 0, false},
		{"steady 2 steps/s", []Sample{{100, 10}, {105, 20}, {110, 30}}, 100, 35, true},
		{"done", []Sample{{100, 100}}, 100, 0, true},
		{"stalled", []Sample{{100, 10}, {110, 10}}, 100, 0, false},
		// Only the newest 60 s count: the early slow phase is ignored.
		{"window", []Sample{{0, 0}, {100, 1}, {110, 11}, {160, 61}}, 161, 100, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ETA(tt.samples, tt.steps)
			if ok != tt.ok || got != tt.want {
				t.Errorf("ETA = %v, %v; want %v, %v", got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestDownsample(t *testing.T) {
	pts := make([]Point, 1001)
	for i := range pts {
		pts[i] = Point{Step: i + 1, Value: float64(i)}
	}
	tests := []struct {
		name      string
		in        []Point
		n         int
		wantLen   int
		wantFirst int
		wantLast  int
	}{
		{"short kept whole", pts[:10], 400, 10, 1, 10},
		{"long capped, ends kept", pts, 400, 400, 1, 1001},
		{"to two", pts, 2, 2, 1, 1001},
		{"to one: the newest", pts, 1, 1, 1001, 1001},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Downsample(tt.in, tt.n)
			if len(got) != tt.wantLen || got[0].Step != tt.wantFirst || got[len(got)-1].Step != tt.wantLast {
				t.Fatalf("Downsample: %d points from step %d to %d; want %d from %d to %d",
					len(got), got[0].Step, got[len(got)-1].Step, tt.wantLen, tt.wantFirst, tt.wantLast)
			}
			for i := 1; i < len(got); i++ {
				if got[i].Step <= got[i-1].Step {
					t.Fatalf("not increasing at %d: %v", i, got[i-1:i+1])
				}
			}
		})
	}
}

func TestUpsertReplaysAndBound(t *testing.T) {
	var pts []Point
	for _, s := range []int{1, 2, 4, 3, 2} {
		pts = upsert(pts, Point{Step: s, Value: float64(10 * s)})
	}
	pts = upsert(pts, Point{Step: 2, Value: -1}) // a replayed step overwrites
	want := []Point{{1, 10}, {2, -1}, {3, 30}, {4, 40}}
	if len(pts) != len(want) {
		t.Fatalf("upsert: %v, want %v", pts, want)
	}
	for i := range want {
		if pts[i] != want[i] {
			t.Fatalf("upsert: %v, want %v", pts, want)
		}
	}
	long := make([]Point, maxKept+1)
	for i := range long {
		long[i] = Point{Step: i}
	}
	if b := bound(long); len(b) != maxKept/2 || b[len(b)-1].Step != maxKept {
		t.Fatalf("bound: %d points ending at %d", len(b), b[len(b)-1].Step)
	}
}

func TestMarkStraggler(t *testing.T) {
	w := func(id string, up bool, compute, wait float64) WorkerStatus {
		return WorkerStatus{ID: id, Up: up, Step: compute + wait + 0.01, Compute: compute, Wait: wait}
	}
	tests := []struct {
		name string
		in   []WorkerStatus
		want string // the straggler's id, "" for none
	}{
		{"balanced", []WorkerStatus{w("a", true, 1.0, 0.02), w("b", true, 1.02, 0.01), w("c", true, 0.99, 0.03)}, ""},
		{"slow rank, others wait", []WorkerStatus{w("a", true, 1.0, 0.5), w("b", true, 1.5, 0.01), w("c", true, 1.0, 0.48)}, "b"},
		// Slower compute but nobody waits for it (e.g. wait hidden by overlap): not flagged.
		{"slow but nobody waits", []WorkerStatus{w("a", true, 1.0, 0.0), w("b", true, 1.5, 0.0)}, ""},
		{"the slow one is down", []WorkerStatus{w("a", true, 1.0, 0.5), w("b", false, 1.5, 0.01)}, ""},
		{"single worker", []WorkerStatus{w("a", true, 3, 0)}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			MarkStraggler(tt.in)
			got := ""
			for _, x := range tt.in {
				if x.Straggler {
					if got != "" {
						t.Fatalf("two stragglers: %s and %s", got, x.ID)
					}
					got = x.ID
				}
			}
			if got != tt.want {
				t.Errorf("straggler %q, want %q", got, tt.want)
			}
		})
	}
}

package monitor

import (
	"math"
	"sort"

	"github.com/bmojo/bmojo/job"
)

// Status is the JSON of /api/v1/status, and what `bmojo status` prints.
type Status struct {
	Job        string   `json:"job"`
	Step       int      `json:"step"`
	Steps      int      `json:"steps"`
	Epoch      uint64   `json:"epoch"`
	Progress   float64  `json:"progress"`    // Step/Steps, in [0, 1]
	ETASeconds *float64 `json:"eta_seconds"` // null while unknown
	TokensPerS float64  `json:"tokens_per_s"`
	Loss       float64  `json:"loss"`
	ValLoss    float64  `json:"val_loss"` // the newest validation loss, 0 before the first
	RingSize   int      `json:"ring_size"`
	Skipped    int      `json:"skipped_steps"`
	Updated    float64  `json:"updated"` // Unix seconds of the newest progress record

	LossHistory       []Point `json:"loss_history"`     // step -> training loss (ledger), downsampled
	ValLossHistory    []Point `json:"val_loss_history"` // step -> validation loss
	TokensPerSHistory []Point `json:"tokens_per_s_history"`

	Workers             []WorkerStatus `json:"workers"`
	Events              []job.Event    `json:"events"` // oldest first, the newest few
	LastRecoverySeconds float64        `json:"last_recovery_seconds"`
	Checkpoint          *Checkpoint    `json:"checkpoint"` // null before the first
	Done                bool           `json:"done"`
	Final               *job.Done      `json:"final,omitempty"`
}

// Point is one (step, value) sample of a curve.
type Point struct {
	Step  int     `json:"step"`
	Value float64 `json:"value"`
}

// Checkpoint is the newest committed checkpoint.
type Checkpoint struct {
	Step int    `json:"step"`
	Dir  string `json:"dir"`
}

// WorkerStatus is one row of the worker table.
type WorkerStatus struct {
	ID       string `json:"id"`
	Rank     int    `json:"rank"` // -1 when not in the current ring
	Endpoint string `json:"endpoint"`
	Device   string `json:"device"`
	// State is up (registered and in the ring), joining (registered, not
	// yet in the ring) or down (its registration is gone).
	State     string  `json:"state"`
	Up        bool    `json:"up"`
	Reason    string  `json:"reason,omitempty"` // for down: the newest event about it
	LastStep  int     `json:"last_step"`
	Step      float64 `json:"step_seconds"`
	Data      float64 `json:"data_seconds"`
	Compute   float64 `json:"compute_seconds"`
	Wait      float64 `json:"allreduce_wait_seconds"`
	Optimizer float64 `json:"optimizer_seconds"`
	TokensPS  float64 `json:"tokens_per_s"`
	GradNorm  float64 `json:"grad_norm"`
	Ckpt      float64 `json:"last_checkpoint_seconds"`
	Straggler bool    `json:"straggler"`
	Updated   float64 `json:"updated"`
	// GPU is the worker's newest NVML sample (GPU workers only).
	GPU *job.GPUStats `json:"gpu,omitempty"`
	// RingArrival is how long after the ring's first rank this rank's
	// gradients entered the all-reduce, in the newest step every up worker
	// has reported (0 for the first rank; the largest is the slow rank).
	// Absent with fewer than two such workers.
	RingArrival *float64 `json:"ring_arrival_seconds,omitempty"`
	arrival     float64
}

// Sample is one progress record's (time, step), for the ETA.
type Sample struct {
	Unix float64
	Step int
}

// etaWindow is how far back (seconds) the ETA's rate looks: long enough to
// average over checkpoints and evals, short enough to follow a resize.
const etaWindow = 60

// ETA estimates the seconds left to reach steps from progress samples
// (oldest first): the rate over the newest etaWindow seconds. ok is false
// when there are too few samples or no progress in the window.
func ETA(samples []Sample, steps int) (eta float64, ok bool) {
	n := len(samples)
	if n == 0 {
		return 0, false
	}
	last := samples[n-1]
	if last.Step >= steps {
		return 0, true
	}
	first := last
	for i := n - 2; i >= 0 && last.Unix-samples[i].Unix <= etaWindow; i-- {
		first = samples[i]
	}
	dt, ds := last.Unix-first.Unix, last.Step-first.Step
	if dt <= 0 || ds <= 0 {
		return 0, false
	}
	return float64(steps-last.Step) * dt / float64(ds), true
}

// Downsample returns at most n points of pts (sorted by step): evenly
// strided, always keeping the first and the last, so a long curve keeps its
// shape and its newest value.
func Downsample(pts []Point, n int) []Point {
	if n <= 0 || len(pts) <= n {
		return append([]Point{}, pts...)
	}
	if n == 1 {
		return []Point{pts[len(pts)-1]}
	}
	out := make([]Point, 0, n)
	for i := range n {
		out = append(out, pts[i*(len(pts)-1)/(n-1)])
	}
	return out
}

// Straggler thresholds: the slow rank's compute exceeds the others' mean
// by at least stragglerGap of its step, and the others spend at least
// stragglerWait of that gap waiting in the all-reduce (they wait for it).
const (
	stragglerGap  = 0.15
	stragglerWait = 0.5
)

// MarkArrivals sets RingArrival for the up workers whose newest stats are
// of the same step (the newest step at least two of them share).
func MarkArrivals(ws []WorkerStatus) {
	count := map[int]int{}
	for i := range ws {
		ws[i].RingArrival = nil
		if ws[i].Up && ws[i].arrival > 0 {
			count[ws[i].LastStep]++
		}
	}
	step := -1
	for s, n := range count {
		if n >= 2 && s > step {
			step = s
		}
	}
	if step < 0 {
		return
	}
	first := math.Inf(1)
	for i := range ws {
		if ws[i].Up && ws[i].arrival > 0 && ws[i].LastStep == step {
			first = min(first, ws[i].arrival)
		}
	}
	for i := range ws {
		if ws[i].Up && ws[i].arrival > 0 && ws[i].LastStep == step {
			d := ws[i].arrival - first
			ws[i].RingArrival = &d
		}
	}
}

// MarkStraggler sets Straggler on the up worker with the largest compute
// time when the others' all-reduce wait shows they wait for it. With fewer
// than two up workers there is no straggler.
func MarkStraggler(ws []WorkerStatus) {
	var up []int
	for i := range ws {
		ws[i].Straggler = false
		if ws[i].Up && ws[i].Step > 0 {
			up = append(up, i)
		}
	}
	if len(up) < 2 {
		return
	}
	s := up[0]
	for _, i := range up[1:] {
		if ws[i].Compute > ws[s].Compute {
			s = i
		}
	}
	var compute, wait float64
	for _, i := range up {
		if i != s {
			compute += ws[i].Compute
			wait += ws[i].Wait
		}
	}
	k := float64(len(up) - 1)
	compute, wait = compute/k, wait/k
	gap := ws[s].Compute - compute
	if gap > 0 && gap >= stragglerGap*ws[s].Step && wait >= stragglerWait*gap {
		ws[s].Straggler = true
	}
}

// finite maps NaN and ±Inf (a skipped step's loss) to 0: JSON has no NaN.
func finite(x float64) float64 {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return 0
	}
	return x
}

// upsert puts p into pts (sorted by step), replacing a point at its step:
// a step replayed after a failure overwrites its ledger entry.
func upsert(pts []Point, p Point) []Point {
	n := len(pts)
	if n == 0 || pts[n-1].Step < p.Step {
		return append(pts, p)
	}
	i := sort.Search(n, func(i int) bool { return pts[i].Step >= p.Step })
	if pts[i].Step == p.Step {
		pts[i] = p
		return pts
	}
	pts = append(pts, Point{})
	copy(pts[i+1:], pts[i:])
	pts[i] = p
	return pts
}

// maxKept bounds the points kept per curve in memory; past it the curve is
// halved (every other point, the newest kept), so memory stays flat on
// long jobs while the served curve (Downsample) looks the same.
const maxKept = 20000

func bound(pts []Point) []Point {
	if len(pts) <= maxKept {
		return pts
	}
	return Downsample(pts, maxKept/2)
}

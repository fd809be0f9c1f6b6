package experiment

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/experiment/mqar"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/model"
)

func TestMQARModels(t *testing.T) {
	for _, f := range Families {
		for _, d := range DModels {
			c, err := MQARModel(ModelSpec{Family: f, DModel: d, Memory: -1, SelectPerChunk: -1}, 256, 1024)
			if err != nil {
				t.Fatalf("%s d=%d: %v", f, d, err)
			}
			if c.NLayer != 2 || c.DFF != 0 || c.VocabSize != mqar.Vocab || c.DModel != d {
				t.Fatalf("%s d=%d: %d layers, d_ff %d, vocab %d, d_model %d; want 2 layers, no MLP, V=8192", f, d, c.NLayer, c.DFF, c.VocabSize, c.DModel)
			}
			hasAttn := false
			for _, m := range c.Mixers {
				hasAttn = hasAttn || m != model.MixerMamba
			}
			switch {
			case f == "transformer" && c.Window < 1024:
				t.Fatalf("transformer window %d does not cover the longest test (1024)", c.Window)
			case f != "transformer" && hasAttn && c.Window != MQARWindow:
				t.Fatalf("%s window %d, want %d", f, c.Window, MQARWindow)
			case f == "bmojo" && !c.HasMemory(), f == "bmojo-f" && c.HasMemory():
				t.Fatalf("%s: memory %d", f, c.Memory)
			case f == "mamba" && hasAttn:
				t.Fatalf("mamba has an attention layer: %v", c.Mixers)
			case f == "hybrid" && (c.Mixers[0] != model.MixerMamba || c.Mixers[1] != model.MixerAttention):
				t.Fatalf("hybrid mixers %v", c.Mixers)
			}
		}
	}
	if _, err := MQARModel(ModelSpec{Family: "rnn", DModel: 64, Memory: -1, SelectPerChunk: -1}, 64, 64); !errors.Is(err, ErrSpec) {
		t.Fatalf("unknown family: %v", err)
	}
	if _, err := MQARModel(ModelSpec{Family: "swa", DModel: 64, Memory: 32, SelectPerChunk: -1}, 64, 64); !errors.Is(err, ErrSpec) {
		t.Fatalf("memory on swa: %v", err)
	}
	c, err := MQARModel(ModelSpec{Family: "bmojo", DModel: 64, Memory: 512, SelectPerChunk: 2}, 256, 1024)
	if err != nil || c.Memory != 512 || c.SelectPerChunk != 2 {
		t.Fatalf("memory override: %+v, %v", c, err)
	}
}

func tinyMQAR() Cell {
	return Cell{Version: Version, Kind: KindMQAR, Seed: 3, Batch: 4, LR: 3e-3,
		Model: ModelSpec{Family: "bmojo-f", DModel: 16, Memory: -1, SelectPerChunk: -1},
		Mix:   []MixEntry{{mqar.Setting{T: 16, K: 2}, 6}, {mqar.Setting{T: 32, K: 4}, 4}}, Epochs: 2,
		Test: []mqar.Setting{{T: 16, K: 2}, {T: 64, K: 8}}, TestExamples: 6, TestSeed: mqar.TestSeedBase + 1, Noise: true}
}

func TestCellHash(t *testing.T) {
	a := tinyMQAR()
	b := a
	b.Data = "/elsewhere"
	if a.Hash() != b.Hash() {
		t.Fatal("the data path changed the hash; only DataID should")
	}
	b = a
	b.LR = 1e-2
	if a.Hash() == b.Hash() {
		t.Fatal("another lr has the same hash")
	}
	b = a
	b.Test = append([]mqar.Setting(nil), a.Test...)
	b.Test[1].K = 4
	if a.Hash() == b.Hash() {
		t.Fatal("another test setting has the same hash")
	}
	if len(a.Hash()) != 16 {
		t.Fatalf("hash %q", a.Hash())
	}
}

// TestSchedule: each epoch visits every training example exactly once,
// and no batch mixes settings.
func TestSchedule(t *testing.T) {
	c := tinyMQAR()
	s := mqarSchedule(c)
	if len(s) != MQARSteps(c) {
		t.Fatalf("%d batches, MQARSteps says %d", len(s), MQARSteps(c))
	}
	seen := map[[2]int]int{}
	for _, b := range s {
		if len(b.first) == 0 || len(b.first) > c.Batch {
			t.Fatalf("batch of %d rows", len(b.first))
		}
		for _, i := range b.first {
			seen[[2]int{b.setting, i}]++
		}
	}
	for si, m := range c.Mix {
		for i := range m.Examples {
			if seen[[2]int{si, i}] != c.Epochs {
				t.Fatalf("setting %v example %d seen %d times in %d epochs", m.Setting, i, seen[[2]int{si, i}], c.Epochs)
			}
		}
	}
}

func TestParse(t *testing.T) {
	m, err := ParseMix("64:4:100, 128:8:20")
	if err != nil || len(m) != 2 || m[1].Setting != (mqar.Setting{T: 128, K: 8}) || m[1].Examples != 20 {
		t.Fatalf("ParseMix: %v, %v", m, err)
	}
	for _, bad := range []string{"64:4", "a:b:c", ""} {
		if _, err := ParseMix(bad); !errors.Is(err, ErrSpec) {
			t.Fatalf("ParseMix(%q): %v", bad, err)
		}
	}
	s, err := ParseSettings("512:128,1024:256")
	if err != nil || len(s) != 2 || s[1].K != 256 {
		t.Fatalf("ParseSettings: %v %v", s, err)
	}
	c := tinyMQAR()
	c.Seed = mqar.TestSeedBase
	if err := c.Validate(); !errors.Is(err, ErrSpec) {
		t.Fatalf("a train seed in the test range was accepted: %v", err)
	}
	c = tinyMQAR()
	c.TestSeed = 5
	if err := c.Validate(); !errors.Is(err, ErrSpec) {
		t.Fatalf("a test seed in the train range was accepted: %v", err)
	}
}

func TestFloatJSON(t *testing.T) {
	b, err := json.Marshal([]Float{1.5, Float(math.NaN()), Float(math.Inf(1))})
	if err != nil || string(b) != "[1.5,null,null]" {
		t.Fatalf("%s %v", b, err)
	}
	var back []Float
	if err := json.Unmarshal(b, &back); err != nil || back[0] != 1.5 || !math.IsNaN(float64(back[1])) {
		t.Fatalf("%v %v", back, err)
	}
}

// TestPlanBudget: a sweep over the budget is refused without --fit; with
// it the cells that fit run and the rest are reported; cached cells cost
// nothing.
func TestPlanBudget(t *testing.T) {
	k := Cache{Dir: t.TempDir()}
	a, b, c := tinyMQAR(), tinyMQAR(), tinyMQAR()
	b.LR, c.LR = 1e-2, 3e-2
	cost, err := CellCost(a, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Each setting at its own length: (16,2) 2 batches × 2 epochs × 4 × 16
	// and (32,4) 1 × 2 × 4 × 32 positions; 6 steps (2 evaluation batches
	// count as none).
	if cost.TrainTokens != 512 || cost.Steps != 6 || cost.FLOPs <= 0 || MQARSteps(a) != 6 {
		t.Fatalf("cost %+v", cost)
	}
	cfg, _ := a.ModelConfig(0)
	rate := Rate{TokensPerS: 1000, FLOPsPerToken: model.FLOPsPerToken(cfg, 32), Source: "test"}
	one := rate.Seconds(cost)
	budget := time.Duration(2.5 * one * float64(time.Second))
	if _, err := NewPlan(k, []Cell{a, b, c}, 0, rate, budget, false); !errors.Is(err, ErrBudget) {
		t.Fatalf("3 cells of %.3fs in a budget of %s: %v", one, budget, err)
	}
	p, err := NewPlan(k, []Cell{a, b, c}, 0, rate, budget, true)
	if err != nil || len(p.Run) != 2 || len(p.Dropped) != 1 || p.Dropped[0].Hash() != c.Hash() {
		t.Fatalf("--fit: run %d dropped %d, %v", len(p.Run), len(p.Dropped), err)
	}
	if err := k.Store(Result{Hash: a.Hash(), Cell: a}); err != nil {
		t.Fatal(err)
	}
	p, err = NewPlan(k, []Cell{a, b, c}, 0, rate, budget, false)
	if err != nil || len(p.Cached) != 1 || len(p.Run) != 2 {
		t.Fatalf("with one cached: cached %d run %d, %v", len(p.Cached), len(p.Run), err)
	}
}

// TestExtremes: the probes of the estimate are the cells with the fewest
// and the most FLOPs per token.
func TestExtremes(t *testing.T) {
	var cells []Cell
	for _, d := range []int{32, 64, 16} {
		c := tinyMQAR()
		c.Model.DModel = d
		cells = append(cells, c)
	}
	lo, hi, err := Extremes(cells, 0)
	if err != nil || lo.Model.DModel != 16 || hi.Model.DModel != 64 {
		t.Fatalf("cheapest d=%d, costliest d=%d (%v); want 16 and 64", lo.Model.DModel, hi.Model.DModel, err)
	}
	if _, _, err := Extremes(nil, 0); !errors.Is(err, ErrSpec) {
		t.Fatalf("no cells: %v", err)
	}
}

// TestRateFrom: one probe puts the time on FLOPs; two fit a fixed cost
// per step and a cost per FLOP through both.
func TestRateFrom(t *testing.T) {
	a := Probe{Cell: "a", StepSeconds: 1e-3, Tokens: 100, FLOPsPerStep: 1e9}
	b := Probe{Cell: "b", StepSeconds: 3e-3, Tokens: 100, FLOPsPerStep: 5e9}
	one, err := RateFrom(a)
	if err != nil {
		t.Fatal(err)
	}
	if got := one.Seconds(Cost{Steps: 10, FLOPs: 1e10}); math.Abs(got-10e-3) > 1e-12 {
		t.Fatalf("one probe: %g s, want 0.01 (1e10 FLOPs at 1e12 FLOP/s)", got)
	}
	two, err := RateFrom(b, a)
	if err != nil {
		t.Fatal(err)
	}
	// 0.5 ms per step + 5e-13 s per FLOP: 10 steps, 1e10 FLOPs = 5 + 5 ms.
	if got := two.Seconds(Cost{Steps: 10, FLOPs: 1e10}); math.Abs(got-10e-3) > 1e-12 || math.Abs(two.StepSeconds-0.5e-3) > 1e-15 {
		t.Fatalf("two probes: %g s (fixed %g per step), want 0.01 (fixed 5e-4)", got, two.StepSeconds)
	}
	flat, _ := RateFrom(a, Probe{Cell: "c", StepSeconds: 1e-3, Tokens: 100, FLOPsPerStep: 5e9})
	if got := flat.Seconds(Cost{Steps: 10, FLOPs: 1e12}); math.Abs(got-10e-3) > 1e-12 {
		t.Fatalf("equal step times: %g s, want 10 steps × 1 ms", got)
	}
	if _, err := RateFrom(); !errors.Is(err, ErrSpec) {
		t.Fatalf("no probes: %v", err)
	}
}

// TestExecute: every cell runs once, never more than jobs at a time, and
// the first error is returned.
func TestExecute(t *testing.T) {
	var cells []Cell
	for i := range 9 {
		c := tinyMQAR()
		c.LR = float64(i+1) * 1e-3
		cells = append(cells, c)
	}
	var running, peak, ran atomic.Int32
	run := func(ctx context.Context, c Cell, slot int) error {
		n := running.Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		time.Sleep(5 * time.Millisecond) // overlap the slots
		running.Add(-1)
		ran.Add(1)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Execute(ctx, cells, 3, run, nil); err != nil {
		t.Fatal(err)
	}
	if ran.Load() != 9 || peak.Load() > 3 || peak.Load() < 2 {
		t.Fatalf("ran %d cells, at most %d at once; want 9, 2..3", ran.Load(), peak.Load())
	}
	// A failing cell stops nothing: every cell runs, each failure is
	// retried once alone, and only the cells that fail again are errors.
	boom := errors.New("boom")
	var mu sync.Mutex
	calls := map[float64]int{}
	var ok atomic.Int32
	err := Execute(ctx, cells, 2, func(ctx context.Context, c Cell, slot int) error {
		mu.Lock()
		calls[c.LR]++
		n := calls[c.LR]
		mu.Unlock()
		switch {
		case c.LR > 8e-3: // always fails
			return boom
		case c.LR > 6e-3 && n == 1: // fails once, then passes alone
			return boom
		}
		return nil
	}, func(Cell) { ok.Add(1) })
	if !errors.Is(err, boom) || ok.Load() != 8 {
		t.Fatalf("got %v with %d cells done, want boom and 8 done", err, ok.Load())
	}
	for lr, n := range calls {
		want := 1
		if lr > 6e-3 {
			want = 2
		}
		if n != want {
			t.Fatalf("cell lr=%g ran %d times, want %d", lr, n, want)
		}
	}
	if s := err.Error(); !strings.Contains(s, "failed twice") || strings.Count(s, "boom") != 1 {
		t.Fatalf("error %q should name the one cell that failed twice", s)
	}
}

func TestBestByLR(t *testing.T) {
	mk := func(lr, acc float64) Result {
		c := tinyMQAR()
		c.LR = lr
		return Result{Hash: c.Hash(), Cell: c, MQAR: []SettingResult{{Setting: c.Test[0], Accuracy: acc}}}
	}
	other := mk(1e-3, 0.9)
	other.Cell.Model.Family = "mamba"
	other.Hash = other.Cell.Hash()
	bs := BestByLR([]Result{mk(1e-3, 0.2), mk(1e-2, 0.7), mk(3e-2, 0.7), other})
	if len(bs) != 2 {
		t.Fatalf("%d groups, want 2", len(bs))
	}
	for _, b := range bs {
		if b.Cell.Model.Family == "bmojo-f" && b.Cell.LR != 1e-2 {
			t.Fatalf("picked lr %v, want 1e-2 (best, ties to the lower lr)", b.Cell.LR)
		}
	}
}

// TestRunMQARCellAndReproduce trains a tiny MQAR cell on the CPU, checks
// its result and checkpoint, and that the checkpoint, reloaded, scores
// exactly what the cell recorded (what `bmojo eval --task mqar` does).
func TestRunMQARCellAndReproduce(t *testing.T) {
	k := Cache{Dir: t.TempDir()}
	c := tinyMQAR()
	env := Env{Backend: cpu.New[float32](), Device: "cpu", Cache: k}
	r, err := RunCell(context.Background(), env, c)
	if err != nil {
		t.Fatal(err)
	}
	if r.Steps != MQARSteps(c) || len(r.MQAR) != 2 || r.MQAR[0].Examples != c.TestExamples {
		t.Fatalf("result %+v", r)
	}
	if l := float64(r.MQAR[0].Loss); !(l > 0 && l < 2*math.Log(mqar.Vocab)) {
		t.Fatalf("test loss %v", l)
	}
	got, err := k.Load(c)
	if err != nil || got.Hash != c.Hash() {
		t.Fatalf("cache: %v", err)
	}
	w, err := checkpoint.LoadWeights(filepath.Join(k.CellDir(c), r.Checkpoint), nil)
	if err != nil {
		t.Fatal(err)
	}
	cell, _, err := ReadCell(filepath.Dir(w.Path))
	if err != nil || cell.Hash() != c.Hash() {
		t.Fatalf("cell.json above the checkpoint: %v", err)
	}
	m, err := model.New[float32](cpu.New[float32](), w.Config, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.SetParamsF32(w.Params); err != nil {
		t.Fatal(err)
	}
	for _, want := range r.MQAR {
		sc, err := EvalMQAR(context.Background(), m, mqar.Source{Seed: cell.TestSeed, Noise: cell.Noise}, want.Setting, cell.TestExamples)
		if err != nil {
			t.Fatal(err)
		}
		if sc.Accuracy() != want.Accuracy || Float(sc.Loss()) != want.Loss {
			t.Fatalf("%v: reloaded checkpoint scores %v / %v, the cell recorded %v / %v", want.Setting, sc.Accuracy(), sc.Loss(), want.Accuracy, want.Loss)
		}
		// One batch holds every test example: the device's loss agrees
		// with the host's reference over the same logits.
		tok, tgt := make([]int32, m.B*want.Setting.T), make([]int32, m.B*want.Setting.T)
		if err := (mqar.Source{Seed: cell.TestSeed, Noise: cell.Noise}).Fill(want.Setting, 0, cell.TestExamples, tok[:cell.TestExamples*want.Setting.T], tgt[:cell.TestExamples*want.Setting.T]); err != nil {
			t.Fatal(err)
		}
		ref, err := mqar.ScoreLogits(m.Logits(), tgt, cell.TestExamples, want.Setting.T, m.Cfg.VocabSize)
		if err != nil {
			t.Fatal(err)
		}
		if ref.Accuracy() != sc.Accuracy() || math.Abs(ref.Loss()-sc.Loss()) > 1e-4*ref.Loss() {
			t.Fatalf("%v: host reference %v / %v, EvalMQAR %v / %v", want.Setting, ref.Accuracy(), ref.Loss(), sc.Accuracy(), sc.Loss())
		}
	}
}

// TestRunLMCell trains tiny LM cells on a small in-memory-sized corpus
// prepared on disk, with and without state passing, and checks the
// length evaluation's shape.
func TestRunLMCell(t *testing.T) {
	if testing.Short() {
		t.Skip("trains two tiny models on the bundled corpus (-short)")
	}
	k := Cache{Dir: t.TempDir()}
	id, vocab, err := DataID("")
	if err != nil {
		t.Fatal(err)
	}
	env := Env{Backend: cpu.New[float32](), Device: "cpu", Cache: k}
	for _, c := range []Cell{
		{Version: Version, Kind: KindLM, Seed: 1, Batch: 2, LR: 1e-3, Model: ModelSpec{Family: "bmojo", Memory: -1, SelectPerChunk: -1},
			Size: "tiny", DataID: id, Vocab: vocab, TrainT: 64, Steps: 2, EvalT: []int{64, 128}, EvalWindows: 2, Bucket: 32},
		{Version: Version, Kind: KindLM, Seed: 1, Batch: 2, LR: 1e-3, Model: ModelSpec{Family: "mamba", Memory: -1, SelectPerChunk: -1},
			Size: "tiny", DataID: id, Vocab: vocab, TrainT: 64, Steps: 2, EvalT: []int{128}, EvalWindows: 2, Bucket: 32, StatePassing: true},
	} {
		r, err := RunCell(context.Background(), env, c)
		if err != nil {
			t.Fatal(err)
		}
		if c.StatePassing && r.TrainTokens != int64(c.Steps*c.Batch*2*c.TrainT) {
			t.Fatalf("state passing trained %d positions, want %d (prefix + window)", r.TrainTokens, c.Steps*c.Batch*2*c.TrainT)
		}
		for i, l := range r.LM {
			if l.T != c.EvalT[i] || l.Windows != 2 || len(l.Buckets) != l.T/c.Bucket {
				t.Fatalf("length result %+v", l)
			}
			if x := float64(l.MeanLoss); !(x > 0 && x < 10) {
				t.Fatalf("mean loss %v", x)
			}
		}
	}
	// With an evaluation span every length scores the same 512 tokens.
	same := Cell{Version: Version, Kind: KindLM, Seed: 1, Batch: 2, LR: 1e-3, Model: ModelSpec{Family: "swa", Memory: -1, SelectPerChunk: -1},
		Size: "tiny", DataID: id, Vocab: vocab, TrainT: 64, Steps: 1, EvalT: []int{64, 128, 256}, EvalSpan: 512, Bucket: 32}
	r, err := RunCell(context.Background(), env, same)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []int{8, 4, 2} {
		if l := r.LM[i]; l.Windows != want {
			t.Fatalf("span 512 at T=%d: %d windows, want %d", l.T, l.Windows, want)
		}
	}
	same.EvalSpan = 500
	if err := same.Validate(); !errors.Is(err, ErrSpec) || !strings.Contains(err.Error(), "same tokens") {
		t.Fatalf("a span of 500 tokens at lengths 64..256: %v", err)
	}
	c := Cell{Version: Version, Kind: KindLM, Seed: 1, Batch: 2, LR: 1e-3, Model: ModelSpec{Family: "bmojo", Memory: -1, SelectPerChunk: -1},
		Size: "tiny", TrainT: 64, Steps: 2, EvalT: []int{64}, Bucket: 32, StatePassing: true}
	if err := c.Validate(); !errors.Is(err, ErrSpec) || !strings.Contains(err.Error(), "state-passing") {
		t.Fatalf("state passing on bmojo: %v", err)
	}
}

// TestEvalLengthPositionBuckets: the buckets' mean, weighted by their
// sizes, is the mean loss; and a length with no window is a note.
func TestEvalLengthPositionBuckets(t *testing.T) {
	c, err := model.Preset("swa-tiny")
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.New[float32](cpu.New[float32](), c, 1)
	if err != nil {
		t.Fatal(err)
	}
	toks := make([]int32, 400)
	for i := range toks {
		toks[i] = int32((i * 37) % 256)
	}
	ds, err := data.NewMemoryDataset(toks, 256)
	if err != nil {
		t.Fatal(err)
	}
	l, err := EvalLength(context.Background(), m, ds, 96, 0, 40)
	if err != nil {
		t.Fatal(err)
	}
	if l.Windows != 4 || len(l.Buckets) != 3 || l.Buckets[2].End != 96 {
		t.Fatalf("%+v", l)
	}
	var s float64
	for _, b := range l.Buckets {
		s += float64(b.Loss) * float64(b.End-b.Start)
	}
	if math.Abs(s/96-float64(l.MeanLoss)) > 1e-9 {
		t.Fatalf("buckets average %v, mean loss %v", s/96, l.MeanLoss)
	}
	// The position losses come from the device's cross-entropy; the
	// reference is a float64 softmax of the downloaded logits on the host.
	sw, err := data.EvalWindows(ds, 96)
	if err != nil {
		t.Fatal(err)
	}
	tok, tgt := make([]int32, 96), make([]int32, 96)
	var ref float64
	var cnt int
	for w := range 4 {
		if err := sw.Fill(0, w, 1, tok, tgt); err != nil {
			t.Fatal(err)
		}
		if err := m.ForwardLogits(tok); err != nil {
			t.Fatal(err)
		}
		lg, V := m.Logits(), c.VocabSize
		for p, y := range tgt {
			if y < 0 {
				continue
			}
			row := lg[p*V : (p+1)*V]
			var z float64
			for _, x := range row {
				z += math.Exp(float64(x))
			}
			ref += math.Log(z) - float64(row[y])
			cnt++
		}
	}
	if ref /= float64(cnt); math.Abs(ref-float64(l.MeanLoss)) > 1e-5*ref {
		t.Fatalf("mean loss %v, host softmax of the logits %v", l.MeanLoss, ref)
	}
	l, err = EvalLength(context.Background(), m, ds, 1024, 0, 40)
	if err != nil || l.Note == "" || l.Windows != 0 {
		t.Fatalf("too long: %+v %v", l, err)
	}
}

// TestReports writes the three reports from synthetic results and checks
// the CSV rows and that each PNG is a PNG.
func TestReports(t *testing.T) {
	dir := t.TempDir()
	var mq []Result
	for _, f := range []string{"bmojo", "mamba"} {
		for _, d := range []int{64, 128} {
			c := tinyMQAR()
			c.Model.Family, c.Model.DModel = f, d
			mq = append(mq, Result{Hash: c.Hash(), Cell: c, Device: "cpu", MQAR: []SettingResult{
				{Setting: c.Test[0], Accuracy: 0.5, Loss: 1, Examples: 6}, {Setting: c.Test[1], Accuracy: 0.25, Loss: Float(math.NaN()), Examples: 6}}})
		}
	}
	if err := WriteMQAR(dir, "mqar", "test", mq); err != nil {
		t.Fatal(err)
	}
	lm := []Result{{Hash: "h", Cell: Cell{Kind: KindLM, Model: ModelSpec{Family: "bmojo", Memory: 32, SelectPerChunk: 2}, TrainT: 64},
		LM: []LengthResult{{T: 64, Windows: 2, MeanLoss: 2, Buckets: []Bucket{{0, 32, 2.1}, {32, 64, 1.9}}}, {T: 128, Windows: 1, MeanLoss: 2.2, Buckets: []Bucket{{0, 64, 2}, {64, 128, 2.4}}}}}}
	if err := WriteLength(dir, "test", lm); err != nil {
		t.Fatal(err)
	}
	if err := WriteMemory(dir, "test", mq[:1], lm); err != nil {
		t.Fatal(err)
	}
	for name, rows := range map[string]int{"mqar.csv": 1 + 8, "length.csv": 1 + 2 + 4, "memory.csv": 1 + 2 + 2} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), "\n"); n != rows {
			t.Fatalf("%s has %d lines, want %d:\n%s", name, n, rows, b)
		}
	}
	for _, name := range []string{"mqar.png", "length.png", "memory.png"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || len(b) < 1000 || string(b[1:4]) != "PNG" {
			t.Fatalf("%s: %d bytes, %v", name, len(b), err)
		}
	}
}

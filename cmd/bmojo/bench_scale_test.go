package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/pflag"

	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/bmojo/bmojo/model"
)

// runScale runs bench scale with args (no --measure: nothing is timed) and
// returns its table and its JSON report.
func runScale(t *testing.T, args ...string) (string, scaleReport, error) {
	t.Helper()
	var f scaleFlags
	fs := pflag.NewFlagSet("scale", pflag.ContinueOnError)
	f.register(fs)
	jsonPath := filepath.Join(t.TempDir(), "scale.json")
	if err := fs.Parse(append(args, "--json", jsonPath)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	err := runBenchScale(ctx, fs.Changed, &f, &out, testlog.New(t, hclog.Info))
	var rep scaleReport
	if err == nil {
		b, rerr := os.ReadFile(jsonPath)
		if rerr != nil {
			t.Fatal(rerr)
		}
		if jerr := json.Unmarshal(b, &rep); jerr != nil {
			t.Fatal(jerr)
		}
	}
	return out.String(), rep, err
}

// within reports whether got is within a relative 1e-9 of want.
func within(got, want float64) bool { return math.Abs(got-want) <= 1e-9*math.Abs(want) }

func findRow(rep scaleReport, n, m int, scheme string) (scaleRow, bool) {
	for _, r := range rep.Rows {
		if r.PerHost == n && r.Hosts == m && r.Scheme == scheme {
			return r, true
		}
	}
	return scaleRow{}, false
}

// The table and the JSON from given inputs: every row marked predicted, one
// worker at efficiency 1, a hand-computed two-host row, and hierarchical
// beating the flat ring when the network is the slow link.
func TestBenchScaleGiven(t *testing.T) {
	out, rep, err := runScale(t, "--preset", "bmojo-130m", "--step-ms", "63.2", "--overlap", "0", "--latency-only", "0",
		"--intra-busbw", "344", "--link-gbps", "100", "--link-efficiency", "0.8", "--per-host", "1,8", "--hosts", "1,2")
	if err != nil {
		t.Fatal(err)
	}
	// 1×1, 1×2, 8×1 (hierarchical is the flat ring there) and 8×2 both ways.
	if len(rep.Rows) != 5 {
		t.Fatalf("%d rows, want 5:\n%s", len(rep.Rows), out)
	}
	for _, r := range rep.Rows {
		if r.Kind != "predicted" {
			t.Errorf("%d×%d %s is %q, want predicted", r.PerHost, r.Hosts, r.Scheme, r.Kind)
		}
	}
	one, ok := findRow(rep, 1, 1, "flat")
	if !ok || one.Efficiency != 1 || !within(one.TokensPerS, 8*2048/0.0632) {
		t.Errorf("1×1: %+v, want efficiency 1 at %v tokens/s", one, 8*2048/0.0632)
	}
	// 1×2: one ring over the network at 100/8 × 0.8 = 10 GB/s, no overlap:
	// 63.2 ms + 2·1/2 · 91,718,400 · 4 B / 10 GB/s.
	two, _ := findRow(rep, 1, 2, "flat")
	step := 0.0632 + 91718400*4/10e9
	if want := 2 * 8 * 2048 / step; !within(two.TokensPerS, want) {
		t.Errorf("1×2: %v tokens/s, want %v (step %v s)", two.TokensPerS, want, step)
	}
	flat, _ := findRow(rep, 8, 2, "flat")
	hier, ok := findRow(rep, 8, 2, "hierarchical")
	if !ok || !(hier.TokensPerS > flat.TokensPerS) {
		t.Errorf("8×2: hierarchical %v tokens/s, flat %v", hier.TokensPerS, flat.TokensPerS)
	}
	if !strings.Contains(hier.Inter.Source, "100 Gb/s link × 0.80") || hier.Inter.BusBWGBs != 10 {
		t.Errorf("8×2 inter link: %+v", hier.Inter)
	}
	for _, want := range []string{"(predicted)", "# assumptions:", "hierarchical: reduce-scatter", "8×2"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if len(rep.Validation) != 0 || len(rep.Assumptions) == 0 {
		t.Errorf("validation %v, assumptions %v", rep.Validation, rep.Assumptions)
	}
}

// A bf16 wire halves the gradient and so the communication.
func TestBenchScaleBF16(t *testing.T) {
	args := []string{"--preset", "bmojo-tiny", "--step-ms", "10", "--intra-busbw", "1", "--per-host", "4", "--hosts", "1", "--overlap", "0"}
	_, f32, err := runScale(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	_, b16, err := runScale(t, append(args, "--wire", "bf16")...)
	if err != nil {
		t.Fatal(err)
	}
	if b16.GradientBytes*2 != f32.GradientBytes {
		t.Errorf("gradient %v bytes in bf16, %v in fp32", b16.GradientBytes, f32.GradientBytes)
	}
	if got, want := b16.Rows[0].CommMs, f32.Rows[0].CommMs/2; !within(got, want) {
		t.Errorf("bf16 communication %v ms, want half of fp32's: %v", got, want)
	}
}

// --stage-gbps adds the float32 gradient down and up to every step of two or
// more workers, and nothing to one worker's.
func TestBenchScaleStaging(t *testing.T) {
	args := []string{"--preset", "bmojo-tiny", "--step-ms", "10", "--intra-busbw", "1", "--per-host", "1,2", "--hosts", "1"}
	_, plain, err := runScale(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	_, staged, err := runScale(t, append(args, "--stage-gbps", "2")...)
	if err != nil {
		t.Fatal(err)
	}
	want := 2 * float64(staged.Params*4) / 2e9 * 1e3 // ms
	if d := staged.Rows[1].StepMs - plain.Rows[1].StepMs; !within(d, want) {
		t.Errorf("2 workers: staging added %v ms, want %v", d, want)
	}
	if staged.Rows[0].StepMs != plain.Rows[0].StepMs {
		t.Errorf("1 worker: %v ms staged, %v ms without", staged.Rows[0].StepMs, plain.Rows[0].StepMs)
	}
}

func TestBenchScaleFlags(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no step time", []string{"--intra-busbw", "1", "--link-gbps", "100"}, "--step-ms"},
		{"no intra busbw", []string{"--step-ms", "1", "--link-gbps", "100"}, "--intra-busbw"},
		{"no inter busbw", []string{"--step-ms", "1", "--intra-busbw", "1"}, "--inter-busbw"},
		{"one host needs no inter busbw", []string{"--step-ms", "1", "--intra-busbw", "1", "--hosts", "1", "--per-host", "0"}, "--per-host"},
		{"both link flags", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--inter-busbw", "3"}, "--link-gbps"},
		{"bad scheme", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--scheme", "tree"}, "--scheme"},
		{"bad wire", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--wire", "fp8"}, "--wire"},
		{"validate needs measure", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--validate"}, "--validate"},
		{"validate on a GPU", []string{"--measure", "--validate", "--device", "cuda"}, "--validate"},
		{"measure and a step time", []string{"--measure", "--step-ms", "1"}, "--step-ms"},
		{"overlap out of range", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--overlap", "2"}, "overlap"},
		{"zero intra busbw with --measure", []string{"--measure", "--intra-busbw", "0"}, "--intra-busbw"},
		{"negative latency", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--inter-latency-us", "-1"}, "latenc"},
		{"unknown preset", []string{"--step-ms", "1", "--intra-busbw", "1", "--link-gbps", "100", "--preset", "gpt-9"}, "gpt-9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := runScale(t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %q", err, tc.want)
			}
		})
	}
	// The one-host case without --inter-busbw is fine.
	if _, _, err := runScale(t, "--step-ms", "1", "--intra-busbw", "1", "--hosts", "1"); err != nil {
		t.Errorf("one host without --inter-busbw: %v", err)
	}
}

func TestParseAllreduceTimes(t *testing.T) {
	table := `# bmojo ring all-reduce: 2 ranks (processes) on one host, data over shared memory, control over gRPC on loopback TCP, float32 buffers, wire float32
# transport auto: hops 2 via shm; chunk 256KiB; grpc: streams/neighbour 4, window 16MiB, read buffer 1MiB, write buffer 1MiB; shm: queues/neighbour 4, slots/queue 8
        size        count  iters     time(us)      min(us) algbw(GB/s) busbw(GB/s)
       4KiB         1024     50        140.3         90.0      0.029      0.029
     360448        90112     50        218.0        190.0      1.653      1.653
# latency at 1MiB: mean 780.0 us
`
	got, err := parseAllreduceTimes(table)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || !within(got["4KiB"], 140.3e-6) || !within(got["360448"], 218e-6) {
		t.Errorf("parsed %v", got)
	}
	if _, err := parseAllreduceTimes("# nothing\n"); err == nil {
		t.Error("a table without rows parsed")
	}
}

func TestCPUThreads(t *testing.T) {
	for _, tc := range []struct{ n, cores, want int }{
		{1, 2, 2}, {2, 2, 1}, {4, 2, 1}, {3, 2, 1}, {4, 16, 4}, {5, 16, 3},
	} {
		if got := cpuThreads(tc.n, tc.cores); got != tc.want {
			t.Errorf("cpuThreads(%d, %d) = %d, want %d", tc.n, tc.cores, got, tc.want)
		}
	}
}

func TestParseStepTokensPerS(t *testing.T) {
	table := `preset bmojo-tiny: 196672 parameters, batch 4 × 128 tokens
threads      step (s)     tokens/s  speed-up
1               0.175         2917     1.00x
2               0.100         5120     1.76x
`
	for _, tc := range []struct {
		threads int
		want    float64
	}{{1, 2917}, {2, 5120}} {
		got, err := parseStepTokensPerS(table, tc.threads)
		if err != nil || got != tc.want {
			t.Errorf("threads %d: %v, %v; want %v", tc.threads, got, err, tc.want)
		}
	}
	if _, err := parseStepTokensPerS(table, 4); err == nil {
		t.Error("a thread count without a row parsed")
	}
}

// The meter's medians: each input is the median over the repeats, and the
// links are fitted to the median times.
func TestScaleMeterResult(t *testing.T) {
	f := &scaleFlags{batch: 4, perHost: []int{1, 2}, hosts: []int{1, 2}, steps: 5}
	m := &scaleMeter{f: f, c: model.Config{SeqLen: 128}, desc: "cpu", onCPU: true, cores: 2, wb: 4,
		small: 4096, large: 1 << 20, needInter: true}
	// Two ranks: 4 KiB in 100 µs, 1 MiB in 100 µs + (1 MiB − 4 KiB) / 1 GB/s:
	// busbw 1 GB/s, and per ring step half of what 100 µs leaves after
	// 4 KiB at 1 GB/s. The stand-in network takes twice as long.
	link := [2]float64{100e-6, 100e-6 + float64(1<<20-4096)/1e9}
	for _, alone := range []float64{0.3, 0.1, 0.2} {
		m.samples = append(m.samples, scaleSample{alone: alone, share: alone * 2, step: map[int]float64{1: alone, 2: 3 * alone},
			link: map[int][2]float64{2: link}, inter: [2]float64{2 * link[0], 2 * link[1]}})
	}
	r, err := m.result()
	if err != nil {
		t.Fatal(err)
	}
	if !within(r.aloneStep, 0.2) || !within(r.baseline, 4*128/0.2) || !within(r.backwardShare, 0.4) {
		t.Errorf("alone %v s, baseline %v tokens/s, backward share %v", r.aloneStep, r.baseline, r.backwardShare)
	}
	if got := r.perN[2]; !within(got.stepSeconds, 3*0.2) || !within(got.intra.BusBW, 1e9) || !within(got.intra.Latency, (100e-6-4096/1e9)/2) {
		t.Errorf("2 workers: %+v", got)
	}
	if !within(r.inter.BusBW, 0.5e9) || !within(r.inter.Latency, (200e-6-4096/0.5e9)/2) || !strings.Contains(r.interSource, "stand-in") {
		t.Errorf("inter: %+v (%s)", r.inter, r.interSource)
	}
}

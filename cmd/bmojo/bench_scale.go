package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/internal/scale"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/model"
)

// scaleFlags are bench scale's inputs. Rates are in GB/s (1e9 bytes),
// latencies in µs, times in ms, as the table prints them.
type scaleFlags struct {
	preset         string
	seqLen, vocab  int
	batch          int
	wire           string
	perHost, hosts []int
	scheme         string
	stepMs         float64
	backwardShare  float64
	overlap        float64
	intraBusBW     float64
	intraLatUs     float64
	interBusBW     float64
	interLatUs     float64
	linkGbps       float64
	linkEff        float64
	lossSums       int
	stageGBs       float64

	measure    bool
	validate   bool
	dev        string
	steps      int
	repeats    int
	trainSteps int
	jsonOut    string
}

// scaleLinkReport is one link as the model used it and where it came from.
type scaleLinkReport struct {
	BusBWGBs  float64 `json:"busbw_gb_s"`
	LatencyUs float64 `json:"latency_us"`
	Source    string  `json:"source"`
}

// scaleRow is one prediction (Kind "predicted") of the table.
type scaleRow struct {
	Kind                  string          `json:"kind"`
	PerHost               int             `json:"per_host"`
	Hosts                 int             `json:"hosts"`
	Ranks                 int             `json:"ranks"`
	Scheme                string          `json:"scheme"`
	ComputeMs             float64         `json:"compute_ms"`
	CommMs                float64         `json:"comm_ms"`
	ExposedMs             float64         `json:"exposed_ms"`
	StepMs                float64         `json:"step_ms"`
	TokensPerS            float64         `json:"tokens_per_s"`
	Efficiency            float64         `json:"efficiency"`
	NoOverlapTokensPerS   float64         `json:"no_overlap_tokens_per_s"`
	FullOverlapTokensPerS float64         `json:"full_overlap_tokens_per_s"`
	Intra                 scaleLinkReport `json:"intra"`
	Inter                 scaleLinkReport `json:"inter"`
}

// scaleValidation is one measured training run beside its prediction.
type scaleValidation struct {
	Kind                string    `json:"kind"` // "measured"
	Workers             int       `json:"workers"`
	Command             string    `json:"command"`
	MeasuredTokensPerS  []float64 `json:"measured_tokens_per_s"` // every repeat
	MedianTokensPerS    float64   `json:"median_tokens_per_s"`
	PredictedTokensPerS float64   `json:"predicted_tokens_per_s"`
	NoOverlapTokensPerS float64   `json:"no_overlap_tokens_per_s"`
	ErrorPct            float64   `json:"error_pct"` // (predicted − measured) / measured
}

// scaleReport is what bench scale writes with --json.
type scaleReport struct {
	Date           string            `json:"date"`
	Host           string            `json:"host"`
	CPUs           int               `json:"cpus"`
	Preset         string            `json:"preset"`
	Params         int               `json:"params"`
	SeqLen         int               `json:"seq_len"`
	BatchPerWorker int               `json:"batch_per_worker"`
	Wire           string            `json:"wire"`
	GradientBytes  float64           `json:"gradient_bytes"`
	Buckets        []float64         `json:"bucket_bytes"`
	StepMs         float64           `json:"step_ms"`
	StepSource     string            `json:"step_source"`
	BackwardShare  float64           `json:"backward_share"`
	BackwardSource string            `json:"backward_source"`
	Overlap        float64           `json:"overlap"`
	Assumptions    []string          `json:"assumptions"`
	Rows           []scaleRow        `json:"rows"`
	Validation     []scaleValidation `json:"validation,omitempty"`
	// LoadAvg is /proc/loadavg's 1-minute figure at the start of each
	// --measure repeat: what else the machine was running.
	LoadAvg []string `json:"load_avg_at_samples,omitempty"`
}

func init() {
	var f scaleFlags
	cmd := &cobra.Command{
		Use:   "scale",
		Short: "Predict tokens/s and scaling efficiency for N workers per host × M hosts (flat ring and hierarchical)",
		Long: `Predict data-parallel tokens/s and scaling efficiency for N workers (GPUs,
or CPU worker processes) per host × M hosts, for the flat ring and for the
hierarchical scheme (reduce-scatter inside each host, a ring across hosts on
each rank's 1/N shard, all-gather inside each host), from: one worker's
step time without communication, backward's share of it, the gradient's
buckets (the preset's layers × bytes per element on the wire), how much of
backward communication may overlap, and the all-reduce busbw and per-step
latency inside and between hosts (internal/scale holds the model).

Every input is a flag. --measure measures on this machine instead: the step
time with bench step (on the CPU, N bench step processes at once at the
threads bmojo train gives each of N workers), backward's share from the
same step timed in parts, and busbw and latency with bench allreduce's rank
processes at 4 KiB and the largest bucket (shared
memory between the ranks of this host; gRPC over loopback TCP as a stand-in
for the network when no --inter-busbw is given). --validate then trains the
preset with bmojo train --workers N for each N per host of the table (one
host) and prints the measured tokens/s beside the prediction, with the error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBenchScale(cmd.Context(), cmd.Flags().Changed, &f, cmd.OutOrStdout(), newLogger().Named("scale"))
		},
	}
	f.register(cmd.Flags())
	benchCmd.AddCommand(cmd)
}

// register adds bench scale's flags to fl, with their defaults.
func (f *scaleFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&f.preset, "preset", "bmojo-130m", "model preset: its parameter count and layers make the gradient's buckets")
	fl.IntVar(&f.seqLen, "seq-len", 0, "sequence length (default: the preset's)")
	fl.IntVar(&f.vocab, "vocab-size", 0, "vocabulary (default: the preset's, 256 bytes)")
	fl.IntVar(&f.batch, "batch-size", 8, "sequences per worker per step")
	fl.StringVar(&f.wire, "wire", "fp32", "gradient element on the wire: fp32 or bf16")
	fl.IntSliceVar(&f.perHost, "per-host", []int{1, 2, 4, 8}, "workers per host (N) to predict")
	fl.IntSliceVar(&f.hosts, "hosts", []int{1, 2, 4, 8}, "hosts (M) to predict")
	fl.StringVar(&f.scheme, "scheme", "both", "flat, hierarchical or both")
	fl.Float64Var(&f.stepMs, "step-ms", 0, "one worker's step without communication in ms (forward, backward, optimizer); required without --measure")
	fl.Float64Var(&f.backwardShare, "backward-share", 2.0/3, "backward's share of the step (--measure measures it); 2/3: backward does twice forward's FLOPs")
	fl.Float64Var(&f.overlap, "overlap", 1, "fraction of backward that the gradient buckets' all-reduce may run under: 0 = none (step = compute + communication), 1 = each bucket starts when backward produces it")
	fl.Float64Var(&f.intraBusBW, "intra-busbw", 0, "all-reduce busbw inside a host in GB/s (--measure: shared memory between this host's ranks)")
	fl.Float64Var(&f.intraLatUs, "intra-latency-us", 0, "latency of one ring step inside a host in µs")
	fl.Float64Var(&f.interBusBW, "inter-busbw", 0, "all-reduce busbw between hosts in GB/s, one host's network shared by all its ranks (or --link-gbps)")
	fl.Float64Var(&f.interLatUs, "inter-latency-us", 0, "latency of one ring step between hosts in µs")
	fl.Float64Var(&f.linkGbps, "link-gbps", 0, "network link per host in Gb/s; sets --inter-busbw to link/8 × --link-efficiency")
	fl.Float64Var(&f.linkEff, "link-efficiency", 0.8, "with --link-gbps: the fraction of the line rate a ring's busbw reaches")
	fl.Float64Var(&f.stageGBs, "stage-gbps", 0, "GPU workers on a host-memory ring: device↔host copy rate in GB/s; each step downloads the float32 gradient and uploads the sums (worker/step.go), not hidden (0: none, a GPU-resident ring or CPU workers)")
	fl.IntVar(&f.lossSums, "latency-only", 1, "tiny collectives per step after the gradient (the worker sums the loss once)")
	fl.BoolVar(&f.measure, "measure", false, "measure step time, backward share and busbw on this machine (see the long help); link flags that are given are used instead of measuring them")
	fl.BoolVar(&f.validate, "validate", false, "with --measure: train with bmojo train --workers N for each N per host (one host) and compare")
	fl.StringVar(&f.dev, "device", "cpu", "with --measure: cpu, cuda or cuda:N")
	fl.IntVar(&f.steps, "steps", 5, "with --measure: timed steps per step-time measurement")
	fl.IntVar(&f.repeats, "repeats", 3, "with --measure: repeats of every measurement (medians are used)")
	fl.IntVar(&f.trainSteps, "train-steps", 40, "with --validate: training steps per run")
	fl.StringVar(&f.jsonOut, "json", "", "also write the inputs, assumptions and rows to this JSON file")
}

func (f *scaleFlags) validateFlags(changed func(string) bool) error {
	bad := func(flag, format string, a ...any) error {
		return fmt.Errorf("bench scale: --%s: %s", flag, fmt.Sprintf(format, a...))
	}
	switch {
	case f.batch <= 0:
		return bad("batch-size", "must be positive, got %d", f.batch)
	case len(f.perHost) == 0 || slices.Min(f.perHost) < 1:
		return bad("per-host", "needs values >= 1, got %v", f.perHost)
	case len(f.hosts) == 0 || slices.Min(f.hosts) < 1:
		return bad("hosts", "needs values >= 1, got %v", f.hosts)
	case f.scheme != "both" && f.scheme != string(scale.Flat) && f.scheme != string(scale.Hierarchical):
		return bad("scheme", "%q: want flat, hierarchical or both", f.scheme)
	case f.steps <= 0 || f.repeats <= 0 || f.trainSteps <= 0:
		return bad("steps", "--steps, --repeats and --train-steps must be positive")
	case f.validate && !f.measure:
		return bad("validate", "needs --measure (the prediction it checks comes from inputs measured here)")
	case f.validate && f.dev != "cpu":
		return bad("validate", "trains CPU workers only (--device cpu): N GPU workers on this host's GPUs may share one, which the model does not describe")
	case f.validate && !slices.Contains(f.hosts, 1):
		return bad("validate", "runs on one host: --hosts must include 1")
	case f.validate && (f.seqLen > 0 || f.vocab > 0):
		return bad("validate", "trains the preset as it is: drop --seq-len and --vocab-size")
	case changed("intra-busbw") && !(f.intraBusBW > 0):
		return bad("intra-busbw", "must be positive, got %v", f.intraBusBW)
	case changed("inter-busbw") && !(f.interBusBW > 0):
		return bad("inter-busbw", "must be positive, got %v", f.interBusBW)
	case f.intraLatUs < 0 || f.interLatUs < 0:
		return bad("intra-latency-us", "latencies must be >= 0")
	case f.stageGBs < 0:
		return bad("stage-gbps", "must be >= 0, got %v", f.stageGBs)
	case f.linkGbps < 0 || !(f.linkEff > 0 && f.linkEff <= 1):
		return bad("link-efficiency", "--link-gbps must be >= 0 and --link-efficiency in (0, 1]")
	case f.linkGbps > 0 && changed("inter-busbw"):
		return bad("link-gbps", "give --link-gbps or --inter-busbw, not both")
	case !f.measure && !(f.stepMs > 0):
		return bad("step-ms", "required (positive) without --measure")
	case f.measure && changed("step-ms"):
		return bad("step-ms", "--measure measures the step; drop one")
	}
	if !f.measure {
		if !(f.intraBusBW > 0) && slices.Max(f.perHost) > 1 {
			return bad("intra-busbw", "required (positive) without --measure when --per-host has values above 1")
		}
		if !(f.interBusBW > 0) && f.linkGbps == 0 && slices.Max(f.hosts) > 1 {
			return bad("inter-busbw", "required (or --link-gbps) without --measure when --hosts has values above 1")
		}
	}
	return nil
}

func (f *scaleFlags) schemes() []scale.Scheme {
	switch f.scheme {
	case string(scale.Flat):
		return []scale.Scheme{scale.Flat}
	case string(scale.Hierarchical):
		return []scale.Scheme{scale.Hierarchical}
	}
	return []scale.Scheme{scale.Flat, scale.Hierarchical}
}

// cpuThreads is the threads each of n CPU workers runs, as bmojo train
// starts them (internal/localrun: max(1, cores/n)).
func cpuThreads(n, cores int) int { return max(1, cores/n) }

// perHostInputs is what the model gets for N workers on one host: the
// compute step as N workers run it and the intra-host link.
type perHostInputs struct {
	stepSeconds float64
	stepSource  string
	intra       scale.Link
	intraSource string
}

func runBenchScale(ctx context.Context, changed func(string) bool, f *scaleFlags, out io.Writer, log hclog.Logger) error {
	if ctx == nil {
		ctx = context.Background()
	}
	if err := f.validateFlags(changed); err != nil {
		return err
	}
	c, err := model.Preset(f.preset)
	if err != nil {
		return fmt.Errorf("bench scale: %w", err)
	}
	if f.seqLen > 0 {
		c.SeqLen = f.seqLen
	}
	if f.vocab > 0 {
		c.VocabSize = f.vocab
	}
	if err := c.Validate(); err != nil {
		return fmt.Errorf("bench scale: %w", err)
	}
	wb, err := scale.WireBytes(f.wire)
	if err != nil {
		return fmt.Errorf("bench scale: --wire: %w", err)
	}
	buckets := scale.Buckets(c, wb)
	params := model.NewLayout(c).ParamCount()
	host, _ := os.Hostname()
	rep := scaleReport{
		Date: time.Now().UTC().Format(time.RFC3339), Host: host, CPUs: runtime.NumCPU(),
		Preset: f.preset, Params: params, SeqLen: c.SeqLen, BatchPerWorker: f.batch, Wire: f.wire,
		GradientBytes: float64(params * wb), Buckets: buckets,
		BackwardShare: f.backwardShare, BackwardSource: "given (--backward-share)", Overlap: f.overlap,
	}
	tokens := float64(f.batch * c.SeqLen)

	perN := map[int]perHostInputs{}
	val := map[int]*scaleValidation{} // --validate's runs by workers
	var baseline float64              // one worker alone, tokens/s
	inter := scale.Link{BusBW: f.interBusBW * 1e9, Latency: f.interLatUs * 1e-6}
	interSource := "given (--inter-busbw, --inter-latency-us)"
	if f.linkGbps > 0 {
		inter.BusBW = f.linkGbps / 8 * f.linkEff * 1e9
		interSource = fmt.Sprintf("%.0f Gb/s link × %.2f efficiency (assumed)", f.linkGbps, f.linkEff)
	}
	if !f.measure {
		step := f.stepMs / 1e3
		rep.StepMs, rep.StepSource = f.stepMs, "given (--step-ms)"
		baseline = tokens / step
		for _, n := range f.perHost {
			perN[n] = perHostInputs{stepSeconds: step, stepSource: rep.StepSource,
				intra: scale.Link{BusBW: f.intraBusBW * 1e9, Latency: f.intraLatUs * 1e-6}, intraSource: "given (--intra-busbw, --intra-latency-us)"}
		}
		if slices.Max(f.hosts) == 1 {
			// No row crosses hosts; any positive value keeps Validate quiet.
			inter, interSource = scale.Link{BusBW: math.Inf(1)}, "unused (one host)"
		}
	} else {
		o, err := device.Open(f.dev, device.Options{Logger: log})
		if err != nil {
			return fmt.Errorf("bench scale: %w", err)
		}
		defer o.Close()
		meter := newScaleMeter(f, c, o, buckets, wb, log)
		meter.intraGiven = changed("intra-busbw")
		// Each repeat measures the inputs and then trains, so that the
		// prediction and the runs it is checked against see the same load.
		for range f.repeats {
			if err := meter.sample(ctx); err != nil {
				return err
			}
			if f.validate {
				for _, n := range f.perHost {
					if err := trainOnce(ctx, f, n, val, log); err != nil {
						return err
					}
				}
			}
		}
		m, err := meter.result()
		if err != nil {
			return err
		}
		perN, baseline = m.perN, m.baseline
		rep.LoadAvg = meter.loads
		if meter.intraGiven {
			for n, in := range perN {
				in.intra, in.intraSource = scale.Link{BusBW: f.intraBusBW * 1e9, Latency: f.intraLatUs * 1e-6}, "given (--intra-busbw, --intra-latency-us)"
				perN[n] = in
			}
		}
		rep.StepMs, rep.StepSource = 1e3*m.aloneStep, m.aloneSource
		if !changed("backward-share") {
			rep.BackwardShare, rep.BackwardSource = m.backwardShare, m.backwardSource
		}
		if slices.Max(f.hosts) > 1 && !(inter.BusBW > 0) {
			inter, interSource = m.inter, m.interSource
		} else if slices.Max(f.hosts) == 1 {
			inter, interSource = scale.Link{BusBW: math.Inf(1)}, "unused (one host)"
		}
	}

	rep.Assumptions = scaleAssumptions(f, rep, interSource)
	for _, n := range f.perHost {
		pin := perN[n]
		in := scale.Input{
			StepSeconds: pin.stepSeconds, BackwardShare: rep.BackwardShare, TokensPerStep: tokens,
			Buckets: buckets, Overlap: f.overlap, Intra: pin.intra, Inter: inter,
			LatencyOnly: f.lossSums, BaselineTokensPerS: baseline,
		}
		if f.stageGBs > 0 {
			in.StageSeconds = 2 * float64(params*4) / (f.stageGBs * 1e9)
		}
		if n == 1 {
			in.Intra = scale.Link{BusBW: math.Inf(1)} // no hop inside a host
		}
		for _, m := range f.hosts {
			for _, s := range f.schemes() {
				if (n == 1 || m == 1) && s == scale.Hierarchical && len(f.schemes()) > 1 {
					continue // the same ring as flat (TestHierarchicalEqualsFlat)
				}
				p, err := scale.Predict(in, scale.Topology{PerHost: n, Hosts: m}, s)
				if err != nil {
					return fmt.Errorf("bench scale: %d per host × %d hosts: %w", n, m, err)
				}
				row := scaleRow{Kind: "predicted", PerHost: n, Hosts: m, Ranks: p.Ranks, Scheme: string(s),
					ComputeMs: 1e3 * pin.stepSeconds, CommMs: 1e3 * p.CommSeconds, ExposedMs: 1e3 * p.ExposedSeconds,
					StepMs: 1e3 * p.StepSeconds, TokensPerS: p.TokensPerS, Efficiency: p.Efficiency,
					NoOverlapTokensPerS: p.NoOverlapTokensPerS, FullOverlapTokensPerS: p.FullOverlapTokensPerS}
				if n > 1 {
					row.Intra = linkReport(pin.intra, pin.intraSource)
				}
				if m > 1 {
					row.Inter = linkReport(inter, interSource)
				}
				rep.Rows = append(rep.Rows, row)
			}
		}
	}
	printScale(out, rep)

	if f.validate {
		reportValidation(f, &rep, val, out)
	}
	return writeJSON(f.jsonOut, rep)
}

func linkReport(l scale.Link, src string) scaleLinkReport {
	return scaleLinkReport{BusBWGBs: l.BusBW / 1e9, LatencyUs: l.Latency * 1e6, Source: src}
}

func scaleAssumptions(f *scaleFlags, rep scaleReport, interSource string) []string {
	a := []string{
		fmt.Sprintf("compute: %.2f ms per step for one worker alone (%s); every worker of a row runs the same step (data parallel, %d × %d tokens each)", rep.StepMs, rep.StepSource, f.batch, rep.SeqLen),
		fmt.Sprintf("gradient: %d parameters × %d bytes (%s on the wire) = %.1f MB in %d buckets, one per layer in backward's order then the embedding, all-reduced one at a time", rep.Params, int(rep.GradientBytes)/rep.Params, f.wire, rep.GradientBytes/1e6, len(rep.Buckets)),
		fmt.Sprintf("overlap %.2f of backward, backward %.2f of the step (%s); backward produces gradient bytes at an even rate; the last bucket (the embedding) and the %d loss sum(s) never hide", f.overlap, rep.BackwardShare, rep.BackwardSource, f.lossSums),
		"flat ring: 2(n−1)/n × bytes / busbw of the slowest hop + 2(n−1) × that hop's latency, per bucket",
		"hierarchical: reduce-scatter + all-gather inside each host (2(N−1)/N × bytes / intra busbw + 2(N−1) × intra latency), N shard rings across hosts sharing one host's network (2(M−1)/M × bytes / inter busbw + 2(M−1) × inter latency)",
		"inter-host: " + interSource,
		stageAssumption(f, rep),
		"not modelled: stragglers, the optimizer's own scaling (it is in the compute time), the training loop's own per-step work (data, etcd records), network congestion beyond one link per host",
	}
	if f.measure && strings.HasPrefix(f.dev, "cpu") {
		a = append(a, "CPU workers share this machine's cores as bmojo train runs them (max(1, cores/N) threads each): their compute step is measured with N bench step processes running at once; the all-reduce was measured alone and competes with compute for the same cores when they overlap")
	}
	return a
}

func stageAssumption(f *scaleFlags, rep scaleReport) string {
	if f.stageGBs == 0 {
		return "no device↔host staging of the gradient (a GPU-resident ring, or CPU workers)"
	}
	return fmt.Sprintf("device↔host staging: the float32 gradient down and the sums up at %.3g GB/s, %.2f ms per step with 2 or more workers, never hidden", f.stageGBs, 2e3*float64(rep.Params*4)/(f.stageGBs*1e9))
}

func printScale(out io.Writer, rep scaleReport) {
	fmt.Fprintf(out, "# bmojo scaling model (predicted): %s, %d parameters, batch %d × %d tokens per worker, gradient %.3g MB (%s wire) in %d buckets\n",
		rep.Preset, rep.Params, rep.BatchPerWorker, rep.SeqLen, rep.GradientBytes/1e6, rep.Wire, len(rep.Buckets))
	fmt.Fprintln(out, "# assumptions:")
	for _, a := range rep.Assumptions {
		fmt.Fprintf(out, "#  - %s\n", a)
	}
	fmt.Fprintf(out, "%-9s %5s %-12s %10s %10s %10s %10s %12s %6s %25s %16s %16s\n", "N×M", "ranks", "scheme",
		"compute", "comm", "exposed", "step", "tokens/s", "eff", "bounds (no..full overlap)", "intra GB/s, µs", "inter GB/s, µs")
	for _, r := range rep.Rows {
		link := func(l scaleLinkReport) string {
			if l.Source == "" {
				return "-"
			}
			return fmt.Sprintf("%.3g, %.3g", l.BusBWGBs, l.LatencyUs)
		}
		fmt.Fprintf(out, "%-9s %5d %-12s %8.2fms %8.2fms %8.2fms %8.2fms %12.0f %5.1f%% %12.0f..%-12.0f %16s %16s\n",
			fmt.Sprintf("%d×%d", r.PerHost, r.Hosts), r.Ranks, r.Scheme, r.ComputeMs, r.CommMs, r.ExposedMs, r.StepMs,
			r.TokensPerS, 100*r.Efficiency, r.NoOverlapTokensPerS, r.FullOverlapTokensPerS, link(r.Intra), link(r.Inter))
	}
}

// scaleMeasured is what --measure found (medians over the repeats).
type scaleMeasured struct {
	perN           map[int]perHostInputs
	baseline       float64 // one worker alone, tokens/s
	aloneStep      float64
	aloneSource    string
	backwardShare  float64
	backwardSource string
	inter          scale.Link
	interSource    string
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// scaleSample is one repeat's raw measurements.
type scaleSample struct {
	alone, share float64            // one worker alone: step seconds, backward's share
	step         map[int]float64    // N → step seconds of N workers computing at once
	link         map[int][2]float64 // N → all-reduce seconds at the small and the large size
	inter        [2]float64         // the same over 2 ranks of the inter-host stand-in
}

// scaleMeter measures the inputs on this machine, one repeat at a time, so
// that a validation run can interleave with them and see the same load.
type scaleMeter struct {
	f            *scaleFlags
	c            model.Config
	be           kernels.Backend[float32]
	desc         string
	onCPU        bool
	cores        int
	wb           int
	small, large int // bench allreduce sizes (bytes of float32)
	needInter    bool
	intraGiven   bool // --intra-busbw given: not measured
	log          hclog.Logger
	samples      []scaleSample
	loads        []string
}

const scaleSmallBytes = 4096

func newScaleMeter(f *scaleFlags, c model.Config, o *device.Opened, buckets []float64, wb int, log hclog.Logger) *scaleMeter {
	large := slices.Max(buckets) * 4 / float64(wb) // bench allreduce sizes are of float32 buffers
	return &scaleMeter{f: f, c: c, be: o.Backend, desc: o.Desc, onCPU: o.Kind == "cpu", cores: runtime.NumCPU(), wb: wb,
		small: scaleSmallBytes, large: max(2*scaleSmallBytes, int(math.Ceil(large/4))*4),
		needInter: slices.Max(f.hosts) > 1 && f.interBusBW == 0 && f.linkGbps == 0, log: log}
}

// sample takes one repeat of every measurement.
func (m *scaleMeter) sample(ctx context.Context) error {
	s := scaleSample{step: map[int]float64{}, link: map[int][2]float64{}}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil { // Linux only; context, not an input
		m.loads = append(m.loads, strings.Fields(string(b))[0])
	}
	prev := runtime.GOMAXPROCS(m.cores)
	var err error
	s.alone, s.share, err = timePhases(m.be, m.c, m.f.batch, m.f.steps)
	runtime.GOMAXPROCS(prev)
	if err != nil {
		return fmt.Errorf("bench scale: step time: %w", err)
	}
	if m.onCPU {
		// One worker alone, as the other rows are measured: in its own process.
		if s.alone, err = m.concurrentSteps(ctx, 1, m.cores); err != nil {
			return fmt.Errorf("bench scale: step time: %w", err)
		}
	}
	for _, n := range m.f.perHost {
		threads := cpuThreads(n, m.cores)
		s.step[n] = s.alone
		if m.onCPU && n > 1 {
			if s.step[n], err = m.concurrentSteps(ctx, n, threads); err != nil {
				return fmt.Errorf("bench scale: step time of %d workers: %w", n, err)
			}
		}
		if n > 1 && !m.intraGiven {
			if s.link[n], err = m.allreduce(ctx, n, "auto", threads); err != nil {
				return err
			}
		}
		m.log.Info("measured", "workers", n, "step_ms", 1e3*s.step[n], "allreduce_small_us", 1e6*s.link[n][0], "allreduce_large_us", 1e6*s.link[n][1])
	}
	if m.needInter {
		if s.inter, err = m.allreduce(ctx, 2, "grpc", max(1, m.cores/2)); err != nil {
			return err
		}
	}
	m.samples = append(m.samples, s)
	return nil
}

// allreduce runs bench allreduce once over n rank processes of threads each
// and returns the slowest rank's mean time at the small and large sizes.
func (m *scaleMeter) allreduce(ctx context.Context, n int, transport string, threads int) ([2]float64, error) {
	var af benchAllreduceFlags
	af.register(&cobra.Command{}) // its defaults
	af.ranks, af.transport, af.procs, af.bf16 = n, transport, threads, m.wb == 2
	af.sizes = fmt.Sprintf("%d,%d", m.small, m.large)
	var buf bytes.Buffer
	if err := runBenchAllreduce(ctx, &af, &buf); err != nil {
		return [2]float64{}, fmt.Errorf("bench scale: all-reduce over %d ranks (%s): %w", n, transport, err)
	}
	times, err := parseAllreduceTimes(buf.String())
	if err != nil {
		return [2]float64{}, fmt.Errorf("bench scale: all-reduce over %d ranks (%s): %w", n, transport, err)
	}
	t0, ok0 := times[fmtBytes(m.small)]
	t1, ok1 := times[fmtBytes(m.large)]
	if !ok0 || !ok1 {
		return [2]float64{}, fmt.Errorf("bench scale: all-reduce over %d ranks: sizes %s and %s missing from:\n%s", n, fmtBytes(m.small), fmtBytes(m.large), buf.String())
	}
	return [2]float64{t0, t1}, nil
}

// fit turns medians of timings at the small and large sizes into a Link.
func (m *scaleMeter) fit(n int, ts [][2]float64) (scale.Link, error) {
	var t0, t1 []float64
	for _, t := range ts {
		t0, t1 = append(t0, t[0]), append(t1, t[1])
	}
	w := float64(m.wb) / 4 // a bf16 wire carries half of the float32 buffer
	l, err := scale.FitLink(n, w*float64(m.small), median(t0), w*float64(m.large), median(t1))
	if err != nil {
		return scale.Link{}, fmt.Errorf("bench scale: %w", err)
	}
	return l, nil
}

// result is the medians over the samples taken.
func (m *scaleMeter) result() (scaleMeasured, error) {
	r := scaleMeasured{perN: map[int]perHostInputs{}}
	k := len(m.samples)
	col := func(get func(scaleSample) float64) float64 {
		var xs []float64
		for _, s := range m.samples {
			xs = append(xs, get(s))
		}
		return median(xs)
	}
	r.aloneStep = col(func(s scaleSample) float64 { return s.alone })
	r.baseline = float64(m.f.batch*m.c.SeqLen) / r.aloneStep
	r.aloneSource = fmt.Sprintf("measured: bench step's step on %s, %d threads, median of %d × %d steps", m.desc, m.cores, k, m.f.steps)
	if m.onCPU {
		r.aloneSource = fmt.Sprintf("measured: bmojo bench step --device cpu --threads %d --steps %d, median of %d", m.cores, m.f.steps, k)
	}
	r.backwardShare = col(func(s scaleSample) float64 { return s.share })
	r.backwardSource = fmt.Sprintf("measured: forward, backward and optimizer of bench step's step timed apart, %d threads, median of %d × %d steps", m.cores, k, m.f.steps)
	sizes := fmt.Sprintf("%s,%s", fmtBytes(m.small), fmtBytes(m.large))
	for _, n := range m.f.perHost {
		threads := cpuThreads(n, m.cores)
		in := perHostInputs{stepSeconds: col(func(s scaleSample) float64 { return s.step[n] }), stepSource: r.aloneSource}
		if m.onCPU && n > 1 {
			in.stepSource = fmt.Sprintf("measured: %d bmojo bench step --device cpu --threads %d processes at once (as bmojo train's %d workers share %d cores), the slowest, median of %d", n, threads, n, m.cores, k)
		}
		if n > 1 && !m.intraGiven {
			var ts [][2]float64
			for _, s := range m.samples {
				ts = append(ts, s.link[n])
			}
			l, err := m.fit(n, ts)
			if err != nil {
				return r, err
			}
			in.intra = l
			in.intraSource = fmt.Sprintf("measured: bench allreduce --ranks %d --transport auto --procs %d --sizes %s, busbw from the slope, latency from the rest of the small size's time, medians of %d", n, threads, sizes, k)
		}
		r.perN[n] = in
	}
	if m.needInter {
		var ts [][2]float64
		for _, s := range m.samples {
			ts = append(ts, s.inter)
		}
		l, err := m.fit(2, ts)
		if err != nil {
			return r, err
		}
		r.inter = l
		r.interSource = fmt.Sprintf("measured: bench allreduce --ranks 2 --transport grpc --sizes %s over loopback TCP on this host (a stand-in for a network), medians of %d", sizes, k)
	}
	return r, nil
}

// concurrentSteps runs n `bmojo bench step --device cpu` processes at once,
// threads each (as bmojo train's n CPU workers run), and returns the
// slowest one's seconds per step: data-parallel workers wait for each other
// every step.
func (m *scaleMeter) concurrentSteps(ctx context.Context, n, threads int) (float64, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, fmt.Errorf("find own binary: %w", err)
	}
	args := []string{"bench", "step", "--device", "cpu", "--preset", m.f.preset, "--seq-len", strconv.Itoa(m.c.SeqLen),
		"--vocab-size", strconv.Itoa(m.c.VocabSize), "--batch-size", strconv.Itoa(m.f.batch),
		"--steps", strconv.Itoa(m.f.steps), "--threads", strconv.Itoa(threads), "--log-level", "warn"}
	cmds := make([]*exec.Cmd, n)
	outs := make([]bytes.Buffer, n)
	for i := range cmds {
		cmds[i] = exec.CommandContext(ctx, exe, args...)
		cmds[i].Stdout, cmds[i].Stderr = &outs[i], os.Stderr
		if err := cmds[i].Start(); err != nil {
			return 0, fmt.Errorf("start bench step: %w", err)
		}
	}
	var errs []error
	for _, c := range cmds {
		if err := c.Wait(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return 0, fmt.Errorf("bmojo %s: %w", strings.Join(args, " "), err)
	}
	var slowest float64
	for i := range outs {
		tps, err := parseStepTokensPerS(outs[i].String(), threads)
		if err != nil {
			return 0, fmt.Errorf("bmojo %s: %w", strings.Join(args, " "), err)
		}
		slowest = max(slowest, float64(m.f.batch*m.c.SeqLen)/tps)
	}
	return slowest, nil
}

// parseStepTokensPerS reads the tokens/s of the row for threads from bench
// step's CPU table ("threads  step (s)  tokens/s  speed-up").
func parseStepTokensPerS(table string, threads int) (float64, error) {
	sc := bufio.NewScanner(strings.NewReader(table))
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 4 && fs[0] == strconv.Itoa(threads) && strings.HasSuffix(fs[3], "x") {
			tps, err := strconv.ParseFloat(fs[2], 64)
			if err != nil || !(tps > 0) {
				return 0, fmt.Errorf("bench step row %q: bad tokens/s", sc.Text())
			}
			return tps, nil
		}
	}
	return 0, fmt.Errorf("no row for %d threads in bench step's output:\n%s", threads, table)
}

// timePhases runs bench step's benchRun and times its step in parts:
// zero + forward, backward, and the optimizer. It returns seconds per step
// and backward's share.
func timePhases(be kernels.Backend[float32], c model.Config, batch, steps int) (float64, float64, error) {
	run, err := newBenchRun(be, c, batch)
	if err != nil {
		return 0, 0, err
	}
	for range 2 { // warm-up, as timeSteps does
		if err := run.step(); err != nil {
			return 0, 0, err
		}
	}
	var bwd, total time.Duration
	for range steps {
		t0 := time.Now()
		run.m.ZeroGrads()
		if _, err := run.m.Forward(run.tokens, run.targets); err != nil {
			return 0, 0, err
		}
		if err := be.Err(); err != nil { // waits for the device
			return 0, 0, err
		}
		t1 := time.Now()
		if err := run.m.Backward(); err != nil {
			return 0, 0, err
		}
		if err := be.Err(); err != nil {
			return 0, 0, err
		}
		bwd += time.Since(t1)
		run.opt.Apply()
		if err := be.Err(); err != nil {
			return 0, 0, err
		}
		total += time.Since(t0)
	}
	return total.Seconds() / float64(steps), bwd.Seconds() / total.Seconds(), nil
}

// parseAllreduceTimes reads bench allreduce's table: size → the slowest
// rank's mean time in seconds.
func parseAllreduceTimes(table string) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(table))
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 7 || strings.HasPrefix(fs[0], "#") || fs[0] == "size" {
			continue
		}
		us, err := strconv.ParseFloat(fs[3], 64)
		if err != nil {
			return nil, fmt.Errorf("bench allreduce line %q: %w", sc.Text(), err)
		}
		out[fs[0]] = us / 1e6
	}
	if len(out) == 0 {
		return nil, errors.New("no rows in bench allreduce's output")
	}
	return out, nil
}

var throughputRe = regexp.MustCompile(`(?m)^throughput\s+([0-9.]+) tokens/s`)

// trainOnce trains the preset with n workers on this host (global batch n ×
// --batch-size) and records the tokens/s that bmojo train reports in val[n].
func trainOnce(ctx context.Context, f *scaleFlags, n int, val map[int]*scaleValidation, log hclog.Logger) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("bench scale: find own binary: %w", err)
	}
	dir, err := os.MkdirTemp("", "bmojo-scale-")
	if err != nil {
		return fmt.Errorf("bench scale: %w", err)
	}
	defer os.RemoveAll(dir)
	args := []string{"train", "--workers", strconv.Itoa(n), "--device", f.dev, "--preset", f.preset,
		"--steps", strconv.Itoa(f.trainSteps), "--batch-size", strconv.Itoa(n * f.batch),
		"--eval-every", "0", "--eval-batches", "1", "--checkpoint-every", "0", "--quiet",
		"--checkpoint-dir", dir, "--http", "", "--log-level", "warn"}
	v := val[n]
	if v == nil {
		v = &scaleValidation{Kind: "measured", Workers: n}
		val[n] = v
	}
	shown := slices.Clone(args)
	for i, a := range shown {
		if a == "" {
			shown[i] = "''"
		}
	}
	v.Command = "bmojo " + strings.Join(shown, " ")
	cmd := exec.CommandContext(ctx, exe, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("bench scale: %s: %w\n%s", v.Command, err, stderr.String())
	}
	mt := throughputRe.FindStringSubmatch(stdout.String())
	if mt == nil {
		return fmt.Errorf("bench scale: %s: no throughput line in:\n%s", v.Command, stdout.String())
	}
	tps, err := strconv.ParseFloat(mt[1], 64)
	if err != nil {
		return fmt.Errorf("bench scale: %s: %w", v.Command, err)
	}
	v.MeasuredTokensPerS = append(v.MeasuredTokensPerS, tps)
	log.Info("training run measured", "workers", n, "tokens_per_s", tps)
	return nil
}

// reportValidation puts each N's measured runs beside the prediction for
// N × 1 and prints them.
func reportValidation(f *scaleFlags, rep *scaleReport, val map[int]*scaleValidation, out io.Writer) {
	fmt.Fprintf(out, "\n# validation (measured): bmojo train --workers N on this host (%d CPUs), %d steps, global batch N × %d, median of %d runs, each after a repeat of the measurements\n",
		runtime.NumCPU(), f.trainSteps, f.batch, f.repeats)
	fmt.Fprintf(out, "%-8s %14s %14s %14s %8s  %s\n", "workers", "measured", "predicted", "no overlap", "error", "runs (tokens/s)")
	for _, n := range f.perHost {
		v := val[n]
		if v == nil {
			continue
		}
		for _, r := range rep.Rows {
			if r.PerHost == n && r.Hosts == 1 { // one host: both schemes are the flat ring
				v.PredictedTokensPerS, v.NoOverlapTokensPerS = r.TokensPerS, r.NoOverlapTokensPerS
			}
		}
		v.MedianTokensPerS = median(v.MeasuredTokensPerS)
		v.ErrorPct = 100 * (v.PredictedTokensPerS - v.MedianTokensPerS) / v.MedianTokensPerS
		rep.Validation = append(rep.Validation, *v)
		runs := make([]string, len(v.MeasuredTokensPerS))
		for i, x := range v.MeasuredTokensPerS {
			runs[i] = strconv.FormatFloat(x, 'f', 0, 64)
		}
		fmt.Fprintf(out, "%-8d %14.0f %14.0f %14.0f %+7.1f%%  %s\n", n, v.MedianTokensPerS, v.PredictedTokensPerS, v.NoOverlapTokensPerS, v.ErrorPct, strings.Join(runs, " "))
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cuda"
	"github.com/bmojo/bmojo/kernels/profile"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/train"
	"github.com/bmojo/bmojo/worker"
)

// stepReport is what bench step measured (--json).
type stepReport struct {
	Preset string `json:"preset"`
	Device string `json:"device"`
	Params int    `json:"params"`
	Batch  int    `json:"batch"`
	SeqLen int    `json:"seq_len"`
	// LabelEvery > 1 labels one position in LabelEvery (as MQAR labels K
	// of T), with the model's labelled head on (--label-every).
	LabelEvery    int     `json:"label_every,omitempty"`
	StepSeconds   float64 `json:"step_seconds"`
	TokensPerS    float64 `json:"tokens_per_s"`
	FLOPsPerToken float64 `json:"flops_per_token"`
	TFLOPs        float64 `json:"achieved_tflops"`
	PeakTFLOPs    float64 `json:"peak_tflops"`
	PeakSource    string  `json:"peak_source"`
	MFU           float64 `json:"mfu"`
	PeakMemGiB    float64 `json:"peak_mem_gib"`
	// The bf16 copies the GPU backend keeps of product inputs, and how many
	// inputs per timed step it still had to convert.
	CopiesGiB          float64 `json:"bf16_copies_gib,omitempty"`
	ConversionsPerStep float64 `json:"conversions_per_step,omitempty"`
	// Timeline is the GPU time of each op in one unsynchronised step
	// (--timeline), and GPUBusyMs their sum.
	Timeline     []cuda.OpTime `json:"timeline,omitempty"`
	GPUBusyMs    float64       `json:"gpu_busy_ms,omitempty"`
	LargestBatch int           `json:"largest_batch,omitempty"`
	// LargestCapped: the search stopped at its time cap, not at an out-of-memory.
	LargestCapped bool `json:"largest_batch_capped,omitempty"`
	Profile       []struct {
		Op    string  `json:"op"`
		Calls int     `json:"calls"`
		Ms    float64 `json:"ms"`
		Share float64 `json:"share"`
	} `json:"profile,omitempty"`
}

func init() {
	var (
		preset, dev, jsonOut string
		configFile           string
		labelEvery           int
		batch, steps, seqLen int
		vocab                int
		threadList           []int
		peakTFLOPs           float64
		maxBatch, prof, noLt bool
		noTune               bool
		timeline             bool
		timelineKernels      bool
		workers              stepWorkersOpts
	)
	cmd := &cobra.Command{
		Use:   "step",
		Short: "Time training steps (forward, backward, AdamW): CPU thread scaling, or GPU tokens/s, MFU and memory",
		Long: `Time training steps of a preset on random tokens.

On the CPU (--device cpu) it compares 1 core with all cores. On a GPU
(--device cuda, a binary built with -tags cuda) it prints tokens/s, the
model FLOPs per token (model.FLOPsPerToken), MFU against the GPU's matrix
rate measured in the same run (or --peak-tflops from a reference such as
torch.matmul), the peak device memory, and the largest batch that fits.

With --workers N it trains N data-parallel replicas in this process, each
on a backend of its own (on a GPU, all on the one device), joined by a
real all-reduce ring over loopback, through the worker's own training step
and gradient reduction (train.Engine, worker.NewStepReducer): each replica
takes --batch-size sequences per step. It prints tokens/s of all replicas
together, and per step the time the gradient sums were in flight
(communication, each collective counted from the moment every replica
has started it), the part of it the step waited for after the last
replica's backward ended (exposed) and the fraction hidden behind compute
(the time a replica waits for a slower one counts in neither), for the overlapped reduction (async copies,
each layer's sum started as backward produces it) and the synchronous
reference (--copies), beside one replica alone.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := model.Preset(preset)
			if configFile != "" {
				js, rerr := os.ReadFile(configFile)
				if rerr != nil {
					return fmt.Errorf("bench step: %w", rerr)
				}
				if c, err = model.ParseConfig(string(js)); err != nil {
					return fmt.Errorf("bench step: --config %s: %w", configFile, err)
				}
				preset = configFile
			}
			if err != nil {
				return err
			}
			if seqLen > 0 {
				c.SeqLen = seqLen
			}
			if vocab > 0 {
				c.VocabSize = vocab
			}
			if err := c.Validate(); err != nil {
				return fmt.Errorf("bench step: %w", err)
			}
			if batch <= 0 || steps <= 0 {
				return fmt.Errorf("bench step: --batch-size and --steps must be positive")
			}
			if workers.workers > 0 {
				workers.dev, workers.batch, workers.steps = dev, batch, steps
				workers.devOpts = device.Options{Logger: newLogger(), NoCublasLt: noLt, NoGemmTune: noTune}
				if err := workers.validate(); err != nil {
					return err
				}
				rep, err := benchStepWorkers(cmd.Context(), os.Stdout, c, preset, workers)
				if err != nil {
					return err
				}
				return writeJSON(jsonOut, rep)
			}
			o, err := device.Open(dev, device.Options{Logger: newLogger(), NoCublasLt: noLt, NoGemmTune: noTune})
			if err != nil {
				return err
			}
			defer o.Close()
			if o.Kind == "cpu" {
				return benchStepCPU(c, preset, batch, steps, threadList)
			}
			r := stepReport{Preset: preset, Device: o.Desc, Batch: batch, SeqLen: c.SeqLen, LabelEvery: labelEvery}
			// MFU's denominator is the higher of the two rates: this
			// backend's own product and the reference given, so neither
			// flatters the figure.
			own, n := matmulPeak(o.Backend)
			r.PeakTFLOPs, r.PeakSource = own, fmt.Sprintf("measured: this backend's MatMul, %d³", n)
			if peakTFLOPs > own {
				r.PeakTFLOPs, r.PeakSource = peakTFLOPs, fmt.Sprintf("given (--peak-tflops; this backend's MatMul reached %.1f on %d³)", own, n)
			} else if peakTFLOPs > 0 {
				r.PeakSource += fmt.Sprintf(" (above the %.1f given by --peak-tflops)", peakTFLOPs)
			}
			fmt.Printf("device %s; matrix peak %.1f TFLOP/s (%s)\n", o.Desc, r.PeakTFLOPs, r.PeakSource)
			var dev *cuda.Device
			if timeline {
				dev = o.Dev
			}
			if err := timeSteps(o.Backend, dev, timelineKernels, c, &r, steps); err != nil {
				return err
			}
			r.PeakMemGiB = float64(o.PeakMemory()) / (1 << 30)
			fmt.Printf("preset %s: %d parameters, batch %d × %d tokens\n", preset, r.Params, batch, c.SeqLen)
			fmt.Printf("step %.1f ms, %.0f tokens/s, %.3g model FLOPs/token, %.1f TFLOP/s, MFU %.1f%%, peak device memory %.2f GiB\n",
				1e3*r.StepSeconds, r.TokensPerS, r.FLOPsPerToken, r.TFLOPs, 100*r.MFU, r.PeakMemGiB)
			if r.CopiesGiB > 0 {
				fmt.Printf("bf16 copies of product inputs: %.2f GiB kept, %.0f conversions per step\n", r.CopiesGiB, r.ConversionsPerStep)
			}
			if len(r.Timeline) > 0 {
				fmt.Printf("one step as it runs (stream events, no synchronisation): GPU busy %.1f ms of %.1f\n", r.GPUBusyMs, 1e3*r.StepSeconds)
				w := 24
				for _, t := range r.Timeline {
					w = max(w, len(t.Op))
				}
				fmt.Printf("%-*s %9s %10s %7s\n", w, "op", "launches", "GPU ms", "share")
				for _, t := range r.Timeline {
					fmt.Printf("%-*s %9d %10.2f %6.1f%%\n", w, t.Op, t.Launches, t.Ms, 100*t.Ms/r.GPUBusyMs)
				}
			}
			if prof {
				pb := profile.Wrap[float32](o.Dev.Backend())
				if err := profileStep(pb, c, batch, &r); err != nil {
					return err
				}
			}
			if maxBatch {
				r.LargestBatch, r.LargestCapped = largestBatch(o.Dev, c, batch, 5*time.Second)
				if r.LargestCapped {
					fmt.Printf("largest batch tried: %d × %d tokens fits (search stopped: a step took over 5 s)\n", r.LargestBatch, c.SeqLen)
				} else {
					fmt.Printf("largest batch that fits: %d × %d tokens (the next doubling ran out of memory)\n", r.LargestBatch, c.SeqLen)
				}
			}
			return writeJSON(jsonOut, r)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&preset, "preset", "bmojo", "model preset")
	fl.StringVar(&configFile, "config", "", "a model config JSON (a checkpoint's config.json, for example) instead of --preset")
	fl.IntVar(&labelEvery, "label-every", 0, "GPU: label one position in N (as MQAR labels K of T) and compute the head only there (model.LabelledHead)")
	fl.IntVar(&batch, "batch-size", 4, "sequences per step")
	fl.IntVar(&steps, "steps", 3, "timed steps (per thread count on the CPU)")
	fl.IntVar(&seqLen, "seq-len", 0, "sequence length (default: the preset's)")
	fl.IntVar(&vocab, "vocab-size", 0, "vocabulary (default: the preset's, 256 bytes; 50304 is GPT-2's padded)")
	fl.IntSliceVar(&threadList, "threads", nil, "CPU: thread counts to time (default: 1 and all cores)")
	fl.StringVar(&dev, "device", "auto", "auto, cpu, cuda or cuda:N")
	fl.Float64Var(&peakTFLOPs, "peak-tflops", 0, "GPU: a reference matrix rate (e.g. torch's); MFU uses it or this backend's measured rate, whichever is higher")
	fl.BoolVar(&maxBatch, "max-batch", true, "GPU: find the largest batch that fits (doubling)")
	fl.BoolVar(&prof, "profile", false, "GPU: time each op of one step (synchronising after each)")
	fl.StringVar(&jsonOut, "json", "", "also write the figures to this JSON file")
	fl.BoolVar(&noLt, "no-cublaslt", false, "GPU: bf16 products through cublasGemmEx instead of cublasLtMatmul")
	fl.BoolVar(&noTune, "no-gemm-tune", false, "GPU: keep cuBLASLt's first-guess algorithm per product shape instead of timing its candidates")
	fl.BoolVar(&timeline, "timeline", false, "GPU: time each op of one more step with stream events (no synchronisation)")
	fl.BoolVar(&timelineKernels, "timeline-kernels", false, "with --timeline: one row per kernel of each op (op/kernel)")
	fl.IntVar(&workers.workers, "workers", 0, "train this many data-parallel replicas in this process, joined by an all-reduce ring over loopback, and report the communication hidden behind compute (0: time one replica alone)")
	fl.StringVar(&workers.copies, "copies", "both", "with --workers: the gradient reduction to time: overlapped (async copies), sync (the synchronous reference) or both")
	fl.StringVar(&workers.transport, "transport", allreduce.TransportAuto, "with --workers: the ring's transport between the replicas: auto (shared memory on one host) or grpc")
	benchCmd.AddCommand(cmd)
}

// benchRun is what every timed step runs: a model on one backend, its
// optimizer and one deterministic random batch.
type benchRun struct {
	m               *model.Model[float32]
	opt             *model.Optimizer[float32]
	tokens, targets []int32
}

func newBenchRun(be kernels.Backend[float32], c model.Config, batch int) (*benchRun, error) {
	m, err := model.New[float32](be, c, 1)
	if err != nil {
		return nil, err
	}
	if err := m.Prepare(batch, c.SeqLen); err != nil {
		return nil, err
	}
	r := &benchRun{m: m, opt: model.NewOptimizer(m, model.DefaultOptim(1e-3, 1<<20))}
	rng := rand.New(rand.NewPCG(1, 2))
	n := batch * c.SeqLen
	r.tokens, r.targets = make([]int32, n), make([]int32, n)
	for i := range r.tokens {
		r.tokens[i], r.targets[i] = int32(rng.IntN(c.VocabSize)), int32(rng.IntN(c.VocabSize))
	}
	return r, nil
}

// labelEvery keeps the targets of one position in every (> 1) and
// ignores the others, with the model's labelled head on.
func (r *benchRun) labelEvery(every int) {
	if every <= 1 {
		return
	}
	for i := range r.targets {
		if i%every != every-1 {
			r.targets[i] = -1
		}
	}
	r.m.LabelledHead = true
}

// step is one training step: zero, forward, backward, AdamW.
func (r *benchRun) step() error {
	r.m.ZeroGrads()
	if _, err := r.m.Forward(r.tokens, r.targets); err != nil {
		return err
	}
	if err := r.m.Backward(); err != nil {
		return err
	}
	r.opt.Apply()
	return r.m.Backend().Err()
}

func benchStepCPU(c model.Config, preset string, batch, steps int, threadList []int) error {
	run, err := newBenchRun(device.CPU(), c, batch)
	if err != nil {
		return err
	}
	fmt.Printf("preset %s: %d parameters, batch %d × %d tokens\n", preset, run.m.Layout.ParamCount(), batch, c.SeqLen)
	fmt.Printf("%-8s %12s %12s %9s\n", "threads", "step (s)", "tokens/s", "speed-up")
	threads := threadList
	if len(threads) == 0 {
		threads = []int{1}
		if all := runtime.NumCPU(); all > 1 {
			threads = append(threads, all)
		}
	}
	var base float64
	for _, n := range threads {
		if n <= 0 {
			return fmt.Errorf("bench step: --threads entries must be positive, got %d", n)
		}
		prev := runtime.GOMAXPROCS(n)
		if err := run.step(); err != nil { // warm-up: page in buffers
			return err
		}
		t0 := time.Now()
		for range steps {
			if err := run.step(); err != nil {
				return err
			}
		}
		sec := time.Since(t0).Seconds() / float64(steps)
		runtime.GOMAXPROCS(prev)
		tps := float64(batch*c.SeqLen) / sec
		if base == 0 {
			base = tps
		}
		fmt.Printf("%-8d %12.3f %12.0f %8.2fx\n", n, sec, tps, tps/base)
	}
	return nil
}

// timeSteps times steps training steps after two warm-up ones; with dev,
// one more step with stream events around every op fills r.Timeline.
func timeSteps(be kernels.Backend[float32], dev *cuda.Device, perKernel bool, c model.Config, r *stepReport, steps int) error {
	run, err := newBenchRun(be, c, r.Batch)
	if err != nil {
		return err
	}
	run.labelEvery(r.LabelEvery)
	r.Params = run.m.Layout.ParamCount()
	for range 2 {
		if err := run.step(); err != nil {
			return err
		}
	}
	copies, _ := be.(interface{ InputCopies() cuda.InputCopyStats })
	var conv0 int
	if copies != nil {
		conv0 = copies.InputCopies().Conversions
	}
	t0 := time.Now()
	for range steps {
		if err := run.step(); err != nil {
			return err
		}
	}
	r.StepSeconds = time.Since(t0).Seconds() / float64(steps)
	if copies != nil {
		st := copies.InputCopies()
		r.CopiesGiB = float64(st.Bytes) / (1 << 30)
		r.ConversionsPerStep = float64(st.Conversions-conv0) / float64(steps)
	}
	if dev != nil {
		dev.StartTiming(perKernel)
		serr := run.step()
		tl, err := dev.StopTiming()
		if serr != nil {
			return serr
		}
		if err != nil {
			return err
		}
		r.Timeline = tl
		for _, t := range tl {
			r.GPUBusyMs += t.Ms
		}
	}
	r.TokensPerS = float64(r.Batch*c.SeqLen) / r.StepSeconds
	r.FLOPsPerToken = model.FLOPsPerToken(c, c.SeqLen)
	r.TFLOPs = r.FLOPsPerToken * r.TokensPerS / 1e12
	r.MFU = r.TFLOPs / r.PeakTFLOPs
	return nil
}

// matmulPeak measures the backend's MatMul on n³ (8192³ on a GPU) in
// TFLOP/s.
func matmulPeak(be kernels.Backend[float32]) (float64, int) {
	n := 8192
	if cuda.Emulated {
		n = 128 // the CPU emulation multiplies in plain loops
	}
	x, w, out := be.Alloc(n*n), be.Alloc(n*n), be.Alloc(n*n)
	be.MatMul(out, x, w, n, n, n, false) // warm-up
	be.Err()
	const reps = 10
	t0 := time.Now()
	for range reps {
		be.MatMul(out, x, w, n, n, n, false)
	}
	if be.Err() != nil {
		return 0, n
	}
	return 2 * float64(n*n) * float64(n) * reps / time.Since(t0).Seconds() / 1e12, n
}

// profileStep times each op of one step and prints the top of the table.
func profileStep(pb *profile.Backend[float32], c model.Config, batch int, r *stepReport) error {
	run, err := newBenchRun(pb, c, batch)
	if err != nil {
		return err
	}
	run.labelEvery(r.LabelEvery)
	if err := run.step(); err != nil {
		return err
	}
	pb.Reset()
	if err := run.step(); err != nil {
		return err
	}
	rows := pb.Rows()
	var total time.Duration
	for _, row := range rows {
		total += row.Time
	}
	fmt.Printf("one step, each op synchronised (%.1f ms in ops):\n%-24s %6s %10s %7s\n", 1e3*total.Seconds(), "op", "calls", "ms", "share")
	for i, row := range rows {
		share := row.Time.Seconds() / total.Seconds()
		if i < 14 {
			fmt.Printf("%-24s %6d %10.2f %6.1f%%\n", row.Op, row.Calls, 1e3*row.Time.Seconds(), 100*share)
		}
		r.Profile = append(r.Profile, struct {
			Op    string  `json:"op"`
			Calls int     `json:"calls"`
			Ms    float64 `json:"ms"`
			Share float64 `json:"share"`
		}{row.Op, row.Calls, 1e3 * row.Time.Seconds(), share})
	}
	return nil
}

// largestBatch doubles the batch from start until a step fails (out of
// memory) and returns the last that worked; capped is true when it stopped
// because one step took longer than limit instead. Each try gets a fresh
// backend (errors are sticky) and the garbage collector returns the
// previous try's memory to the cache.
func largestBatch(d *cuda.Device, c model.Config, start int, limit time.Duration) (ok int, capped bool) {
	defer runtime.GC()
	for b := start; ; b *= 2 {
		runtime.GC()
		t0 := time.Now()
		if err := tryBatch(d.Backend(), c, b); err != nil {
			return ok, false
		}
		ok = b
		if time.Since(t0) > limit {
			return ok, true
		}
	}
}

func tryBatch(be kernels.Backend[float32], c model.Config, b int) error {
	run, err := newBenchRun(be, c, b)
	if err != nil {
		return err
	}
	return run.step()
}

// stepWorkersOpts configure bench step --workers.
type stepWorkersOpts struct {
	workers   int    // replicas
	copies    string // overlapped, sync or both
	transport string // the ring's (allreduce.Config.Transport)
	dev       string // --device, opened once per replica
	batch     int    // sequences per replica per step
	steps     int    // timed steps, after two warm-up ones
	devOpts   device.Options
}

// validate names the bad flag.
func (o stepWorkersOpts) validate() error {
	switch o.copies {
	case "overlapped", "sync", "both":
	default:
		return fmt.Errorf("bench step: --copies %q: want overlapped, sync or both", o.copies)
	}
	switch o.transport {
	case allreduce.TransportAuto, allreduce.TransportGRPC:
	default:
		return fmt.Errorf("bench step: --transport %q: want auto or grpc", o.transport)
	}
	if o.workers < 1 {
		return fmt.Errorf("bench step: --workers %d: want 1 or more", o.workers)
	}
	if o.batch <= 0 || o.steps <= 0 {
		return fmt.Errorf("bench step: --batch-size and --steps must be positive")
	}
	return nil
}

// workerRow is one row of bench step --workers.
type workerRow struct {
	Workers int `json:"workers"`
	// Reduction is "alone" (one replica, nothing to sum: train.Local),
	// "overlapped" or "sync" (worker.NewStepReducer's two paths).
	Reduction  string  `json:"reduction"`
	Transport  string  `json:"transport,omitempty"` // what carried rank 0's hop
	StepMs     float64 `json:"step_ms"`             // the slowest replica's
	TokensPerS float64 `json:"tokens_per_s"`        // every replica's tokens
	// CommMs and ExposedMs are per step and replica (means), without the
	// time a replica waits for a slower one (worker.Overlap): the time the
	// gradient sums were in flight, each collective counted from its
	// latest start across replicas, and the time Finish went on after the
	// last replica's backward ended. Hidden is 1 − exposed/comm over every
	// timed step and replica, within [0, 1].
	CommMs    float64 `json:"comm_ms"`
	ExposedMs float64 `json:"exposed_ms"`
	Hidden    float64 `json:"hidden"`
}

// stepWorkersReport is what bench step --workers measured (--json).
type stepWorkersReport struct {
	Preset string      `json:"preset"`
	Device string      `json:"device"`
	Params int         `json:"params"`
	Batch  int         `json:"batch_per_worker"`
	SeqLen int         `json:"seq_len"`
	Rows   []workerRow `json:"rows"`
}

// benchStepWorkers times o.workers replicas of c training together, each
// on a backend of its own, through the worker's training step and
// reduction, beside one replica alone, and prints the table to out.
func benchStepWorkers(ctx context.Context, out io.Writer, c model.Config, preset string, o stepWorkersOpts) (stepWorkersReport, error) {
	rep := stepWorkersReport{Preset: preset, Batch: o.batch, SeqLen: c.SeqLen}
	devs := make([]*device.Opened, o.workers)
	defer func() {
		for _, d := range devs {
			if d != nil {
				_ = d.Close()
			}
		}
	}()
	for i := range devs {
		if d := devs[0]; i > 0 && cuda.Emulated && d.Dev != nil {
			// The emulation runs kernels on global state: two devices of
			// one process must not launch at once, so its replicas share
			// one (a backend each, one stream). Dev stays nil: closed once.
			devs[i] = &device.Opened{Backend: d.Dev.Backend(), Kind: d.Kind, GPU: d.GPU, Desc: d.Desc}
			continue
		}
		d, err := device.Open(o.dev, o.devOpts)
		if err != nil {
			return rep, err
		}
		devs[i] = d
	}
	rep.Device = devs[0].Desc
	// Random tokens: enough windows for every step of every replica.
	rng := rand.New(rand.NewPCG(1, 2))
	toks := make([]int32, o.workers*o.batch*(o.steps+2)*(c.SeqLen+1))
	for i := range toks {
		toks[i] = int32(rng.IntN(c.VocabSize))
	}
	ds, err := data.NewMemoryDataset(toks, c.VocabSize)
	if err != nil {
		return rep, err
	}
	share := "on its own backend"
	switch {
	case devs[0].Dev != nil && cuda.Emulated:
		share = "on one emulated device (a backend each)"
	case devs[0].Dev != nil:
		share = "on the same GPU (a device thread, stream and memory cache each; their kernels share the GPU)"
	}
	fmt.Fprintf(out, "bench step --workers %d: %s, one process, each replica %s, joined by an all-reduce ring over loopback\n",
		o.workers, rep.Device, share)

	alone, err := timeReplicas(ctx, devs[:1], c, ds, o, "")
	if err != nil {
		return rep, fmt.Errorf("bench step: one replica alone: %w", err)
	}
	rep.Params = alone.params
	rep.Rows = append(rep.Rows, alone.row)
	fmt.Fprintf(out, "preset %s: %d parameters, batch %d × %d tokens per replica\n", preset, rep.Params, o.batch, c.SeqLen)
	fmt.Fprintf(out, "%-8s %-11s %-6s %10s %12s %10s %12s %7s\n", "workers", "reduction", "hop", "step (ms)", "tokens/s", "comm (ms)", "exposed (ms)", "hidden")
	printRow := func(r workerRow) {
		hidden := "-"
		if r.CommMs > 0 {
			hidden = fmt.Sprintf("%.1f%%", 100*r.Hidden)
		}
		hop := r.Transport
		if hop == "" {
			hop = "-"
		}
		fmt.Fprintf(out, "%-8d %-11s %-6s %10.2f %12.0f %10.2f %12.2f %7s\n", r.Workers, r.Reduction, hop, r.StepMs, r.TokensPerS, r.CommMs, r.ExposedMs, hidden)
	}
	printRow(alone.row)
	paths := []string{"overlapped", "sync"}
	if o.copies != "both" {
		paths = []string{o.copies}
	}
	for _, p := range paths {
		res, err := timeReplicas(ctx, devs, c, ds, o, p)
		if err != nil {
			return rep, fmt.Errorf("bench step: %d replicas, %s reduction: %w", o.workers, p, err)
		}
		rep.Rows = append(rep.Rows, res.row)
		printRow(res.row)
	}
	return rep, nil
}

// replicaTiming is what timeReplicas measured.
type replicaTiming struct {
	row    workerRow
	params int
}

// timeReplicas trains one replica per element of devs for two warm-up and
// o.steps timed steps, through train.Engine: alone (path "", one replica,
// train.Local), or joined by a fresh ring with worker.NewStepReducer's
// path ("overlapped" or "sync"). Every replica starts from the same
// parameters (seed 1), as after a worker's state transfer.
func timeReplicas(ctx context.Context, devs []*device.Opened, c model.Config, ds *data.Dataset, o stepWorkersOpts, path string) (replicaTiming, error) {
	n := len(devs)
	res := replicaTiming{row: workerRow{Workers: n, Reduction: path}}
	reducers := make([]train.Reducer, n)
	if path == "" {
		res.row.Reduction = "alone"
		reducers[0] = train.Local{}
	} else {
		rings, err := stepRings(ctx, n, o.transport)
		if err != nil {
			return res, err
		}
		defer func() {
			var wg sync.WaitGroup
			for _, r := range rings {
				wg.Go(func() { _ = r.Close() })
			}
			wg.Wait()
		}()
		res.row.Transport, _ = rings[0].Transport()
		for i := range reducers {
			reducers[i] = worker.NewStepReducer(ctx, rings[i], i, n, devs[i].Backend, path == "sync")
		}
	}
	type result struct {
		wall   time.Duration
		steps  []worker.ReplicaStep // per timed step
		params int
		err    error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := range devs {
		wg.Go(func() {
			r := &results[i]
			m, err := model.New[float32](devs[i].Backend, c, 1)
			if err != nil {
				r.err = err
				return
			}
			r.params = m.Layout.ParamCount()
			s, err := data.NewSampler(ds, c.SeqLen, 1)
			if err != nil {
				r.err = err
				return
			}
			eng := &train.Engine{M: m, Opt: model.NewOptimizer(m, model.DefaultOptim(1e-3, 1<<20)), Train: s, GB: n * o.batch}
			var t0 time.Time
			for step := range 2 + o.steps {
				if step == 2 {
					t0 = time.Now()
				}
				st, err := eng.TrainStep(reducers[i])
				if err != nil {
					r.err = fmt.Errorf("replica %d, step %d: %w", i, step, err)
					return
				}
				if step >= 2 {
					rs := worker.ReplicaStep{Arrive: st.Arrive, End: st.Arrive.Add(st.Exposed)}
					if sp, ok := reducers[i].(interface{ Spans() [][2]time.Time }); ok {
						rs.Spans = sp.Spans()
					}
					r.steps = append(r.steps, rs)
				}
			}
			r.wall = time.Since(t0)
		})
	}
	wg.Wait()
	var errs []error
	var slowest, comm, exposed time.Duration
	for _, r := range results {
		errs = append(errs, r.err)
		slowest = max(slowest, r.wall)
		res.params = r.params
	}
	if err := errors.Join(errs...); err != nil {
		return res, err
	}
	for step := range o.steps {
		rs := make([]worker.ReplicaStep, n)
		for i, r := range results {
			rs[i] = r.steps[step]
		}
		c, e := worker.Overlap(rs)
		comm, exposed = comm+c, exposed+e
	}
	per := float64(o.steps)
	res.row.StepMs = 1e3 * slowest.Seconds() / per
	res.row.TokensPerS = float64(n*o.batch*c.SeqLen) * per / slowest.Seconds()
	res.row.CommMs = 1e3 * comm.Seconds() / per / float64(n)
	res.row.ExposedMs = 1e3 * exposed.Seconds() / per / float64(n)
	res.row.Hidden = train.StepStats{Comm: comm, Exposed: exposed}.Hidden()
	return res, nil
}

// stepRings makes and connects an n-rank ring on loopback (transport as
// allreduce.Config.Transport: shared memory between ranks of one host when
// "auto").
func stepRings(ctx context.Context, n int, transport string) ([]*allreduce.Ring, error) {
	lis := make([]net.Listener, n)
	peers := make([]string, n)
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			for _, l := range lis[:i] {
				_ = l.Close()
			}
			return nil, err
		}
		lis[i], peers[i] = l, l.Addr().String()
	}
	rings := make([]*allreduce.Ring, 0, n)
	closeAll := func() {
		for _, r := range rings {
			_ = r.Close()
		}
	}
	for i := range lis {
		cfg := allreduce.Default()
		cfg.Rank, cfg.Peers, cfg.Epoch, cfg.Transport = i, peers, 1, transport
		r, err := allreduce.New(cfg, lis[i])
		if err != nil {
			closeAll()
			for _, l := range lis[i:] {
				_ = l.Close()
			}
			return nil, err
		}
		rings = append(rings, r)
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, r := range rings {
		wg.Go(func() { errs[i] = r.Connect(cctx) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		closeAll()
		return nil, fmt.Errorf("connecting the ring: %w", err)
	}
	return rings, nil
}

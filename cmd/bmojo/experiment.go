package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/bmojo/bmojo/experiment"
	"github.com/bmojo/bmojo/experiment/mqar"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/model"
)

// sweepFlags are the flags every experiment shares: where results go, the
// device, concurrency and the budget.
type sweepFlags struct {
	cache, ckpts  string
	out, dev      string
	jobs          int
	isolate, fit  bool
	budget        time.Duration
	tokensPerS    float64
	probeSteps    int
	dryRun, quick bool
	cached        bool
	seed          uint64
	title         string
}

func (s *sweepFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&s.cache, "cache", "runs/experiments/cells", "cell cache: one directory per finished cell, named by its config hash")
	fl.StringVar(&s.ckpts, "checkpoints", "", "where cells write their checkpoints (default: in each cell's cache directory)")
	fl.StringVar(&s.out, "out", "docs/results", "where the CSV and PNG go (--quick: docs/results/quick)")
	fl.StringVar(&s.dev, "device", "auto", "compute device: auto, cpu, cuda or cuda:N")
	fl.IntVar(&s.jobs, "jobs", 1, "cells run at once on the device (several small runs keep a GPU busy)")
	fl.BoolVar(&s.isolate, "isolate", false, "run each cell in its own process (always so for a GPU with --jobs > 1)")
	fl.DurationVar(&s.budget, "budget", 0, "device time the sweep may take, e.g. 20m (0 = no check): refuse a sweep estimated above it")
	fl.BoolVar(&s.fit, "fit", false, "with --budget: run the cells that fit, in order, and skip the rest (a later call resumes)")
	fl.Float64Var(&s.tokensPerS, "tokens-per-s", 0, "training tokens/s of the costliest cell for the estimate (0 = measure it at startup)")
	fl.IntVar(&s.probeSteps, "probe-steps", 5, "timed steps of each startup measurement")
	fl.BoolVar(&s.dryRun, "dry-run", false, "print the plan and the estimate, run nothing")
	fl.BoolVar(&s.cached, "cached", false, "write the CSV and PNG from the cells already in --cache, run nothing (the missing ones are listed)")
	fl.BoolVar(&s.quick, "quick", false, "one small cell on the CPU in a few minutes (flags given explicitly still apply)")
	fl.Uint64Var(&s.seed, "seed", 1, "initialisation and training-data seed (below 2^31)")
	fl.StringVar(&s.title, "title", "", "plot title (default: the device and mode)")
}

// newExperimentCmd builds `bmojo experiment` and its subcommands (a
// function, so that tests get fresh flags).
func newExperimentCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "experiment",
		Short: "Reproduce B'MOJO's claims: MQAR recall, length generalisation, the memory sweep (docs/results)",
		Long: `Sweeps of small training runs ("cells") that test the B'MOJO paper's claims
(../shared/design/experiments.md). Each finished cell is cached under its
config hash in --cache: a sweep resumes where it stopped and never recomputes
a cell. Before launching, the device time of the pending cells is estimated
from their model FLOPs and a tokens/s figure measured at startup (or given
with --tokens-per-s) and checked against --budget.`,
	}
	cmd.AddCommand(mqarCommand(), lengthCommand(), memoryCommand(), cellCommand())
	return cmd
}

func init() { rootCmd.AddCommand(newExperimentCmd()) }

// set assigns v to a flag's variable unless the user gave the flag: the
// --quick defaults.
func set[T any](fl *pflag.FlagSet, name string, p *T, v T) {
	if !fl.Changed(name) {
		*p = v
	}
}

func mqarCommand() *cobra.Command {
	var (
		sf                      sweepFlags
		families                []string
		dModels                 []int
		lrs                     []float64
		mix, test               string
		epochs, batch, examples int
		testSeed                uint64
		noise                   bool
		seqLen, kv              int
		memory, sel             int
	)
	cmd := &cobra.Command{
		Use:   "mqar",
		Short: "MQAR accuracy against d_model for every family, best of an lr sweep (mqar.csv, mqar.png)",
		Long: `Train 2-layer, MLP-free models of each family on the MQAR training mix and
test them on the Based settings up to (T, K) = (1024, 256). One cell is
one (family, d_model, lr); the plot shows the best lr per (family, d_model).

A single cell: bmojo experiment mqar --family bmojo --d-model 128 --lr 3e-3 --seq-len 512 --kv 128
(--seq-len/--kv name the test setting to print; it is added to the tests if absent).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fl := cmd.Flags()
			if sf.quick {
				set(fl, "family", &families, []string{"bmojo"})
				set(fl, "d-model", &dModels, []int{64})
				set(fl, "lr", &lrs, []float64{3.2e-3})
				set(fl, "train-mix", &mix, "64:4:1024")
				set(fl, "epochs", &epochs, 1)
				set(fl, "batch-size", &batch, 32)
				set(fl, "test", &test, "64:4,128:8")
				set(fl, "test-examples", &examples, 100)
			}
			m, err := experiment.ParseMix(mix)
			if err != nil {
				return err
			}
			ts, err := experiment.ParseSettings(test)
			if err != nil {
				return err
			}
			var want *mqar.Setting
			if fl.Changed("seq-len") || fl.Changed("kv") {
				s := mqar.Setting{T: seqLen, K: kv}
				if err := s.Validate(); err != nil {
					return fmt.Errorf("experiment mqar: --seq-len/--kv: %w", err)
				}
				if !slices.Contains(ts, s) {
					ts = append(ts, s)
				}
				want = &s
			}
			base := experiment.Cell{Version: experiment.Version, Kind: experiment.KindMQAR, Seed: sf.seed, Batch: batch,
				Model: experiment.ModelSpec{Memory: memory, SelectPerChunk: sel},
				Mix:   m, Epochs: epochs, Test: ts, TestExamples: examples, TestSeed: testSeed, Noise: noise}
			cells := experiment.MQARSweep(base, families, dModels, lrs)
			rs, err := runSweep(cmd, &sf, "mqar", cells)
			if errors.Is(err, errDryRun) {
				return nil
			}
			if err != nil {
				return err
			}
			if err := experiment.WriteMQAR(sf.out, "mqar", sf.title, rs); err != nil {
				return err
			}
			fmt.Printf("wrote %s and %s\n", filepath.Join(sf.out, "mqar.csv"), filepath.Join(sf.out, "mqar.png"))
			if len(rs) == 1 {
				printMQARCell(sf.cache, sf.ckpts, rs[0], want)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	sf.register(fl)
	fl.StringSliceVar(&families, "family", experiment.Families, "model families")
	fl.IntSliceVar(&dModels, "d-model", experiment.DModels, "widths")
	fl.Float64SliceVar(&lrs, "lr", experiment.DefaultLRs, "learning rates (the best is reported)")
	fl.StringVar(&mix, "train-mix", experiment.DefaultMix,
		"training settings T:K:EXAMPLES (default: the Based mix at half its size)")
	fl.IntVar(&epochs, "epochs", experiment.DefaultEpochs, "passes over the training examples")
	fl.IntVar(&batch, "batch-size", experiment.DefaultBatch, "sequences per step")
	fl.StringVar(&test, "test", "64:4,64:8,64:16,128:32,256:64,512:128,1024:256", "test settings T:K")
	fl.IntVar(&examples, "test-examples", 1000, "test examples per setting")
	fl.Uint64Var(&testSeed, "test-seed", mqar.TestSeedBase+1, "test-set seed (at least 2^31)")
	fl.BoolVar(&noise, "noise", true, "noise variant: filler inputs drawn uniformly (the Based default)")
	fl.IntVar(&seqLen, "seq-len", 0, "with --kv: the test setting to print for a single cell")
	fl.IntVar(&kv, "kv", 0, "with --seq-len: key-value pairs of that setting")
	fl.IntVar(&memory, "memory", -1, "bmojo's eidetic memory M (-1 = the MQAR default, 128)")
	fl.IntVar(&sel, "select-per-chunk", -1, "bmojo's tokens selected per chunk (-1 = the MQAR default, 8)")
	return cmd
}

// printMQARCell prints one cell's result and how to reproduce it.
func printMQARCell(cache, ckpts string, r experiment.Result, want *mqar.Setting) {
	fmt.Printf("cell %s (%s): %d steps on %s in %.1f s\n", r.Hash, r.Cell.Name(), r.Steps, r.Device, r.WallSeconds)
	for _, s := range r.MQAR {
		mark := ""
		if want != nil && s.Setting == *want {
			mark = "  <-"
		}
		fmt.Printf("  %-12v accuracy %.4f  loss %.4f  (%d examples)%s\n", s.Setting, s.Accuracy, float64(s.Loss), s.Examples, mark)
	}
	if ckpts == "" {
		ckpts = cache
	}
	ck := filepath.Join(ckpts, r.Hash, r.Checkpoint)
	s := r.MQAR[len(r.MQAR)-1].Setting
	if want != nil {
		s = *want
	}
	fmt.Printf("checkpoint %s\nreproduce: bmojo eval --task mqar --checkpoint %s --seq-len %d --kv %d\n", ck, ck, s.T, s.K)
}

func lengthCommand() *cobra.Command {
	var (
		sf                   sweepFlags
		families             []string
		size, dataDir        string
		seqLen, steps, batch int
		evalLens             []int
		windows, bucket      int
		lr                   float64
		statePassing         bool
	)
	cmd := &cobra.Command{
		Use:   "length",
		Short: "Length generalisation: train at T, evaluate at 1×–16× T (length.csv, length.png)",
		Long: `Train each family at one size on text at --seq-len and evaluate the held-out
split at every --eval-len: the mean loss and the loss per position bucket.
--data takes a dataset from 'bmojo data prepare' (default: the bundled corpus).
--state-passing adds a mamba cell trained with state passing: each training
sequence starts from the final state of an unrelated sequence.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fl := cmd.Flags()
			if sf.quick {
				set(fl, "family", &families, []string{"bmojo"})
				set(fl, "size", &size, "tiny")
				set(fl, "seq-len", &seqLen, 128)
				set(fl, "steps", &steps, 150)
				set(fl, "batch-size", &batch, 8)
				set(fl, "eval-len", &evalLens, []int{128, 256, 512})
				set(fl, "eval-windows", &windows, 8)
				set(fl, "state-passing", &statePassing, false)
			}
			if !fl.Changed("bucket") {
				bucket = max(1, seqLen/4)
			}
			id, vocab, err := experiment.DataID(dataDir)
			if err != nil {
				return err
			}
			var cells []experiment.Cell
			for _, f := range families {
				c := experiment.Cell{Version: experiment.Version, Kind: experiment.KindLM, Seed: sf.seed, Batch: batch, LR: lr,
					Model: experiment.ModelSpec{Family: f, Memory: -1, SelectPerChunk: -1},
					Size:  size, Data: dataDir, DataID: id, Vocab: vocab, TrainT: seqLen, Steps: steps, EvalT: evalLens, EvalSpan: evalSpan(windows, evalLens), Bucket: bucket}
				cells = append(cells, c)
				if f == "mamba" && statePassing {
					c.StatePassing = true
					cells = append(cells, c)
				}
			}
			rs, err := runSweep(cmd, &sf, "length", cells)
			if errors.Is(err, errDryRun) {
				return nil
			}
			if err != nil {
				return err
			}
			if err := experiment.WriteLength(sf.out, sf.title, rs); err != nil {
				return err
			}
			fmt.Printf("wrote %s and %s\n", filepath.Join(sf.out, "length.csv"), filepath.Join(sf.out, "length.png"))
			for _, r := range rs {
				fmt.Printf("%-40s", r.Cell.Name())
				for _, l := range r.LM {
					fmt.Printf("  T=%d %.4f", l.T, float64(l.MeanLoss))
				}
				fmt.Println()
			}
			return nil
		},
	}
	fl := cmd.Flags()
	sf.register(fl)
	fl.StringSliceVar(&families, "family", experiment.Families, "model families")
	fl.StringVar(&size, "size", "small", "preset size (docs/model.md §1)")
	fl.StringVar(&dataDir, "data", "", "dataset directory from `bmojo data prepare` (default: the bundled corpus)")
	fl.IntVar(&seqLen, "seq-len", 512, "training length T")
	fl.IntVar(&steps, "steps", 1000, "training steps")
	fl.IntVar(&batch, "batch-size", 16, "sequences per step")
	fl.Float64Var(&lr, "lr", 1e-3, "peak learning rate")
	fl.IntSliceVar(&evalLens, "eval-len", []int{512, 1024, 2048, 4096, 8192}, "evaluation lengths")
	fl.IntVar(&windows, "eval-windows", 32, "validation windows at the longest --eval-len; every length scores the same tokens (0 = the whole split)")
	fl.IntVar(&bucket, "bucket", 0, "positions per bucket of the position-wise loss (default: seq-len/4)")
	fl.BoolVar(&statePassing, "state-passing", true, "also train mamba with state passing")
	return cmd
}

func memoryCommand() *cobra.Command {
	var (
		sf                      sweepFlags
		dModel                  int
		memories, sels          []int
		lrs                     []float64
		mix, test               string
		epochs, batch, examples int
		lm                      bool
		lmSize, dataDir         string
		lmSteps, lmBatch, lmT   int
		lmEval                  []int
		lmLR                    float64
	)
	cmd := &cobra.Command{
		Use:   "memory",
		Short: "B'MOJO's eidetic memory M against MQAR accuracy and LM loss (memory.csv, memory.png)",
		Long: `Sweep B'MOJO's eidetic memory M and the tokens selected per chunk, on MQAR
accuracy at the hardest test settings (best of --lr) and, with --lm, on
language-model loss.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fl := cmd.Flags()
			if sf.quick {
				set(fl, "d-model", &dModel, 64)
				set(fl, "memories", &memories, []int{32})
				set(fl, "select-per-chunk", &sels, []int{2})
				set(fl, "lr", &lrs, []float64{3.2e-3})
				set(fl, "train-mix", &mix, "64:4:512")
				set(fl, "epochs", &epochs, 1)
				set(fl, "batch-size", &batch, 32)
				set(fl, "test", &test, "128:8")
				set(fl, "test-examples", &examples, 50)
				set(fl, "lm-size", &lmSize, "tiny")
				set(fl, "lm-steps", &lmSteps, 30)
				set(fl, "lm-batch-size", &lmBatch, 4)
				set(fl, "lm-seq-len", &lmT, 128)
				set(fl, "lm-eval-len", &lmEval, []int{128, 256})
			}
			m, err := experiment.ParseMix(mix)
			if err != nil {
				return err
			}
			ts, err := experiment.ParseSettings(test)
			if err != nil {
				return err
			}
			var mq, lmc []experiment.Cell
			for _, k := range sels {
				for _, M := range memories {
					for _, lr := range lrs {
						mq = append(mq, experiment.Cell{Version: experiment.Version, Kind: experiment.KindMQAR, Seed: sf.seed, Batch: batch, LR: lr,
							Model: experiment.ModelSpec{Family: "bmojo", DModel: dModel, Memory: M, SelectPerChunk: k},
							Mix:   m, Epochs: epochs, Test: ts, TestExamples: examples, TestSeed: mqar.TestSeedBase + 1, Noise: true})
					}
				}
			}
			if lm {
				id, vocab, err := experiment.DataID(dataDir)
				if err != nil {
					return err
				}
				for _, k := range sels {
					for _, M := range memories {
						lmc = append(lmc, experiment.Cell{Version: experiment.Version, Kind: experiment.KindLM, Seed: sf.seed, Batch: lmBatch, LR: lmLR,
							Model: experiment.ModelSpec{Family: "bmojo", Memory: M, SelectPerChunk: k},
							Size:  lmSize, Data: dataDir, DataID: id, Vocab: vocab, TrainT: lmT, Steps: lmSteps, EvalT: lmEval, EvalSpan: evalSpan(16, lmEval), Bucket: max(1, lmT/4)})
					}
				}
			}
			rs, err := runSweep(cmd, &sf, "memory", slices.Concat(mq, lmc))
			if errors.Is(err, errDryRun) {
				return nil
			}
			if err != nil {
				return err
			}
			var rq, rl []experiment.Result
			for _, r := range rs {
				if r.Cell.Kind == experiment.KindMQAR {
					rq = append(rq, r)
				} else {
					rl = append(rl, r)
				}
			}
			if err := experiment.WriteMemory(sf.out, sf.title, rq, rl); err != nil {
				return err
			}
			fmt.Printf("wrote %s and %s\n", filepath.Join(sf.out, "memory.csv"), filepath.Join(sf.out, "memory.png"))
			return nil
		},
	}
	fl := cmd.Flags()
	sf.register(fl)
	fl.IntVar(&dModel, "d-model", 128, "B'MOJO's width for the MQAR cells")
	fl.IntSliceVar(&memories, "memories", []int{0, 32, 128, 512}, "eidetic memory sizes M")
	fl.IntSliceVar(&sels, "select-per-chunk", []int{2, 8}, "tokens selected per chunk of 32")
	fl.Float64SliceVar(&lrs, "lr", []float64{3.2e-3, 1e-2}, "learning rates of the MQAR cells (the best is reported)")
	fl.StringVar(&mix, "train-mix", experiment.DefaultMix, "MQAR training settings T:K:EXAMPLES")
	fl.IntVar(&epochs, "epochs", experiment.DefaultEpochs, "MQAR passes over the training examples")
	fl.IntVar(&batch, "batch-size", experiment.DefaultBatch, "MQAR sequences per step")
	fl.StringVar(&test, "test", "512:128,1024:256", "MQAR test settings T:K (the hardest)")
	fl.IntVar(&examples, "test-examples", 1000, "test examples per setting")
	fl.BoolVar(&lm, "lm", true, "also train language models at each M")
	fl.StringVar(&lmSize, "lm-size", "tiny", "LM preset size")
	fl.StringVar(&dataDir, "data", "", "LM dataset directory (default: the bundled corpus)")
	fl.IntVar(&lmSteps, "lm-steps", 1000, "LM training steps")
	fl.IntVar(&lmBatch, "lm-batch-size", 16, "LM sequences per step")
	fl.IntVar(&lmT, "lm-seq-len", 512, "LM training length")
	fl.IntSliceVar(&lmEval, "lm-eval-len", []int{512, 2048}, "LM evaluation lengths")
	fl.Float64Var(&lmLR, "lm-lr", 1e-3, "LM peak learning rate")
	return cmd
}

// cellCommand runs one cell whose cell.json is in --cell-dir: the child
// process of a sweep with --isolate.
func cellCommand() *cobra.Command {
	var dir, dev, ckpts string
	cmd := &cobra.Command{
		Use:    "cell",
		Short:  "Run one cached cell spec (a sweep's child process)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, cdir, err := experiment.ReadCell(dir)
			if err != nil {
				return err
			}
			if filepath.Clean(cdir) != filepath.Clean(dir) || filepath.Base(cdir) != c.Hash() {
				return fmt.Errorf("experiment cell: %s holds cell %s, whose hash is %s", dir, filepath.Base(cdir), c.Hash())
			}
			log := newLogger().Named("cell")
			o, err := device.Open(dev, device.Options{Logger: log})
			if err != nil {
				return err
			}
			defer o.Close()
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			env := experiment.Env{Backend: o.Backend, Device: o.Desc, Cache: experiment.Cache{Dir: filepath.Dir(cdir), Checkpoints: ckpts},
				Report: func(p experiment.Progress) { printProgress(os.Stderr, "", p) }, ReportEvery: 10 * time.Second}
			_, err = experiment.RunCell(ctx, env, c)
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "cell-dir", "", "the cell's directory in the cache (holds cell.json)")
	cmd.Flags().StringVar(&dev, "device", "auto", "compute device")
	cmd.Flags().StringVar(&ckpts, "checkpoints", "", "where the checkpoint goes (default: the cell directory)")
	return cmd
}

func printProgress(w io.Writer, prefix string, p experiment.Progress) {
	if p.Phase == "eval" {
		fmt.Fprintf(w, "%s%s [%s]: evaluating\n", prefix, p.Cell, p.Hash)
		return
	}
	fmt.Fprintf(w, "%s%s [%s]: step %d/%d loss %.4f\n", prefix, p.Cell, p.Hash, p.Step, p.Steps, p.Loss)
}

// errDryRun ends a --dry-run after the plan: nothing ran, nothing is written.
var errDryRun = errors.New("dry run")

// runSweep validates the cells, estimates the pending ones, checks the
// budget, runs them (in goroutines, or child processes with --isolate or
// on a GPU with --jobs > 1) and returns every cell's result, cached or new.
func runSweep(cmd *cobra.Command, sf *sweepFlags, name string, cells []experiment.Cell) ([]experiment.Result, error) {
	log := newLogger().Named("experiment").With("experiment", name)
	fl := cmd.Flags()
	if sf.quick {
		set(fl, "device", &sf.dev, "cpu")
		set(fl, "out", &sf.out, "docs/results/quick")
	}
	if sf.jobs <= 0 || sf.probeSteps <= 0 || sf.tokensPerS < 0 || sf.budget < 0 {
		return nil, fmt.Errorf("experiment %s: --jobs and --probe-steps must be positive, --tokens-per-s and --budget not negative", name)
	}
	if len(cells) == 0 {
		return nil, fmt.Errorf("experiment %s: no cells: check --family and the lists", name)
	}
	for _, c := range cells {
		if err := c.Validate(); err != nil {
			return nil, err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cache := experiment.Cache{Dir: sf.cache, Checkpoints: sf.ckpts}
	vocab := 0 // MQAR cells have mqar.Vocab, LM cells their Vocab
	var pending []experiment.Cell
	for _, c := range cells {
		if _, err := cache.Load(c); errors.Is(err, experiment.ErrNotCached) {
			pending = append(pending, c)
		} else if err != nil {
			return nil, err
		}
	}
	if sf.cached {
		if len(pending) == len(cells) {
			return nil, fmt.Errorf("experiment %s: --cached: none of the %d cells is in %s", name, len(cells), sf.cache)
		}
		for _, c := range pending {
			fmt.Fprintf(os.Stderr, "not cached, left out of the report: %s [%s]\n", c.Name(), c.Hash())
		}
		log.Info("report from the cache", "cached", len(cells)-len(pending), "missing", len(pending))
		return loadCached(cache, cells, sf)
	}
	o, err := device.Open(sf.dev, device.Options{Logger: log})
	if err != nil {
		return nil, err
	}
	kind, desc := o.Kind, o.Desc
	rate := experiment.Rate{TokensPerS: sf.tokensPerS, Source: "given (--tokens-per-s)"}
	if len(pending) > 0 {
		cheap, probe, err := experiment.Extremes(pending, vocab)
		if err != nil {
			o.Close()
			return nil, err
		}
		if sf.tokensPerS > 0 {
			cfg, err := probe.ModelConfig(vocab)
			if err != nil {
				o.Close()
				return nil, err
			}
			T := probe.MaxTrainT()
			if probe.Kind == experiment.KindLM {
				T = probe.TrainT
			}
			rate.FLOPsPerToken = model.FLOPsPerToken(cfg, T)
			rate.Source += " for " + probe.Name()
		} else {
			// Two probes, the costliest and the cheapest cell, fit the
			// estimate's fixed cost per step and its cost per FLOP.
			probes := []experiment.Cell{probe}
			if cheap.Hash() != probe.Hash() {
				probes = append(probes, cheap)
			}
			var ps []experiment.Probe
			for _, c := range probes {
				fmt.Fprintf(os.Stderr, "measuring %d steps of %s on %s for the estimate\n", sf.probeSteps, c.Name(), desc)
				p, err := experiment.MeasureStep(ctx, o.Backend, c, vocab, sf.probeSteps)
				if err != nil {
					o.Close()
					return nil, fmt.Errorf("experiment %s: measure: %w", name, err)
				}
				fmt.Fprintf(os.Stderr, "  %.2f ms per step of %d tokens\n", 1e3*p.StepSeconds, p.Tokens)
				ps = append(ps, p)
			}
			if rate, err = experiment.RateFrom(ps...); err != nil {
				o.Close()
				return nil, fmt.Errorf("experiment %s: measure: %w", name, err)
			}
		}
	}
	o.Close() // children (or the slots below) open their own
	plan, err := experiment.NewPlan(cache, cells, vocab, rate, sf.budget, sf.fit)
	printPlan(os.Stderr, name, desc, sf, plan)
	if err != nil {
		return nil, err
	}
	if len(plan.Dropped) > 0 {
		log.Warn("cells left out to fit the budget; run again to continue", "dropped", len(plan.Dropped), "budget", sf.budget)
	}
	if sf.dryRun {
		return nil, errDryRun
	}
	isolate := sf.isolate || (kind == "cuda" && sf.jobs > 1)
	var mu sync.Mutex
	total, finished := len(plan.Run), 0
	t0 := time.Now()
	report := func(slot int) func(experiment.Progress) {
		return func(p experiment.Progress) {
			mu.Lock()
			defer mu.Unlock()
			printProgress(os.Stderr, fmt.Sprintf("[%d/%d slot %d] ", finished, total, slot), p)
		}
	}
	var run experiment.Executor
	if isolate {
		run = subprocessExecutor(sf, cache)
	} else {
		devs := make([]*device.Opened, sf.jobs)
		defer func() {
			for _, d := range devs {
				if d != nil {
					d.Close()
				}
			}
		}()
		run = func(ctx context.Context, c experiment.Cell, slot int) error {
			if devs[slot] == nil {
				d, err := device.Open(sf.dev, device.Options{Logger: log})
				if err != nil {
					return err
				}
				devs[slot] = d
			}
			env := experiment.Env{Backend: devs[slot].Backend, Device: devs[slot].Desc, Cache: cache, Report: report(slot), ReportEvery: 10 * time.Second}
			_, err := experiment.RunCell(ctx, env, c)
			return err
		}
	}
	err = experiment.Execute(ctx, plan.Run, sf.jobs, run, func(c experiment.Cell) {
		mu.Lock()
		defer mu.Unlock()
		finished++
		fmt.Fprintf(os.Stderr, "[%d/%d] done %s [%s], %s elapsed\n", finished, total, c.Name(), c.Hash(), time.Since(t0).Round(time.Second))
	})
	if err != nil {
		return nil, fmt.Errorf("experiment %s: %w (finished cells are cached; run again to resume)", name, err)
	}
	return loadCached(cache, cells, sf)
}

func printPlan(w io.Writer, name, desc string, sf *sweepFlags, p experiment.Plan) {
	fmt.Fprintf(w, "experiment %s on %s: %d cells cached, %d to run", name, desc, len(p.Cached), len(p.Run))
	if len(p.Dropped) > 0 {
		fmt.Fprintf(w, ", %d left out to fit --budget %s", len(p.Dropped), sf.budget)
	}
	fmt.Fprintln(w)
	if len(p.Run) == 0 {
		return
	}
	if p.Rate.StepSeconds > 0 {
		fmt.Fprintf(w, "estimate at %.2f ms per step + %.3g model FLOP/s (%s):\n", 1e3*p.Rate.StepSeconds, p.Rate.TokensPerS*p.Rate.FLOPsPerToken, p.Rate.Source)
	} else {
		fmt.Fprintf(w, "estimate at %.0f tokens/s (%s), assuming time goes with model FLOPs:\n", p.Rate.TokensPerS, p.Rate.Source)
	}
	for i, c := range p.Run {
		fmt.Fprintf(w, "  %-60s %s  ~%s\n", c.Name(), c.Hash(), time.Duration(p.Seconds[i]*float64(time.Second)).Round(time.Second))
	}
	fmt.Fprintf(w, "total ~%s of device time for one cell at a time (%.3g training tokens, %.3g model FLOPs)",
		time.Duration(p.Total*float64(time.Second)).Round(time.Second), float64(p.Tokens), p.FLOPs)
	if sf.jobs > 1 {
		fmt.Fprintf(w, " (with --jobs %d the wall time can be lower; the estimate assumes no gain)", sf.jobs)
	}
	fmt.Fprintln(w)
}

// subprocessExecutor runs each cell as `bmojo experiment cell` in a child
// process, its output prefixed with the slot.
func subprocessExecutor(sf *sweepFlags, cache experiment.Cache) experiment.Executor {
	return func(ctx context.Context, c experiment.Cell, slot int) error {
		dir, err := cache.Begin(c)
		if err != nil {
			return err
		}
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("experiment: find this binary: %w", err)
		}
		cmd := exec.CommandContext(ctx, exe, "experiment", "cell", "--cell-dir", dir, "--checkpoints", sf.ckpts, "--device", sf.dev, "--log-level", logLevel)
		cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
		cmd.WaitDelay = 30 * time.Second
		out, err := cmd.StderrPipe()
		if err != nil {
			return fmt.Errorf("experiment: %s: %w", c.Name(), err)
		}
		cmd.Stdout = os.Stdout
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("experiment: %s: start: %w", c.Name(), err)
		}
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			fmt.Fprintf(os.Stderr, "[slot %d] %s\n", slot, sc.Text())
		}
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("experiment: %s [%s]: child: %w", c.Name(), c.Hash(), err)
		}
		return nil
	}
}

// mqarEvalFlags are `bmojo eval --task mqar`'s own flags.
type mqarEvalFlags struct {
	kv, examples int
	testSeed     uint64
	noise        bool
}

func (f *mqarEvalFlags) register(fl *pflag.FlagSet) {
	fl.IntVar(&f.kv, "kv", 0, "--task mqar: key-value pairs K of the test setting (with --seq-len T)")
	fl.IntVar(&f.examples, "examples", 0, "--task mqar: test examples (default: the cell's, else 1000)")
	fl.Uint64Var(&f.testSeed, "test-seed", 0, "--task mqar: test seed (default: the cell's, else 2^31+1)")
	fl.BoolVar(&f.noise, "noise", true, "--task mqar: noise variant (default: the cell's)")
}

// evalMQAR is `bmojo eval --task mqar`: the checkpoint's MQAR accuracy at
// (--seq-len, --kv), on the test set of the cell that produced it when
// its cell.json is found above the checkpoint (the same examples, the
// same batches), else on the protocol's default test set.
func evalMQAR(cmd *cobra.Command, ckpt, devSpec string, T int, f mqarEvalFlags, log hclog.Logger) error {
	c, params, path, err := loadForEval(ckpt, log)
	if err != nil {
		return err
	}
	s := mqar.Setting{T: T, K: f.kv}
	if err := s.Validate(); err != nil {
		return fmt.Errorf("eval: --seq-len/--kv: %w", err)
	}
	src, n := mqar.Source{Seed: mqar.TestSeedBase + 1, Noise: true}, 1000
	from := "the protocol's default test set"
	if cell, dir, err := experiment.ReadCell(filepath.Dir(path)); err == nil && cell.Kind == experiment.KindMQAR {
		src, n = mqar.Source{Seed: cell.TestSeed, Noise: cell.Noise}, cell.TestExamples
		from = "the test set of cell " + filepath.Base(dir)
	}
	fl := cmd.Flags()
	if fl.Changed("examples") {
		n = f.examples
	}
	if fl.Changed("test-seed") {
		src.Seed = f.testSeed
	}
	if fl.Changed("noise") {
		src.Noise = f.noise
	}
	if n <= 0 {
		return fmt.Errorf("eval: --examples must be positive, got %d", n)
	}
	if err := src.Check(mqar.Test); err != nil {
		return fmt.Errorf("eval: --test-seed: %w", err)
	}
	m, closeDev, err := openModel(devSpec, c, params, log)
	if err != nil {
		return err
	}
	defer closeDev()
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	sc, err := experiment.EvalMQAR(ctx, m, src, s, n)
	if err != nil {
		return fmt.Errorf("eval: %w", err)
	}
	fmt.Printf("checkpoint   %s\n", path)
	fmt.Printf("mqar         T=%d K=%d, %d examples of %s (seed %d, noise %v)\n", s.T, s.K, sc.Examples, from, src.Seed, src.Noise)
	fmt.Printf("accuracy     %.4f\n", sc.Accuracy())
	fmt.Printf("loss         %.4f nats/query\n", sc.Loss())
	return nil
}

// loadCached returns the results of the cells found in the cache, in cell
// order, and sets the plot title from their devices unless --title gave one.
func loadCached(cache experiment.Cache, cells []experiment.Cell, sf *sweepFlags) ([]experiment.Result, error) {
	var rs []experiment.Result
	for _, c := range cells {
		r, err := cache.Load(c)
		if errors.Is(err, experiment.ErrNotCached) {
			continue // dropped by --fit, or not run (--cached)
		}
		if err != nil {
			return nil, err
		}
		rs = append(rs, r)
	}
	if sf.title == "" {
		devs := map[string]bool{}
		for _, r := range rs {
			// "cuda:0 NVIDIA H200" → "NVIDIA H200": the ordinal says nothing
			// across runs, and the title must fit the first panel.
			d := r.Device
			if pre, name, ok := strings.Cut(d, " "); ok && strings.HasPrefix(pre, "cuda:") {
				d = name
			}
			devs[d] = true
		}
		var ds []string
		for d := range devs {
			ds = append(ds, d)
		}
		slices.Sort(ds)
		mode := ""
		if sf.quick {
			mode = "CPU quick run, "
		}
		sf.title = fmt.Sprintf("%s%s", mode, strings.Join(ds, ", "))
	}
	return rs, nil
}

// evalSpan is the number of validation tokens an LM cell scores at every
// evaluation length: windows windows of the longest one (0: all windows).
func evalSpan(windows int, lens []int) int {
	if windows <= 0 || len(lens) == 0 {
		return 0
	}
	return windows * slices.Max(lens)
}

package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/data"
	devicepkg "github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/internal/localrun"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/tokenizer"
	"github.com/bmojo/bmojo/train"
)

func init() {
	var (
		file    string
		resume  bool
		quiet   bool
		noTLS   bool
		workers int
		devSpec string
		mon     *monitorOpts
		f       = job.Default()
	)
	cmd := &cobra.Command{
		Use:   "train",
		Short: "Train a model (with no flags: a tiny B'MOJO on the bundled corpus, on the CPU)",
		Long: `Train a B'MOJO-family model.

With no flags it trains the tiny B'MOJO preset on the bundled public-domain
corpus on the CPU, shows a progress bar, evaluates on the validation split
and writes checkpoints under runs/bmojo-tiny. A job file (-f job.yaml) sets
any field; flags given on the command line override the file.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			j := job.Default()
			if file != "" {
				var err error
				if j, err = job.Load(file); err != nil {
					return err
				}
			}
			fl := cmd.Flags()
			if fl.Changed("preset") {
				j.Preset, j.Model = f.Preset, f.Model // the preset replaces file overrides
				// Without a job file the job is named after its preset (metrics, dashboard).
				if file == "" {
					j.Name = f.Preset
					if !fl.Changed("checkpoint-dir") {
						j.CheckpointDir = "runs/" + f.Preset
					}
				}
			}
			set := func(name string, apply func()) {
				if fl.Changed(name) {
					apply()
				}
			}
			set("steps", func() { j.Steps = f.Steps })
			set("batch-size", func() { j.BatchSize = f.BatchSize })
			set("lr", func() { j.LR = f.LR })
			set("warmup-steps", func() { j.WarmupSteps = f.WarmupSteps })
			set("seed", func() { j.Seed = f.Seed })
			set("data", func() { j.Data = f.Data })
			set("tokenizer", func() { j.Tokenizer = f.Tokenizer })
			set("checkpoint-dir", func() { j.CheckpointDir = f.CheckpointDir })
			set("checkpoint-every", func() { j.CheckpointEvery = f.CheckpointEvery })
			set("eval-every", func() { j.EvalEvery = f.EvalEvery })
			set("eval-batches", func() { j.EvalBatches = f.EvalBatches })
			set("threads", func() { j.Threads = f.Threads })
			set("allreduce", func() {
				j.AllReduce = f.AllReduce
				if j.AllReduce == job.AllReduceAuto {
					j.AllReduce = "" // the job file's spelling of the default
				}
			})
			if err := j.Validate(); err != nil {
				return err
			}
			// Both paths below (and the workers) train the resolved job.
			resolved, err := train.ResolveTokenizer(j)
			if err != nil {
				return err
			}
			j = resolved
			if _, _, err := devicepkg.Parse(devSpec); err != nil {
				return fmt.Errorf("train: --device: %w", err)
			}
			log := newLogger()
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			if !fl.Changed("workers") && devSpec != "cpu" {
				// One worker per GPU when this build can use the GPUs.
				if gpus, err := devicepkg.GPUs(); err == nil && len(gpus) > 0 {
					workers = len(gpus)
				}
			}
			if workers > 0 {
				return trainLocal(ctx, j, workers, devSpec, quiet, noTLS, mon, log)
			}
			opts := train.Options{Logger: log.Named("train"), Device: devSpec}
			if !quiet {
				opts.Progress = os.Stderr
			}
			res, err := train.Run(ctx, j, opts)
			if errors.Is(err, train.ErrFinished) {
				fmt.Println(err)
				return nil
			}
			if err != nil {
				return err
			}
			var last float64
			if n := len(res.Losses); n > 0 {
				last = res.Losses[n-1]
			}
			printSummary(summary{unit: lossUnit(j), steps: res.Steps, skipped: res.Skipped, workers: 1, train: last, val: res.ValLoss,
				entropy: res.UnigramEntropy, tps: res.TokensPerSec, checkpoint: res.Checkpoint})
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&file, "file", "f", "", "job file (YAML, version: 1); flags override it")
	fl.IntVar(&workers, "workers", 2, "worker processes (embedded etcd + coordinator + N workers); 0 = train in this process")
	fl.BoolVar(&resume, "resume", false, "no effect: a job always resumes from the newest good checkpoint in its --checkpoint-dir")
	_ = fl.MarkDeprecated("resume", "a job always resumes from its checkpoint directory")
	fl.BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	fl.BoolVar(&noTLS, "insecure", false, "with --workers N: no job CA, no mutual TLS on etcd and the ring (to measure what TLS costs)")
	fl.StringVar(&devSpec, "device", "auto", "compute device: auto (the GPUs, one worker each, when built with -tags cuda; else the CPU), cpu, cuda or cuda:N")
	mon = monitorFlags(fl, "127.0.0.1:8080") // with --workers N: a free port when this one is taken
	fl.StringVar(&f.Preset, "preset", f.Preset, "model preset: FAMILY[-SIZE], families bmojo, bmojo-f, mamba, swa, transformer, hybrid; sizes tiny, small, 130m, 370m")
	fl.IntVar(&f.Steps, "steps", f.Steps, "optimizer steps")
	fl.IntVar(&f.BatchSize, "batch-size", f.BatchSize, "sequences per step")
	fl.Float64Var(&f.LR, "lr", f.LR, "peak learning rate")
	fl.IntVar(&f.WarmupSteps, "warmup-steps", 0, "linear warm-up steps (0 = 5% of steps)")
	fl.Uint64Var(&f.Seed, "seed", f.Seed, "seed for initialisation and data order")
	fl.StringVar(&f.Data, "data", "", "dataset directory from `bmojo data prepare` (default: the bundled corpus)")
	fl.StringVar(&f.Tokenizer, "tokenizer", "", "tokenizer the data must have: bytes, gpt2 or a tokenizer.json path (default: the dataset's); the model's vocab_size grows to its padded vocabulary")
	fl.StringVar(&f.CheckpointDir, "checkpoint-dir", f.CheckpointDir, "checkpoint directory")
	fl.IntVar(&f.CheckpointEvery, "checkpoint-every", f.CheckpointEvery, "steps between checkpoints (0 = only at the end)")
	fl.IntVar(&f.EvalEvery, "eval-every", f.EvalEvery, "steps between validation passes (0 = only at the end)")
	fl.IntVar(&f.EvalBatches, "eval-batches", f.EvalBatches, "validation batches per pass (0 = the whole split)")
	fl.IntVar(&f.Threads, "threads", 0, "CPU threads (0 = all cores)")
	fl.StringVar(&f.AllReduce, "allreduce", "auto", "gradient all-reduce: auto (hierarchical when the workers span 2+ hosts with the same number, 2+, on each; else one ring), flat or hier (auto that warns when it cannot be hierarchical)")
	rootCmd.AddCommand(cmd)
}

// trainLocal runs the job with an embedded etcd, a coordinator and workers
// worker processes; rerunning the same job resumes it.
func trainLocal(ctx context.Context, j job.Job, workers int, devSpec string, quiet, insecure bool, mon *monitorOpts, log hclog.Logger) error {
	opts := localrun.Options{Workers: workers, Device: devSpec, Logger: log.Named("train"), WorkerLevel: "warn",
		HTTP: mon.http, Token: mon.tokenOrEnv(), TensorBoard: mon.tensorboard, Insecure: insecure,
		OnHTTP: func(url string) { log.Info("dashboard (bmojo status reads it too)", "url", url) }}
	if log.IsDebug() {
		opts.WorkerLevel = "debug"
	}
	if !quiet {
		opts.Progress = os.Stderr
	}
	res, err := localrun.Run(ctx, j, opts)
	if errors.Is(err, localrun.ErrFinished) {
		fmt.Println(err)
		return nil
	}
	if err != nil {
		return err
	}
	ds, err := data.Load(j.Data, data.SplitTrain)
	if err != nil {
		return err
	}
	printSummary(summary{unit: lossUnit(j), steps: res.Done.Step, skipped: res.Progress.Skipped, workers: workers, train: res.Done.Loss,
		val: res.Done.ValLoss, entropy: ds.UnigramEntropy(), tps: res.Progress.TokensPerS, checkpoint: res.Checkpoint})
	return nil
}

type summary struct {
	unit                     string // what the loss is per: byte or token
	steps, skipped, workers  int
	train, val, entropy, tps float64
	checkpoint               string
}

// printSummary is the end-of-run report: the validation loss beside the
// corpus's unigram entropy is the first sign the model learned anything.
func printSummary(s summary) {
	fmt.Printf("steps            %d (skipped %d) on %d worker(s)\n", s.steps, s.skipped, s.workers)
	fmt.Printf("train loss       %.4f\n", s.train)
	fmt.Printf("val loss         %.4f nats/%s (%.3f bits/%s)\n", s.val, s.unit, s.val/math.Ln2, s.unit)
	fmt.Printf("unigram entropy  %.4f nats/%s; val loss is %.3f× of it\n", s.entropy, s.unit, s.val/s.entropy)
	fmt.Printf("throughput       %.0f tokens/s\n", s.tps)
	fmt.Printf("checkpoint       %s\n", s.checkpoint)
}

// lossUnit is what j's loss is measured per: a byte with the bytes
// tokenizer, else a token.
func lossUnit(j job.Job) string {
	if j.Tokenizer == "" || j.Tokenizer == tokenizer.Bytes {
		return "byte"
	}
	return "token"
}

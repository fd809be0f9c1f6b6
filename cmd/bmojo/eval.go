package main

import (
	"fmt"
	"math"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/data"
	devicepkg "github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/train"
)

func init() {
	var (
		ckpt, dataDir string
		devSpec       string
		seqLen, batch int
		maxBatches    int
		task          string
		mq            mqarEvalFlags
	)
	cmd := &cobra.Command{
		Use:   "eval",
		Short: "Validation loss and perplexity of a checkpoint at any sequence length",
		Long: `Evaluate a checkpoint on a dataset's validation split.

--seq-len may exceed the training length: that is the length-generalisation
test (B'MOJO's fading and eidetic memories keep working past it).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := newLogger().Named("eval")
			switch task {
			case "lm":
			case "mqar":
				if seqLen <= 0 {
					return fmt.Errorf("eval: --task mqar needs --seq-len and --kv")
				}
				return evalMQAR(cmd, ckpt, devSpec, seqLen, mq, log)
			default:
				return fmt.Errorf("eval: --task %q: want lm or mqar", task)
			}
			c, params, path, err := loadForEval(ckpt, log)
			if err != nil {
				return err
			}
			T := seqLen
			if T == 0 {
				T = c.SeqLen
			}
			if T <= 0 || batch <= 0 || maxBatches < 0 {
				return fmt.Errorf("eval: --seq-len, --batch-size must be positive and --max-batches >= 0")
			}
			ds, err := data.Load(dataDir, data.SplitVal)
			if err != nil {
				return err
			}
			if err := checkDataTokenizer("eval", path, c, ds); err != nil {
				return err
			}
			m, closeDev, err := openModel(devSpec, c, params, log)
			if err != nil {
				return err
			}
			defer closeDev()
			if err := m.Prepare(batch, T); err != nil {
				return err
			}
			log.Info("evaluating", "checkpoint", path, "seq_len", T, "train_seq_len", c.SeqLen, "val_tokens", ds.NumTokens())
			loss, err := train.Evaluate(m, ds, maxBatches)
			if err != nil {
				return err
			}
			fmt.Printf("checkpoint   %s\n", path)
			fmt.Printf("seq_len      %d (trained at %d)\n", T, c.SeqLen)
			fmt.Printf("val loss     %.4f nats/token\n", loss)
			fmt.Printf("perplexity   %.3f\n", math.Exp(loss))
			fmt.Printf("bits/token   %.4f\n", loss/math.Ln2)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&ckpt, "checkpoint", "runs/bmojo-tiny", "model.safetensors, a step-N directory, or a checkpoint root (newest good one)")
	fl.StringVar(&dataDir, "data", "", "dataset directory from `bmojo data prepare` (default: the bundled corpus)")
	fl.IntVar(&seqLen, "seq-len", 0, "evaluation length (default: the training length)")
	fl.IntVar(&batch, "batch-size", 4, "sequences per forward pass")
	fl.StringVar(&devSpec, "device", "auto", "compute device: auto, cpu, cuda or cuda:N")
	fl.IntVar(&maxBatches, "max-batches", 0, "stop after this many batches (0 = the whole split)")
	fl.StringVar(&task, "task", "lm", "lm: loss on a dataset; mqar: MQAR accuracy at (--seq-len, --kv), see `bmojo experiment mqar`")
	mq.register(fl)
	rootCmd.AddCommand(cmd)
}

// loadForEval reads the weights --checkpoint names (see the flag), checked
// against their manifest's SHA-256.
func loadForEval(path string, log hclog.Logger) (model.Config, []float32, string, error) {
	w, err := checkpoint.LoadWeights(path, func(dir string, err error) {
		log.Warn("skipping damaged checkpoint", "dir", dir, "error", err)
	})
	if err != nil {
		return model.Config{}, nil, "", fmt.Errorf("eval: %w", err)
	}
	return w.Config, w.Params, w.Path, nil
}

// openModel opens the device devSpec names and builds model c on it with
// params (from loadForEval); closeDev releases the device.
func openModel(devSpec string, c model.Config, params []float32, log hclog.Logger) (m *model.Model[float32], closeDev func(), err error) {
	dev, err := devicepkg.Open(devSpec, devicepkg.Options{Logger: log})
	if err != nil {
		return nil, nil, err
	}
	if m, err = model.New[float32](dev.Backend, c, 0); err == nil {
		err = m.SetParamsF32(params)
	}
	if err != nil {
		dev.Close()
		return nil, nil, err
	}
	return m, func() { dev.Close() }, nil
}

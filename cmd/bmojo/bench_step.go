package main

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/model"
)

func init() {
	var (
		preset       string
		batch, steps int
		seqLen       int
		threadList   []int
	)
	cmd := &cobra.Command{
		Use:   "step",
		Short: "Time one training step (forward, backward, AdamW) on the CPU: 1 core vs all cores",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := model.Preset(preset)
			if err != nil {
				return err
			}
			if seqLen > 0 {
				c.SeqLen = seqLen
			}
			if batch <= 0 || steps <= 0 {
				return fmt.Errorf("bench step: --batch-size and --steps must be positive")
			}
			m, err := model.New[float32](cpu.New[float32](), c, 1)
			if err != nil {
				return err
			}
			if err := m.Prepare(batch, c.SeqLen); err != nil {
				return err
			}
			opt := model.NewOptimizer(m, model.DefaultOptim(1e-3, steps+1))
			r := rand.New(rand.NewPCG(1, 2))
			tokens, targets := make([]int32, batch*c.SeqLen), make([]int32, batch*c.SeqLen)
			for i := range tokens {
				tokens[i], targets[i] = int32(r.IntN(c.VocabSize)), int32(r.IntN(c.VocabSize))
			}
			step := func() error {
				m.ZeroGrads()
				if _, err := m.Forward(tokens, targets); err != nil {
					return err
				}
				if err := m.Backward(); err != nil {
					return err
				}
				opt.Apply()
				return nil
			}
			fmt.Printf("preset %s: %d parameters, batch %d × %d tokens\n", preset, m.Layout.ParamCount(), batch, c.SeqLen)
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
				if err := step(); err != nil { // warm-up: page in buffers
					return err
				}
				t0 := time.Now()
				for range steps {
					if err := step(); err != nil {
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
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&preset, "preset", "bmojo", "model preset")
	fl.IntVar(&batch, "batch-size", 4, "sequences per step")
	fl.IntVar(&steps, "steps", 3, "timed steps per thread count")
	fl.IntVar(&seqLen, "seq-len", 0, "sequence length (default: the preset's)")
	fl.IntSliceVar(&threadList, "threads", nil, "thread counts to time (default: 1 and all cores)")
	benchCmd.AddCommand(cmd)
}

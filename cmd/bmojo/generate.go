package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/signal"
	"slices"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tokenizer"
)

// newlineToken starts generation when the prompt is empty.
const newlineToken = 10

func init() {
	var (
		checkpoint  string
		prompt      string
		tokens      int
		temperature float64
		topK        int
		seed        uint64
		tokFlag     string
	)
	cmd := &cobra.Command{
		Use:   "generate --checkpoint PATH [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]",
		Short: "Generate text from a trained checkpoint (streamed to stdout)",
		Long: `Generate text from a trained model, one token at a time, with the tokenizer
the checkpoint was trained with (a tokenizer.json one is found in the
training dataset, or given with --tokenizer). Padding ids past the
tokenizer's vocabulary are never sampled.

--checkpoint is a model.safetensors file, a step-N checkpoint directory, or a
checkpoint root directory (such as runs/bmojo-small), in which case the newest
checkpoint that reads back cleanly is used. The prompt is printed, then each
generated token as soon as it is sampled. An empty prompt starts from the
end-of-text token, or a newline for the byte tokenizer. Temperature 0 is
greedy decoding; --top-k 0 samples from the whole vocabulary. The model carries a fixed-size state, so generation may run past
the training length.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch {
			case checkpoint == "":
				return errors.New("generate: --checkpoint is required (a model.safetensors file, a step-N directory or a checkpoint root)")
			case tokens < 0:
				return fmt.Errorf("generate: --tokens must be >= 0, got %d", tokens)
			case temperature < 0 || math.IsNaN(temperature) || math.IsInf(temperature, 0):
				return fmt.Errorf("generate: --temperature must be a finite number >= 0, got %v", temperature)
			case topK < 0:
				return fmt.Errorf("generate: --top-k must be >= 0 (0 = whole vocabulary), got %d", topK)
			}
			log := newLogger().Named("generate")
			cfg, params, from, err := loadForGenerate(checkpoint, log)
			if err != nil {
				return err
			}
			tok, err := checkpointTokenizerFor("generate", from, cfg, tokFlag)
			if err != nil {
				return err
			}
			log.Info("loaded checkpoint", "path", from, "mixers", fmt.Sprint(cfg.Mixers), "d_model", cfg.DModel, "parameters", len(params), "tokenizer", tok.Name())
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			g := generation{
				cfg: cfg, params: params, tok: tok, prompt: prompt, tokens: tokens,
				temperature: temperature, topK: topK, seed: seed, log: log,
			}
			return g.run(ctx, cmd.OutOrStdout())
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&checkpoint, "checkpoint", "", "model.safetensors file, step-N checkpoint directory, or checkpoint root (newest good checkpoint)")
	fl.StringVar(&prompt, "prompt", "", "text to continue (empty: start from the end-of-text token, or a newline for bytes)")
	fl.IntVar(&tokens, "tokens", 256, "tokens to generate")
	fl.StringVar(&tokFlag, "tokenizer", "", "the checkpoint's tokenizer.json, when it is not in the training dataset (bytes and gpt2 need none)")
	fl.Float64Var(&temperature, "temperature", 0.8, "sampling temperature (0 = greedy)")
	fl.IntVar(&topK, "top-k", 40, "sample among the K most likely tokens (0 = all)")
	fl.Uint64Var(&seed, "seed", 1, "sampling seed")
	rootCmd.AddCommand(cmd)
}

// loadForGenerate reads the weights at path (see the command's help) and
// returns them with the path they came from.
func loadForGenerate(path string, log hclog.Logger) (model.Config, []float32, string, error) {
	w, err := checkpoint.LoadWeights(path, func(dir string, err error) {
		log.Warn("skipping damaged checkpoint", "dir", dir, "error", err)
	})
	if err != nil {
		return model.Config{}, nil, "", fmt.Errorf("generate: %w", err)
	}
	return w.Config, w.Params, w.Path, nil
}

// generation is one generate run on loaded weights.
type generation struct {
	cfg         model.Config
	params      []float32
	tok         tokenizer.Tokenizer
	prompt      string
	tokens      int
	temperature float64
	topK        int
	seed        uint64
	log         hclog.Logger
}

func (g *generation) run(ctx context.Context, stdout io.Writer) error {
	tok := g.tok
	V := g.cfg.VocabSize
	in, err := tokenizer.EncodeSpecial(tok, g.prompt)
	if err != nil {
		return fmt.Errorf("generate: prompt: %w", err)
	}
	prompt := slices.Clone(in)
	if eot, ok := tok.EOT(); len(in) == 0 && ok {
		in = []int32{eot}
	}
	if len(in) == 0 {
		if V <= newlineToken {
			return fmt.Errorf("generate: --prompt is empty and the model's %d-token vocabulary has no newline token (%d) to start from; give a --prompt", V, newlineToken)
		}
		in = []int32{newlineToken}
	}
	for i, t := range in {
		if int(t) >= V {
			return fmt.Errorf("generate: prompt token %d (at %d) is outside the model's %d-token vocabulary", t, i, V)
		}
	}
	// Ids from the tokenizer's vocabulary up are padding (or, for a byte
	// model, never valid): never sampled.
	sampleV := min(V, tok.VocabSize())
	dec, err := model.NewDecoder(g.cfg, g.params)
	if err != nil {
		return fmt.Errorf("generate: %w", err)
	}
	w := bufio.NewWriter(stdout)
	out := &utf8Stream{w: w}
	for _, t := range prompt {
		if err := out.put(tok.TokenBytes(t)); err != nil {
			return fmt.Errorf("generate: write: %w", err)
		}
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("generate: write: %w", err)
	}
	start := time.Now()
	var logits []float32
	for _, t := range in {
		if logits, err = dec.Step(t); err != nil {
			return fmt.Errorf("generate: prompt: %w", err)
		}
	}
	promptTime := time.Since(start)
	rng := rand.New(rand.NewPCG(g.seed, 0x67656e)) // "gen"
	n := 0
	genStart := time.Now()
	for n < g.tokens {
		if ctx.Err() != nil {
			g.log.Info("interrupted", "generated", n)
			break
		}
		next := model.Sample(logits[:sampleV], g.temperature, g.topK, rng)
		if err := out.put(tok.TokenBytes(next)); err != nil {
			return fmt.Errorf("generate: write: %w", err)
		}
		if err := w.Flush(); err != nil {
			return fmt.Errorf("generate: write: %w", err)
		}
		n++
		if n == g.tokens {
			break // the last token's logits are not needed
		}
		if logits, err = dec.Step(next); err != nil {
			return fmt.Errorf("generate: %w", err)
		}
	}
	if err := out.finish(); err != nil {
		return fmt.Errorf("generate: write: %w", err)
	}
	if _, err := io.WriteString(w, "\n"); err != nil {
		return fmt.Errorf("generate: write: %w", err)
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("generate: write: %w", err)
	}
	el := time.Since(genStart).Seconds()
	g.log.Info("done", "prompt_tokens", len(in), "prompt_seconds", promptTime.Seconds(),
		"generated", n, "tokens_per_sec", float64(n)/math.Max(el, 1e-9))
	return nil
}

// utf8Stream writes tokens' bytes as they come, holding back an incomplete
// UTF-8 sequence until its last byte arrives, and replacing invalid bytes
// and unknown tokens (nil) with U+FFFD (as Tokenizer.Decode does).
type utf8Stream struct {
	w       *bufio.Writer
	pending []byte
}

func (s *utf8Stream) put(b []byte) error {
	if b == nil {
		if err := s.flushInvalid(); err != nil {
			return err
		}
		_, err := s.w.WriteRune(utf8.RuneError)
		return err
	}
	s.pending = append(s.pending, b...)
	for len(s.pending) > 0 {
		if !utf8.FullRune(s.pending) {
			return nil // wait for the rest of the sequence
		}
		r, size := utf8.DecodeRune(s.pending)
		var err error
		if r == utf8.RuneError && size <= 1 {
			_, err = s.w.WriteRune(utf8.RuneError)
		} else {
			_, err = s.w.Write(s.pending[:size])
		}
		if err != nil {
			return err
		}
		s.pending = s.pending[size:]
	}
	s.pending = s.pending[:0]
	return nil
}

// flushInvalid replaces a held-back incomplete sequence by U+FFFD.
func (s *utf8Stream) flushInvalid() error {
	if len(s.pending) == 0 {
		return nil
	}
	s.pending = s.pending[:0]
	_, err := s.w.WriteRune(utf8.RuneError)
	return err
}

func (s *utf8Stream) finish() error { return s.flushInvalid() }

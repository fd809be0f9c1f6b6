// Package model owns the B'MOJO network of docs/model.md: its
// configuration and named presets, parameter layout and initialisation, and
// the forward and backward passes written against kernels.Backend. It does
// no I/O and knows no file format: it names the tensors (Layout) and encodes
// the config (ConfigMetadata); the checkpoint package reads and writes files.
package model

import (
	"errors"
	"fmt"
	"math"
	"strings"
)

// Mixer names, as written in configs and checkpoints.
const (
	MixerBMOJO     = "bmojo"
	MixerMamba     = "mamba"
	MixerAttention = "attention"
)

// ErrConfig is wrapped by every configuration validation error.
var ErrConfig = errors.New("invalid model config")

// Config is the model's shape (docs/model.md §1). JSON keys are the config keys
// of docs/model.md; the same struct is stored in checkpoint metadata.
type Config struct {
	VocabSize      int      `json:"vocab_size" yaml:"vocab_size"`             // V, tokens (256 for bytes)
	DModel         int      `json:"d_model" yaml:"d_model"`                   // d, residual width
	NLayer         int      `json:"n_layer" yaml:"n_layer"`                   // L, blocks
	NHead          int      `json:"n_head" yaml:"n_head"`                     // H, attention heads
	NKVHead        int      `json:"n_kv_head" yaml:"n_kv_head"`               // G, key/value heads
	HeadDim        int      `json:"head_dim" yaml:"head_dim"`                 // D, head width
	DInner         int      `json:"d_inner" yaml:"d_inner"`                   // E, SSM width
	DState         int      `json:"d_state" yaml:"d_state"`                   // N, SSM state per channel
	DConv          int      `json:"d_conv" yaml:"d_conv"`                     // K, conv width
	DtRank         int      `json:"dt_rank" yaml:"dt_rank"`                   // R, rank of the Δ projection
	Window         int      `json:"window" yaml:"window"`                     // w_c, context window
	FadingWindow   int      `json:"fading_window" yaml:"fading_window"`       // w_f, 0 = fading path off
	Chunk          int      `json:"chunk" yaml:"chunk"`                       // C, eidetic chunk length
	SelectPerChunk int      `json:"select_per_chunk" yaml:"select_per_chunk"` // k_sel
	Memory         int      `json:"memory" yaml:"memory"`                     // M, eidetic capacity, 0 = off
	InnovationLoss float64  `json:"innovation_loss" yaml:"innovation_loss"`   // λ
	DFF            int      `json:"d_ff" yaml:"d_ff"`                         // F, SwiGLU width, 0 = no MLP
	Expand         int      `json:"expand" yaml:"expand"`                     // E/d
	RopeTheta      float64  `json:"rope_theta" yaml:"rope_theta"`             // RoPE base
	MemoryRope     string   `json:"memory_rope" yaml:"memory_rope"`           // "absolute" or "none"
	Mixers         []string `json:"mixers" yaml:"mixers"`                     // one per layer
	SeqLen         int      `json:"seq_len" yaml:"seq_len"`                   // training length T
}

// MemoryDelay is δ = 1 + ceil((w_c + w_f)/C): a token selected in chunk c is
// visible from chunk c+δ on, when it has left both windows (docs/model.md §4).
func (c Config) MemoryDelay() int {
	return 1 + (c.Window+c.FadingWindow+c.Chunk-1)/c.Chunk
}

// HasMLP reports whether layers carry a SwiGLU block.
func (c Config) HasMLP() bool { return c.DFF > 0 }

// HasMemory reports whether bmojo layers keep an eidetic memory.
func (c Config) HasMemory() bool { return c.Memory > 0 }

// Validate checks the config without side effects; errors name the key.
func (c Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, a...))
	}
	pos := []struct {
		name string
		v    int
	}{
		{"vocab_size", c.VocabSize}, {"d_model", c.DModel}, {"n_layer", c.NLayer},
		{"seq_len", c.SeqLen},
	}
	for _, p := range pos {
		if p.v <= 0 {
			return bad("%s must be positive, got %d", p.name, p.v)
		}
	}
	// Upper bounds: far beyond any model this code trains, and small enough
	// that no size derived from them overflows or asks for an absurd
	// allocation (a hostile job file or checkpoint gets this error, not a
	// panic or an out-of-memory crash).
	for _, p := range []struct {
		name   string
		v, max int
	}{
		{"vocab_size", c.VocabSize, 1 << 22}, {"d_model", c.DModel, 1 << 16}, {"n_layer", c.NLayer, 1 << 10},
		{"seq_len", c.SeqLen, 1 << 22}, {"d_ff", c.DFF, 1 << 18}, {"d_inner", c.DInner, 1 << 18},
		{"d_state", c.DState, 1 << 12}, {"d_conv", c.DConv, 1 << 10}, {"dt_rank", c.DtRank, 1 << 16},
		{"n_head", c.NHead, 1 << 12}, {"n_kv_head", c.NKVHead, 1 << 12}, {"head_dim", c.HeadDim, 1 << 12},
		{"window", c.Window, 1 << 22}, {"fading_window", c.FadingWindow, 1 << 22}, {"memory", c.Memory, 1 << 22},
		{"chunk", c.Chunk, 1 << 22}, {"select_per_chunk", c.SelectPerChunk, 1 << 22},
	} {
		if p.v > p.max {
			return bad("%s must be at most %d, got %d", p.name, p.max, p.v)
		}
	}
	nonneg := []struct {
		name string
		v    int
	}{{"d_ff", c.DFF}, {"memory", c.Memory}, {"fading_window", c.FadingWindow}}
	for _, p := range nonneg {
		if p.v < 0 {
			return bad("%s must be >= 0, got %d", p.name, p.v)
		}
	}
	if len(c.Mixers) != c.NLayer {
		return bad("mixers lists %d layers, n_layer is %d", len(c.Mixers), c.NLayer)
	}
	var hasSSM, hasAttn, hasBMOJO bool
	for i, m := range c.Mixers {
		switch m {
		case MixerBMOJO:
			hasSSM, hasAttn, hasBMOJO = true, true, true
		case MixerMamba:
			hasSSM = true
		case MixerAttention:
			hasAttn = true
		default:
			return bad("mixers[%d] is %q, want one of bmojo, mamba, attention", i, m)
		}
	}
	if hasSSM {
		for _, p := range []struct {
			name string
			v    int
		}{{"d_inner", c.DInner}, {"d_state", c.DState}, {"d_conv", c.DConv}, {"dt_rank", c.DtRank}} {
			if p.v <= 0 {
				return bad("%s must be positive for ssm layers, got %d", p.name, p.v)
			}
		}
	}
	if hasAttn {
		for _, p := range []struct {
			name string
			v    int
		}{{"n_head", c.NHead}, {"n_kv_head", c.NKVHead}, {"head_dim", c.HeadDim}, {"window", c.Window}} {
			if p.v <= 0 {
				return bad("%s must be positive for attention layers, got %d", p.name, p.v)
			}
		}
		if c.NHead%c.NKVHead != 0 {
			return bad("n_head (%d) must be a multiple of n_kv_head (%d)", c.NHead, c.NKVHead)
		}
		if c.HeadDim%2 != 0 {
			return bad("head_dim must be even for RoPE, got %d", c.HeadDim)
		}
		if c.Window > c.SeqLen {
			return bad("window (%d) is longer than seq_len (%d)", c.Window, c.SeqLen)
		}
		if !(c.RopeTheta > 0) {
			return bad("rope_theta must be positive, got %v", c.RopeTheta)
		}
	}
	if n := NewLayout(c).Total; n > MaxParams {
		return bad("%d parameters is more than this build trains (%d)", n, MaxParams)
	}
	if hasBMOJO && c.Memory > 0 {
		if c.Chunk <= 0 {
			return bad("chunk must be positive when memory > 0, got %d", c.Chunk)
		}
		if c.SeqLen%c.Chunk != 0 {
			return bad("chunk (%d) does not divide seq_len (%d)", c.Chunk, c.SeqLen)
		}
		if c.SelectPerChunk <= 0 || c.SelectPerChunk > c.Chunk {
			return bad("select_per_chunk must be in [1, chunk=%d], got %d", c.Chunk, c.SelectPerChunk)
		}
		if c.MemoryRope != "absolute" && c.MemoryRope != "none" {
			return bad("memory_rope is %q, want absolute or none", c.MemoryRope)
		}
		if c.InnovationLoss < 0 || math.IsNaN(c.InnovationLoss) {
			return bad("innovation_loss must be >= 0, got %v", c.InnovationLoss)
		}
	}
	return nil
}

// MaxParams bounds a model's parameter count (16 Gi: 64 GiB of float32
// weights, before gradients and moments).
const MaxParams = 1 << 34

// Families are the model kinds of docs/model.md §1, the paper's special cases.
var Families = []string{"bmojo", "bmojo-f", "mamba", "swa", "transformer", "hybrid"}

// Sizes are the named sizes of docs/model.md §1.
var Sizes = []string{"tiny", "small", "130m", "370m"}

type sizeRow struct {
	d                                        int
	bmojoLayers, mambaLayers, swaLayers, hyb int
	seqLen, window, memory, sel              int
}

// sizeTable is docs/model.md §1's named-size table. The hybrid column is a choice
// (docs/model.md gives none): about the parameter count of the bmojo column, in
// whole groups of four layers so that every model has an attention layer.
var sizeTable = map[string]sizeRow{
	"tiny":  {64, 2, 4, 2, 4, 128, 32, 32, 2},
	"small": {256, 4, 12, 6, 4, 512, 128, 128, 8},
	"130m":  {768, 8, 24, 12, 12, 2048, 512, 512, 32},
	"370m":  {1024, 16, 48, 24, 20, 2048, 512, 512, 32},
}

// Preset returns the config named "family" or "family-size" (size defaults
// to small), e.g. "bmojo", "mamba-tiny", "hybrid-130m".
func Preset(name string) (Config, error) {
	family, size := name, "small"
	for _, s := range Sizes {
		if strings.HasSuffix(name, "-"+s) {
			family, size = strings.TrimSuffix(name, "-"+s), s
			break
		}
	}
	row, ok := sizeTable[size]
	known := false
	for _, f := range Families {
		known = known || f == family
	}
	if !ok || !known {
		return Config{}, fmt.Errorf("%w: unknown preset %q (families: %s; sizes: %s; e.g. bmojo-tiny)",
			ErrConfig, name, strings.Join(Families, ", "), strings.Join(Sizes, ", "))
	}
	d := row.d
	c := Config{
		VocabSize:      256,
		DModel:         d,
		NHead:          max(1, d/64),
		HeadDim:        64,
		Expand:         2,
		DInner:         2 * d,
		DState:         16,
		DConv:          4,
		DtRank:         (d + 15) / 16,
		Window:         row.window,
		FadingWindow:   row.window,
		Chunk:          row.window,
		SelectPerChunk: row.sel,
		Memory:         0,
		InnovationLoss: 0.01,
		DFF:            (8*d/3 + 63) / 64 * 64,
		RopeTheta:      10000,
		MemoryRope:     "absolute",
		SeqLen:         row.seqLen,
	}
	if (8*d)%3 != 0 && (8*d/3)%64 == 0 {
		c.DFF += 64 // 8d/3 is fractional: round up past it
	}
	c.NKVHead = c.NHead
	layers := func(n int, m string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = m
		}
		return out
	}
	switch family {
	case "bmojo":
		c.Memory = row.memory
		c.Mixers = layers(row.bmojoLayers, MixerBMOJO)
	case "bmojo-f":
		c.Mixers = layers(row.bmojoLayers, MixerBMOJO)
	case "mamba":
		c.DFF = 0
		c.Mixers = layers(row.mambaLayers, MixerMamba)
	case "swa":
		c.FadingWindow = 0
		c.Mixers = layers(row.swaLayers, MixerAttention)
	case "transformer":
		c.Window, c.FadingWindow, c.Chunk = row.seqLen, 0, row.seqLen
		c.Mixers = layers(row.swaLayers, MixerAttention)
	case "hybrid":
		// Jamba-like: one attention layer in every four, the last of each group.
		c.FadingWindow = 0
		c.Mixers = layers(row.hyb, MixerMamba)
		for i := 3; i < row.hyb; i += 4 {
			c.Mixers[i] = MixerAttention
		}
	}
	c.NLayer = len(c.Mixers)
	return c, nil
}

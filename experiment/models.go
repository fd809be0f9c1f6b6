// Package experiment runs the experiments of issue 17 that show B'MOJO's
// claims (../shared/design/experiments.md): MQAR recall against d_model,
// length generalisation, and the eidetic-memory sweep. A sweep is a list of
// cells; a cell is one training run and its evaluation, a pure function of
// its Cell spec, cached on disk under the spec's hash so that a sweep
// resumes where it stopped and never recomputes a finished cell.
//
// It owns the cell specs, their cache, the training loops of the two cell
// kinds (MQAR and language modelling), the cost estimate and the CSV and
// PNG reports. It reads data through data/ and trains through model/; it
// touches neither the distributed system nor the checkpoint format (cells
// write ordinary checkpoints through checkpoint/).
package experiment

import (
	"errors"
	"fmt"
	"slices"

	"github.com/bmojo/bmojo/experiment/mqar"
	"github.com/bmojo/bmojo/model"
)

// ErrSpec is wrapped by every error about a cell spec or a sweep's flags.
var ErrSpec = errors.New("experiment")

// MQAR model choices (issue 17): two layers, no MLP, B'MOJO's window at 32
// so that recall past it must come from the fading or the eidetic memory,
// and the same window for SWA and the hybrid's attention layer.
const (
	MQARLayers = 2
	MQARWindow = 32
)

// Families are the model families the experiments compare (model.Families).
var Families = model.Families

// DModels is the MQAR width sweep.
var DModels = []int{64, 128, 256}

// ModelSpec is what a cell changes of a family's model.
type ModelSpec struct {
	Family string `json:"family"`
	DModel int    `json:"d_model"`
	// Memory and SelectPerChunk override B'MOJO's eidetic memory M and
	// k_sel (bmojo family only; -1 keeps the default).
	Memory         int `json:"memory"`
	SelectPerChunk int `json:"select_per_chunk"`
}

// MQARModel is the MQAR model of a family at width d (experiments.md §1):
// V = 8,192, 2 layers, no MLP, tied embeddings (the model always ties
// them). trainT is the training length of the config; maxT the longest
// test length: full attention (transformer) gets window = seq_len = maxT
// so that it attends to every earlier position at every test length.
//
// Choices where the protocol leaves one open: bmojo keeps M = 128 eidetic
// tokens, k_sel = 8 per chunk of 32 (the memory experiment sweeps both);
// hybrid is [mamba, attention(window 32)], a hybrid without eidetic
// memory at the same window as B'MOJO.
func MQARModel(s ModelSpec, trainT, maxT int) (model.Config, error) {
	if !slices.Contains(Families, s.Family) {
		return model.Config{}, fmt.Errorf("%w: unknown family %q (want one of %v)", ErrSpec, s.Family, Families)
	}
	if s.DModel < 16 || s.DModel%16 != 0 {
		return model.Config{}, fmt.Errorf("%w: d_model %d must be a positive multiple of 16", ErrSpec, s.DModel)
	}
	d := s.DModel
	c := model.Config{
		VocabSize: mqar.Vocab, DModel: d, NLayer: MQARLayers,
		NHead: max(1, d/64), HeadDim: min(64, d), Expand: 2, DInner: 2 * d,
		DState: 16, DConv: 4, DtRank: (d + 15) / 16,
		Window: MQARWindow, FadingWindow: MQARWindow, Chunk: MQARWindow,
		SelectPerChunk: 8, InnovationLoss: 0.01, DFF: 0,
		RopeTheta: 10000, MemoryRope: "absolute",
		// seq_len only bounds the window and must be a multiple of the
		// chunk: the training length rounded up to whole windows (the
		// cell prepares the model at its own lengths).
		SeqLen: (max(trainT, MQARWindow) + MQARWindow - 1) / MQARWindow * MQARWindow,
	}
	c.NKVHead = c.NHead
	two := func(a, b string) []string { return []string{a, b} }
	switch s.Family {
	case "bmojo":
		c.Memory = 128
		c.Mixers = two(model.MixerBMOJO, model.MixerBMOJO)
	case "bmojo-f":
		c.Mixers = two(model.MixerBMOJO, model.MixerBMOJO)
	case "mamba":
		c.Mixers = two(model.MixerMamba, model.MixerMamba)
	case "swa":
		c.FadingWindow = 0
		c.Mixers = two(model.MixerAttention, model.MixerAttention)
	case "transformer":
		c.FadingWindow = 0
		c.SeqLen, c.Window, c.Chunk = max(trainT, maxT), max(trainT, maxT), max(trainT, maxT)
		c.Mixers = two(model.MixerAttention, model.MixerAttention)
	case "hybrid":
		c.FadingWindow = 0
		c.Mixers = two(model.MixerMamba, model.MixerAttention)
	}
	if err := applyMemory(&c, s); err != nil {
		return model.Config{}, err
	}
	if err := c.Validate(); err != nil {
		return model.Config{}, fmt.Errorf("%w: %s d_model %d: %w", ErrSpec, s.Family, d, err)
	}
	return c, nil
}

// applyMemory applies the spec's M and k_sel overrides (bmojo only).
func applyMemory(c *model.Config, s ModelSpec) error {
	if s.Memory < 0 && s.SelectPerChunk < 0 {
		return nil
	}
	if s.Family != "bmojo" {
		return fmt.Errorf("%w: --memory and --select-per-chunk apply to the bmojo family, not %s", ErrSpec, s.Family)
	}
	if s.Memory >= 0 {
		c.Memory = s.Memory
	}
	if s.SelectPerChunk >= 0 {
		c.SelectPerChunk = s.SelectPerChunk
	}
	return nil
}

// LMModel is the language model of a family for the length experiment:
// the preset "family-size" with vocab, training length trainT. Full
// attention (transformer) gets window = seq_len = maxT, the longest
// evaluation length, so that it is full attention at every length.
func LMModel(s ModelSpec, size string, vocab, trainT, maxT int) (model.Config, error) {
	c, err := model.Preset(s.Family + "-" + size)
	if err != nil {
		return model.Config{}, fmt.Errorf("%w: %w", ErrSpec, err)
	}
	c.VocabSize = max(c.VocabSize, vocab)
	c.SeqLen = trainT
	if s.Family == "transformer" {
		c.SeqLen, c.Window, c.Chunk = max(trainT, maxT), max(trainT, maxT), max(trainT, maxT)
	}
	c.Window = min(c.Window, c.SeqLen)
	c.Chunk = min(c.Chunk, c.SeqLen)
	if s.Family != "transformer" && c.Chunk > 0 && c.SeqLen%c.Chunk != 0 {
		return model.Config{}, fmt.Errorf("%w: training length %d is not a multiple of the chunk %d", ErrSpec, trainT, c.Chunk)
	}
	if c.FadingWindow > 0 {
		c.FadingWindow = c.Window
	}
	if err := applyMemory(&c, s); err != nil {
		return model.Config{}, err
	}
	if err := c.Validate(); err != nil {
		return model.Config{}, fmt.Errorf("%w: %s-%s: %w", ErrSpec, s.Family, size, err)
	}
	return c, nil
}

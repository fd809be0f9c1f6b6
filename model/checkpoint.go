package model

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"github.com/bmojo/bmojo/internal/safetensors"
)

// ErrCheckpoint is wrapped by every error about a checkpoint whose content
// does not match its config.
var ErrCheckpoint = errors.New("checkpoint does not match its config")

// ConfigKey is the safetensors metadata key holding the config JSON (§7).
const ConfigKey = "config"

// ToTensors returns the flat vector v (Layout order) as named tensors with the
// shapes of model.md §7. prefix is prepended to each name ("" for weights;
// optimizer moments use "exp_avg." and "exp_avg_sq.").
func (l *Layout) ToTensors(v []float64, prefix string) []safetensors.Tensor {
	out := make([]safetensors.Tensor, 0, len(l.Tensors))
	for _, t := range l.Tensors {
		d := make([]float32, t.Size())
		for i := range d {
			d[i] = float32(v[t.Offset+i])
		}
		out = append(out, safetensors.Tensor{Name: prefix + t.Name, Shape: slices.Clone(t.Shape), Data: d})
	}
	return out
}

// FromFile gathers the tensors of l (with prefix) from f into a flat vector,
// checking that every tensor is present with its shape and that f holds no
// tensor of that prefix the layout does not know.
func (l *Layout) FromFile(f *safetensors.File, prefix string) ([]float64, error) {
	v := make([]float64, l.Total)
	for _, t := range l.Tensors {
		st, ok := f.Tensors[prefix+t.Name]
		if !ok {
			return nil, fmt.Errorf("%w: %s: tensor %q is missing", ErrCheckpoint, f.Path, prefix+t.Name)
		}
		if !slices.Equal(st.Shape, t.Shape) {
			return nil, fmt.Errorf("%w: %s: tensor %q has shape %v, config says %v", ErrCheckpoint, f.Path, prefix+t.Name, st.Shape, t.Shape)
		}
		for i, x := range st.Data {
			v[t.Offset+i] = float64(x)
		}
	}
	for name := range f.Tensors {
		if len(name) < len(prefix) || name[:len(prefix)] != prefix {
			continue
		}
		if _, ok := l.Lookup(name[len(prefix):]); !ok {
			return nil, fmt.Errorf("%w: %s: tensor %q is not part of this config", ErrCheckpoint, f.Path, name)
		}
	}
	return v, nil
}

// ConfigMetadata encodes c under ConfigKey.
func ConfigMetadata(c Config) map[string]string {
	b, _ := json.Marshal(c) // a struct of numbers and strings always encodes
	return map[string]string{ConfigKey: string(b)}
}

// ConfigFromFile decodes and validates the config stored in f's metadata.
func ConfigFromFile(f *safetensors.File) (Config, error) {
	s, ok := f.Metadata[ConfigKey]
	if !ok {
		return Config{}, fmt.Errorf("%w: %s has no %q metadata (not a bmojo checkpoint?)", ErrCheckpoint, f.Path, ConfigKey)
	}
	var c Config
	if err := json.Unmarshal([]byte(s), &c); err != nil {
		return Config{}, fmt.Errorf("%w: %s: config metadata: %v", ErrCheckpoint, f.Path, err)
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", f.Path, err)
	}
	return c, nil
}

// SaveWeights writes the model's parameters to path atomically.
func SaveWeights(path string, c Config, params []float64) error {
	return safetensors.Write(path, NewLayout(c).ToTensors(params, ""), ConfigMetadata(c))
}

// LoadWeights reads a weights file written by SaveWeights (or exported in the
// same naming by another tool) and returns its config and parameters.
func LoadWeights(path string) (Config, []float64, error) {
	f, err := safetensors.Read(path)
	if err != nil {
		return Config{}, nil, err
	}
	c, err := ConfigFromFile(f)
	if err != nil {
		return Config{}, nil, err
	}
	v, err := NewLayout(c).FromFile(f, "")
	if err != nil {
		return Config{}, nil, err
	}
	return c, v, nil
}

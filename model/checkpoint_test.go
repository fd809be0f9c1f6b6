package model

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/internal/safetensors"
)

func TestCheckpointRoundTrip(t *testing.T) {
	for _, name := range []string{"bmojo-tiny", "mamba-tiny", "hybrid-tiny", "swa-tiny"} {
		t.Run(name, func(t *testing.T) {
			c, err := Preset(name)
			if err != nil {
				t.Fatal(err)
			}
			l := NewLayout(c)
			p := InitParams(c, l, 4)
			path := filepath.Join(t.TempDir(), "model.safetensors")
			if err := SaveWeights(path, c, p); err != nil {
				t.Fatal(err)
			}
			c2, p2, err := LoadWeights(path)
			if err != nil {
				t.Fatal(err)
			}
			if string(ConfigMetadata(c)[ConfigKey]) != string(ConfigMetadata(c2)[ConfigKey]) {
				t.Fatalf("config changed: %v vs %v", c, c2)
			}
			for i := range p {
				if float32(p[i]) != float32(p2[i]) {
					t.Fatalf("parameter %d: %v then %v", i, p[i], p2[i])
				}
			}
			// model.md §7: every name and shape, PyTorch layout.
			f, err := safetensors.Read(path)
			if err != nil {
				t.Fatal(err)
			}
			E, d := c.DInner, c.DModel
			want := map[string][]int{"embed.weight": {c.VocabSize, d}, "norm_f.weight": {d}}
			if c.Mixers[0] != MixerAttention {
				want["layers.0.ssm.in_proj.weight"] = []int{2 * E, d}
				want["layers.0.ssm.x_proj.weight"] = []int{c.DtRank + 2*c.DState, E}
				want["layers.0.ssm.A_log"] = []int{E, c.DState}
			}
			for n, shape := range want {
				got, ok := f.Tensors[n]
				if !ok || len(got.Shape) != len(shape) {
					t.Fatalf("%s: got %v, want shape %v", n, got.Shape, shape)
				}
				for i := range shape {
					if got.Shape[i] != shape[i] {
						t.Fatalf("%s: shape %v, want %v", n, got.Shape, shape)
					}
				}
			}
		})
	}
}

func TestCheckpointMismatchNamesTheTensor(t *testing.T) {
	c, _ := Preset("bmojo-tiny")
	l := NewLayout(c)
	p := InitParams(c, l, 4)
	dir := t.TempDir()
	write := func(name string, ts []safetensors.Tensor, meta map[string]string) string {
		path := filepath.Join(dir, name)
		if err := safetensors.Write(path, ts, meta); err != nil {
			t.Fatal(err)
		}
		return path
	}
	good := l.ToTensors(p, "")
	cases := []struct {
		name string
		edit func([]safetensors.Tensor) ([]safetensors.Tensor, map[string]string)
		want string
	}{
		{"missing tensor", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			return ts[1:], ConfigMetadata(c)
		}, "embed.weight"},
		{"wrong shape", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			out := append([]safetensors.Tensor(nil), ts...)
			out[0] = safetensors.Tensor{Name: "embed.weight", Shape: []int{128, 128}, Data: ts[0].Data}
			return out, ConfigMetadata(c)
		}, "embed.weight"},
		{"extra tensor", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			return append(append([]safetensors.Tensor(nil), ts...), safetensors.Tensor{Name: "layers.9.norm1.weight", Shape: []int{64}, Data: make([]float32, 64)}), ConfigMetadata(c)
		}, "layers.9.norm1.weight"},
		{"no config", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) { return ts, nil }, "config"},
		{"invalid config", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			bad := c
			bad.Window = 100000
			return ts, ConfigMetadata(bad)
		}, "window"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts, meta := tc.edit(good)
			path := write(strings.ReplaceAll(tc.name, " ", "_")+".safetensors", ts, meta)
			_, _, err := LoadWeights(path)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("got %v, want an error naming %q and the file", err, tc.want)
			}
		})
	}
	t.Run("corrupted file", func(t *testing.T) {
		path := write("ok.safetensors", good, ConfigMetadata(c))
		b, _ := os.ReadFile(path)
		if err := os.WriteFile(path, b[:len(b)/2], 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err := LoadWeights(path)
		if !errors.Is(err, safetensors.ErrTruncated) {
			t.Fatalf("got %v, want ErrTruncated", err)
		}
	})
}

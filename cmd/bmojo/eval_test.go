package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/model"
)

// TestEvalAndGenerateRefuseAFlippedBit: `bmojo eval` and `bmojo generate`
// load through loadForEval and loadForGenerate; one flipped bit in
// model.safetensors is refused with an error naming the file, whether
// --checkpoint names the file, its step-N directory or the checkpoint root
// (where the damaged checkpoint is skipped with a warning naming the file).
func TestEvalAndGenerateRefuseAFlippedBit(t *testing.T) {
	c, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	n := model.NewLayout(c).Total
	root := t.TempDir()
	man, err := checkpoint.Save(root, checkpoint.Checkpoint{Config: c, Params: make([]float32, n), M: make([]float32, n), V: make([]float32, n),
		State: checkpoint.State{DataStep: 5, OptimizerStep: 5, BatchSize: 1, SeqLen: c.SeqLen}})
	if err != nil {
		t.Fatal(err)
	}
	weights := filepath.Join(man.Dir, checkpoint.WeightsFile)
	for _, arg := range []string{root, man.Dir, weights} {
		if _, _, from, err := loadForEval(arg, hclog.NewNullLogger()); err != nil || from != weights {
			t.Fatalf("intact checkpoint via %s: %q, %v", arg, from, err)
		}
	}
	b, err := os.ReadFile(weights)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 0x01
	if err := os.WriteFile(weights, b, 0o644); err != nil {
		t.Fatal(err)
	}
	loaders := map[string]func(string, hclog.Logger) (model.Config, []float32, string, error){
		"eval": loadForEval, "generate": loadForGenerate,
	}
	for name, load := range loaders {
		for _, arg := range []string{man.Dir, weights} {
			_, _, _, err := load(arg, hclog.NewNullLogger())
			if !errors.Is(err, checkpoint.ErrDamaged) || !strings.Contains(err.Error(), weights) || !strings.HasPrefix(err.Error(), name+":") {
				t.Fatalf("%s --checkpoint %s: got %v, want a %s error naming %s", name, arg, err, name, weights)
			}
		}
		var logs strings.Builder
		_, _, _, err := load(root, hclog.New(&hclog.LoggerOptions{Output: &logs}))
		if !errors.Is(err, checkpoint.ErrNoCheckpoint) || !strings.Contains(logs.String(), weights) {
			t.Fatalf("%s --checkpoint %s: got %v, logs %q; want no checkpoint and a warning naming %s", name, root, err, logs.String(), weights)
		}
	}
}

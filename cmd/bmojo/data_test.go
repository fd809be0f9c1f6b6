package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tokenizer"
)

// TestCLI runs the real binary, built once, for what a user sees of the
// data commands, the tokenizer checks and commands that start processes
// of their own (bench allreduce): output and exit status.
func TestCLI(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the bmojo binary; skipped with -short")
	}
	bin, cleanup, err := testbin.Build()
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	t.Run("tokenize", func(t *testing.T) { testDataTokenize(t, bin) })
	t.Run("prepare-inspect", func(t *testing.T) { testDataPrepareInspect(t, bin) })
	t.Run("tokenizer-mismatch", func(t *testing.T) { testTokenizerMismatch(t, bin) })
	t.Run("bench-allreduce-per-host", func(t *testing.T) { testBenchAllreducePerHost(t, bin) })
}

// testBenchAllreducePerHost: `bench allreduce --per-host 2` runs the
// hierarchical all-reduce over 2 "hosts" × 2 rank processes, under mutual
// TLS with every slot's identity checked (a wrong mapping of local and
// cross-host slots to ranks is refused), and reports what carried it.
func testBenchAllreducePerHost(t *testing.T, bin string) {
	out, stderr, code := runBmojo(t, bin, t.TempDir(), "", "bench", "allreduce", "--ranks", "4", "--per-host", "2",
		"--transport", "grpc", "--tls", "--sizes", "1MiB,3MiB", "--iters", "2", "--log-level", "error")
	if code != 0 {
		t.Fatalf("exit %d\n%s%s", code, out, stderr)
	}
	for _, want := range []string{"hierarchical (allreduce.Hier): 2 hosts × 2 ranks", "4 via grpc", "4 via shm"} {
		if !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	if !regexp.MustCompile(`(?m)^\s+3MiB\s+786432\s+2\s`).MatchString(out) {
		t.Fatalf("no 3MiB row:\n%s", out)
	}
	_, stderr, code = runBmojo(t, bin, t.TempDir(), "", "bench", "allreduce", "--ranks", "4", "--per-host", "3")
	if code == 0 || !strings.Contains(stderr, "--per-host 3: must divide --ranks 4") {
		t.Fatalf("--per-host 3 of 4 ranks: exit %d, %s", code, stderr)
	}
}

// runBmojo runs bin in dir with stdin and returns stdout, stderr and the
// exit status.
func runBmojo(t *testing.T, bin, dir, stdin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// testDataTokenize: `bmojo data tokenize` prints GPT-2's ids and --decode
// turns them back.
func testDataTokenize(t *testing.T, bin string) {
	dir := t.TempDir()
	cases := []struct {
		args  []string
		stdin string
		want  string
	}{
		{[]string{"data", "tokenize", "--tokenizer", "gpt2", "Hello world"}, "", "15496 995\n"},
		{[]string{"data", "tokenize", "hello <|endoftext|>"}, "", "31373 220 50256\n"},
		{[]string{"data", "tokenize", "--decode", "15496", "995"}, "", "Hello world\n"},
		{[]string{"data", "tokenize", "--decode"}, "[31373, 220, 50256]", "hello <|endoftext|>\n"},
		{[]string{"data", "tokenize", "--tokenizer", "bytes", "hé"}, "", "104 195 169\n"},
	}
	for _, c := range cases {
		out, errOut, code := runBmojo(t, bin, dir, c.stdin, c.args...)
		if code != 0 || out != c.want {
			t.Errorf("bmojo %s: exit %d, stdout %q (stderr %q); want %q", strings.Join(c.args, " "), code, out, errOut, c.want)
		}
	}
	if _, errOut, code := runBmojo(t, bin, dir, "", "data", "tokenize", "--decode", "50257"); code != 1 || !strings.Contains(errOut, "50257") {
		t.Errorf("decode of an id outside the vocabulary: exit %d, %q", code, errOut)
	}
}

// testDataPrepareInspect: prepare from stdin with gpt2, then inspect shows
// the tokenizer, the token counts and a decoded sample.
func testDataPrepareInspect(t *testing.T, bin string) {
	dir := t.TempDir()
	text := strings.Repeat("The quick brown fox jumps over the lazy dog.\n", 200)
	if _, errOut, code := runBmojo(t, bin, dir, text, "data", "prepare", "--tokenizer", "gpt2", "--val-fraction", "0", "--out", "ds", "-"); code != 0 {
		t.Fatalf("prepare: exit %d: %s", code, errOut)
	}
	out, errOut, code := runBmojo(t, bin, dir, "", "data", "inspect", "ds")
	if code != 0 {
		t.Fatalf("inspect: exit %d: %s", code, errOut)
	}
	// 11 tokens a line (The, quick, brown, fox, jumps, over, the, lazy,
	// dog, ".", "\n") and one end-of-text id.
	for _, want := range []string{"tokenizer gpt2", "vocab 50257 (model vocabulary 50304)", "train: 2201 tokens", "The quick brown fox jumps over the lazy dog.\nThe quick"} {
		if !strings.Contains(out, want) {
			t.Errorf("inspect output lacks %q:\n%s", want, out)
		}
	}
}

// testTokenizerMismatch: eval and train refuse data tokenized otherwise
// than the checkpoint's model, exit 1 and name both tokenizers.
func testTokenizerMismatch(t *testing.T, bin string) {
	dir := t.TempDir()
	j := job.Default()
	c, err := model.Preset(j.Preset)
	if err != nil {
		t.Fatal(err)
	}
	c.VocabSize = 50304
	j.Model, j.Tokenizer, j.CheckpointDir, j.Steps = c, "gpt2", filepath.Join(dir, "ck"), 10
	y, err := j.YAML()
	if err != nil {
		t.Fatal(err)
	}
	n := model.NewLayout(c).Total
	if _, err := checkpoint.Save(j.CheckpointDir, checkpoint.Checkpoint{Config: c, Params: make([]float32, n), M: make([]float32, n), V: make([]float32, n),
		State: checkpoint.State{DataStep: 1, OptimizerStep: 1, BatchSize: j.BatchSize, Seed: j.Seed, SeqLen: c.SeqLen, Job: y}}); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"eval", "--checkpoint", "ck", "--max-batches", "1"},
		{"train", "--workers", "0", "-q", "--checkpoint-dir", "ck", "--steps", "10"},
	} {
		_, errOut, code := runBmojo(t, bin, dir, "", args...)
		if code != 1 || !strings.Contains(errOut, "tokenizer gpt2") || !strings.Contains(errOut, "tokenized with bytes") {
			t.Errorf("bmojo %s: exit %d, stderr %q; want exit 1 naming gpt2 and bytes", strings.Join(args, " "), code, errOut)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "ck", "step-00000001")); err != nil {
		t.Errorf("the checkpoint is gone after a refused run: %v", err)
	}
}

// saveWithJob writes a zero checkpoint of config c whose trainer.json
// records job y, and returns its weights file.
func saveWithJob(t *testing.T, c model.Config, y string) string {
	t.Helper()
	n := model.NewLayout(c).Total
	man, err := checkpoint.Save(t.TempDir(), checkpoint.Checkpoint{Config: c, Params: make([]float32, n), M: make([]float32, n), V: make([]float32, n),
		State: checkpoint.State{DataStep: 1, OptimizerStep: 1, BatchSize: 1, SeqLen: c.SeqLen, Job: y}})
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(man.Dir, checkpoint.WeightsFile)
}

// TestCheckpointTokenizerFor: generate finds the checkpoint's tokenizer by
// name, in its training dataset (a tokenizer.json copy), or from
// --tokenizer, and refuses one that is not the checkpoint's.
func TestCheckpointTokenizerFor(t *testing.T) {
	c, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	// A byte-level tokenizer.json: the 256 bytes and <|endoftext|>.
	vocab := map[string]int{}
	for b := range 256 {
		vocab[string(tokenizer.ByteLevelAlphabet(byte(b)))] = b
	}
	tj, _ := json.Marshal(map[string]any{
		"added_tokens":  []any{map[string]any{"id": 256, "content": tokenizer.EndOfText, "special": true}},
		"pre_tokenizer": map[string]any{"type": "ByteLevel"},
		"model":         map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{}},
	})
	dir := t.TempDir()
	tjPath := filepath.Join(dir, "tokenizer.json")
	if err := os.WriteFile(tjPath, tj, 0o644); err != nil {
		t.Fatal(err)
	}
	hf, err := tokenizer.New(tjPath)
	if err != nil {
		t.Fatal(err)
	}
	text := filepath.Join(dir, "a.txt")
	os.WriteFile(text, []byte(strings.Repeat("some text\n", 50)), 0o644)
	opts := data.DefaultPrepareOptions()
	opts.Tokenizer, opts.TokenizerFile = hf, tjPath
	dsDir := filepath.Join(dir, "ds")
	if _, err := data.Prepare([]string{text}, dsDir, opts); err != nil {
		t.Fatal(err)
	}
	jobWith := func(tok, dataDir string) string {
		return "version: 1\ntokenizer: " + tok + "\ndata: " + dataDir + "\n"
	}
	big := c
	big.VocabSize = 50304
	small := c
	small.VocabSize = 320
	cases := []struct {
		name, job, spec string
		cfg             model.Config
		want, errSays   string
	}{
		{"old checkpoint, byte model", "", "", c, tokenizer.Bytes, ""},
		{"job names gpt2", jobWith("gpt2", ""), "", big, tokenizer.GPT2, ""},
		{"tokenizer.json from the dataset", jobWith(hf.Name(), dsDir), "", small, hf.Name(), ""},
		{"tokenizer.json from --tokenizer", jobWith(hf.Name(), "elsewhere"), tjPath, small, hf.Name(), ""},
		{"tokenizer.json nowhere", jobWith(hf.Name(), "elsewhere"), "", small, "", "--tokenizer"},
		{"--tokenizer of another", jobWith("gpt2", ""), tjPath, big, "", "trained with tokenizer gpt2"},
		{"no job, not bytes", "", "", big, "", "records no tokenizer"},
		{"model smaller than the tokenizer", jobWith("gpt2", ""), "", c, "", "50257 ids"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w := saveWithJob(t, tc.cfg, tc.job)
			tok, err := checkpointTokenizerFor("generate", w, tc.cfg, tc.spec)
			if tc.errSays != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errSays) {
					t.Fatalf("got %v, want an error saying %q", err, tc.errSays)
				}
				return
			}
			if err != nil || tok.Name() != tc.want {
				t.Fatalf("got %v, %v; want %s", tok, err, tc.want)
			}
		})
	}
}

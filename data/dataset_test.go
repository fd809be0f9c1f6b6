package data

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func writeText(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// concat joins a split's shards back into one token slice.
func concat(ds *Dataset) []int32 {
	var out []int32
	for i := range ds.NumShards() {
		out = append(out, ds.Shard(i)...)
	}
	return out
}

func TestPrepareOpenRoundTrip(t *testing.T) {
	in := t.TempDir()
	var a, b strings.Builder
	for i := range 200 {
		a.WriteString("line of the first file, number ")
		a.WriteString(strings.Repeat("x", i%7))
		a.WriteString("\n")
	}
	for range 50 {
		b.WriteString("second file line\n")
	}
	fa := writeText(t, in, "a.txt", a.String())
	fb := writeText(t, in, "b.txt", b.String())

	out := filepath.Join(t.TempDir(), "ds")
	opts := DefaultPrepareOptions()
	opts.ShardTokens = 1000 // force several shards
	var lastDone, lastTotal int64
	opts.Progress = func(done, total int64) { lastDone, lastTotal = done, total }
	m, err := Prepare([]string{fa, fb}, out, opts)
	if err != nil {
		t.Fatal(err)
	}
	if lastDone != lastTotal || lastTotal != int64(a.Len()+b.Len()) {
		t.Errorf("progress ended at %d/%d, want %d", lastDone, lastTotal, a.Len()+b.Len())
	}
	if len(m.Train) < 2 {
		t.Errorf("expected several train shards, got %d", len(m.Train))
	}

	// Each file splits at the same point the bundled corpus would use.
	var wantTrain, wantVal []byte
	for _, s := range []string{a.String(), b.String()} {
		cut := splitPoint([]byte(s), opts.ValFraction)
		wantTrain = append(wantTrain, s[:cut]...)
		wantVal = append(wantVal, s[cut:]...)
	}
	if len(wantVal) == 0 || !bytes.HasPrefix(wantVal, []byte("line of")) {
		t.Fatalf("validation should start at a line start, got %q", wantVal[:min(20, len(wantVal))])
	}
	var tok ByteTokenizer
	for _, c := range []struct {
		split Split
		want  []byte
	}{{SplitTrain, wantTrain}, {SplitVal, wantVal}} {
		ds, err := OpenDataset(out, c.split)
		if err != nil {
			t.Fatal(err)
		}
		if got := tok.Decode(concat(ds)); got != string(c.want) {
			t.Errorf("%s split text differs: got %d bytes, want %d", c.split, len(got), len(c.want))
		}
		if ds.NumTokens() != m.Tokens(c.split) {
			t.Errorf("%s: %d tokens, manifest says %d", c.split, ds.NumTokens(), m.Tokens(c.split))
		}
	}

	// Manifest on disk matches the returned one.
	got, err := ReadManifest(out)
	if err != nil {
		t.Fatal(err)
	}
	gj, _ := json.Marshal(got)
	mj, _ := json.Marshal(m)
	if !bytes.Equal(gj, mj) {
		t.Errorf("manifest on disk %s\n differs from returned %s", gj, mj)
	}

	// Re-preparing with bigger shards removes the now-stale shard files.
	opts.ShardTokens = 1 << 20
	if _, err := Prepare([]string{fa, fb}, out, opts); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(out)
	if len(ents) != 3 { // dataset.json, train-00000.tok, val-00000.tok
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Errorf("directory holds %v, want manifest + 2 shards", names)
	}
}

func TestOpenDatasetErrors(t *testing.T) {
	in := t.TempDir()
	f := writeText(t, in, "a.txt", strings.Repeat("some text here\n", 100))
	prepared := func(t *testing.T) string {
		out := t.TempDir()
		if _, err := Prepare([]string{f}, out, DefaultPrepareOptions()); err != nil {
			t.Fatal(err)
		}
		return out
	}
	editManifest := func(t *testing.T, dir string, edit func(m map[string]any)) {
		p := filepath.Join(dir, ManifestFile)
		b, _ := os.ReadFile(p)
		var m map[string]any
		json.Unmarshal(b, &m)
		edit(m)
		b, _ = json.Marshal(m)
		os.WriteFile(p, b, 0o644)
	}
	cases := []struct {
		name  string
		setup func(t *testing.T, dir string)
		want  error
		msg   string
	}{
		{"manifest version", func(t *testing.T, d string) {
			editManifest(t, d, func(m map[string]any) { m["format_version"] = 9 })
		}, ErrVersion, "version 9"},
		{"not a manifest", func(t *testing.T, d string) {
			editManifest(t, d, func(m map[string]any) { m["format"] = "other" })
		}, ErrCorrupt, "not a bmojo dataset manifest"},
		{"bad json", func(t *testing.T, d string) {
			os.WriteFile(filepath.Join(d, ManifestFile), []byte("{"), 0o644)
		}, ErrCorrupt, ManifestFile},
		{"path escape", func(t *testing.T, d string) {
			editManifest(t, d, func(m map[string]any) {
				m["train"].([]any)[0].(map[string]any)["file"] = "../x.tok"
			})
		}, ErrCorrupt, "plain name"},
		{"manifest count differs", func(t *testing.T, d string) {
			editManifest(t, d, func(m map[string]any) {
				m["train"].([]any)[0].(map[string]any)["tokens"] = 3
			})
		}, ErrCorrupt, "manifest lists 3 tokens"},
		{"damaged shard", func(t *testing.T, d string) {
			p := filepath.Join(d, "train-00000.tok")
			b, _ := os.ReadFile(p)
			b[len(b)-1] ^= 0xff
			os.WriteFile(p, b, 0o644)
		}, ErrChecksum, "train-00000.tok"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := prepared(t)
			tc.setup(t, dir)
			_, err := OpenDataset(dir, SplitTrain)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.want, tc.msg)
			}
		})
	}
	if _, err := OpenDataset(t.TempDir(), SplitTrain); err == nil || !strings.Contains(err.Error(), "bmojo data prepare") {
		t.Errorf("missing manifest error %v should say how to create one", err)
	}
}

func TestPrepareOptionsValidate(t *testing.T) {
	cases := []struct {
		name string
		opts PrepareOptions
		flag string
	}{
		{"zero value", PrepareOptions{}, "--shard-tokens"},
		{"val fraction 1", PrepareOptions{ValFraction: 1, ShardTokens: 10}, "--val-fraction"},
		{"negative val", PrepareOptions{ValFraction: -0.1, ShardTokens: 10}, "--val-fraction"},
	}
	for _, tc := range cases {
		err := tc.opts.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.flag) {
			t.Errorf("%s: err = %v, want mention of %s", tc.name, err, tc.flag)
		}
	}
	if err := DefaultPrepareOptions().Validate(); err != nil {
		t.Errorf("defaults invalid: %v", err)
	}
}

func TestBundledCorpus(t *testing.T) {
	train, val, err := BundledCorpus()
	if err != nil {
		t.Fatal(err)
	}
	total := len(train) + len(val)
	if total < 2<<20 {
		t.Errorf("bundled corpus is %d bytes, want at least 2 MiB", total)
	}
	frac := float64(len(val)) / float64(total)
	if frac < 0.045 || frac > 0.055 {
		t.Errorf("validation fraction %.4f, want about 0.05", frac)
	}
	srcs, err := BundledSources()
	if err != nil {
		t.Fatal(err)
	}
	if len(srcs) < 2 {
		t.Errorf("want at least two sources, got %v", srcs)
	}
	// The held-out text must not also appear in training: take a line from
	// the middle of each source's validation part.
	_, texts, _ := bundledTexts()
	for i, s := range srcs {
		v := texts[i][s.TrainLen:]
		if s.TrainLen == 0 || v[0] == 0 || texts[i][s.TrainLen-1] != '\n' {
			t.Errorf("%s: validation does not start at a line boundary", s.Name)
		}
		probe := v[len(v)/2 : len(v)/2+200]
		if bytes.Contains(train, probe) {
			t.Errorf("%s: validation text %q also occurs in train", s.Name, probe[:40])
		}
	}
	h := UnigramEntropy(ByteTokenizer{}.EncodeBytes(val), ByteVocabSize)
	// English bytes sit around 3 nats; uniform over 256 would be 5.55.
	if h < 2.5 || h > 3.5 {
		t.Errorf("validation unigram entropy %.4f nats out of the plausible range", h)
	}
	t.Logf("bundled: train %d bytes, val %d bytes, val unigram entropy %.4f nats", len(train), len(val), h)
}

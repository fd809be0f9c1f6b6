package data

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/tokenizer"
)

func gpt2(t *testing.T) tokenizer.Tokenizer {
	t.Helper()
	tok, err := tokenizer.New(tokenizer.GPT2)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// corpusText is seeded pseudo-English with the things chunking must not
// break: runs of spaces and newlines, indentation, numbers, non-ASCII and
// lines starting with punctuation.
func corpusText(seed uint64, lines int) string {
	r := rand.New(rand.NewPCG(seed, 1))
	words := []string{"the", "network", "Request", "for", "Comments:", "don't", "it's", "1984", "3.14", "naïve", "Ωμέγα", "🙂", "(see", "RFC", "791)", "--", "x"}
	var b strings.Builder
	for range lines {
		switch r.IntN(6) {
		case 0:
			b.WriteString("   ")
		case 1:
			b.WriteString("\n")
		case 2:
			b.WriteString("- ")
		}
		for j := range 3 + r.IntN(12) {
			if j > 0 {
				b.WriteString(strings.Repeat(" ", 1+r.IntN(2)*r.IntN(4)))
			}
			b.WriteString(words[r.IntN(len(words))])
		}
		b.WriteString("\n")
	}
	return b.String()
}

func gzipFile(t *testing.T, path, text string) string {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write([]byte(text))
	zw.Close()
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// splitTokens reads a split back whole, or nil when it has no shards.
func splitTokens(t *testing.T, dir string, split Split) []int32 {
	t.Helper()
	m, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Shards(split)) == 0 {
		return nil
	}
	ds, err := OpenDataset(dir, split)
	if err != nil {
		t.Fatal(err)
	}
	return concat(ds)
}

// dirBytes maps every file of dir to its content.
func dirBytes(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = b
	}
	return out
}

// TestPrepareSameOutputAnyWorkers: 1, 2 and 7 workers write byte-identical
// shards and manifests, with chunks small enough that there are hundreds.
func TestPrepareSameOutputAnyWorkers(t *testing.T) {
	in := t.TempDir()

	for i := range 6 {
		writeText(t, in, fmt.Sprintf("doc%d.txt", i), corpusText(uint64(i), 300+100*i))
	}
	var first map[string][]byte
	for _, workers := range []int{1, 2, 7} {
		out := t.TempDir()
		opts := DefaultPrepareOptions()
		opts.Tokenizer, opts.Workers, opts.ShardTokens, opts.chunkBytes = gpt2(t), workers, 5000, 2048
		opts.ValSplit = ValSplitDocument
		opts.ValFraction = 0.34
		if _, err := Prepare([]string{in}, out, opts); err != nil {
			t.Fatal(err)
		}
		got := dirBytes(t, out)
		if len(got) < 4 {
			t.Fatalf("workers %d wrote only %d files", workers, len(got))
		}
		if first == nil {
			first = got
			continue
		}
		for name, b := range first {
			if !bytes.Equal(got[name], b) {
				t.Errorf("workers %d: %s differs from the 1-worker run", workers, name)
			}
		}
		if len(got) != len(first) {
			t.Errorf("workers %d wrote %d files, 1 worker %d", workers, len(got), len(first))
		}
	}
}

// byteLevelJSON writes a tokenizer.json of the 256 byte-level tokens and
// <|endoftext|>, with add_prefix_space.
func byteLevelJSON(t *testing.T) string {
	t.Helper()
	vocab := map[string]int{}
	for b := range 256 {
		vocab[string(tokenizer.ByteLevelAlphabet(byte(b)))] = b
	}
	b, _ := json.Marshal(map[string]any{
		"added_tokens":  []any{map[string]any{"id": 256, "content": tokenizer.EndOfText, "special": true}},
		"pre_tokenizer": map[string]any{"type": "ByteLevel", "add_prefix_space": true},
		"model":         map[string]any{"type": "BPE", "vocab": vocab, "merges": []string{}},
	})
	return writeText(t, t.TempDir(), "tokenizer.json", string(b))
}

// TestPrepareChunksEncodeLikeTheWhole: a document cut into many chunks gets
// exactly the tokens of encoding it whole, then the end-of-text id, with
// GPT-2 and with a tokenizer.json that adds a prefix space (to the
// document, not to each chunk).
func TestPrepareChunksEncodeLikeTheWhole(t *testing.T) {
	prefixed, err := tokenizer.New(byteLevelJSON(t))
	if err != nil {
		t.Fatal(err)
	}
	text := corpusText(42, 3000)
	f := writeText(t, t.TempDir(), "a.txt", text)
	for _, tok := range []tokenizer.Tokenizer{gpt2(t), prefixed} {
		want, err := tok.Encode(text)
		if err != nil {
			t.Fatal(err)
		}
		eot, _ := tok.EOT()
		want = append(want, eot)
		for _, chunk := range []int{1000, 4096, 1 << 20} {
			out := t.TempDir()
			opts := DefaultPrepareOptions()
			opts.Tokenizer, opts.ValFraction, opts.chunkBytes, opts.Workers = tok, 0, chunk, 3
			if _, err := Prepare([]string{f}, out, opts); err != nil {
				t.Fatal(err)
			}
			if got := splitTokens(t, out, SplitTrain); !slices.Equal(got, want) {
				t.Errorf("%s, chunk %d: %d tokens differ from encoding the whole (%d tokens)", tok.Name(), chunk, len(got), len(want))
			}
		}
	}
}

// TestPrepareInputs: directories (recursively, skipping hidden and non-text
// files), globs, .gz, .jsonl with another field and stdin all become
// documents, in order, each followed by the end-of-text id.
func TestPrepareInputs(t *testing.T) {
	tok := gpt2(t)
	in := t.TempDir()
	os.MkdirAll(filepath.Join(in, "dir", "sub"), 0o755)
	writeText(t, in, "dir/b.txt", "doc b\n")
	gzipFile(t, filepath.Join(in, "dir", "sub", "c.txt.gz"), "doc c, compressed\n")
	writeText(t, in, "dir/.hidden.txt", "never read\n")
	writeText(t, in, "dir/image.png", "never read\n")
	writeText(t, in, "g1.md", "doc g1\n")
	writeText(t, in, "g2.md", "doc g2\n")
	writeText(t, in, "r.jsonl", `{"body": "record one", "text": "not this"}`+"\n\n"+`{"body": "record two\nwith a newline"}`+"\n")
	stdin := `{"body": "from stdin"}` + "\n"

	out := t.TempDir()
	opts := DefaultPrepareOptions()
	opts.Tokenizer, opts.ValFraction, opts.JSONLField, opts.StdinJSONL = tok, 0, "body", true
	opts.Stdin = strings.NewReader(stdin)
	m, err := Prepare([]string{filepath.Join(in, "dir"), filepath.Join(in, "g*.md"), filepath.Join(in, "r.jsonl"), "-"}, out, opts)
	if err != nil {
		t.Fatal(err)
	}
	docs := []string{"doc b\n", "doc c, compressed\n", "doc g1\n", "doc g2\n", "record one", "record two\nwith a newline", "from stdin"}
	want := strings.Join(docs, tokenizer.EndOfText) + tokenizer.EndOfText
	if got := tok.Decode(splitTokens(t, out, SplitTrain)); got != want {
		t.Errorf("train text %q\nwant %q", got, want)
	}
	if m.ValSplit != ValSplitDocument || m.TrainDocs != int64(len(docs)) || m.Tokenizer != "gpt2" || m.EOT == nil || *m.EOT != 50256 || m.Vocab != 50257 {
		t.Errorf("manifest: split %q, %d train docs, tokenizer %q eot %v vocab %d", m.ValSplit, m.TrainDocs, m.Tokenizer, m.EOT, m.Vocab)
	}
	var files []string
	for _, s := range m.Sources {
		files = append(files, filepath.Base(s.File))
	}
	if wantFiles := []string{"b.txt", "c.txt.gz", "g1.md", "g2.md", "r.jsonl", "-"}; !slices.Equal(files, wantFiles) {
		t.Errorf("sources %v, want %v", files, wantFiles)
	}
}

// TestPrepareDocumentSplit: one document in every 1/ValFraction goes to
// validation, whole.
func TestPrepareDocumentSplit(t *testing.T) {
	tok := gpt2(t)
	var lines []string
	for i := range 40 {
		b, _ := json.Marshal(map[string]string{"text": fmt.Sprintf("document number %d\n", i)})
		lines = append(lines, string(b))
	}
	f := writeText(t, t.TempDir(), "d.jsonl", strings.Join(lines, "\n"))
	out := t.TempDir()
	opts := DefaultPrepareOptions()
	opts.Tokenizer = tok
	m, err := Prepare([]string{f}, out, opts)
	if err != nil {
		t.Fatal(err)
	}
	wantVal := "document number 19\n" + tokenizer.EndOfText + "document number 39\n" + tokenizer.EndOfText
	if got := tok.Decode(splitTokens(t, out, SplitVal)); got != wantVal || m.ValDocs != 2 || m.TrainDocs != 38 {
		t.Errorf("val %q (%d docs, train %d), want %q", got, m.ValDocs, m.TrainDocs, wantVal)
	}
	if train := tok.Decode(splitTokens(t, out, SplitTrain)); strings.Contains(train, "number 19\n") || !strings.HasPrefix(train, "document number 0\n"+tokenizer.EndOfText) {
		t.Errorf("train text starts %q", train[:40])
	}
}

// TestPrepareTailSplitGzipAndStdin: a .gz file splits at its tail like the
// plain file; stdin has no size to split at and says what to do instead.
func TestPrepareTailSplitGzipAndStdin(t *testing.T) {
	text := corpusText(7, 400)
	in := t.TempDir()
	plain := writeText(t, in, "a.txt", text)
	gz := gzipFile(t, filepath.Join(in, "a.txt.gz"), text)
	var got [2][2][]int32
	for i, f := range []string{plain, gz} {
		out := t.TempDir()
		if _, err := Prepare([]string{f}, out, DefaultPrepareOptions()); err != nil {
			t.Fatal(err)
		}
		got[i] = [2][]int32{splitTokens(t, out, SplitTrain), splitTokens(t, out, SplitVal)}
	}
	if !slices.Equal(got[0][0], got[1][0]) || !slices.Equal(got[0][1], got[1][1]) || len(got[0][1]) == 0 {
		t.Errorf(".gz split differs from the plain file's (val %d vs %d tokens)", len(got[1][1]), len(got[0][1]))
	}
	opts := DefaultPrepareOptions()
	opts.Stdin = strings.NewReader(text)
	if _, err := Prepare([]string{"-"}, t.TempDir(), opts); err == nil || !strings.Contains(err.Error(), "--val-split document") {
		t.Errorf("stdin with a tail split: %v", err)
	}
	opts.ValFraction = 0
	opts.Stdin = strings.NewReader(text)
	out := t.TempDir()
	if _, err := Prepare([]string{"-"}, out, opts); err != nil {
		t.Fatal(err)
	}
	if got := (ByteTokenizer{}).Decode(splitTokens(t, out, SplitTrain)); got != text {
		t.Errorf("stdin without a split: %d bytes back of %d", len(got), len(text))
	}
}

func TestPrepareInputErrors(t *testing.T) {
	in := t.TempDir()
	bad := writeText(t, in, "bad.jsonl", `{"text": "ok"}`+"\n"+`{"text": 3}`+"\n")
	broken := writeText(t, in, "broken.jsonl", "{not json\n")
	os.MkdirAll(filepath.Join(in, "empty"), 0o755)
	cases := []struct {
		name   string
		inputs []string
		want   string
	}{
		{"field not a string", []string{bad}, "bad.jsonl: line 2"},
		{"not json", []string{broken}, "broken.jsonl: line 1"},
		{"glob without match", []string{filepath.Join(in, "*.nothing")}, "matches no file"},
		{"missing file", []string{filepath.Join(in, "missing.txt")}, "missing.txt"},
		{"empty directory", []string{filepath.Join(in, "empty")}, "holds no text files"},
		{"stdin twice", []string{"-", "-"}, "given twice"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			opts := DefaultPrepareOptions()
			opts.Stdin = strings.NewReader("")
			_, err := Prepare(c.inputs, t.TempDir(), opts)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
		})
	}
	if _, err := Prepare([]string{bad}, t.TempDir(), DefaultPrepareOptions()); !errors.Is(err, ErrCorrupt) {
		t.Errorf("bad record: %v, want ErrCorrupt", err)
	}
}

// TestManifestTokenizerNames: manifests written before tokenizers had names
// ("byte", or no field) read as bytes; a gpt2 manifest must carry gpt2's
// vocabulary.
func TestManifestTokenizerNames(t *testing.T) {
	f := writeText(t, t.TempDir(), "a.txt", strings.Repeat("some text here\n", 100))
	out := t.TempDir()
	if _, err := Prepare([]string{f}, out, DefaultPrepareOptions()); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(out, ManifestFile)
	orig, _ := os.ReadFile(p)
	edit := func(edit func(m map[string]any)) {
		var m map[string]any
		json.Unmarshal(orig, &m)
		edit(m)
		b, _ := json.Marshal(m)
		os.WriteFile(p, b, 0o644)
	}
	for _, name := range []any{"byte", nil} {
		edit(func(m map[string]any) {
			if name == nil {
				delete(m, "tokenizer")
			} else {
				m["tokenizer"] = name
			}
		})
		ds, err := OpenDataset(out, SplitTrain)
		if err != nil || ds.Tokenizer != tokenizer.Bytes {
			t.Errorf("tokenizer %v: %v, dataset tokenizer %q; want bytes", name, err, ds.Tokenizer)
		}
	}
	edit(func(m map[string]any) { m["tokenizer"] = "gpt2" })
	if _, err := ReadManifest(out); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "50257") {
		t.Errorf("gpt2 with vocab 256: %v", err)
	}
}

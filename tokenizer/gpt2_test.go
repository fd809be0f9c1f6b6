package tokenizer

import (
	"encoding/json"
	"flag"
	"math"
	"os"

	"slices"
	"testing"

	"github.com/dlclark/regexp2/v2"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the ids of the \"reference\" vectors in testdata/gpt2_vectors.json from referenceEncode (never from the library)")

const vectorsFile = "testdata/gpt2_vectors.json"

// vectorFile is testdata/gpt2_vectors.json: GPT-2 ids with where each came
// from (see its "sources").
type vectorFile struct {
	Comment []string          `json:"comment"`
	Sources map[string]string `json:"sources"`
	Vectors []vector          `json:"vectors"`
}

type vector struct {
	Name    string  `json:"name"`
	Text    string  `json:"text"`
	Special bool    `json:"special,omitempty"` // "<|endoftext|>" in Text is the EOT id (EncodeSpecial)
	IDs     []int32 `json:"ids"`
	Source  string  `json:"source"` // a key of Sources
}

func readVectors(t *testing.T) vectorFile {
	t.Helper()
	b, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	var f vectorFile
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatalf("%s: %v", vectorsFile, err)
	}
	return f
}

// TestGPT2Vectors holds the GPT-2 tokenizer (the library) to ids it did not
// produce: published ones, and ones from referenceEncode, written out here
// from encoder.py's regex and tiktoken's merge rule.
func TestGPT2Vectors(t *testing.T) {
	tok, err := NewGPT2()
	if err != nil {
		t.Fatal(err)
	}
	f := readVectors(t)
	ref := newReference(t, tok)
	kinds := map[string]int{}
	for i, v := range f.Vectors {
		if _, ok := f.Sources[v.Source]; !ok {
			t.Fatalf("vector %q: source %q is not described in %s", v.Name, v.Source, vectorsFile)
		}
		kinds[v.Source]++
		refIDs := ref.encode(v.Text, v.Special)
		if *rewrite && v.Source == "reference" {
			f.Vectors[i].IDs = refIDs
			continue
		}
		t.Run(v.Name, func(t *testing.T) {
			if !slices.Equal(refIDs, v.IDs) {
				t.Errorf("reference encoder: %q -> %v, %s (%s) says %v", v.Text, refIDs, vectorsFile, v.Source, v.IDs)
			}
			enc := tok.Encode
			if v.Special {
				enc = func(s string) ([]int32, error) { return EncodeSpecial(tok, s) }
			}
			got, err := enc(v.Text)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, v.IDs) {
				t.Errorf("gpt2: %q -> %v, want %v (%s)", v.Text, got, v.IDs, v.Source)
			}
			if back := tok.Decode(v.IDs); back != v.Text {
				t.Errorf("gpt2: Decode(%v) = %q, want %q", v.IDs, back, v.Text)
			}
		})
	}
	if *rewrite {
		b, err := json.MarshalIndent(f, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(vectorsFile, append(b, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("rewrote the reference vectors of %s", vectorsFile)
		return
	}
	// The file must keep ids that the library under test did not produce.
	if kinds["published-tiktoken"] == 0 || kinds["published-gpt2"] == 0 || kinds["reference"] == 0 {
		t.Fatalf("%s lost a kind of vector: %v", vectorsFile, kinds)
	}
}

// reference is an encoder written from GPT-2's published algorithm, sharing
// no code with the library under test or with this package's BPE: the
// pre-tokenization regex of openai/gpt-2 src/encoder.py run by the regexp2
// interpreter (the library runs generated code), then tiktoken's
// byte-pair merge (educational _byte_pair_merge: repeatedly merge the
// adjacent pair whose concatenation has the lowest rank, leftmost first),
// which for r50k_base gives encoder.py's merges. The ranks are the token
// table (id -> bytes) embedded in the binary: data, not the algorithm.
type reference struct {
	split *regexp2.Regexp
	ranks map[string]int
}

func newReference(t *testing.T, tok Tokenizer) *reference {
	t.Helper()
	r := &reference{
		split: regexp2.MustCompile(`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, regexp2.None),
		ranks: make(map[string]int, GPT2EOT),
	}
	for id := range int32(GPT2EOT) {
		b := tok.TokenBytes(id)
		if len(b) == 0 {
			t.Fatalf("token %d has no bytes", id)
		}
		if _, dup := r.ranks[string(b)]; dup {
			t.Fatalf("token bytes %q appear twice", b)
		}
		r.ranks[string(b)] = int(id)
	}
	return r
}

func (r *reference) encode(text string, special bool) []int32 {
	out := []int32{}
	for {
		before, after, found := text, "", false
		if special {
			if i := indexOf(text, EndOfText); i >= 0 {
				before, after, found = text[:i], text[i+len(EndOfText):], true
			}
		}
		m, err := r.split.FindStringMatch(before)
		for ; m != nil && err == nil; m, err = r.split.FindNextMatch(m) {
			out = append(out, r.merge([]byte(m.String()))...)
		}
		if err != nil {
			panic(err) // a test helper: the pattern has no timeout
		}
		if !found {
			return out
		}
		out = append(out, GPT2EOT)
		text = after
	}
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

func (r *reference) merge(piece []byte) []int32 {
	parts := make([][]byte, len(piece))
	for i := range piece {
		parts[i] = piece[i : i+1]
	}
	for len(parts) > 1 {
		best, bestRank := -1, math.MaxInt
		for i := 0; i+1 < len(parts); i++ {
			joined := string(parts[i]) + string(parts[i+1])
			if rank, ok := r.ranks[joined]; ok && rank < bestRank {
				best, bestRank = i, rank
			}
		}
		if best < 0 {
			break
		}
		merged := append(append([]byte{}, parts[best]...), parts[best+1]...)
		parts = append(parts[:best], append([][]byte{merged}, parts[best+2:]...)...)
	}
	ids := make([]int32, len(parts))
	for i, p := range parts {
		ids[i] = int32(r.ranks[string(p)])
	}
	return ids
}

// TestGPT2Shape pins what the rest of bmojo relies on: the vocabulary, the
// end-of-text id and its text, and the padded model vocabulary.
func TestGPT2Shape(t *testing.T) {
	tok, err := New("gpt2")
	if err != nil {
		t.Fatal(err)
	}
	eot, ok := tok.EOT()
	if tok.Name() != GPT2 || tok.VocabSize() != 50257 || !ok || eot != 50256 || PadVocab(tok.VocabSize()) != 50304 {
		t.Fatalf("gpt2: name %q vocab %d eot %d,%v padded %d; want gpt2, 50257, 50256, 50304",
			tok.Name(), tok.VocabSize(), eot, ok, PadVocab(tok.VocabSize()))
	}
	if got := tok.Decode([]int32{50256}); got != EndOfText {
		t.Fatalf("Decode(50256) = %q", got)
	}
	for _, id := range []int32{-1, 50257, 50303} {
		if b := tok.TokenBytes(id); b != nil {
			t.Errorf("TokenBytes(%d) = %q, want nil (outside the vocabulary or padding)", id, b)
		}
	}
}

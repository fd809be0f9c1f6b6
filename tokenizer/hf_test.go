package tokenizer

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// gpt2Alphabet is bytes_to_unicode from openai/gpt-2 src/encoder.py, written
// out again here so the test does not check the package against itself.
func gpt2Alphabet() []string {
	var bs []int
	for b := int('!'); b <= int('~'); b++ {
		bs = append(bs, b)
	}
	for b := 0xA1; b <= 0xAC; b++ {
		bs = append(bs, b)
	}
	for b := 0xAE; b <= 0xFF; b++ {
		bs = append(bs, b)
	}
	cs := slices.Clone(bs)
	n := 0
	for b := range 256 {
		if !slices.Contains(bs, b) {
			bs = append(bs, b)
			cs = append(cs, 256+n)
			n++
		}
	}
	out := make([]string, 256)
	for i, b := range bs {
		out[b] = string(rune(cs[i]))
	}
	return out
}

// smallBPE writes a byte-level BPE tokenizer.json: ids 0-255 are the bytes
// (in byte order), then seven merges spelling "hello" and " wor", then
// <|endoftext|> as an added token. pairs writes the merges in the newer
// [["a","b"]] form. It returns the file's path.
func smallBPE(t *testing.T, mutate func(m map[string]any), pairs bool) string {
	t.Helper()
	alpha := gpt2Alphabet()
	vocab := map[string]int{}
	for b, s := range alpha {
		vocab[s] = b
	}
	merges := [][2]string{{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {alpha[' '], "w"}, {"o", "r"}, {alpha[' '] + "w", "or"}}
	var ms []any
	for i, m := range merges {
		vocab[m[0]+m[1]] = 256 + i
		if pairs {
			ms = append(ms, []string{m[0], m[1]})
		} else {
			ms = append(ms, m[0]+" "+m[1])
		}
	}
	doc := map[string]any{
		"version":        "1.0",
		"added_tokens":   []any{map[string]any{"id": 263, "content": EndOfText, "special": true}},
		"normalizer":     nil,
		"pre_tokenizer":  map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
		"post_processor": nil,
		"decoder":        map[string]any{"type": "ByteLevel"},
		"model":          map[string]any{"type": "BPE", "dropout": nil, "unk_token": nil, "vocab": vocab, "merges": ms},
	}
	if mutate != nil {
		mutate(doc)
	}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "tokenizer.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestTokenizerJSON: a BPE tokenizer.json built here encodes to ids worked
// out by hand from its merges, and round-trips text.
func TestTokenizerJSON(t *testing.T) {
	for _, pairs := range []bool{false, true} {
		tok, err := New(smallBPE(t, nil, pairs))
		if err != nil {
			t.Fatal(err)
		}
		cases := []struct {
			text string
			want []int32
		}{
			// "hello": he (rank 0), ll (1), hell (2), hello (3).
			// " world": Ġw (4), or (5), Ġwor (6), then l and d alone.
			{"hello world", []int32{259, 262, 'l', 'd'}},
			// Every occurrence of the best pair merges before the next pair.
			{"hellhello", []int32{258, 259}},
			// The space before a word joins it; a lone space does not.
			// Pieces "a", " ", " hello": there is no Ġh merge, so the
			// space stays a token of its own.
			{"a  hello", []int32{'a', ' ', ' ', 259}},
			// Encode treats the end-of-text text as ordinary characters.
			{"<|endoftext|>", []int32{'<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e', 'x', 't', '|', '>'}},
		}
		for _, c := range cases {
			got, err := tok.Encode(c.text)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("pairs=%v: Encode(%q) = %v, want %v", pairs, c.text, got, c.want)
			}
			if back := tok.Decode(got); back != c.text {
				t.Errorf("Decode(Encode(%q)) = %q", c.text, back)
			}
		}
		eot, ok := tok.EOT()
		if !ok || eot != 263 || tok.VocabSize() != 264 || !strings.HasPrefix(tok.Name(), "tokenizer.json@sha256:") {
			t.Fatalf("eot %d,%v vocab %d name %q; want 263, 264, tokenizer.json@sha256:…", eot, ok, tok.VocabSize(), tok.Name())
		}
		if ids, _ := EncodeSpecial(tok, "hello<|endoftext|>hello"); !slices.Equal(ids, []int32{259, 263, 259}) {
			t.Errorf("EncodeSpecial = %v, want [259 263 259]", ids)
		}
	}
}

func TestTokenizerJSONPrefixSpaceAndName(t *testing.T) {
	plain, err := New(smallBPE(t, nil, false))
	if err != nil {
		t.Fatal(err)
	}
	prefixed, err := New(smallBPE(t, func(m map[string]any) {
		m["pre_tokenizer"].(map[string]any)["add_prefix_space"] = true
	}, false))
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := prefixed.Encode("hello"); !slices.Equal(got, []int32{' ', 259}) {
		t.Errorf("add_prefix_space: Encode(hello) = %v, want [32 259]", got)
	}
	if plain.Name() == prefixed.Name() {
		t.Errorf("two different files have one name %q", plain.Name())
	}
}

// TestTokenizerJSONRefused: what is not a byte-level BPE is refused, naming
// what was found, never half-loaded.
func TestTokenizerJSONRefused(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(m map[string]any)
		want   error
		says   string
	}{
		{"wordpiece", func(m map[string]any) { m["model"].(map[string]any)["type"] = "WordPiece" }, ErrUnsupported, "WordPiece"},
		{"byte fallback", func(m map[string]any) { m["model"].(map[string]any)["byte_fallback"] = true }, ErrUnsupported, "byte_fallback"},
		{"dropout", func(m map[string]any) { m["model"].(map[string]any)["dropout"] = 0.1 }, ErrUnsupported, "dropout"},
		{"metaspace", func(m map[string]any) { m["pre_tokenizer"] = map[string]any{"type": "Metaspace"} }, ErrUnsupported, "Metaspace"},
		{"no pre-tokenizer", func(m map[string]any) { m["pre_tokenizer"] = nil }, ErrUnsupported, "pre_tokenizer"},
		{"nfkc", func(m map[string]any) { m["normalizer"] = map[string]any{"type": "NFKC"} }, ErrUnsupported, "NFKC"},
		{"merge to nowhere", func(m map[string]any) {
			mm := m["model"].(map[string]any)
			mm["merges"] = append(mm["merges"].([]any), "x y")
		}, ErrInvalid, `"x" "y"`},
		{"bad merge", func(m map[string]any) {
			mm := m["model"].(map[string]any)
			mm["merges"] = []any{"xy"}
		}, ErrInvalid, "two symbols"},
		{"empty vocab", func(m map[string]any) { m["model"].(map[string]any)["vocab"] = map[string]int{} }, ErrInvalid, "empty"},
		{"negative id", func(m map[string]any) { m["model"].(map[string]any)["vocab"] = map[string]int{"a": -1} }, ErrInvalid, "-1"},
		{"not byte-level", func(m map[string]any) {
			m["model"].(map[string]any)["vocab"] = map[string]int{"a": 0, "▁a": 1}
			m["model"].(map[string]any)["merges"] = []any{}
		}, ErrUnsupported, "not byte-level"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := New(smallBPE(t, c.mutate, false))
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("got %v, want %v saying %q", err, c.want, c.says)
			}
		})
	}
	bad := filepath.Join(t.TempDir(), "tokenizer.json")
	if err := os.WriteFile(bad, []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := New(bad); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), bad) {
		t.Fatalf("malformed file: %v", err)
	}
	if _, err := New("no-such-tokenizer"); !errors.Is(err, ErrUnknown) || !strings.Contains(err.Error(), "gpt2") {
		t.Fatalf("unknown name: %v", err)
	}
}

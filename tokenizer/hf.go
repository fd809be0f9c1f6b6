package tokenizer

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/dlclark/regexp2/v2"
	"golang.org/x/text/unicode/norm"
)

// GPT2Pattern is the pre-tokenization regex of GPT-2's encoder.py, which
// Hugging Face's ByteLevel pre-tokenizer also uses.
const GPT2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

// maxTokenizerFile bounds the tokenizer.json read: real ones are a few MB.
const maxTokenizerFile = 256 << 20

// eotNames are the added tokens taken as end-of-text, in order of
// preference.
var eotNames = []string{EndOfText, "<|end_of_text|>", "</s>", "<eos>"}

// hfFile is the part of a Hugging Face tokenizer.json this package reads.
type hfFile struct {
	AddedTokens []struct {
		ID      int    `json:"id"`
		Content string `json:"content"`
		Special bool   `json:"special"`
	} `json:"added_tokens"`
	Normalizer   *struct{ Type string } `json:"normalizer"`
	PreTokenizer *struct {
		Type           string `json:"type"`
		AddPrefixSpace bool   `json:"add_prefix_space"`
		UseRegex       *bool  `json:"use_regex"`
	} `json:"pre_tokenizer"`
	Model struct {
		Type                    string            `json:"type"`
		Dropout                 *float64          `json:"dropout"`
		ContinuingSubwordPrefix *string           `json:"continuing_subword_prefix"`
		EndOfWordSuffix         *string           `json:"end_of_word_suffix"`
		ByteFallback            bool              `json:"byte_fallback"`
		Vocab                   map[string]int    `json:"vocab"`
		Merges                  []json.RawMessage `json:"merges"`
	} `json:"model"`
}

// hfBPE is a byte-level BPE tokenizer read from a tokenizer.json: the
// model GPT-2, GPT-NeoX, Pythia and RoBERTa use. Encoding follows GPT-2's
// encoder.py: optional NFC, the GPT2Pattern split, bytes mapped to
// printable characters (bytes_to_unicode), then the lowest-ranked merge of
// adjacent symbols is applied everywhere until none applies.
type hfBPE struct {
	name      string
	vocab     map[string]int32
	merges    map[[2]string]int
	tokens    [][]byte // id -> bytes; nil for unused ids
	vocabSize int
	eot       int32
	hasEOT    bool
	nfc       bool
	prefix    bool // add_prefix_space
	split     *regexp2.Regexp
}

// LoadFile reads a Hugging Face tokenizer.json holding a byte-level BPE
// model. Other models (WordPiece, Unigram, SentencePiece-style BPE with
// byte fallback) are refused with ErrUnsupported, naming what was found.
func LoadFile(path string) (Tokenizer, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	if st.Size() > maxTokenizerFile {
		return nil, fmt.Errorf("tokenizer: %s: %w: %d bytes, more than %d", path, ErrInvalid, st.Size(), maxTokenizerFile)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	t, err := ParseJSON(b)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %s: %w", path, err)
	}
	return t, nil
}

// ParseJSON is LoadFile on the file's bytes.
func ParseJSON(b []byte) (Tokenizer, error) {
	var f hfFile
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	m := f.Model
	switch {
	case m.Type != "" && m.Type != "BPE":
		return nil, fmt.Errorf("%w: model type %q (only byte-level BPE is implemented)", ErrUnsupported, m.Type)
	case m.Dropout != nil && *m.Dropout != 0:
		return nil, fmt.Errorf("%w: BPE dropout %v makes encoding random", ErrUnsupported, *m.Dropout)
	case m.ByteFallback:
		return nil, fmt.Errorf("%w: byte_fallback (a SentencePiece-style BPE, not byte-level)", ErrUnsupported)
	case m.ContinuingSubwordPrefix != nil && *m.ContinuingSubwordPrefix != "",
		m.EndOfWordSuffix != nil && *m.EndOfWordSuffix != "":
		return nil, fmt.Errorf("%w: continuing_subword_prefix or end_of_word_suffix", ErrUnsupported)
	case len(m.Vocab) == 0:
		return nil, fmt.Errorf("%w: model.vocab is empty", ErrInvalid)
	}
	t := &hfBPE{vocab: make(map[string]int32, len(m.Vocab)), merges: make(map[[2]string]int, len(m.Merges))}
	if f.Normalizer != nil {
		switch f.Normalizer.Type {
		case "NFC":
			t.nfc = true
		default:
			return nil, fmt.Errorf("%w: normalizer %q (only none or NFC)", ErrUnsupported, f.Normalizer.Type)
		}
	}
	useRegex := true
	if p := f.PreTokenizer; p != nil {
		if p.Type != "ByteLevel" {
			return nil, fmt.Errorf("%w: pre_tokenizer %q (only ByteLevel)", ErrUnsupported, p.Type)
		}
		t.prefix = p.AddPrefixSpace
		if p.UseRegex != nil {
			useRegex = *p.UseRegex
		}
	} else {
		return nil, fmt.Errorf("%w: no pre_tokenizer (a byte-level BPE needs ByteLevel)", ErrUnsupported)
	}
	if useRegex {
		re, err := regexp2.Compile(GPT2Pattern, regexp2.None)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		t.split = re
	}

	maxID := -1
	for tok, id := range m.Vocab {
		if id < 0 || id >= 1<<24 {
			return nil, fmt.Errorf("%w: token %q has id %d", ErrInvalid, tok, id)
		}
		t.vocab[tok] = int32(id)
		maxID = max(maxID, id)
	}
	for _, a := range f.AddedTokens {
		if a.ID < 0 || a.ID >= 1<<24 {
			return nil, fmt.Errorf("%w: added token %q has id %d", ErrInvalid, a.Content, a.ID)
		}
		maxID = max(maxID, a.ID)
	}
	t.vocabSize = maxID + 1
	t.tokens = make([][]byte, t.vocabSize)
	for tok, id := range m.Vocab {
		b, ok := fromByteLevel(tok)
		if !ok {
			return nil, fmt.Errorf("%w: vocab token %q (id %d) is not byte-level (a character outside GPT-2's byte alphabet)", ErrUnsupported, tok, id)
		}
		if t.tokens[id] != nil {
			return nil, fmt.Errorf("%w: id %d is given to two tokens", ErrInvalid, id)
		}
		t.tokens[id] = b
	}
	for _, a := range f.AddedTokens {
		// An added token already in the vocabulary keeps its vocab bytes.
		if t.tokens[a.ID] == nil {
			t.tokens[a.ID] = []byte(a.Content)
		}
	}
	for _, name := range eotNames {
		for _, a := range f.AddedTokens {
			if a.Content == name && !t.hasEOT {
				t.eot, t.hasEOT = int32(a.ID), true
			}
		}
	}
	for i, raw := range m.Merges {
		pair, err := parseMerge(raw)
		if err != nil {
			return nil, fmt.Errorf("%w: merge %d: %v", ErrInvalid, i, err)
		}
		if _, ok := t.vocab[pair[0]+pair[1]]; !ok {
			return nil, fmt.Errorf("%w: merge %d (%q %q) makes a token that is not in the vocabulary", ErrInvalid, i, pair[0], pair[1])
		}
		if _, dup := t.merges[pair]; !dup {
			t.merges[pair] = i
		}
	}
	sum := sha256.Sum256(b)
	t.name = "tokenizer.json@sha256:" + hex.EncodeToString(sum[:8])
	return t, nil
}

// parseMerge reads one merge in either format tokenizer.json uses: "a b" or
// ["a", "b"].
func parseMerge(raw json.RawMessage) ([2]string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		a, b, ok := strings.Cut(s, " ")
		if !ok || a == "" || b == "" || strings.Contains(b, " ") {
			return [2]string{}, fmt.Errorf("%q is not two symbols separated by one space", s)
		}
		return [2]string{a, b}, nil
	}
	var p []string
	if err := json.Unmarshal(raw, &p); err != nil || len(p) != 2 || p[0] == "" || p[1] == "" {
		return [2]string{}, fmt.Errorf("%s is neither \"a b\" nor [\"a\", \"b\"]", raw)
	}
	return [2]string{p[0], p[1]}, nil
}

func (t *hfBPE) Name() string              { return t.name }
func (t *hfBPE) VocabSize() int            { return t.vocabSize }
func (t *hfBPE) EOT() (int32, bool)        { return t.eot, t.hasEOT }
func (t *hfBPE) Decode(ids []int32) string { return decodeWith(t, ids) }

func (t *hfBPE) TokenBytes(id int32) []byte {
	if id < 0 || int(id) >= len(t.tokens) {
		return nil
	}
	return t.tokens[id]
}

// Encode splits text into pieces and byte-pair-encodes each.
func (t *hfBPE) Encode(text string) ([]int32, error) { return t.encode(text, true) }

// EncodeContinuation is Encode without add_prefix_space: for text that
// continues a document (Continuer).
func (t *hfBPE) EncodeContinuation(text string) ([]int32, error) { return t.encode(text, false) }

func (t *hfBPE) encode(text string, start bool) ([]int32, error) {
	if t.nfc {
		text = norm.NFC.String(text)
	}
	if start && t.prefix && text != "" && text[0] != ' ' {
		text = " " + text
	}
	var out []int32
	if t.split == nil {
		return t.bpe(out, text)
	}
	m, err := t.split.FindStringMatch(text)
	for ; m != nil && err == nil; m, err = t.split.FindNextMatch(m) {
		if out, err = t.bpe(out, m.String()); err != nil {
			return nil, err
		}
	}
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %s: %w: %v", t.name, ErrEncode, err)
	}
	return out, nil
}

// bpe appends the ids of one pre-tokenized piece, merging as encoder.py
// does: find the adjacent pair with the lowest merge rank, merge every
// occurrence of it left to right, repeat.
func (t *hfBPE) bpe(out []int32, piece string) ([]int32, error) {
	if piece == "" {
		return out, nil
	}
	mapped := toByteLevel(piece)
	if id, ok := t.vocab[mapped]; ok {
		return append(out, id), nil
	}
	word := make([]string, 0, len(piece))
	for _, r := range mapped {
		word = append(word, string(r))
	}
	for len(word) > 1 {
		best, bestRank := -1, int(^uint(0)>>1)
		for i := 0; i+1 < len(word); i++ {
			if r, ok := t.merges[[2]string{word[i], word[i+1]}]; ok && r < bestRank {
				best, bestRank = i, r
			}
		}
		if best < 0 {
			break
		}
		first, second := word[best], word[best+1]
		next := word[:0:0]
		for i := 0; i < len(word); {
			if i+1 < len(word) && word[i] == first && word[i+1] == second {
				next = append(next, first+second)
				i += 2
				continue
			}
			next = append(next, word[i])
			i++
		}
		word = next
	}
	for _, sym := range word {
		id, ok := t.vocab[sym]
		if !ok {
			return nil, fmt.Errorf("tokenizer: %s: %w: symbol %q of piece %q is not in the vocabulary", t.name, ErrEncode, sym, piece)
		}
		out = append(out, id)
	}
	return out, nil
}

// byteToRune and runeToByte are GPT-2's bytes_to_unicode: printable bytes map
// to themselves, the others to 256, 257, ... in byte order, so every byte
// sequence is a string of printable characters.
var byteToRune, runeToByte = byteLevelTables()

func byteLevelTables() ([256]rune, map[rune]byte) {
	var b2r [256]rune
	r2b := make(map[rune]byte, 256)
	n := 0
	for b := range 256 {
		printable := (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
		r := rune(b)
		if !printable {
			r = rune(256 + n)
			n++
		}
		b2r[b] = r
		r2b[r] = byte(b)
	}
	return b2r, r2b
}

// ByteLevelAlphabet maps a byte to the character GPT-2's byte-level BPE
// writes it as (Ġ for a space): the alphabet of tokenizer.json vocabularies.
func ByteLevelAlphabet(b byte) rune { return byteToRune[b] }

func toByteLevel(s string) string {
	var sb strings.Builder
	sb.Grow(2 * len(s))
	for i := 0; i < len(s); i++ {
		sb.WriteRune(byteToRune[s[i]])
	}
	return sb.String()
}

func fromByteLevel(s string) ([]byte, bool) {
	out := make([]byte, 0, len(s))
	for _, r := range s {
		b, ok := runeToByte[r]
		if !ok {
			return nil, false
		}
		out = append(out, b)
	}
	return out, true
}

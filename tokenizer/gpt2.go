package tokenizer

import (
	"fmt"
	"sync"

	tiktoken "github.com/tiktoken-go/tokenizer"
)

// GPT-2's vocabulary: 50,000 merges over 256 byte tokens, plus
// <|endoftext|>.
const (
	GPT2Vocab = 50257
	GPT2EOT   = 50256
)

// gpt2Tokenizer is r50k_base through github.com/tiktoken-go/tokenizer,
// whose ranks are compiled into the binary: no file, no network.
type gpt2Tokenizer struct {
	codec tiktoken.Codec
}

var (
	gpt2Once   sync.Once
	gpt2Tokens [][]byte // id -> bytes, built once from the codec's table
	gpt2Err    error
)

// NewGPT2 returns GPT-2's tokenizer. Invalid UTF-8 in the input is replaced
// by U+FFFD before encoding, as Python's tiktoken does for text decoded with
// errors="replace".
func NewGPT2() (Tokenizer, error) {
	c, err := tiktoken.Get(tiktoken.R50kBase)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: gpt2: %w", err)
	}
	c.SetErrorMode(tiktoken.ErrorModeReplace)
	gpt2Once.Do(func() { gpt2Tokens, gpt2Err = tokenTable() })
	if gpt2Err != nil {
		return nil, gpt2Err
	}
	return &gpt2Tokenizer{codec: c}, nil
}

// tokenTable decodes every id once, so Decode and TokenBytes are slice
// lookups and the end-of-text id (which the library's Decode does not know)
// decodes to its text.
func tokenTable() ([][]byte, error) {
	raw, err := tiktoken.Get(tiktoken.R50kBase) // ErrorModeNone: raw bytes of partial characters
	if err != nil {
		return nil, fmt.Errorf("tokenizer: gpt2: %w", err)
	}
	t := make([][]byte, GPT2Vocab)
	for id := range GPT2EOT {
		s, err := raw.Decode([]uint{uint(id)})
		if err != nil {
			return nil, fmt.Errorf("tokenizer: gpt2: id %d: %w", id, err)
		}
		t[id] = []byte(s)
	}
	t[GPT2EOT] = []byte(EndOfText)
	return t, nil
}

func (*gpt2Tokenizer) Name() string       { return GPT2 }
func (*gpt2Tokenizer) VocabSize() int     { return GPT2Vocab }
func (*gpt2Tokenizer) EOT() (int32, bool) { return GPT2EOT, true }

// Encode is tiktoken's encode_ordinary: "<|endoftext|>" in text is seven
// ordinary tokens.
func (g *gpt2Tokenizer) Encode(text string) ([]int32, error) {
	ids, _, err := g.codec.Encode(text)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: gpt2: %w: %w", ErrEncode, err)
	}
	out := make([]int32, len(ids))
	for i, id := range ids {
		out[i] = int32(id)
	}
	return out, nil
}

func (g *gpt2Tokenizer) Decode(ids []int32) string { return decodeWith(g, ids) }

func (*gpt2Tokenizer) TokenBytes(id int32) []byte {
	if id < 0 || int(id) >= len(gpt2Tokens) {
		return nil
	}
	return gpt2Tokens[id]
}

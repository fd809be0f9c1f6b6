package data

import "strings"

// ByteTokenizer maps each byte of UTF-8 text to one token in [0, 256). It
// needs no vocabulary file, cannot meet an unknown symbol, and makes the
// unigram entropy of the data a meaningful floor for the loss. It is the
// mapping of tokenizer.ByteTokenizer (the "bytes" tokenizer), with
// error-free signatures for the callers that only ever use bytes.
type ByteTokenizer struct{}

// ByteVocabSize is the vocabulary size of ByteTokenizer.
const ByteVocabSize = 256

// Encode returns one token per byte of s.
func (ByteTokenizer) Encode(s string) []int32 {
	out := make([]int32, len(s))
	for i := 0; i < len(s); i++ {
		out[i] = int32(s[i])
	}
	return out
}

// EncodeBytes is Encode for a byte slice, avoiding a string copy of large inputs.
func (ByteTokenizer) EncodeBytes(b []byte) []int32 {
	out := make([]int32, len(b))
	for i, c := range b {
		out[i] = int32(c)
	}
	return out
}

// Decode turns tokens back into text. A model can emit byte sequences that
// are not valid UTF-8 (it samples one byte at a time), so invalid sequences
// and ids outside [0, 256) become U+FFFD rather than corrupting the output.
func (ByteTokenizer) Decode(ids []int32) string {
	b := make([]byte, 0, len(ids))
	for _, id := range ids {
		if id < 0 || id >= ByteVocabSize {
			b = append(b, "\uFFFD"...)
			continue
		}
		b = append(b, byte(id))
	}
	return strings.ToValidUTF8(string(b), "\uFFFD")
}

// VocabSize is 256.
func (ByteTokenizer) VocabSize() int { return ByteVocabSize }

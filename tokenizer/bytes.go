package tokenizer

// ByteVocab is the vocabulary size of ByteTokenizer.
const ByteVocab = 256

// ByteTokenizer maps each byte of text to one token in [0, 256). It needs no
// vocabulary file, cannot meet an unknown symbol, and makes the unigram
// entropy of the data a meaningful floor for the loss. It has no end-of-text
// id: documents are concatenated as they are (as bmojo always did).
// data.ByteTokenizer is the same mapping with the byte-slice helpers the
// data package uses.
type ByteTokenizer struct{}

// Name is "bytes".
func (ByteTokenizer) Name() string { return Bytes }

// VocabSize is 256.
func (ByteTokenizer) VocabSize() int { return ByteVocab }

// EOT reports that bytes has no end-of-text id.
func (ByteTokenizer) EOT() (int32, bool) { return 0, false }

// Encode returns one token per byte of text; it never fails.
func (ByteTokenizer) Encode(text string) ([]int32, error) {
	out := make([]int32, len(text))
	for i := 0; i < len(text); i++ {
		out[i] = int32(text[i])
	}
	return out, nil
}

// Decode turns bytes back into text (invalid UTF-8 and ids outside
// [0, 256) become U+FFFD).
func (t ByteTokenizer) Decode(ids []int32) string { return decodeWith(t, ids) }

// TokenBytes is the one byte of id, or nil outside [0, 256).
func (ByteTokenizer) TokenBytes(id int32) []byte {
	if id < 0 || id >= ByteVocab {
		return nil
	}
	return []byte{byte(id)}
}

// Package tokenizer owns the mapping between text and token ids: one
// interface, Tokenizer, and the implementations a dataset or a checkpoint
// can name: "bytes" (one token per byte, the default), "gpt2" (GPT-2's BPE,
// r50k_base, embedded in the binary) and a Hugging Face tokenizer.json file
// holding a byte-level BPE model (GPT-NeoX's, Pythia's, RoBERTa's).
//
// It knows nothing of datasets, shards or models beyond PadVocab; it does no
// I/O except reading a tokenizer.json that New is given, never uses the
// network, and never exits or panics on bad input: every error wraps one of
// the sentinels below.
package tokenizer

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"unicode/utf8"
)

// Sentinel errors; every error of this package wraps one of them.
var (
	// ErrUnknown: New was given a name that is neither a built-in tokenizer
	// nor a readable file.
	ErrUnknown = errors.New("unknown tokenizer")
	// ErrUnsupported: a tokenizer.json uses a model, normalizer or
	// pre-tokenizer this package does not implement.
	ErrUnsupported = errors.New("unsupported tokenizer.json")
	// ErrInvalid: a tokenizer.json is malformed or inconsistent.
	ErrInvalid = errors.New("invalid tokenizer.json")
	// ErrEncode: text could not be encoded (a piece has no token).
	ErrEncode = errors.New("cannot encode")
)

// Names of the built-in tokenizers.
const (
	Bytes = "bytes"
	GPT2  = "gpt2"
)

// EndOfText is the text form of GPT-2's end-of-text token.
const EndOfText = "<|endoftext|>"

// Tokenizer turns text into token ids and back. Implementations are safe for
// concurrent use.
type Tokenizer interface {
	// Name identifies the tokenizer in dataset manifests, checkpoints and
	// errors: "bytes", "gpt2", or "tokenizer.json@sha256:<16 hex>" for a
	// file (its content, not its path, so a copied file is the same
	// tokenizer and an edited one is not).
	Name() string
	// VocabSize is one more than the largest id Encode or EOT can return.
	VocabSize() int
	// EOT is the end-of-text id that separates documents, and false when
	// the tokenizer has none (bytes: documents are simply concatenated).
	EOT() (int32, bool)
	// Encode tokenizes text as ordinary text: a special token's text, such
	// as "<|endoftext|>", is encoded like any other characters, so a
	// corpus cannot inject document boundaries (EncodeSpecial does
	// recognise it).
	Encode(text string) ([]int32, error)
	// Decode turns ids into text. Ids outside the vocabulary and byte
	// sequences that are not valid UTF-8 become U+FFFD.
	Decode(ids []int32) string
	// TokenBytes is the raw bytes of one token (possibly part of a UTF-8
	// sequence), or nil for an id outside the vocabulary or a padding id.
	TokenBytes(id int32) []byte
}

// Continuer is implemented by tokenizers whose Encode treats the start of
// its text specially (a tokenizer.json's add_prefix_space): a document
// encoded in pieces encodes every piece but the first with
// EncodeContinuation, as Encode treats the inside of the whole text.
type Continuer interface {
	EncodeContinuation(text string) ([]int32, error)
}

// EncodePiece encodes a piece of a document: with Encode when it starts the
// document, else with EncodeContinuation where the tokenizer has one.
func EncodePiece(t Tokenizer, text string, first bool) ([]int32, error) {
	if c, ok := t.(Continuer); ok && !first {
		return c.EncodeContinuation(text)
	}
	return t.Encode(text)
}

// New returns the tokenizer spec names: "bytes" (also "" and "byte", the
// name datasets written before tokenizers had names carry), "gpt2", or the
// path of a Hugging Face tokenizer.json.
func New(spec string) (Tokenizer, error) {
	switch strings.ToLower(spec) {
	case "", "byte", Bytes:
		return ByteTokenizer{}, nil
	case GPT2, "r50k_base":
		return NewGPT2()
	}
	if _, err := os.Stat(spec); err != nil {
		return nil, fmt.Errorf("tokenizer: %w %q: want %q, %q or the path of a Hugging Face tokenizer.json (%v)", ErrUnknown, spec, Bytes, GPT2, err)
	}
	return LoadFile(spec)
}

// CanonicalName maps the names a manifest or job may hold for the byte
// tokenizer ("", "byte") to "bytes" and returns others unchanged.
func CanonicalName(name string) string {
	switch strings.ToLower(name) {
	case "", "byte", Bytes:
		return Bytes
	case "r50k_base":
		return GPT2
	}
	return name
}

// PadVocab is the model vocabulary for a tokenizer of n ids: n rounded up to
// a multiple of 64, so the output projection's rows tile evenly on tensor
// cores (50,257 -> 50,304). The ids from n up are padding: never in the data,
// and generate never samples them.
func PadVocab(n int) int {
	return (n + 63) / 64 * 64
}

// EncodeSpecial is Encode, except that each occurrence of the end-of-text
// text ("<|endoftext|>") becomes the EOT id, as a user typing it means. A
// tokenizer without an EOT encodes everything as ordinary text.
func EncodeSpecial(t Tokenizer, text string) ([]int32, error) {
	eot, ok := t.EOT()
	if !ok {
		return t.Encode(text)
	}
	var out []int32
	for {
		before, after, found := strings.Cut(text, EndOfText)
		ids, err := t.Encode(before)
		if err != nil {
			return nil, err
		}
		out = append(out, ids...)
		if !found {
			return out, nil
		}
		out = append(out, eot)
		text = after
	}
}

// decodeWith is Decode for tokenizers that have TokenBytes.
func decodeWith(t Tokenizer, ids []int32) string {
	var b []byte
	for _, id := range ids {
		tb := t.TokenBytes(id)
		if tb == nil {
			b = utf8.AppendRune(b, utf8.RuneError)
			continue
		}
		b = append(b, tb...)
	}
	return strings.ToValidUTF8(string(b), "\uFFFD")
}

package data

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"

	"github.com/bmojo/bmojo/internal/fsutil"
)

// Sentinel errors. Errors returned by this package wrap one of them, with the
// file and the problem in the message.
var (
	// ErrBadMagic: the file does not start with the shard or manifest magic.
	ErrBadMagic = errors.New("not a bmojo token shard")
	// ErrVersion: the file was written by an unsupported format version.
	ErrVersion = errors.New("unsupported format version")
	// ErrTruncated: the file is shorter than its header says.
	ErrTruncated = errors.New("file truncated")
	// ErrChecksum: the payload does not match its recorded CRC-32C.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrTokenRange: a token is negative or not below the vocabulary size.
	ErrTokenRange = errors.New("token out of range")
	// ErrCorrupt: any other inconsistency (bad header field, trailing bytes,
	// manifest disagreeing with a shard, malformed manifest).
	ErrCorrupt = errors.New("corrupt dataset")
)

// Shard file layout, all integers little-endian:
//
//	offset size field
//	0      8    magic "BMOJOTOK"
//	8      4    format version (uint32) = ShardVersion
//	12     4    vocab size (uint32)
//	16     4    token width in bytes (uint32): 2 (uint16) or 4 (uint32)
//	20     4    CRC-32C (Castagnoli) of the payload bytes
//	24     8    token count (uint64)
//	32     ...  payload: token count × width bytes
//
// Width 2 is used whenever vocab ≤ 65536, which halves disk and memory for
// the byte tokenizer; width 4 exists so a larger vocabulary does not need a
// new format version.
const (
	ShardMagic      = "BMOJOTOK"
	ShardVersion    = 1
	ShardHeaderSize = 32
)

// maxVocab keeps every token id representable as the int32 the model uses.
const maxVocab = 1<<31 - 1

// crcTable is CRC-32C: hardware-accelerated on amd64/arm64, so verifying a
// shard costs far less than reading it.
var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ShardHeader is the fixed-size header of a shard file.
type ShardHeader struct {
	Version    uint32
	Vocab      uint32
	TokenWidth uint32
	Checksum   uint32 // CRC-32C of the payload
	Count      uint64 // number of tokens
}

// Shard is a verified shard loaded into memory.
type Shard struct {
	Path   string
	Header ShardHeader
	// Tokens are widened to int32, the type the model consumes; a shard of
	// n tokens costs 4n bytes of memory.
	Tokens []int32
}

// tokenWidth picks the narrowest width that holds every id of vocab.
func tokenWidth(vocab int) uint32 {
	if vocab <= 1<<16 {
		return 2
	}
	return 4
}

// WriteShard writes tokens as a shard at path, atomically and durably (see
// fsutil.WriteFile). Every token must be in [0, vocab).
func WriteShard(path string, tokens []int32, vocab int) error {
	_, err := writeShard(path, tokens, vocab)
	return err
}

// writeShard is WriteShard returning the header, whose checksum the manifest
// records.
func writeShard(path string, tokens []int32, vocab int) (ShardHeader, error) {
	if vocab <= 0 || int64(vocab) > maxVocab {
		return ShardHeader{}, fmt.Errorf("data: write shard %s: vocab size %d out of range", path, vocab)
	}
	for i, t := range tokens {
		if t < 0 || int(t) >= vocab {
			return ShardHeader{}, fmt.Errorf("data: write shard %s: %w: token %d at index %d not in [0, %d)", path, ErrTokenRange, t, i, vocab)
		}
	}
	width := tokenWidth(vocab)
	payload := make([]byte, 0, len(tokens)*int(width))
	for _, t := range tokens {
		if width == 2 {
			payload = binary.LittleEndian.AppendUint16(payload, uint16(t))
		} else {
			payload = binary.LittleEndian.AppendUint32(payload, uint32(t))
		}
	}
	h := ShardHeader{
		Version:    ShardVersion,
		Vocab:      uint32(vocab),
		TokenWidth: width,
		Checksum:   crc32.Checksum(payload, crcTable),
		Count:      uint64(len(tokens)),
	}
	_, err := fsutil.WriteFile(path, func(w io.Writer) error {
		if _, err := w.Write(h.marshal()); err != nil {
			return err
		}
		_, err := w.Write(payload)
		return err
	})
	if err != nil {
		return ShardHeader{}, fmt.Errorf("data: write shard %s: %w", path, err)
	}
	return h, nil
}

func (h ShardHeader) marshal() []byte {
	b := make([]byte, 0, ShardHeaderSize)
	b = append(b, ShardMagic...)
	b = binary.LittleEndian.AppendUint32(b, h.Version)
	b = binary.LittleEndian.AppendUint32(b, h.Vocab)
	b = binary.LittleEndian.AppendUint32(b, h.TokenWidth)
	b = binary.LittleEndian.AppendUint32(b, h.Checksum)
	b = binary.LittleEndian.AppendUint64(b, h.Count)
	return b
}

// parseShardHeader checks magic, version and header fields. size is the
// whole file's size, used to report truncation with expected vs actual bytes.
func parseShardHeader(path string, b []byte, size int64) (ShardHeader, error) {
	var h ShardHeader
	n := min(len(b), len(ShardMagic))
	if !bytes.Equal(b[:n], []byte(ShardMagic)[:n]) || n == 0 {
		return h, fmt.Errorf("data: %s: %w (magic %q, want %q); create shards with `bmojo data prepare`", path, ErrBadMagic, b[:n], ShardMagic)
	}
	if len(b) < ShardHeaderSize {
		return h, fmt.Errorf("data: %s: %w: header needs %d bytes, file has %d; re-run `bmojo data prepare`", path, ErrTruncated, ShardHeaderSize, size)
	}
	h.Version = binary.LittleEndian.Uint32(b[8:])
	h.Vocab = binary.LittleEndian.Uint32(b[12:])
	h.TokenWidth = binary.LittleEndian.Uint32(b[16:])
	h.Checksum = binary.LittleEndian.Uint32(b[20:])
	h.Count = binary.LittleEndian.Uint64(b[24:])
	if h.Version != ShardVersion {
		return h, fmt.Errorf("data: %s: %w %d (this build reads version %d); re-run `bmojo data prepare` with this build", path, ErrVersion, h.Version, ShardVersion)
	}
	if h.TokenWidth != 2 && h.TokenWidth != 4 {
		return h, fmt.Errorf("data: %s: %w: token width %d, want 2 or 4; re-run `bmojo data prepare`", path, ErrCorrupt, h.TokenWidth)
	}
	if h.Vocab == 0 || h.Vocab > maxVocab || (h.TokenWidth == 2 && h.Vocab > 1<<16) {
		return h, fmt.Errorf("data: %s: %w: vocab size %d does not fit token width %d; re-run `bmojo data prepare`", path, ErrCorrupt, h.Vocab, h.TokenWidth)
	}
	if h.Count > (1<<63-1-ShardHeaderSize)/uint64(h.TokenWidth) {
		return h, fmt.Errorf("data: %s: %w: token count %d is impossible; re-run `bmojo data prepare`", path, ErrCorrupt, h.Count)
	}
	want := h.fileSize()
	if size < want {
		return h, fmt.Errorf("data: %s: %w: header promises %d tokens (%d bytes), file has %d bytes; re-run `bmojo data prepare`", path, ErrTruncated, h.Count, want, size)
	}
	if size > want {
		return h, fmt.Errorf("data: %s: %w: %d trailing bytes after %d tokens (file %d bytes, expected %d); re-run `bmojo data prepare`", path, ErrCorrupt, size-want, h.Count, size, want)
	}
	return h, nil
}

func (h ShardHeader) fileSize() int64 {
	return ShardHeaderSize + int64(h.Count)*int64(h.TokenWidth)
}

// ReadShardHeader reads and checks only the header (magic, version, fields,
// file size against the token count); the payload is not verified. It is
// what `bmojo data inspect` uses to describe a damaged shard.
func ReadShardHeader(path string) (ShardHeader, error) {
	f, err := os.Open(path)
	if err != nil {
		return ShardHeader{}, fmt.Errorf("data: open shard: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return ShardHeader{}, fmt.Errorf("data: open shard: %w", err)
	}
	b := make([]byte, ShardHeaderSize)
	n, err := io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		return ShardHeader{}, fmt.Errorf("data: read shard %s: %w", path, err)
	}
	return parseShardHeader(path, b[:n], st.Size())
}

// ReadShard loads a shard and verifies it completely: magic, version, header
// fields, size, CRC-32C of the payload, and that every token is below the
// vocabulary size.
func ReadShard(path string) (*Shard, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("data: read shard: %w", err)
	}
	return parseShard(path, b)
}

func parseShard(path string, b []byte) (*Shard, error) {
	h, err := parseShardHeader(path, b, int64(len(b)))
	if err != nil {
		return nil, err
	}
	payload := b[ShardHeaderSize:]
	if got := crc32.Checksum(payload, crcTable); got != h.Checksum {
		return nil, fmt.Errorf("data: %s: %w: payload CRC-32C %08x, header says %08x (file damaged); re-run `bmojo data prepare`", path, ErrChecksum, got, h.Checksum)
	}
	tokens := make([]int32, h.Count)
	for i := range tokens {
		var t uint32
		if h.TokenWidth == 2 {
			t = uint32(binary.LittleEndian.Uint16(payload[2*i:]))
		} else {
			t = binary.LittleEndian.Uint32(payload[4*i:])
		}
		if t >= h.Vocab {
			return nil, fmt.Errorf("data: %s: %w: token %d at index %d ≥ vocab size %d; re-run `bmojo data prepare`", path, ErrTokenRange, t, i, h.Vocab)
		}
		tokens[i] = int32(t)
	}
	return &Shard{Path: path, Header: h, Tokens: tokens}, nil
}

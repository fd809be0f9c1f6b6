package data

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/bmojo/bmojo/tokenizer"
)

// Split names one half of a prepared dataset.
type Split string

// The two splits Prepare writes.
const (
	SplitTrain Split = "train"
	SplitVal   Split = "val"
)

// Manifest constants. The manifest is JSON, so its "magic" is the format
// field; its version moves with the shard format version. Fields added
// since version 1 (tokenizer names other than "byte", eot, val_split,
// documents) are optional, so version 1 still describes every dataset.
const (
	ManifestFile    = "dataset.json"
	ManifestFormat  = "bmojo-dataset"
	ManifestVersion = 1
	// TokenizerByte is the name the first datasets recorded for the byte
	// tokenizer; ReadManifest reports it (and a missing name) as
	// tokenizer.Bytes.
	TokenizerByte = "byte"
	// TokenizerFile is the copy of a tokenizer.json that Prepare keeps in
	// the dataset directory, so the dataset can be decoded on its own.
	TokenizerFile = "tokenizer.json"
)

// ShardInfo is one shard as listed in the manifest.
type ShardInfo struct {
	File   string `json:"file"`   // base name inside the dataset directory
	Tokens int64  `json:"tokens"` // token count
	CRC32C string `json:"crc32c"` // payload CRC-32C, 8 hex digits
}

// SourceInfo records how one input file was split.
type SourceInfo struct {
	File       string `json:"file"`                // path as found (given, or inside a given directory or glob); "-" is stdin
	Bytes      int64  `json:"bytes"`               // text bytes read (after gzip)
	TrainBytes int64  `json:"train_bytes"`         // text bytes that went to train; the rest went to val
	Docs       int64  `json:"documents,omitempty"` // documents (1 for a text file, records for .jsonl)
	ValDocs    int64  `json:"val_documents,omitempty"`
}

// Manifest describes a prepared dataset directory (dataset.json).
type Manifest struct {
	Format        string  `json:"format"`         // always ManifestFormat
	FormatVersion int     `json:"format_version"` // ManifestVersion
	Vocab         int     `json:"vocab"`          // the tokenizer's vocabulary (not padded)
	Tokenizer     string  `json:"tokenizer"`      // tokenizer.Tokenizer.Name(): "bytes", "gpt2", "tokenizer.json@sha256:…"
	TokenizerFile string  `json:"tokenizer_file,omitempty"`
	EOT           *int32  `json:"eot,omitempty"`       // the id after every document; absent for bytes
	ValSplit      string  `json:"val_split,omitempty"` // "tail" or "document" (absent: tail)
	ValFraction   float64 `json:"val_fraction"`
	ShardTokens   int     `json:"shard_tokens"`
	// TrainDocs and ValDocs count the documents of each split (a text
	// file split at its tail counts in both).
	TrainDocs int64        `json:"train_documents,omitempty"`
	ValDocs   int64        `json:"val_documents,omitempty"`
	Train     []ShardInfo  `json:"train"`
	Val       []ShardInfo  `json:"val"`
	Sources   []SourceInfo `json:"sources"`
}

// Shards returns the shard list of one split.
func (m Manifest) Shards(split Split) []ShardInfo {
	if split == SplitVal {
		return m.Val
	}
	return m.Train
}

// Tokens sums the token counts of one split.
func (m Manifest) Tokens(split Split) int64 {
	var n int64
	for _, s := range m.Shards(split) {
		n += s.Tokens
	}
	return n
}

// removeStaleShards deletes shard files from an earlier Prepare that the new
// manifest does not list, so `ls` and disk usage match the manifest. Failure
// is harmless (the manifest is authoritative), so errors are ignored.
func removeStaleShards(dir string, m Manifest) {
	keep := map[string]bool{}
	for _, s := range append(append([]ShardInfo{}, m.Train...), m.Val...) {
		keep[s.File] = true
	}
	for _, pattern := range []string{"train-*.tok", "val-*.tok"} {
		old, _ := filepath.Glob(filepath.Join(dir, pattern))
		for _, p := range old {
			if !keep[filepath.Base(p)] {
				os.Remove(p)
			}
		}
	}
}

// ReadManifest loads and checks dir/dataset.json.
func ReadManifest(dir string) (Manifest, error) {
	path := filepath.Join(dir, ManifestFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return Manifest{}, fmt.Errorf("data: open dataset: %w (create one with `bmojo data prepare --out %s FILES...`)", err, dir)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("data: %s: %w: %v; re-run `bmojo data prepare`", path, ErrCorrupt, err)
	}
	if m.Format != ManifestFormat {
		return Manifest{}, fmt.Errorf("data: %s: %w: format %q, want %q (not a bmojo dataset manifest)", path, ErrCorrupt, m.Format, ManifestFormat)
	}
	if m.FormatVersion != ManifestVersion {
		return Manifest{}, fmt.Errorf("data: %s: %w %d (this build reads version %d); re-run `bmojo data prepare` with this build", path, ErrVersion, m.FormatVersion, ManifestVersion)
	}
	m.Tokenizer = tokenizer.CanonicalName(m.Tokenizer)
	want := map[string]int{tokenizer.Bytes: tokenizer.ByteVocab, tokenizer.GPT2: tokenizer.GPT2Vocab}
	if n, builtin := want[m.Tokenizer]; builtin && m.Vocab != n || m.Vocab <= 0 || m.Vocab > maxVocab {
		return Manifest{}, fmt.Errorf("data: %s: %w: tokenizer %q with vocab %d (%s has %d)", path, ErrCorrupt, m.Tokenizer, m.Vocab, m.Tokenizer, n)
	}
	if m.EOT != nil && (*m.EOT < 0 || int(*m.EOT) >= m.Vocab) {
		return Manifest{}, fmt.Errorf("data: %s: %w: eot %d outside the vocabulary [0, %d)", path, ErrCorrupt, *m.EOT, m.Vocab)
	}
	if m.TokenizerFile != "" && m.TokenizerFile != TokenizerFile {
		return Manifest{}, fmt.Errorf("data: %s: %w: tokenizer_file %q, want %q", path, ErrCorrupt, m.TokenizerFile, TokenizerFile)
	}
	for _, s := range append(append([]ShardInfo{}, m.Train...), m.Val...) {
		// Shard names come from a file anyone can edit; keep them inside dir.
		if s.File == "" || s.File != filepath.Base(s.File) || s.File == ".." || s.File == "." {
			return Manifest{}, fmt.Errorf("data: %s: %w: shard file name %q must be a plain name inside the dataset directory", path, ErrCorrupt, s.File)
		}
	}
	return m, nil
}

// Dataset is one split of token data: an ordered list of shards held in
// memory. Windows never span two shards (see Sampler).
type Dataset struct {
	// Name identifies the data in messages: "DIR (train)", "bundled (val)"
	// or "memory".
	Name  string
	Vocab int
	// Tokenizer is the name of the tokenizer that made the tokens
	// (tokenizer.Tokenizer.Name()); "" for a memory dataset, which does
	// not know.
	Tokenizer string
	shards    [][]int32
}

// NewMemoryDataset wraps tokens as a one-shard dataset, checking that every
// token is in [0, vocab). The slice is used, not copied.
func NewMemoryDataset(tokens []int32, vocab int) (*Dataset, error) {
	if vocab <= 0 {
		return nil, fmt.Errorf("data: memory dataset: vocab size %d must be positive", vocab)
	}
	for i, t := range tokens {
		if t < 0 || int(t) >= vocab {
			return nil, fmt.Errorf("data: memory dataset: %w: token %d at index %d not in [0, %d)", ErrTokenRange, t, i, vocab)
		}
	}
	return &Dataset{Name: "memory", Vocab: vocab, shards: [][]int32{tokens}}, nil
}

// OpenDataset loads one split of a prepared dataset directory, verifying
// every shard (ReadShard) and that each matches its manifest entry.
func OpenDataset(dir string, split Split) (*Dataset, error) {
	if split != SplitTrain && split != SplitVal {
		return nil, fmt.Errorf("data: open dataset %s: unknown split %q (want %q or %q)", dir, split, SplitTrain, SplitVal)
	}
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, err
	}
	infos := m.Shards(split)
	if len(infos) == 0 {
		return nil, fmt.Errorf("data: open dataset %s: no %s shards (was it prepared with --val-fraction 0?)", dir, split)
	}
	ds := &Dataset{Name: fmt.Sprintf("%s (%s)", dir, split), Vocab: m.Vocab, Tokenizer: m.Tokenizer}
	for _, info := range infos {
		sh, err := checkShard(dir, m, info)
		if err != nil {
			return nil, err
		}
		ds.shards = append(ds.shards, sh.Tokens)
	}
	return ds, nil
}

// checkShard reads a shard and compares it with its manifest entry.
func checkShard(dir string, m Manifest, info ShardInfo) (*Shard, error) {
	path := filepath.Join(dir, info.File)
	sh, err := ReadShard(path)
	if err != nil {
		return nil, err
	}
	want, err := strconv.ParseUint(info.CRC32C, 16, 32)
	if err != nil || int64(sh.Header.Count) != info.Tokens || uint32(want) != sh.Header.Checksum || int(sh.Header.Vocab) != m.Vocab {
		return nil, fmt.Errorf("data: %s: %w: manifest lists %d tokens, crc32c %s, vocab %d; shard has %d tokens, crc32c %08x, vocab %d; re-run `bmojo data prepare`",
			path, ErrCorrupt, info.Tokens, info.CRC32C, m.Vocab, sh.Header.Count, sh.Header.Checksum, sh.Header.Vocab)
	}
	return sh, nil
}

// CheckShard loads and verifies one manifest entry of a dataset directory:
// the shard itself (as ReadShard) and its agreement with the manifest. It is
// what `bmojo data inspect` reports per shard.
func CheckShard(dir string, m Manifest, info ShardInfo) (*Shard, error) {
	return checkShard(dir, m, info)
}

// BundledDataset returns one split of the bundled corpus, byte-tokenized.
func BundledDataset(split Split) (*Dataset, error) {
	train, val, err := BundledCorpus()
	if err != nil {
		return nil, err
	}
	text := train
	switch split {
	case SplitTrain:
	case SplitVal:
		text = val
	default:
		return nil, fmt.Errorf("data: bundled dataset: unknown split %q (want %q or %q)", split, SplitTrain, SplitVal)
	}
	ds, err := NewMemoryDataset(ByteTokenizer{}.EncodeBytes(text), ByteVocabSize)
	if err != nil {
		return nil, err
	}
	ds.Name = fmt.Sprintf("bundled (%s)", split)
	ds.Tokenizer = tokenizer.Bytes
	return ds, nil
}

// Load opens split from dir, or from the bundled corpus when dir is "" or
// "bundled"; it is the one call a training command needs.
func Load(dir string, split Split) (*Dataset, error) {
	if dir == "" || strings.EqualFold(dir, "bundled") {
		return BundledDataset(split)
	}
	return OpenDataset(dir, split)
}

// NumShards is the number of shards.
func (d *Dataset) NumShards() int { return len(d.shards) }

// Shard returns the tokens of shard i; callers must not modify them.
func (d *Dataset) Shard(i int) []int32 { return d.shards[i] }

// NumTokens is the total token count.
func (d *Dataset) NumTokens() int64 {
	var n int64
	for _, s := range d.shards {
		n += int64(len(s))
	}
	return n
}

// UnigramEntropy is the entropy in nats of the dataset's token frequencies:
// the loss of a model that ignores context, so a trained model's loss must
// fall below it.
func (d *Dataset) UnigramEntropy() float64 {
	counts := make([]int64, d.Vocab)
	for _, s := range d.shards {
		countTokens(counts, s)
	}
	return entropy(counts)
}

// UnigramEntropy returns the entropy in nats of the empirical distribution of
// tokens over a vocabulary of size vocab. Tokens outside [0, vocab) are
// ignored; an empty input has entropy 0.
func UnigramEntropy(tokens []int32, vocab int) float64 {
	if vocab <= 0 {
		return 0
	}
	counts := make([]int64, vocab)
	countTokens(counts, tokens)
	return entropy(counts)
}

func countTokens(counts []int64, tokens []int32) {
	for _, t := range tokens {
		if t >= 0 && int(t) < len(counts) {
			counts[t]++
		}
	}
}

func entropy(counts []int64) float64 {
	var n int64
	for _, c := range counts {
		n += c
	}
	if n == 0 {
		return 0
	}
	var h float64
	for _, c := range counts {
		if c > 0 {
			p := float64(c) / float64(n)
			h -= p * math.Log(p)
		}
	}
	return h
}

// OpenTokenizer returns the tokenizer dir's dataset was prepared with: a
// built-in one by name, or the tokenizer.json Prepare copied into dir,
// which must still be the file the manifest names.
func OpenTokenizer(dir string, m Manifest) (tokenizer.Tokenizer, error) {
	name := tokenizer.CanonicalName(m.Tokenizer)
	if name == tokenizer.Bytes || name == tokenizer.GPT2 {
		return tokenizer.New(name)
	}
	if m.TokenizerFile == "" {
		return nil, fmt.Errorf("data: dataset %s: %w: tokenizer %q is not built in and the dataset keeps no %s", dir, ErrCorrupt, name, TokenizerFile)
	}
	path := filepath.Join(dir, m.TokenizerFile)
	tok, err := tokenizer.LoadFile(path)
	if err != nil {
		return nil, fmt.Errorf("data: dataset %s: %w", dir, err)
	}
	if tok.Name() != name {
		return nil, fmt.Errorf("data: dataset %s: %w: %s is %s, the manifest says %s; re-run `bmojo data prepare`", dir, ErrCorrupt, path, tok.Name(), name)
	}
	return tok, nil
}

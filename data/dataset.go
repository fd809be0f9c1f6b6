package data

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/bmojo/bmojo/internal/fsutil"
)

// Split names one half of a prepared dataset.
type Split string

// The two splits Prepare writes.
const (
	SplitTrain Split = "train"
	SplitVal   Split = "val"
)

// Manifest constants. The manifest is JSON, so its "magic" is the format
// field; its version moves with the shard format version.
const (
	ManifestFile    = "dataset.json"
	ManifestFormat  = "bmojo-dataset"
	ManifestVersion = 1
	// TokenizerByte is the only tokenizer so far: ByteTokenizer.
	TokenizerByte = "byte"
)

// ShardInfo is one shard as listed in the manifest.
type ShardInfo struct {
	File   string `json:"file"`   // base name inside the dataset directory
	Tokens int64  `json:"tokens"` // token count
	CRC32C string `json:"crc32c"` // payload CRC-32C, 8 hex digits
}

// SourceInfo records how one input file was split.
type SourceInfo struct {
	File       string `json:"file"`        // path as given to Prepare
	Bytes      int64  `json:"bytes"`       // input size
	TrainBytes int64  `json:"train_bytes"` // leading bytes that went to train; the rest went to val
}

// Manifest describes a prepared dataset directory (dataset.json).
type Manifest struct {
	Format        string       `json:"format"`         // always ManifestFormat
	FormatVersion int          `json:"format_version"` // ManifestVersion
	Vocab         int          `json:"vocab"`
	Tokenizer     string       `json:"tokenizer"`
	ValFraction   float64      `json:"val_fraction"`
	ShardTokens   int          `json:"shard_tokens"`
	Train         []ShardInfo  `json:"train"`
	Val           []ShardInfo  `json:"val"`
	Sources       []SourceInfo `json:"sources"`
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

// PrepareOptions configures Prepare.
type PrepareOptions struct {
	// ValFraction is the share of each input file, taken from its end and
	// extended to the next line start, that goes to the validation split.
	// In [0, 1); default 0.05.
	ValFraction float64
	// ShardTokens is the maximum number of tokens per shard file; default
	// 1<<24 (16 Mi tokens, 32 MiB on disk with the byte tokenizer).
	ShardTokens int
	// Progress, if set, is called after each chunk of input with the input
	// bytes consumed so far and the total input size.
	Progress func(done, total int64)
}

// DefaultPrepareOptions returns the documented defaults.
func DefaultPrepareOptions() PrepareOptions {
	return PrepareOptions{ValFraction: 0.05, ShardTokens: 1 << 24}
}

// Validate reports the first invalid option, named as its CLI flag.
func (o PrepareOptions) Validate() error {
	if !(o.ValFraction >= 0 && o.ValFraction < 1) {
		return fmt.Errorf("data: --val-fraction %v must be in [0, 1)", o.ValFraction)
	}
	if o.ShardTokens <= 0 {
		return fmt.Errorf("data: --shard-tokens %d must be positive", o.ShardTokens)
	}
	return nil
}

// shardWriter buffers tokens of one split and writes a shard each time
// ShardTokens accumulate.
type shardWriter struct {
	dir, split string
	vocab      int
	max        int
	buf        []int32
	shards     []ShardInfo
}

func (w *shardWriter) add(tokens []int32) error {
	for len(tokens) > 0 {
		n := min(len(tokens), w.max-len(w.buf))
		w.buf = append(w.buf, tokens[:n]...)
		tokens = tokens[n:]
		if len(w.buf) == w.max {
			if err := w.flush(); err != nil {
				return err
			}
		}
	}
	return nil
}

func (w *shardWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	name := fmt.Sprintf("%s-%05d.tok", w.split, len(w.shards))
	h, err := writeShard(filepath.Join(w.dir, name), w.buf, w.vocab)
	if err != nil {
		return err
	}
	w.shards = append(w.shards, ShardInfo{File: name, Tokens: int64(h.Count), CRC32C: fmt.Sprintf("%08x", h.Checksum)})
	w.buf = w.buf[:0]
	return nil
}

// Prepare tokenizes text files with ByteTokenizer into train and validation
// shards in outDir and writes the manifest (dataset.json) last, atomically,
// so a directory with a manifest always describes complete shards.
//
// Each input is split on its own, exactly like the bundled corpus: the last
// ValFraction of its bytes, moved forward to the next line start, goes to
// validation. Inputs are then concatenated in the order given, train parts
// into train-NNNNN.tok and validation parts into val-NNNNN.tok. Inputs are
// streamed, so memory use is bounded by ShardTokens, not by input size.
// Shard files left over from an earlier Prepare into the same directory and
// not in the new manifest are removed.
func Prepare(inputs []string, outDir string, opts PrepareOptions) (Manifest, error) {
	if err := opts.Validate(); err != nil {
		return Manifest{}, err
	}
	if len(inputs) == 0 {
		return Manifest{}, fmt.Errorf("data: prepare: no input files")
	}
	var total int64
	sizes := make([]int64, len(inputs))
	for i, in := range inputs {
		st, err := os.Stat(in)
		if err != nil {
			return Manifest{}, fmt.Errorf("data: prepare: %w", err)
		}
		if st.IsDir() {
			return Manifest{}, fmt.Errorf("data: prepare: %s is a directory; pass text files", in)
		}
		sizes[i] = st.Size()
		total += st.Size()
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("data: prepare: %w", err)
	}

	vocab := ByteVocabSize
	train := &shardWriter{dir: outDir, split: string(SplitTrain), vocab: vocab, max: opts.ShardTokens}
	val := &shardWriter{dir: outDir, split: string(SplitVal), vocab: vocab, max: opts.ShardTokens}
	m := Manifest{
		Format: ManifestFormat, FormatVersion: ManifestVersion, Vocab: vocab, Tokenizer: TokenizerByte,
		ValFraction: opts.ValFraction, ShardTokens: opts.ShardTokens,
	}
	var done int64
	for i, in := range inputs {
		trainBytes, err := splitFile(in, sizes[i], opts.ValFraction, train, val, func(n int64) {
			done += n
			if opts.Progress != nil {
				opts.Progress(done, total)
			}
		})
		if err != nil {
			return Manifest{}, err
		}
		m.Sources = append(m.Sources, SourceInfo{File: in, Bytes: sizes[i], TrainBytes: trainBytes})
	}
	if err := train.flush(); err != nil {
		return Manifest{}, err
	}
	if err := val.flush(); err != nil {
		return Manifest{}, err
	}
	if len(train.shards) == 0 {
		return Manifest{}, fmt.Errorf("data: prepare: inputs hold no training text (%d bytes in all)", total)
	}
	m.Train, m.Val = train.shards, val.shards

	js, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return Manifest{}, fmt.Errorf("data: prepare: %w", err)
	}
	js = append(js, '\n')
	mpath := filepath.Join(outDir, ManifestFile)
	if _, err := fsutil.WriteBytes(mpath, js); err != nil {
		return Manifest{}, fmt.Errorf("data: prepare: write %s: %w", mpath, err)
	}
	removeStaleShards(outDir, m)
	return m, nil
}

// splitFile streams one input into the train and val writers, switching at
// the byte splitPoint would choose, and returns the train byte count.
func splitFile(path string, size int64, valFraction float64, train, val *shardWriter, progress func(int64)) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("data: prepare: %w", err)
	}
	defer f.Close()
	cut := size // valFraction 0: everything is train
	if valFraction > 0 {
		cut = int64(float64(size) * (1 - valFraction))
	}
	var tok ByteTokenizer
	var pos, trainBytes int64
	inVal := false
	buf := make([]byte, 1<<20)
	for {
		n, rerr := f.Read(buf)
		chunk := buf[:n]
		if !inVal {
			// Train takes everything before the cut, then up to and
			// including the first newline at or after it.
			take := len(chunk)
			if pos+int64(take) > cut {
				from := int(max(cut-pos, 0))
				if i := bytes.IndexByte(chunk[from:], '\n'); i >= 0 {
					take = from + i + 1
					inVal = true
				}
			}
			if err := train.add(tok.EncodeBytes(chunk[:take])); err != nil {
				return 0, err
			}
			trainBytes += int64(take)
			chunk = chunk[take:]
		}
		if len(chunk) > 0 {
			if err := val.add(tok.EncodeBytes(chunk)); err != nil {
				return 0, err
			}
		}
		pos += int64(n)
		if n > 0 {
			progress(int64(n))
		}
		if rerr == io.EOF {
			return trainBytes, nil
		}
		if rerr != nil {
			return 0, fmt.Errorf("data: prepare: read %s: %w", path, rerr)
		}
	}
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
	if m.Tokenizer != TokenizerByte || m.Vocab != ByteVocabSize {
		return Manifest{}, fmt.Errorf("data: %s: %w: tokenizer %q with vocab %d, this build supports %q with vocab %d", path, ErrCorrupt, m.Tokenizer, m.Vocab, TokenizerByte, ByteVocabSize)
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
	Name   string
	Vocab  int
	shards [][]int32
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
	ds := &Dataset{Name: fmt.Sprintf("%s (%s)", dir, split), Vocab: m.Vocab}
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

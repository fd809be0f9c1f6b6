package data

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"github.com/bmojo/bmojo/internal/fsutil"
	"github.com/bmojo/bmojo/tokenizer"
)

// How PrepareOptions.ValSplit holds out validation text.
const (
	// ValSplitAuto is ValSplitTail when every input is a text file named
	// on the command line (or stdin), and ValSplitDocument when any input
	// is a directory, a glob or a .jsonl file.
	ValSplitAuto = "auto"
	// ValSplitTail holds out the last ValFraction of each text file, moved
	// forward to the next line start (as the bundled corpus is split).
	ValSplitTail = "tail"
	// ValSplitDocument holds out whole documents: document i (counted from
	// 0 across all inputs in order) goes to validation when
	// floor((i+1)·ValFraction) > floor(i·ValFraction), i.e. one document in
	// every 1/ValFraction, spread evenly through the corpus.
	ValSplitDocument = "document"
)

// Defaults and limits of Prepare.
const (
	// DefaultJSONLField is the field of a .jsonl record that holds its text.
	DefaultJSONLField = "text"
	// defaultChunkBytes is the text per unit of work given to an encoding
	// goroutine. Chunk boundaries depend only on the text, never on the
	// number of workers, so neither does the output.
	defaultChunkBytes = 1 << 20
	// chunkScan is how far past the chunk size a boundary is looked for.
	chunkScan = 64 << 10
	// maxJSONLLine bounds one .jsonl record, which is held whole.
	maxJSONLLine = 256 << 20
)

// PrepareOptions configures Prepare.
type PrepareOptions struct {
	// ValFraction is the share of the text held out for validation, as
	// ValSplit says. In [0, 1); default 0.05.
	ValFraction float64
	// ShardTokens is the maximum number of tokens per shard file; default
	// 1<<24 (16 Mi tokens, 32 MiB on disk with a vocabulary ≤ 65,536).
	ShardTokens int
	// Tokenizer encodes the text; nil is the byte tokenizer.
	Tokenizer tokenizer.Tokenizer
	// TokenizerFile is the tokenizer.json Tokenizer was read from, copied
	// into the dataset as TokenizerFile; "" for a built-in tokenizer.
	TokenizerFile string
	// ValSplit is ValSplitAuto (also ""), ValSplitTail or ValSplitDocument.
	ValSplit string
	// JSONLField names the text field of .jsonl records; default "text".
	JSONLField string
	// StdinJSONL reads the input "-" as JSON lines instead of as one text
	// document.
	StdinJSONL bool
	// Stdin is what the input "-" reads; nil is os.Stdin.
	Stdin io.Reader
	// Workers is the number of goroutines encoding text; 0 is GOMAXPROCS.
	// The output is byte-identical for every value.
	Workers int
	// Progress, if set, is called as input is consumed with the input
	// bytes read so far (as stored: compressed for .gz) and the total, -1
	// when unknown (stdin). It is called from the goroutine that called
	// Prepare.
	Progress func(done, total int64)

	chunkBytes int // tests shrink it to exercise chunking; 0 = defaultChunkBytes
}

// DefaultPrepareOptions returns the documented defaults.
func DefaultPrepareOptions() PrepareOptions {
	return PrepareOptions{ValFraction: 0.05, ShardTokens: 1 << 24, ValSplit: ValSplitAuto, JSONLField: DefaultJSONLField}
}

// Validate reports the first invalid option, named as its CLI flag.
func (o PrepareOptions) Validate() error {
	if !(o.ValFraction >= 0 && o.ValFraction < 1) {
		return fmt.Errorf("data: --val-fraction %v must be in [0, 1)", o.ValFraction)
	}
	if o.ShardTokens <= 0 {
		return fmt.Errorf("data: --shard-tokens %d must be positive", o.ShardTokens)
	}
	switch o.ValSplit {
	case "", ValSplitAuto, ValSplitTail, ValSplitDocument:
	default:
		return fmt.Errorf("data: --val-split %q must be %s, %s or %s", o.ValSplit, ValSplitAuto, ValSplitTail, ValSplitDocument)
	}
	if o.Workers < 0 {
		return fmt.Errorf("data: --workers %d must be >= 0 (0 = every core)", o.Workers)
	}
	if o.chunkBytes < 0 {
		return fmt.Errorf("data: chunk size %d must be >= 0", o.chunkBytes)
	}
	return nil
}

// source is one input file (or stdin) after directories and globs are
// expanded.
type source struct {
	path     string // "-" is stdin
	jsonl    bool
	gz       bool  // by name; stdin by its magic number
	size     int64 // as stored; -1 unknown
	explicit bool  // named as a file, not found in a directory or a glob
}

// textExt reports whether a file found in a directory is text to prepare:
// .txt, .text, .md, .jsonl or no extension, each optionally .gz.
func textExt(name string) bool {
	name = strings.TrimSuffix(name, ".gz")
	switch filepath.Ext(name) {
	case "", ".txt", ".text", ".md", ".jsonl":
		return true
	}
	return false
}

func newSource(path string, size int64, explicit bool) source {
	base := strings.TrimSuffix(path, ".gz")
	return source{path: path, jsonl: strings.HasSuffix(base, ".jsonl"), gz: strings.HasSuffix(path, ".gz"), size: size, explicit: explicit}
}

// expandInputs turns arguments into sources in a fixed order: arguments as
// given; a directory's text files (textExt, not hidden, not symlinks) in
// lexical order of their paths; a glob's matches in lexical order.
func expandInputs(args []string, stdinJSONL bool) ([]source, error) {
	var out []source
	walk := func(dir string) error {
		n := len(out)
		err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if p != dir && strings.HasPrefix(d.Name(), ".") {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
			if !d.Type().IsRegular() || !textExt(d.Name()) {
				return nil
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			out = append(out, newSource(p, info.Size(), false))
			return nil
		})
		if err != nil {
			return fmt.Errorf("data: prepare: %w", err)
		}
		if len(out) == n {
			return fmt.Errorf("data: prepare: directory %s holds no text files (.txt, .text, .md, .jsonl or no extension, optionally .gz)", dir)
		}
		return nil
	}
	stdin := false
	for _, a := range args {
		if a == "-" {
			if stdin {
				return nil, fmt.Errorf("data: prepare: stdin (-) given twice")
			}
			stdin = true
			out = append(out, source{path: "-", jsonl: stdinJSONL, size: -1, explicit: true})
			continue
		}
		st, err := os.Stat(a)
		switch {
		case err == nil && st.IsDir():
			if err := walk(a); err != nil {
				return nil, err
			}
		case err == nil:
			out = append(out, newSource(a, st.Size(), true))
		case strings.ContainsAny(a, "*?["):
			matches, gerr := filepath.Glob(a)
			if gerr != nil {
				return nil, fmt.Errorf("data: prepare: pattern %q: %w", a, gerr)
			}
			if len(matches) == 0 {
				return nil, fmt.Errorf("data: prepare: pattern %q matches no file", a)
			}
			for _, m := range matches {
				st, err := os.Stat(m)
				if err != nil {
					return nil, fmt.Errorf("data: prepare: %w", err)
				}
				if st.IsDir() {
					if err := walk(m); err != nil {
						return nil, err
					}
					continue
				}
				out = append(out, newSource(m, st.Size(), false))
			}
		default:
			return nil, fmt.Errorf("data: prepare: %w", err)
		}
	}
	return out, nil
}

// part is one piece of one document bound for one split.
type part struct {
	split Split
	text  []byte
	first bool // the document starts here (tokenizer.EncodePiece)
	eot   bool // the document ends here: the EOT id follows its tokens
}

// chunk is one unit of work: whole documents and pieces of documents, in
// order, about chunkBytes of text in all.
type chunk struct {
	seq   int
	parts []part
	size  int
	done  int64 // input bytes read when the chunk was cut, for progress
}

type result struct {
	c      *chunk
	tokens [][]int32 // per part
	err    error
}

// Prepare tokenizes text into train and validation shards in outDir and
// writes the manifest (dataset.json) last, atomically, so a directory with a
// manifest always describes complete shards.
//
// Inputs are files, directories, glob patterns and "-" for stdin (see
// expandInputs); a name ending in .gz is decompressed, one ending in .jsonl
// (or .jsonl.gz) holds one document per line in its JSONLField. A text file
// is one document. With a tokenizer that has an end-of-text id, every
// document is followed by it. ValSplit says how validation text is chosen.
// Each split's documents go to its shards in input order.
//
// Text streams through a bounded pipeline: one goroutine reads and cuts it
// into chunks at boundaries that depend only on the text (a line start
// between two printable ASCII characters, where GPT-2's pre-tokenizer
// always splits, so a chunked document encodes as the whole would),
// Workers goroutines encode chunks, and the caller's goroutine writes the
// tokens in chunk order. Memory is bounded by the chunks in flight and two
// shards' tokens, not by the input size, and the shards are byte-identical
// whatever Workers is. Shard files of an earlier Prepare into the same
// directory that the new manifest does not list are removed.
func Prepare(inputs []string, outDir string, opts PrepareOptions) (Manifest, error) {
	if err := opts.Validate(); err != nil {
		return Manifest{}, err
	}
	if len(inputs) == 0 {
		return Manifest{}, fmt.Errorf("data: prepare: no input files")
	}
	if opts.Tokenizer == nil {
		opts.Tokenizer = tokenizer.ByteTokenizer{}
	}
	if opts.JSONLField == "" {
		opts.JSONLField = DefaultJSONLField
	}
	if opts.chunkBytes == 0 {
		opts.chunkBytes = defaultChunkBytes
	}
	if opts.Workers == 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	if opts.Stdin == nil {
		opts.Stdin = os.Stdin
	}
	srcs, err := expandInputs(inputs, opts.StdinJSONL)
	if err != nil {
		return Manifest{}, err
	}
	mode := opts.ValSplit
	if mode == "" || mode == ValSplitAuto {
		mode = ValSplitTail
		for _, s := range srcs {
			if !s.explicit || s.jsonl {
				mode = ValSplitDocument
			}
		}
	}
	var total int64
	for _, s := range srcs {
		if s.size < 0 {
			total = -1
			break
		}
		total += s.size
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("data: prepare: %w", err)
	}

	tok := opts.Tokenizer
	vocab := tok.VocabSize()
	m := Manifest{
		Format: ManifestFormat, FormatVersion: ManifestVersion, Vocab: vocab, Tokenizer: tok.Name(),
		ValSplit: mode, ValFraction: opts.ValFraction, ShardTokens: opts.ShardTokens,
	}
	if id, ok := tok.EOT(); ok {
		m.EOT = &id
	}
	if opts.TokenizerFile != "" {
		b, err := os.ReadFile(opts.TokenizerFile)
		if err != nil {
			return Manifest{}, fmt.Errorf("data: prepare: %w", err)
		}
		if _, err := fsutil.WriteBytes(filepath.Join(outDir, TokenizerFile), b); err != nil {
			return Manifest{}, fmt.Errorf("data: prepare: copy tokenizer: %w", err)
		}
		m.TokenizerFile = TokenizerFile
	}
	writers := map[Split]*shardWriter{
		SplitTrain: {dir: outDir, split: string(SplitTrain), vocab: vocab, max: opts.ShardTokens},
		SplitVal:   {dir: outDir, split: string(SplitVal), vocab: vocab, max: opts.ShardTokens},
	}
	p := &producer{opts: opts, mode: mode, srcs: srcs, m: &m}
	if err := p.run(writers, total); err != nil {
		return Manifest{}, err
	}
	for _, w := range []*shardWriter{writers[SplitTrain], writers[SplitVal]} {
		if err := w.flush(); err != nil {
			return Manifest{}, err
		}
	}
	if len(writers[SplitTrain].shards) == 0 {
		return Manifest{}, fmt.Errorf("data: prepare: inputs hold no training text (%d files, %d documents)", len(srcs), m.TrainDocs+m.ValDocs)
	}
	m.Train, m.Val = writers[SplitTrain].shards, writers[SplitVal].shards

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

// producer reads the sources and cuts them into chunks; run drives the
// whole pipeline.
type producer struct {
	opts PrepareOptions
	mode string
	srcs []source
	m    *Manifest // Sources, TrainDocs and ValDocs are filled as text is read

	emit     func(*chunk) error
	cur      *chunk
	seq      int
	docIndex int64
	read     int64 // input bytes of finished sources
	counter  *countingReader
}

// run starts the encoding workers and the reader, and writes results to
// writers in chunk order as they arrive.
func (p *producer) run(writers map[Split]*shardWriter, total int64) error {
	workers := p.opts.Workers
	inflight := 2*workers + 2
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	jobs := make(chan *chunk)
	results := make(chan result, inflight)
	slots := make(chan struct{}, inflight)
	p.emit = func(c *chunk) error {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case jobs <- c:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	tok := p.opts.Tokenizer
	eot, hasEOT := tok.EOT()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for c := range jobs {
				r := result{c: c, tokens: make([][]int32, len(c.parts))}
				for i, pt := range c.parts {
					ids, err := tokenizer.EncodePiece(tok, string(pt.text), pt.first)
					if err != nil {
						r.err = fmt.Errorf("data: prepare: %w", err)
						break
					}
					if pt.eot && hasEOT {
						ids = append(ids, eot)
					}
					r.tokens[i] = ids
				}
				results <- r // never blocks: at most inflight results are pending
			}
		})
	}
	readErr := make(chan error, 1)
	go func() {
		defer close(jobs)
		readErr <- p.produce()
	}()
	go func() {
		wg.Wait()
		close(results)
	}()

	var firstErr error
	pending := map[int]result{}
	next := 0
	for r := range results {
		if firstErr != nil {
			continue // drain
		}
		if r.err != nil {
			firstErr = r.err
			cancel()
			continue
		}
		pending[r.c.seq] = r
		for {
			r, ok := pending[next]
			if !ok {
				break
			}
			delete(pending, next)
			next++
			<-slots
			for i, pt := range r.c.parts {
				if err := writers[pt.split].add(r.tokens[i]); err != nil && firstErr == nil {
					firstErr = err
					cancel()
				}
			}
			if p.opts.Progress != nil {
				p.opts.Progress(r.c.done, total)
			}
		}
	}
	if err := <-readErr; err != nil && firstErr == nil && !errors.Is(err, context.Canceled) {
		firstErr = err
	}
	if firstErr == nil && p.opts.Progress != nil {
		p.opts.Progress(p.read, total)
	}
	return firstErr
}

// produce reads every source in order and emits its chunks.
func (p *producer) produce() error {
	for _, s := range p.srcs {
		info := SourceInfo{File: s.path}
		if err := p.source(s, &info); err != nil {
			return err
		}
		p.m.Sources = append(p.m.Sources, info)
	}
	if p.cur != nil && len(p.cur.parts) > 0 {
		return p.flushChunk()
	}
	return nil
}

// countingReader counts the bytes read from the stored file, for progress.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

// open returns the text of s (decompressed) and a closer.
func (p *producer) open(s source) (io.Reader, func(), error) {
	var raw io.Reader
	closeFn := func() {}
	if s.path == "-" {
		raw = p.opts.Stdin
	} else {
		f, err := os.Open(s.path)
		if err != nil {
			return nil, nil, fmt.Errorf("data: prepare: %w", err)
		}
		raw, closeFn = f, func() { f.Close() }
	}
	p.counter = &countingReader{r: raw}
	br := bufio.NewReaderSize(p.counter, 1<<20)
	gz := s.gz
	if s.path == "-" {
		magic, _ := br.Peek(2)
		gz = len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b
	}
	if !gz {
		return br, closeFn, nil
	}
	zr, err := gzip.NewReader(br)
	if err != nil {
		closeFn()
		return nil, nil, fmt.Errorf("data: prepare: %s: %w", s.path, err)
	}
	return bufio.NewReaderSize(zr, 1<<20), func() { zr.Close(); closeFn() }, nil
}

// source emits the documents of one source, recording them in info.
func (p *producer) source(s source, info *SourceInfo) error {
	r, closeFn, err := p.open(s)
	if err != nil {
		return err
	}
	defer func() {
		closeFn()
		p.read += p.counter.n
		p.counter = nil
	}()
	wrap := func(err error) error {
		if err == nil || errors.Is(err, context.Canceled) {
			return err
		}
		return fmt.Errorf("data: prepare: read %s: %w", s.path, err)
	}
	if s.jsonl {
		return wrap(p.jsonl(s, r, info))
	}
	if p.mode == ValSplitDocument {
		split := p.docSplit()
		n, err := p.stream(r, split)
		info.Bytes, info.Docs = n, 1
		if split == SplitTrain {
			info.TrainBytes = n
		} else {
			info.ValDocs = 1
		}
		return wrap(err)
	}
	// Tail split: the text up to the cut and on to the end of its line is
	// train, the rest val.
	size := s.size
	if p.opts.ValFraction > 0 && (s.gz || s.path == "-") {
		if s.path == "-" {
			return fmt.Errorf("data: prepare: stdin has no size to split at its tail; use --val-split document, --val-fraction 0, or a file")
		}
		if size, err = textSize(s.path); err != nil {
			return err
		}
	}
	cut := int64(math.MaxInt64) // no validation: everything is train
	if p.opts.ValFraction > 0 {
		cut = int64(float64(size) * (1 - p.opts.ValFraction))
	}
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReader(r)
	}
	trainN, err := p.stream(&tailReader{br: br, cut: cut}, SplitTrain)
	if err != nil {
		return wrap(err)
	}
	valN, err := p.stream(br, SplitVal)
	if err != nil {
		return wrap(err)
	}
	info.Bytes, info.TrainBytes, info.Docs = trainN+valN, trainN, 1
	if trainN > 0 {
		p.m.TrainDocs++
	}
	if valN > 0 {
		p.m.ValDocs++
		info.ValDocs = 1
	}
	return nil
}

// textSize is the decompressed size of a .gz file, read once to find where
// a tail split cuts it.
func textSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("data: prepare: %w", err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(bufio.NewReader(f))
	if err != nil {
		return 0, fmt.Errorf("data: prepare: %s: %w", path, err)
	}
	n, err := io.Copy(io.Discard, zr)
	if err != nil {
		return 0, fmt.Errorf("data: prepare: %s: %w", path, err)
	}
	return n, nil
}

// tailReader reads br up to cut, then on to the end of that line.
type tailReader struct {
	br   *bufio.Reader
	cut  int64
	pos  int64
	done bool
}

func (t *tailReader) Read(b []byte) (int, error) {
	if t.done || len(b) == 0 {
		if t.done {
			return 0, io.EOF
		}
		return 0, nil
	}
	if t.pos < t.cut {
		n, err := t.br.Read(b[:min(int64(len(b)), t.cut-t.pos)])
		t.pos += int64(n)
		return n, err
	}
	peek, err := t.br.Peek(min(len(b), max(t.br.Buffered(), 1)))
	if len(peek) == 0 {
		return 0, err
	}
	if i := bytes.IndexByte(peek, '\n'); i >= 0 {
		peek = peek[:i+1]
		t.done = true
	}
	n := copy(b, peek)
	_, _ = t.br.Discard(n)
	t.pos += int64(n)
	return n, nil
}

// docSplit is the split of the next document in ValSplitDocument mode.
func (p *producer) docSplit() Split {
	i := float64(p.docIndex)
	p.docIndex++
	f := p.opts.ValFraction
	if f > 0 && math.Floor((i+1)*f) > math.Floor(i*f) {
		p.m.ValDocs++
		return SplitVal
	}
	p.m.TrainDocs++
	return SplitTrain
}

// jsonl emits one document per non-empty line of r.
func (p *producer) jsonl(s source, r io.Reader, info *SourceInfo) error {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReader(r)
	}
	field := p.opts.JSONLField
	for line := 1; ; line++ {
		b, err := readLine(br)
		if len(bytes.TrimSpace(b)) > 0 {
			var rec map[string]json.RawMessage
			if jerr := json.Unmarshal(b, &rec); jerr != nil {
				return fmt.Errorf("line %d: %w: %v", line, ErrCorrupt, jerr)
			}
			raw, ok := rec[field]
			var text string
			if ok {
				if jerr := json.Unmarshal(raw, &text); jerr != nil {
					ok = false
				}
			}
			if !ok {
				return fmt.Errorf("line %d: %w: no string field %q (choose it with --jsonl-field)", line, ErrCorrupt, field)
			}
			split := p.docSplit()
			n, serr := p.stream(strings.NewReader(text), split)
			if serr != nil {
				return serr
			}
			info.Bytes += n
			info.Docs++
			if split == SplitTrain {
				info.TrainBytes += n
			} else {
				info.ValDocs++
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// readLine returns the next line of br without its newline, refusing one
// longer than maxJSONLLine.
func readLine(br *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		line = append(line, frag...)
		if len(line) > maxJSONLLine {
			return nil, fmt.Errorf("%w: a line longer than %d bytes", ErrCorrupt, maxJSONLLine)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		return bytes.TrimSuffix(line, []byte("\n")), err
	}
}

// stream cuts one document (or one split's part of a file) read from r into
// parts, the last marked as the end of a document, and returns its length.
// A document of no bytes emits nothing, not even an end-of-text id.
func (p *producer) stream(r io.Reader, split Split) (int64, error) {
	target := p.opts.chunkBytes
	buf := make([]byte, 0, target+chunkScan)
	var n int64
	first := true
	for {
		m, err := io.ReadFull(r, buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		n += int64(m)
		if err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
			if len(buf) > 0 {
				return n, p.add(split, buf, first, true)
			}
			return n, nil
		}
		if err != nil {
			return n, err
		}
		// buf is full: cut it where the text allows.
		cut := safeCut(buf, target)
		if err := p.add(split, buf[:cut], first, false); err != nil {
			return n, err
		}
		first = false
		buf = buf[:copy(buf, buf[cut:])]
	}
}

// safeCut returns where to end a chunk in b (len(b) > target): the first
// position p ≥ target, within chunkScan, such that b[p-1] is a newline and
// b[p-2] and b[p] are printable ASCII other than a space. GPT-2's
// pre-tokenizer (and any that never joins a newline to a letter, digit or
// punctuation after it) always splits there, so encoding the halves gives
// the tokens of the whole. Text without such a place (no newlines for 64
// KiB) is cut at a UTF-8 character boundary: still deterministic, and
// only the tokens at that one seam may differ from encoding the whole.
func safeCut(b []byte, target int) int {
	printable := func(c byte) bool { return c > ' ' && c < 0x7f }
	limit := min(len(b)-1, target+chunkScan)
	for p := max(target, 2); p < limit; p++ {
		if b[p-1] == '\n' && printable(b[p-2]) && printable(b[p]) {
			return p
		}
	}
	p := min(target, len(b))
	for p > 0 && b[p]&0xC0 == 0x80 {
		p--
	}
	if p == 0 {
		return min(target, len(b))
	}
	return p
}

// add appends a part (copying text) to the current chunk and emits the
// chunk once it holds chunkBytes.
func (p *producer) add(split Split, text []byte, first, eot bool) error {
	if p.cur == nil {
		p.cur = &chunk{seq: p.seq}
		p.seq++
	}
	p.cur.parts = append(p.cur.parts, part{split: split, text: bytes.Clone(text), first: first, eot: eot})
	p.cur.size += len(text)
	if p.cur.size >= p.opts.chunkBytes {
		return p.flushChunk()
	}
	return nil
}

func (p *producer) flushChunk() error {
	c := p.cur
	p.cur = nil
	c.done = p.read
	if p.counter != nil {
		c.done += p.counter.n
	}
	return p.emit(c)
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

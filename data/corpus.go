package data

import (
	"bytes"
	"compress/gzip"
	"embed"
	"fmt"
	"io"
	"path"
	"sort"
)

// The corpus files are gzip-compressed to keep the repository and binary
// small (about 1.4 MB instead of 4.9 MB); corpus/README.md lists the sources
// and corpus/build.sh regenerates them.
//
//go:embed corpus/*.txt.gz
var corpusFS embed.FS

// BundledValFraction is the share of each bundled source held out for
// validation.
const BundledValFraction = 0.05

// BundledSource describes one text of the bundled corpus.
type BundledSource struct {
	Name     string // file stem, e.g. "kjv"
	RawBytes int    // uncompressed size
	TrainLen int    // bytes of the source that go to the train split
}

// BundledCorpus returns the bundled public-domain English corpus split into
// train and validation text. Each source is split on its own: its last
// BundledValFraction (moved forward to the next line start, so no line is
// cut) goes to validation. Validation is therefore a contiguous tail of each
// text, never interleaved with training text, and the split is identical on
// every machine. Sources are concatenated in file-name order.
func BundledCorpus() (train, val []byte, err error) {
	srcs, texts, err := bundledTexts()
	if err != nil {
		return nil, nil, err
	}
	for i, s := range srcs {
		train = append(train, texts[i][:s.TrainLen]...)
		val = append(val, texts[i][s.TrainLen:]...)
	}
	return train, val, nil
}

// BundledSources lists the bundled texts with their sizes and split points.
func BundledSources() ([]BundledSource, error) {
	srcs, _, err := bundledTexts()
	return srcs, err
}

func bundledTexts() ([]BundledSource, [][]byte, error) {
	names, err := corpusFS.ReadDir("corpus")
	if err != nil {
		return nil, nil, fmt.Errorf("data: bundled corpus: %w", err)
	}
	var files []string
	for _, e := range names {
		if path.Ext(e.Name()) == ".gz" {
			files = append(files, e.Name())
		}
	}
	sort.Strings(files)
	var srcs []BundledSource
	var texts [][]byte
	for _, name := range files {
		gz, err := corpusFS.ReadFile("corpus/" + name)
		if err != nil {
			return nil, nil, fmt.Errorf("data: bundled corpus %s: %w", name, err)
		}
		zr, err := gzip.NewReader(bytes.NewReader(gz))
		if err != nil {
			return nil, nil, fmt.Errorf("data: bundled corpus %s: %w", name, err)
		}
		text, err := io.ReadAll(zr)
		if err != nil {
			return nil, nil, fmt.Errorf("data: bundled corpus %s: %w", name, err)
		}
		srcs = append(srcs, BundledSource{
			Name:     name[:len(name)-len(".txt.gz")],
			RawBytes: len(text),
			TrainLen: splitPoint(text, BundledValFraction),
		})
		texts = append(texts, text)
	}
	if len(texts) == 0 {
		return nil, nil, fmt.Errorf("data: bundled corpus is empty (build with data/corpus/build.sh)")
	}
	return srcs, texts, nil
}

// splitPoint returns the length of the train part of text when the last
// valFraction is held out: the byte just after the first newline at or after
// the nominal cut, so validation starts at a line boundary. Without a newline
// after the cut everything is train, rather than splitting a line.
func splitPoint(text []byte, valFraction float64) int {
	if valFraction <= 0 {
		return len(text)
	}
	cut := int(float64(len(text)) * (1 - valFraction))
	if cut >= len(text) {
		return len(text)
	}
	if i := bytes.IndexByte(text[cut:], '\n'); i >= 0 {
		return cut + i + 1
	}
	return len(text)
}

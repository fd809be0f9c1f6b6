package data

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	tiktoken "github.com/tiktoken-go/tokenizer"

	"github.com/bmojo/bmojo/tokenizer"
)

// BenchmarkPrepareGPT2 is `bmojo data prepare --tokenizer gpt2` on the
// bundled corpus (4.9 MB of English): MB/s of text on 1 worker and on every
// core, beside the library's own single-threaded encoder on the same text in
// the same run (its MB/s is the baseline the pipeline must multiply).
//
//	go test -run '^$' -bench PrepareGPT2 -benchtime 3x ./data
func BenchmarkPrepareGPT2(b *testing.B) {
	train, val, err := BundledCorpus()
	if err != nil {
		b.Fatal(err)
	}
	text := append(append([]byte{}, train...), val...)
	in := filepath.Join(b.TempDir(), "corpus.txt")
	if err := os.WriteFile(in, text, 0o644); err != nil {
		b.Fatal(err)
	}
	b.Run("library-encode-1-thread", func(b *testing.B) {
		codec, err := tiktoken.Get(tiktoken.R50kBase)
		if err != nil {
			b.Fatal(err)
		}
		b.SetBytes(int64(len(text)))
		for b.Loop() {
			if _, _, err := codec.Encode(string(text)); err != nil {
				b.Fatal(err)
			}
		}
	})
	tok, err := tokenizer.New(tokenizer.GPT2)
	if err != nil {
		b.Fatal(err)
	}
	for _, workers := range []int{1, runtime.GOMAXPROCS(0)} {
		b.Run(fmt.Sprintf("prepare-workers-%d", workers), func(b *testing.B) {
			opts := DefaultPrepareOptions()
			opts.Tokenizer, opts.Workers = tok, workers
			out := b.TempDir()
			b.SetBytes(int64(len(text)))
			for b.Loop() {
				if _, err := Prepare([]string{in}, out, opts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

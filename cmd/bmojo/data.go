package main

import (
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tokenizer"
	"github.com/bmojo/bmojo/train"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"go.yaml.in/yaml/v3"
)

// progressMinBytes is the input size from which prepare draws a progress
// bar; below it tokenizing takes well under a second and a bar is noise.
const progressMinBytes = 16 << 20

// sampleTokens is how many tokens of the train split inspect decodes.
const sampleTokens = 64

var (
	prepareOut         string
	prepareValFraction float64
	prepareShardTokens int
	prepareTokenizer   string
	prepareValSplit    string
	prepareJSONLField  string
	prepareStdinJSONL  bool
	prepareWorkers     int

	tokenizeName   string
	tokenizeDecode bool

	dataCmd = &cobra.Command{
		Use:   "data",
		Short: "Prepare, inspect and tokenize token datasets",
	}

	dataPrepareCmd = &cobra.Command{
		Use:   "prepare [--out DIR] [--tokenizer NAME] [--val-fraction F] [--val-split auto|tail|document] [--workers N] INPUT...",
		Short: "Tokenize text (files, directories, globs, .gz, .jsonl, - for stdin) into checksummed train/val shards",
		Long: `Tokenize text into train and validation shards plus a dataset.json
manifest in --out.

An INPUT is a text file, a directory (its .txt, .text, .md, .jsonl and
extension-less files, optionally .gz, recursively, in name order), a glob
pattern, or - for stdin. A name ending in .gz is decompressed; a .jsonl file
holds one document per line in its --jsonl-field. A text file is one
document; with a tokenizer that has an end-of-text id (gpt2) every document
is followed by it.

--tokenizer is bytes (the default), gpt2 (GPT-2's BPE, built in) or the path
of a Hugging Face tokenizer.json (byte-level BPE); the dataset records it,
and training, eval and generate refuse a checkpoint with another.

--val-split tail holds out the last --val-fraction of each file (moved to the
next line start); document holds out whole documents, one in every
1/--val-fraction; auto (the default) is tail when every input is a file
named on the command line and document when any is a directory, a glob or
.jsonl.

Text streams through every core (--workers) with bounded memory, and the
shards are byte-identical whatever the number of workers. Training given no
dataset uses the corpus bundled into the binary instead (see 'bmojo data
inspect bundled').`,
		Args: cobra.MinimumNArgs(1),
		RunE: runDataPrepare,
	}

	dataInspectCmd = &cobra.Command{
		Use:   "inspect DIR|SHARD|bundled",
		Short: "Verify and describe a dataset directory (tokenizer, token counts, a decoded sample), a single shard, or the bundled corpus",
		Args:  cobra.ExactArgs(1),
		RunE:  runDataInspect,
	}

	dataTokenizeCmd = &cobra.Command{
		Use:   "tokenize [--tokenizer NAME] [--decode] TEXT...|IDS...",
		Short: "Print the token ids of TEXT (or, with --decode, the text of IDS)",
		Long: `Print the ids --tokenizer gives TEXT (the arguments joined by spaces, or
stdin when there are none), separated by spaces. "<|endoftext|>" in TEXT is
the end-of-text id. With --decode the arguments (or stdin) are ids,
separated by spaces or commas, and the text is printed.`,
		RunE: runDataTokenize,
	}
)

func init() {
	def := data.DefaultPrepareOptions()
	f := dataPrepareCmd.Flags()
	f.StringVar(&prepareOut, "out", "dataset", "output directory for shards and dataset.json")
	f.StringVar(&prepareTokenizer, "tokenizer", tokenizer.Bytes, "tokenizer: bytes, gpt2, or the path of a Hugging Face tokenizer.json")
	f.Float64Var(&prepareValFraction, "val-fraction", def.ValFraction, "share of the text held out for validation, in [0, 1)")
	f.StringVar(&prepareValSplit, "val-split", def.ValSplit, "how validation text is held out: auto, tail (each file's end) or document (whole documents)")
	f.StringVar(&prepareJSONLField, "jsonl-field", def.JSONLField, "field of .jsonl records that holds the text")
	f.BoolVar(&prepareStdinJSONL, "stdin-jsonl", false, "read the input - as JSON lines (default: one text document)")
	f.IntVar(&prepareWorkers, "workers", 0, "goroutines encoding text (0 = every core); the output does not depend on it")
	f.IntVar(&prepareShardTokens, "shard-tokens", def.ShardTokens, "maximum tokens per shard file")
	t := dataTokenizeCmd.Flags()
	t.StringVar(&tokenizeName, "tokenizer", tokenizer.GPT2, "tokenizer: bytes, gpt2, or the path of a Hugging Face tokenizer.json")
	t.BoolVar(&tokenizeDecode, "decode", false, "the arguments are ids: print their text")
	dataCmd.AddCommand(dataPrepareCmd, dataInspectCmd, dataTokenizeCmd)
	rootCmd.AddCommand(dataCmd)
}

// openTokenizer is tokenizer.New, and the file to copy into a dataset when
// spec names a tokenizer.json.
func openTokenizer(spec string) (tokenizer.Tokenizer, string, error) {
	tok, err := tokenizer.New(spec)
	if err != nil {
		return nil, "", err
	}
	file := ""
	if tok.Name() != tokenizer.Bytes && tok.Name() != tokenizer.GPT2 {
		file = spec
	}
	return tok, file, nil
}

// prepareMemoryLimit is the Go heap limit of `data prepare` (unless
// GOMEMLIMIT sets one): the pipeline's live memory is a few hundred MB
// whatever the input, and the limit keeps garbage from doubling it, so the
// process stays under 1 GiB resident.
const prepareMemoryLimit = 768 << 20

func runDataPrepare(cmd *cobra.Command, args []string) error {
	log := newLogger().Named("data")
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(prepareMemoryLimit)
	}
	tok, tokFile, err := openTokenizer(prepareTokenizer)
	if err != nil {
		return fmt.Errorf("data prepare: --tokenizer: %w", err)
	}
	opts := data.PrepareOptions{
		ValFraction: prepareValFraction, ShardTokens: prepareShardTokens, Tokenizer: tok, TokenizerFile: tokFile,
		ValSplit: prepareValSplit, JSONLField: prepareJSONLField, StdinJSONL: prepareStdinJSONL, Workers: prepareWorkers,
		Stdin: cmd.InOrStdin(),
	}
	if err := opts.Validate(); err != nil {
		return err
	}
	workers := prepareWorkers
	if workers == 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	var bar *progressbar.ProgressBar
	if isTerminal(os.Stderr) {
		opts.Progress = func(done, total int64) {
			if bar == nil && (total < 0 || total >= progressMinBytes) {
				bar = progressbar.DefaultBytes(total, "tokenizing")
			}
			if bar != nil {
				_ = bar.Set64(done)
			}
		}
	}
	start := time.Now()
	var read int64
	inner := opts.Progress
	opts.Progress = func(done, total int64) {
		read = done
		if inner != nil {
			inner(done, total)
		}
	}
	m, err := data.Prepare(args, prepareOut, opts)
	if bar != nil {
		_ = bar.Finish()
	}
	if err != nil {
		return err
	}
	secs := time.Since(start).Seconds()
	var text int64
	for _, s := range m.Sources {
		text += s.Bytes
	}
	log.Info("prepared dataset", "out", prepareOut, "tokenizer", m.Tokenizer, "workers", workers,
		"sources", len(m.Sources), "input_bytes", read, "text_bytes", text, "seconds", math.Round(secs*100)/100,
		"mb_per_s", math.Round(float64(text)/1e6/secs*100)/100,
		"train_tokens", m.Tokens(data.SplitTrain), "train_documents", m.TrainDocs, "train_shards", len(m.Train),
		"val_tokens", m.Tokens(data.SplitVal), "val_documents", m.ValDocs, "val_shards", len(m.Val))
	if m.ValFraction > 0 && len(m.Val) == 0 {
		log.Warn("no validation text: too few documents or lines for --val-fraction", "val_fraction", m.ValFraction, "val_split", m.ValSplit)
	}
	return nil
}

func runDataTokenize(cmd *cobra.Command, args []string) error {
	tok, err := tokenizer.New(tokenizeName)
	if err != nil {
		return fmt.Errorf("data tokenize: --tokenizer: %w", err)
	}
	in := strings.Join(args, " ")
	if len(args) == 0 {
		b, err := io.ReadAll(cmd.InOrStdin())
		if err != nil {
			return fmt.Errorf("data tokenize: stdin: %w", err)
		}
		in = string(b)
	}
	out := cmd.OutOrStdout()
	if tokenizeDecode {
		var ids []int32
		for _, f := range strings.FieldsFunc(in, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' || r == '[' || r == ']' }) {
			v, err := strconv.ParseInt(f, 10, 32)
			if err != nil || v < 0 || int(v) >= tok.VocabSize() {
				return fmt.Errorf("data tokenize: --decode: %q is not an id of %s (0 to %d)", f, tok.Name(), tok.VocabSize()-1)
			}
			ids = append(ids, int32(v))
		}
		_, err := fmt.Fprintln(out, tok.Decode(ids))
		return err
	}
	ids, err := tokenizer.EncodeSpecial(tok, in)
	if err != nil {
		return fmt.Errorf("data tokenize: %w", err)
	}
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = strconv.Itoa(int(id))
	}
	_, err = fmt.Fprintln(out, strings.Join(parts, " "))
	return err
}

// isTerminal reports whether f is a character device, i.e. an interactive
// terminal, so logs redirected to a file do not fill with bar redraws.
func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

func runDataInspect(cmd *cobra.Command, args []string) error {
	target := args[0]
	out := cmd.OutOrStdout()
	if strings.EqualFold(target, "bundled") {
		return inspectBundled(out)
	}
	st, err := os.Stat(target)
	if err != nil {
		return fmt.Errorf("data inspect: %w", err)
	}
	if st.IsDir() {
		return inspectDir(out, target)
	}
	return inspectShard(out, target)
}

func inspectBundled(out io.Writer) error {
	srcs, err := data.BundledSources()
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "source\tbytes\ttrain\tval")
	for _, s := range srcs {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\n", s.Name, s.RawBytes, s.TrainLen, s.RawBytes-s.TrainLen)
	}
	tw.Flush()
	for _, split := range []data.Split{data.SplitTrain, data.SplitVal} {
		ds, err := data.BundledDataset(split)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "%-5s %d tokens (tokenizer bytes, vocab %d), unigram entropy %.4f nats\n",
			split, ds.NumTokens(), ds.Vocab, ds.UnigramEntropy())
	}
	return nil
}

func inspectDir(out io.Writer, dir string) error {
	m, err := data.ReadManifest(dir)
	if err != nil {
		return err
	}
	valSplit := m.ValSplit
	if valSplit == "" {
		valSplit = data.ValSplitTail
	}
	fmt.Fprintf(out, "dataset %s: %s v%d, tokenizer %s, vocab %d (model vocabulary %d), val fraction %g by %s, shard tokens %d\n",
		dir, m.Format, m.FormatVersion, m.Tokenizer, m.Vocab, tokenizer.PadVocab(m.Vocab), m.ValFraction, valSplit, m.ShardTokens)
	if m.EOT != nil {
		fmt.Fprintf(out, "documents: %d train, %d val, each followed by end-of-text id %d\n", m.TrainDocs, m.ValDocs, *m.EOT)
	}
	if len(m.Sources) > 20 {
		var b, tb int64
		for _, s := range m.Sources {
			b, tb = b+s.Bytes, tb+s.TrainBytes
		}
		fmt.Fprintf(out, "sources: %d files, %d bytes of text, %d train, %d val\n", len(m.Sources), b, tb, b-tb)
	}
	for _, s := range m.Sources {
		if len(m.Sources) <= 20 {
			fmt.Fprintf(out, "source %s: %d bytes, %d train, %d val\n", s.File, s.Bytes, s.TrainBytes, s.Bytes-s.TrainBytes)
		}
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "split\tshard\ttokens\tcrc32c\tstatus")
	bad := 0
	var firstErr error
	var sample []int32
	for _, split := range []data.Split{data.SplitTrain, data.SplitVal} {
		var all [][]int32
		for _, info := range m.Shards(split) {
			status := "ok"
			sh, err := data.CheckShard(dir, m, info)
			if err != nil {
				status = "BAD: " + err.Error()
				bad++
				if firstErr == nil {
					firstErr = err
				}
			} else {
				all = append(all, sh.Tokens)
				if sample == nil && split == data.SplitTrain {
					sample = sh.Tokens[:min(sampleTokens, len(sh.Tokens))]
				}
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", split, info.File, info.Tokens, info.CRC32C, status)
		}
		tw.Flush()
		if len(all) > 0 {
			fmt.Fprintf(out, "%s: %d tokens in %d shards, unigram entropy %.4f nats\n",
				split, m.Tokens(split), len(m.Shards(split)), unigramOf(all, m.Vocab))
		}
	}
	if bad > 0 {
		return fmt.Errorf("data inspect: %d shard(s) of %s failed verification; first: %w", bad, dir, firstErr)
	}
	if sample != nil {
		tok, err := data.OpenTokenizer(dir, m)
		if err != nil {
			return fmt.Errorf("data inspect: %w", err)
		}
		fmt.Fprintf(out, "sample (first %d train tokens): %v\n%s\n", len(sample), sample, tok.Decode(sample))
	}
	return nil
}

func unigramOf(shards [][]int32, vocab int) float64 {
	var n int
	for _, s := range shards {
		n += len(s)
	}
	all := make([]int32, 0, n)
	for _, s := range shards {
		all = append(all, s...)
	}
	return data.UnigramEntropy(all, vocab)
}

func inspectShard(out io.Writer, path string) error {
	h, err := data.ReadShardHeader(path)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "shard %s: version %d, vocab %d, token width %d, %d tokens, crc32c %08x\n",
		filepath.Clean(path), h.Version, h.Vocab, h.TokenWidth, h.Count, h.Checksum)
	sh, err := data.ReadShard(path)
	if err != nil {
		fmt.Fprintf(out, "status: BAD\n")
		return err
	}
	fmt.Fprintf(out, "status: ok (checksum and token range verified), unigram entropy %.4f nats\n",
		data.UnigramEntropy(sh.Tokens, int(h.Vocab)))
	return nil
}

// checkpointTokenizer returns the tokenizer name the checkpoint holding
// weightsPath was trained with and its job's dataset directory. A
// checkpoint that records no job is a byte model when its vocabulary is
// 256 and unknown ("") otherwise.
func checkpointTokenizer(weightsPath string, c model.Config) (name, dataDir string, err error) {
	y, err := checkpoint.JobOf(weightsPath)
	if err != nil {
		return "", "", err
	}
	if y == "" {
		if c.VocabSize == tokenizer.ByteVocab {
			return tokenizer.Bytes, "", nil
		}
		return "", "", nil
	}
	// Only the two keys: a full job.Parse would also judge settings (such
	// as threads) against this machine.
	var j struct {
		Tokenizer string `yaml:"tokenizer"`
		Data      string `yaml:"data"`
	}
	if err := yaml.Unmarshal([]byte(y), &j); err != nil {
		return "", "", fmt.Errorf("checkpoint %s: job: %w", weightsPath, err)
	}
	return tokenizer.CanonicalName(j.Tokenizer), j.Data, nil
}

// checkDataTokenizer refuses a dataset tokenized otherwise than the
// checkpoint's model was trained, naming both (cmd is eval or generate).
func checkDataTokenizer(cmd, weightsPath string, c model.Config, ds *data.Dataset) error {
	name, _, err := checkpointTokenizer(weightsPath, c)
	if err != nil {
		return fmt.Errorf("%s: %w", cmd, err)
	}
	if name != "" && ds.Tokenizer != "" && name != ds.Tokenizer {
		return fmt.Errorf("%s: %w: checkpoint %s was trained with tokenizer %s, the dataset %s is tokenized with %s",
			cmd, train.ErrTokenizer, weightsPath, name, ds.Name, ds.Tokenizer)
	}
	return nil
}

// checkpointTokenizerFor opens the tokenizer of the checkpoint holding
// weightsPath: by name when built in; a tokenizer.json from spec (which
// must be the one the checkpoint names) or else from its training
// dataset's copy.
func checkpointTokenizerFor(cmd, weightsPath string, c model.Config, spec string) (tokenizer.Tokenizer, error) {
	name, dataDir, err := checkpointTokenizer(weightsPath, c)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	var tok tokenizer.Tokenizer
	switch {
	case spec != "":
		if tok, err = tokenizer.New(spec); err != nil {
			return nil, fmt.Errorf("%s: --tokenizer: %w", cmd, err)
		}
		if name != "" && tok.Name() != name {
			return nil, fmt.Errorf("%s: %w: checkpoint %s was trained with tokenizer %s, --tokenizer %s is %s",
				cmd, train.ErrTokenizer, weightsPath, name, spec, tok.Name())
		}
	case name == "":
		return nil, fmt.Errorf("%s: checkpoint %s records no tokenizer and its vocabulary (%d) is not the byte tokenizer's; name it with --tokenizer", cmd, weightsPath, c.VocabSize)
	case name == tokenizer.Bytes || name == tokenizer.GPT2:
		if tok, err = tokenizer.New(name); err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
	default:
		m, merr := data.ReadManifest(dataDir)
		if dataDir == "" || merr != nil || m.Tokenizer != name {
			return nil, fmt.Errorf("%s: checkpoint %s was trained with %s, and its dataset %q does not hold that tokenizer.json; give it with --tokenizer", cmd, weightsPath, name, dataDir)
		}
		if tok, err = data.OpenTokenizer(dataDir, m); err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
	}
	if tok.VocabSize() > c.VocabSize {
		return nil, fmt.Errorf("%s: %w: tokenizer %s has %d ids, the model's vocabulary only %d", cmd, train.ErrTokenizer, tok.Name(), tok.VocabSize(), c.VocabSize)
	}
	return tok, nil
}

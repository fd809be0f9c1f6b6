package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/bmojo/bmojo/data"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
)

// progressMinBytes is the input size from which prepare draws a progress
// bar; below it tokenizing takes well under a second and a bar is noise.
const progressMinBytes = 16 << 20

var (
	prepareOut         string
	prepareValFraction float64
	prepareShardTokens int

	dataCmd = &cobra.Command{
		Use:   "data",
		Short: "Prepare and inspect token datasets",
	}

	dataPrepareCmd = &cobra.Command{
		Use:   "prepare [--out DIR] [--val-fraction F] [--shard-tokens N] FILES...",
		Short: "Tokenize text files (byte tokenizer) into checksummed train/val shards",
		Long: `Tokenize text files with the byte tokenizer into train and validation
shards plus a dataset.json manifest in --out. The last --val-fraction of each
file (moved to the next line start) goes to validation, so validation text is
never interleaved with training text. Training given no dataset uses the
corpus bundled into the binary instead (see 'bmojo data inspect bundled').`,
		Args: cobra.MinimumNArgs(1),
		RunE: runDataPrepare,
	}

	dataInspectCmd = &cobra.Command{
		Use:   "inspect DIR|SHARD|bundled",
		Short: "Verify and describe a dataset directory, a single shard, or the bundled corpus",
		Args:  cobra.ExactArgs(1),
		RunE:  runDataInspect,
	}
)

func init() {
	def := data.DefaultPrepareOptions()
	f := dataPrepareCmd.Flags()
	f.StringVar(&prepareOut, "out", "dataset", "output directory for shards and dataset.json")
	f.Float64Var(&prepareValFraction, "val-fraction", def.ValFraction, "share of each input file, from its end, held out for validation, in [0, 1)")
	f.IntVar(&prepareShardTokens, "shard-tokens", def.ShardTokens, "maximum tokens per shard file")
	dataCmd.AddCommand(dataPrepareCmd, dataInspectCmd)
	rootCmd.AddCommand(dataCmd)
}

func runDataPrepare(cmd *cobra.Command, args []string) error {
	log := newLogger().Named("data")
	opts := data.PrepareOptions{ValFraction: prepareValFraction, ShardTokens: prepareShardTokens}
	if err := opts.Validate(); err != nil {
		return err
	}
	var total int64
	for _, a := range args {
		if st, err := os.Stat(a); err == nil {
			total += st.Size()
		}
	}
	var bar *progressbar.ProgressBar
	if total >= progressMinBytes && isTerminal(os.Stderr) {
		bar = progressbar.DefaultBytes(total, "tokenizing")
		opts.Progress = func(done, _ int64) { bar.Set64(done) }
	}
	m, err := data.Prepare(args, prepareOut, opts)
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		return err
	}
	log.Info("prepared dataset", "out", prepareOut, "inputs", len(args), "input_bytes", total,
		"train_tokens", m.Tokens(data.SplitTrain), "train_shards", len(m.Train),
		"val_tokens", m.Tokens(data.SplitVal), "val_shards", len(m.Val))
	return nil
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
		fmt.Fprintf(out, "%-5s %d tokens (byte tokenizer, vocab %d), unigram entropy %.4f nats\n",
			split, ds.NumTokens(), ds.Vocab, ds.UnigramEntropy())
	}
	return nil
}

func inspectDir(out io.Writer, dir string) error {
	m, err := data.ReadManifest(dir)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "dataset %s: %s v%d, tokenizer %s, vocab %d, val fraction %g, shard tokens %d\n",
		dir, m.Format, m.FormatVersion, m.Tokenizer, m.Vocab, m.ValFraction, m.ShardTokens)
	for _, s := range m.Sources {
		fmt.Fprintf(out, "source %s: %d bytes, %d train, %d val\n", s.File, s.Bytes, s.TrainBytes, s.Bytes-s.TrainBytes)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "split\tshard\ttokens\tcrc32c\tstatus")
	bad := 0
	var firstErr error
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

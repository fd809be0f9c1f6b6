package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// resetFlags puts every flag of cmd and its subcommands back to its
// default and unset, so that one test's flags do not leak into the next
// (cobra keeps flag values between Execute calls).
func resetFlags(t *testing.T, cmd *cobra.Command) {
	t.Helper()
	reset := func(f *pflag.Flag) {
		if sv, ok := f.Value.(pflag.SliceValue); ok {
			var vals []string
			if d := strings.Trim(f.DefValue, "[]"); d != "" {
				vals = strings.Split(d, ",")
			}
			if err := sv.Replace(vals); err != nil {
				t.Fatalf("reset --%s: %v", f.Name, err)
			}
		} else if err := f.Value.Set(f.DefValue); err != nil {
			t.Fatalf("reset --%s: %v", f.Name, err)
		}
		f.Changed = false
	}
	cmd.Flags().VisitAll(reset)
	cmd.PersistentFlags().VisitAll(reset)
	for _, c := range cmd.Commands() {
		resetFlags(t, c)
	}
}

// bmojo runs the command line in this process and returns its stdout and
// stderr together. `experiment` runs on a fresh command tree (its slice
// flags cannot be reset: pflag appends to a slice set before), every
// other command on rootCmd with its flags reset.
func bmojo(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := rootCmd
	if args[0] == "experiment" {
		root = &cobra.Command{Use: "bmojo", SilenceUsage: true, SilenceErrors: true}
		root.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level")
		root.AddCommand(newExperimentCmd())
	} else {
		resetFlags(t, rootCmd)
		t.Cleanup(func() { resetFlags(t, rootCmd) })
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, stderr := os.Stdout, os.Stderr
	os.Stdout, os.Stderr = w, w
	done := make(chan string)
	go func() {
		b, _ := io.ReadAll(r)
		done <- string(b)
	}()
	root.SetArgs(args)
	err = root.Execute()
	os.Stdout, os.Stderr = stdout, stderr
	w.Close()
	out := <-done
	r.Close()
	return out, err
}

// TestExperimentMQARCellResumesAndEvalReproduces: a single MQAR cell runs,
// writes mqar.csv/png and a checkpoint; run again it is not recomputed;
// `bmojo eval --task mqar` on its checkpoint prints the accuracy and loss
// the cell recorded.
func TestExperimentMQARCellResumesAndEvalReproduces(t *testing.T) {
	dir := t.TempDir()
	cache, out := filepath.Join(dir, "cells"), filepath.Join(dir, "out")
	args := []string{"experiment", "mqar", "--quick", "--log-level", "error", "--cache", cache, "--out", out,
		"--family", "bmojo", "--d-model", "16", "--train-mix", "16:2:8", "--batch-size", "4", "--test", "16:2",
		"--test-examples", "8", "--seq-len", "32", "--kv", "4", "--probe-steps", "1"}
	got, err := bmojo(t, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, got)
	}
	if !strings.Contains(got, "0 cells cached, 1 to run") {
		t.Fatalf("first run did not plan one cell:\n%s", got)
	}
	var acc, ckpt string
	for _, l := range strings.Split(got, "\n") {
		if strings.Contains(l, "(32,4)") && strings.Contains(l, "<-") {
			acc = strings.Fields(l)[2] + " " + strings.Fields(l)[4]
		}
		if strings.HasPrefix(l, "checkpoint ") {
			ckpt = strings.TrimPrefix(l, "checkpoint ")
		}
	}
	if acc == "" || ckpt == "" {
		t.Fatalf("no accuracy for (32,4) or no checkpoint in:\n%s", got)
	}
	for _, f := range []string{"mqar.csv", "mqar.png"} {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Fatalf("%s: %v", f, err)
		}
	}
	res, err := filepath.Glob(filepath.Join(cache, "*", "result.json"))
	if err != nil || len(res) != 1 {
		t.Fatalf("results in the cache: %v %v", res, err)
	}
	before, _ := os.Stat(res[0])

	got, err = bmojo(t, args...)
	if err != nil {
		t.Fatalf("%v\n%s", err, got)
	}
	if !strings.Contains(got, "1 cells cached, 0 to run") {
		t.Fatalf("second run recomputed the cell:\n%s", got)
	}
	if after, _ := os.Stat(res[0]); !after.ModTime().Equal(before.ModTime()) {
		t.Fatal("second run rewrote the cached result")
	}

	got, err = bmojo(t, "eval", "--task", "mqar", "--log-level", "error", "--device", "cpu", "--checkpoint", ckpt, "--seq-len", "32", "--kv", "4")
	if err != nil {
		t.Fatalf("%v\n%s", err, got)
	}
	var evAcc, evLoss string
	for _, l := range strings.Split(got, "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == "accuracy" {
			evAcc = f[1]
		}
		if len(f) >= 2 && f[0] == "loss" {
			evLoss = f[1]
		}
	}
	if evAcc+" "+evLoss != acc {
		t.Fatalf("eval --task mqar printed accuracy/loss %s %s, the cell recorded %s\n%s", evAcc, evLoss, acc, got)
	}
	if !strings.Contains(got, "test set of cell") {
		t.Fatalf("eval did not use the cell's test set:\n%s", got)
	}
}

// TestExperimentQuick runs the three experiments' --quick mode, as a user
// would, into a temporary directory: a few minutes on a small CPU.
func TestExperimentQuick(t *testing.T) {
	if testing.Short() || os.Getenv("BMOJO_LONG") == "" {
		t.Skip("--quick trains three small models on the CPU, minutes: make experiments-quick (BMOJO_LONG=1) runs it")
	}
	dir := t.TempDir()
	for _, e := range []string{"mqar", "length", "memory"} {
		got, err := bmojo(t, "experiment", e, "--quick", "--log-level", "error", "--cache", filepath.Join(dir, "cells"), "--out", dir)
		if err != nil {
			t.Fatalf("%s --quick: %v\n%s", e, err, got)
		}
		for _, ext := range []string{".csv", ".png"} {
			st, err := os.Stat(filepath.Join(dir, e+ext))
			if err != nil || st.Size() == 0 {
				t.Fatalf("%s --quick wrote no %s%s: %v\n%s", e, e, ext, err, got)
			}
		}
	}
}

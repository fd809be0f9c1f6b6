// Command bmojo trains B'MOJO-family language models data-parallel across
// workers. Each subcommand lives in its own file of this package and adds
// itself to rootCmd (or benchCmd) in an init function.
package main

import (
	"fmt"
	"os"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
)

var (
	logLevel string

	rootCmd = &cobra.Command{
		Use:           "bmojo",
		Short:         "Train B'MOJO language models data-parallel across workers",
		SilenceUsage:  true,
		SilenceErrors: true,
	}

	benchCmd = &cobra.Command{
		Use:   "bench",
		Short: "Benchmarks quoted in the README (allreduce, kernels, step)",
	}
)

func init() {
	rootCmd.PersistentFlags().StringVar(&logLevel, "log-level", "info", "log level: trace, debug, info, warn, error")
	rootCmd.AddCommand(benchCmd)
}

// newLogger builds the root logger; subsystems take Named() children.
func newLogger() hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:   "bmojo",
		Level:  hclog.LevelFromString(logLevel),
		Output: os.Stderr,
	})
}

func main() {
	if err := rootCmd.Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "bmojo: %v\n", err)
		os.Exit(1)
	}
}

// Package testbin builds the bmojo binary for test packages that run real
// processes (the robustness suite, the dashboard's browser test). Nothing
// outside tests imports it.
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"go.uber.org/goleak"

	"github.com/bmojo/bmojo/internal/testleak"
)

// Build compiles cmd/bmojo into a new temporary directory and returns the
// binary's path and a cleanup that removes the directory.
func Build() (path string, cleanup func(), err error) {
	dir, err := os.MkdirTemp("", "bmojo-testbin-")
	if err != nil {
		return "", nil, err
	}
	path = filepath.Join(dir, "bmojo")
	build := exec.Command("go", "build", "-o", path, "github.com/bmojo/bmojo/cmd/bmojo")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("testbin: build bmojo: %w", err)
	}
	return path, func() { os.RemoveAll(dir) }, nil
}

// Main is a TestMain body: it builds the binary into *bin unless skip, runs
// the tests, checks that they left no goroutine running (testleak), and
// exits with their code.
func Main(run func() int, bin *string, skip bool) {
	if skip {
		os.Exit(leakCheck(run()))
	}
	path, cleanup, err := Build()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*bin = path
	code := run()
	cleanup()
	os.Exit(leakCheck(code))
}

// leakCheck returns code, or 1 with goleak's report when tests that passed
// left goroutines running.
func leakCheck(code int) int {
	if code != 0 {
		return code
	}
	if err := goleak.Find(testleak.Options()...); err != nil {
		fmt.Fprintf(os.Stderr, "testbin: goroutines left running after the tests: %v\n", err)
		return 1
	}
	return 0
}

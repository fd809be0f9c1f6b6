// Package golden runs the golden scripts of the project's state machines
// (coordinator/testdata, worker/testdata). A script is a sequence of
// blocks separated by blank lines; in a block, lines starting with "> " are
// commands applied in order, the other lines the output expected after
// them, one per line; lines starting with "#" are comments. Run the test
// with -rewrite to regenerate the expected lines from the code (then read
// the diff). Nothing outside tests imports it.
package golden

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var rewrite = flag.Bool("rewrite", false, "rewrite the expected lines of the golden scripts from the current code")

// A Script is one run of a script: Do applies a command (its fields and
// the whole line, for errors; it fails t itself), Output returns what the
// machine produced since the last call, rendered one line each.
type Script interface {
	Do(fields []string, line string)
	Output() []string
}

// Run runs every dir/*.txt as a subtest, each with a fresh Script.
func Run(t *testing.T, dir string, start func(t *testing.T) Script) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.txt"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts in %s: %v", dir, err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) { runFile(t, f, start(t)) })
	}
}

func runFile(t *testing.T, path string, s Script) {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	blocks := strings.Split(strings.TrimRight(string(b), "\n"), "\n\n")
	for bi, block := range blocks {
		var cmds, want, head []string
		for _, line := range strings.Split(block, "\n") {
			switch {
			case strings.HasPrefix(line, "#"):
				head = append(head, line)
			case strings.HasPrefix(line, "> "):
				cmds = append(cmds, line)
			case strings.TrimSpace(line) != "":
				want = append(want, line)
			}
		}
		for _, c := range cmds {
			s.Do(strings.Fields(strings.TrimPrefix(c, "> ")), c)
		}
		var got []string
		if len(cmds) > 0 {
			got = s.Output()
		}
		if !*rewrite && strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("%s block %d (%s):\ngot:\n%s\nwant:\n%s", path, bi+1, strings.Join(cmds, " | "),
				strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		if bi > 0 {
			out.WriteString("\n")
		}
		for _, l := range append(append(head, cmds...), got...) {
			out.WriteString(l + "\n")
		}
	}
	if *rewrite {
		if err := os.WriteFile(path, []byte(out.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

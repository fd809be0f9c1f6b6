// Package testlog gives tests an hclog.Logger bound to their testing.TB:
// lines go to t.Log, so `go test` shows them with -v or beside a failure,
// under the test that wrote them.
package testlog

import (
	"os"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// New returns a logger named after t at level (hclog.Debug when
// BMOJO_TEST_LOG=debug, else level). Lines written after the test ended
// (from goroutines it did not join) go to stderr instead of panicking in
// t.Log.
func New(t testing.TB, level hclog.Level) hclog.Logger {
	if os.Getenv("BMOJO_TEST_LOG") == "debug" {
		level = hclog.Debug
	}
	w := &writer{t: t}
	t.Cleanup(w.end)
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: level, Output: w})
}

// Writer returns an io.Writer that writes each write as one t.Log line,
// with New's rule for writes after the test.
func Writer(t testing.TB) *writer {
	w := &writer{t: t}
	t.Cleanup(w.end)
	return w
}

type writer struct {
	mu    sync.Mutex
	t     testing.TB
	ended bool
}

func (w *writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ended {
		return os.Stderr.Write(p)
	}
	n := len(p)
	if n > 0 && p[n-1] == '\n' {
		p = p[:n-1]
	}
	w.t.Log(string(p))
	return n, nil
}

func (w *writer) end() {
	w.mu.Lock()
	w.ended = true
	w.mu.Unlock()
}

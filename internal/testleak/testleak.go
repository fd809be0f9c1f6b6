// Package testleak runs go.uber.org/goleak over a test binary with one list
// of the process-wide goroutines that libraries start and never stop, so
// that every package that starts goroutines or processes checks the same
// way. Nothing outside tests imports it.
package testleak

import (
	"flag"
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"
)

// Options are goleak's options for this module: the library goroutines
// that live for the whole process, plus extra.
func Options(extra ...goleak.Option) []goleak.Option {
	return append([]goleak.Option{
		// etcd's server and client import these; each starts one worker
		// per process on first use.
		goleak.IgnoreTopFunction("go.opencensus.io/stats/view.(*worker).start"),
		goleak.IgnoreAnyFunction("google.golang.org/grpc/internal/grpcsync.(*CallbackSerializer).run"),
		// glog/klog's flush daemon (client-go, the launch tests).
		goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
	}, extra...)
}

// Main is a TestMain body: it runs the tests, then fails the binary if a
// goroutine started by them is still running (goleak waits a moment for
// ones that are ending). A fuzzing run (-fuzz) is not checked: its workers
// are other processes, and the fuzzing engine's own goroutines outlive it.
func Main(m *testing.M, extra ...goleak.Option) {
	code := m.Run()
	if code == 0 && !fuzzing() {
		if err := goleak.Find(Options(extra...)...); err != nil {
			fmt.Fprintf(os.Stderr, "testleak: goroutines left running after the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

func fuzzing() bool {
	f := flag.Lookup("test.fuzz")
	return f != nil && f.Value.String() != ""
}

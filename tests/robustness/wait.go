package robustness

import (
	"context"
	"testing"
	"time"
)

// CallTimeout bounds each etcd read a test makes; a wait polls such reads.
const CallTimeout = 5 * time.Second

// WaitFor polls cond every 20 ms until it holds, the deadline d passes (a
// failure), or stop is closed (the caller checks why). Each call of cond
// gets a context with a deadline of CallTimeout and runs in a goroutine of
// its own: a condition blocked past its deadline cannot block the wait.
func WaitFor(t testing.TB, d time.Duration, stop <-chan struct{}, what string, cond func(ctx context.Context) bool) {
	t.Helper()
	end := time.Now().Add(d)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), CallTimeout)
		res := make(chan bool, 1)
		go func() { res <- cond(ctx) }()
		var ok bool
		select {
		case ok = <-res:
		case <-ctx.Done():
			t.Logf("waiting for %s: a check overran its %v deadline", what, CallTimeout)
		case <-stop:
		}
		cancel()
		if ok {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		select {
		case <-stop:
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

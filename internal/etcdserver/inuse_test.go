package etcdserver

import (
	"context"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestPortInUseIsRecognised: a named client port that is taken fails with
// an error that is EADDRINUSE (what Start retries on for ports it picked).
func TestPortInUseIsRecognised(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = Start(ctx, Config{DataDir: t.TempDir(), ClientURL: "http://" + l.Addr().String()})
	if !errors.Is(err, syscall.EADDRINUSE) || !errors.Is(err, ErrStart) {
		t.Fatalf("start on a taken port: %v, want ErrStart wrapping EADDRINUSE", err)
	}
}

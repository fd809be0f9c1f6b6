package allreduce

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/testleak"
)

const helperEnv = "BMOJO_ALLREDUCE_TEST_HELPER"

// TestMain lets the test binary double as a ring rank in a separate
// process, which TestKillRank kills with SIGKILL.
func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "1" {
		if err := helperRank(os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stdout, "ERR", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	testleak.Main(m)
}

// helperRank: prints "ADDR host:port", reads "RANK r PEERS a,b,...
// TRANSPORT t", then all-reduces forever, printing "OP k" after each
// collective.
func helperRank(in io.Reader, out io.Writer) error {
	lis, addrs := listenersNoT(1)
	fmt.Fprintln(out, "ADDR", addrs[0])
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil {
		return err
	}
	f := strings.Fields(line)
	if len(f) != 6 || f[0] != "RANK" || f[2] != "PEERS" || f[4] != "TRANSPORT" {
		return fmt.Errorf("bad command %q", line)
	}
	rank, _ := strconv.Atoi(f[1])
	c := killTestConfig()
	c.Rank, c.Peers, c.Epoch, c.Transport = rank, strings.Split(f[3], ","), 5, f[5]
	r, err := New(c, lis[0])
	if err != nil {
		return err
	}
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.Connect(ctx); err != nil {
		return err
	}
	buf := make([]float32, killTestLen)
	for k := 1; ; k++ {
		if err := r.AllReduce(ctx, buf, Sum); err != nil {
			return err
		}
		fmt.Fprintln(out, "OP", k)
	}
}

const killTestLen = 1 << 20

func killTestConfig() Config {
	c := testConfig()
	c.ChunkBytes = 64 << 10
	c.HopTimeout = 3 * time.Second
	return c
}

// TestKillRank: SIGKILL one rank (a real process) mid-collective; every
// other rank fails within the hop deadline with an error naming it. On the
// shared-memory path the victim's neighbours learn of it from the gRPC
// control stream breaking.
func TestKillRank(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a subprocess")
	}
	checkNoLeaks(t)
	forTransports(t, testKillRank)
}

func testKillRank(t *testing.T, transport string) {
	if raceEnabled && transport == TransportAuto {
		// Ranks 1 → 2 → 3 hand chunks on through the child's shared
		// memory; the race detector cannot see that ordering and reports
		// the ring's own hand-offs (see shm_race.go).
		t.Skip("the race detector cannot follow synchronisation through another process's shared memory")
	}
	const n, victim = 4, 2
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	lines := make(chan string, 1024)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	next := func() string {
		select {
		case l := <-lines:
			return l
		case <-ctx.Done():
			t.Fatal("helper said nothing")
		}
		return ""
	}
	addrLine := next()
	if !strings.HasPrefix(addrLine, "ADDR ") {
		t.Fatalf("helper: %q", addrLine)
	}
	lis, addrs := listeners(t, n)
	addrs[victim] = strings.TrimPrefix(addrLine, "ADDR ")
	_ = lis[victim].Close()
	fmt.Fprintf(stdin, "RANK %d PEERS %s TRANSPORT %s\n", victim, strings.Join(addrs, ","), transport)

	var rings []*Ring
	for i := 0; i < n; i++ {
		if i == victim {
			rings = append(rings, nil)
			continue
		}
		c := killTestConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger, c.Transport = i, addrs, 5, testLogger(t), transport
		r, err := New(c, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		rings = append(rings, r)
	}
	errs := make([]error, n)
	failedAt := make([]time.Time, n)
	var wg sync.WaitGroup
	for i, r := range rings {
		if r == nil {
			continue
		}
		wg.Add(1)
		go func(i int, r *Ring) {
			defer wg.Done()
			if errs[i] = r.Connect(ctx); errs[i] != nil {
				return
			}
			buf := make([]float32, killTestLen)
			for errs[i] == nil {
				errs[i] = r.AllReduce(ctx, buf, Sum)
			}
			failedAt[i] = time.Now()
		}(i, r)
	}
	// Kill once the victim is well into its run of collectives.
	for l := next(); l != "OP 3"; l = next() {
		if strings.HasPrefix(l, "ERR") {
			t.Fatalf("helper: %s", l)
		}
	}
	want := TransportGRPC
	if transport == TransportAuto && hostIdentity() != "" {
		want = TransportShm
	}
	if transport == TransportSocket {
		want = TransportSocket
	}
	if out, _ := rings[victim-1].Transport(); out != want {
		t.Errorf("hop to the victim uses %q, want %q", out, want)
	}
	if _, in := rings[victim+1].Transport(); in != want {
		t.Errorf("hop from the victim uses %q, want %q", in, want)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()
	wg.Wait()
	// Nothing of the victim's is left in the shared-memory directory: the
	// files lose their names during the handshake.
	if left, _ := filepath.Glob(filepath.Join(shmDir(), fmt.Sprintf("%s%d-*", shmNamePrefix, cmd.Process.Pid))); len(left) > 0 {
		t.Errorf("the killed rank left %v behind", left)
	}
	for i := range rings {
		if rings[i] == nil {
			continue
		}
		var pe *PeerError
		if !errors.As(errs[i], &pe) || pe.Rank != victim {
			t.Errorf("rank %d: err = %v, want a PeerError naming rank %d", i, errs[i], victim)
			continue
		}
		el := failedAt[i].Sub(killedAt)
		if el > killTestConfig().HopTimeout {
			t.Errorf("rank %d failed %v after the kill, past the %v deadline", i, el, killTestConfig().HopTimeout)
		}
		t.Logf("rank %d failed %v after the kill: %v", i, el.Round(time.Millisecond), errs[i])
	}
}

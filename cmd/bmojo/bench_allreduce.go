package main

import (
	"bufio"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/internal/pki"
)

// benchAllreduceFlags are shared by the launcher and the hidden per-rank command.
type benchAllreduceFlags struct {
	ranks      int
	size       string
	sizes      string
	bf16       bool
	iters      int
	streams    int
	chunk      string
	window     string
	rbuf, wbuf string
	hopTimeout time.Duration
	cpuProfile string
	procs      int
	unix       bool
	transport  string
	shmQueues  int
	shmSlots   int
	tls        bool
	tlsDir     string // the rank command's: where the launcher put rank-<i> certificates
}

func (f *benchAllreduceFlags) register(c *cobra.Command) {
	d := allreduce.Default()
	c.Flags().IntVar(&f.ranks, "ranks", 4, "number of ranks (separate processes on loopback)")
	c.Flags().StringVar(&f.size, "size", "256MiB", "largest buffer of the sweep (bytes of float32; suffixes KiB, MiB, GiB)")
	c.Flags().StringVar(&f.sizes, "sizes", "sweep", `"sweep" (1 MiB doubling up to --size) or a comma-separated list of sizes`)
	c.Flags().BoolVar(&f.bf16, "bf16", false, "send bfloat16 on the wire (accumulate in float32)")
	c.Flags().IntVar(&f.iters, "iters", 0, "timed iterations per size (0: about 1 GiB of traffic per size, 3..50)")
	c.Flags().IntVar(&f.streams, "streams", d.Streams, "TCP connections (gRPC streams) per ring neighbour")
	c.Flags().StringVar(&f.chunk, "chunk", strconv.Itoa(d.ChunkBytes), "pipelining chunk in bytes")
	c.Flags().StringVar(&f.window, "window", strconv.Itoa(int(d.WindowBytes)), "HTTP/2 flow-control window in bytes")
	c.Flags().StringVar(&f.rbuf, "rbuf", strconv.Itoa(d.ReadBufferBytes), "gRPC read buffer per connection in bytes (0: unbuffered)")
	c.Flags().StringVar(&f.wbuf, "wbuf", strconv.Itoa(d.WriteBufferBytes), "gRPC write buffer per connection in bytes (0: unbuffered)")
	c.Flags().DurationVar(&f.hopTimeout, "hop-timeout", 30*time.Second, "per-hop deadline")
	c.Flags().StringVar(&f.cpuProfile, "cpuprofile", "", "write rank 0's CPU profile to this file")
	c.Flags().IntVar(&f.procs, "procs", 0, "GOMAXPROCS of each rank process (0: Go's default, all CPUs)")
	c.Flags().BoolVar(&f.unix, "unix", false, "connect the ranks over Unix sockets instead of loopback TCP")
	c.Flags().StringVar(&f.transport, "transport", d.Transport, `data path between ranks: "auto" (shared memory between ranks on one host, gRPC otherwise) or "grpc"`)
	c.Flags().IntVar(&f.shmQueues, "shm-queues", d.ShmQueues, "shared-memory slot rings per neighbour (the same-host path's parallelism)")
	c.Flags().IntVar(&f.shmSlots, "shm-slots", d.ShmSlots, "chunk-sized slots per shared-memory ring")
	c.Flags().BoolVar(&f.tls, "tls", false, "mutual TLS with each rank's certificate checked against its slot, as training runs it (a job CA made for the run)")
}

func (f *benchAllreduceFlags) sizeList() ([]int, error) {
	maxSize, err := parseBytes(f.size)
	if err != nil {
		return nil, fmt.Errorf("--size: %w", err)
	}
	if f.sizes == "" || f.sizes == "sweep" {
		var out []int
		for s := 1 << 20; s <= maxSize; s *= 2 {
			out = append(out, s)
		}
		if len(out) == 0 {
			out = []int{maxSize}
		}
		return out, nil
	}
	var out []int
	for _, p := range strings.Split(f.sizes, ",") {
		s, err := parseBytes(p)
		if err != nil {
			return nil, fmt.Errorf("--sizes: %w", err)
		}
		out = append(out, s)
	}
	return out, nil
}

func (f *benchAllreduceFlags) config() (allreduce.Config, error) {
	c := allreduce.Default()
	var err error
	if c.ChunkBytes, err = parseBytes(f.chunk); err != nil {
		return c, fmt.Errorf("--chunk: %w", err)
	}
	w, err := parseBytes(f.window)
	if err != nil || w > math.MaxInt32 {
		return c, fmt.Errorf("--window %q: must be a size below 2 GiB", f.window)
	}
	c.WindowBytes = int32(w)
	bufFlag := func(name, v string) (int, error) {
		if v == "0" || v == "-1" {
			return -1, nil
		}
		n, err := parseBytes(v)
		if err != nil {
			return 0, fmt.Errorf("--%s: %w", name, err)
		}
		return n, nil
	}
	if c.ReadBufferBytes, err = bufFlag("rbuf", f.rbuf); err != nil {
		return c, err
	}
	if c.WriteBufferBytes, err = bufFlag("wbuf", f.wbuf); err != nil {
		return c, err
	}
	c.Streams, c.WireBF16, c.HopTimeout = f.streams, f.bf16, f.hopTimeout
	c.Transport, c.ShmQueues, c.ShmSlots = f.transport, f.shmQueues, f.shmSlots
	v := c
	v.Peers = []string{"-"} // the launcher checks the flags before it knows the peers
	return c, v.Validate()
}

func parseBytes(s string) (int, error) {
	s = strings.TrimSpace(s)
	mult := 1
	for _, u := range []struct {
		suf string
		m   int
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(s, u.suf) {
			s, mult = strings.TrimSuffix(s, u.suf), u.m
			break
		}
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("bad size %q (want e.g. 4096, 1MiB, 1GiB)", s)
	}
	return v * mult, nil
}

func fmtBytes(b int) string {
	switch {
	case b >= 1<<30 && b%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", b>>30)
	case b >= 1<<20 && b%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", b>>20)
	case b >= 1<<10 && b%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", b>>10)
	}
	return fmt.Sprintf("%dB", b)
}

func fmtBuf(b int) string {
	if b < 0 {
		return "off"
	}
	return fmtBytes(b)
}

func itersFor(size, fixed int) int {
	if fixed > 0 {
		return fixed
	}
	return min(50, max(3, (1<<30)/size))
}

func init() {
	var f benchAllreduceFlags
	launch := &cobra.Command{
		Use:   "allreduce",
		Short: "Ring all-reduce bandwidth: N rank processes on loopback, sizes 1 MiB up to --size",
		Long: `Starts --ranks separate processes on loopback that form one ring and all-reduce
float32 buffers of each size. Prints, per size, the slowest rank's mean time,
algbw = size/time and busbw = algbw * 2(N-1)/N (the nccl-tests definitions,
GB = 1e9 bytes), then the latency at 1 MiB. With --transport auto (the
default) the ranks, all on this host, move data through shared memory and use
gRPC only as the control plane; --transport grpc measures the gRPC streams.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBenchAllreduce(cmd.Context(), &f, cmd.OutOrStdout())
		},
	}
	f.register(launch)

	var rf benchAllreduceFlags
	var rank int
	var peers string
	rankCmd := &cobra.Command{
		Use:    "allreduce-rank",
		Short:  "one rank of bench allreduce (started by it; listener on fd 3)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBenchAllreduceRank(cmd.Context(), &rf, rank, strings.Split(peers, ","), cmd.OutOrStdout())
		},
	}
	rf.register(rankCmd)
	rankCmd.Flags().IntVar(&rank, "rank", 0, "this rank")
	rankCmd.Flags().StringVar(&peers, "peers", "", "comma-separated addresses of all ranks")
	rankCmd.Flags().StringVar(&rf.tlsDir, "tls-dir", "", "with --tls: the directory of the ranks' certificates")
	benchCmd.AddCommand(launch, rankCmd)
}

// runBenchAllreduce opens one loopback listener per rank (so every address is
// known before any process starts), hands each to a child process as fd 3,
// collects their timings and prints the table.
func runBenchAllreduce(ctx context.Context, f *benchAllreduceFlags, out io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	sizes, err := f.sizeList()
	if err != nil {
		return err
	}
	cfg, err := f.config()
	if err != nil {
		return err
	}
	if f.ranks < 1 {
		return fmt.Errorf("--ranks %d: need at least 1", f.ranks)
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("bench allreduce: find own binary: %w", err)
	}
	files := make([]*os.File, f.ranks)
	addrs := make([]string, f.ranks)
	sockDir := ""
	if f.unix {
		if sockDir, err = os.MkdirTemp("", "bmojo-bench-"); err != nil {
			return fmt.Errorf("bench allreduce: %w", err)
		}
		defer os.RemoveAll(sockDir)
	}
	for i := range files {
		var l net.Listener
		if f.unix {
			path := fmt.Sprintf("%s/rank%d.sock", sockDir, i)
			l, err = net.Listen("unix", path)
			addrs[i] = "unix:" + path
		} else {
			l, err = net.Listen("tcp", "127.0.0.1:0")
		}
		if err != nil {
			return fmt.Errorf("bench allreduce: listen for rank %d: %w", i, err)
		}
		switch tl := l.(type) {
		case *net.TCPListener:
			addrs[i] = l.Addr().String()
			files[i], err = tl.File()
		case *net.UnixListener:
			tl.SetUnlinkOnClose(false) // the child serves on it
			files[i], err = tl.File()
		}
		_ = l.Close()
		if err != nil {
			return fmt.Errorf("bench allreduce: listener fd for rank %d: %w", i, err)
		}
	}

	tlsDir := ""
	if f.tls {
		if tlsDir, err = benchIdentities(f.ranks); err != nil {
			return err
		}
		defer os.RemoveAll(tlsDir)
	}

	type result struct {
		size, iters   int
		mean, minimum time.Duration
	}
	var mu sync.Mutex
	results := map[int][]result{} // size -> per rank
	hops := map[string]int{}      // data path -> ranks sending over it
	var wg sync.WaitGroup
	errs := make([]error, f.ranks)
	cmds := make([]*exec.Cmd, f.ranks)
	for i := 0; i < f.ranks; i++ {
		args := []string{"bench", "allreduce-rank", "--rank", strconv.Itoa(i), "--peers", strings.Join(addrs, ","),
			"--ranks", strconv.Itoa(f.ranks), "--size", f.size, "--sizes", f.sizes, "--iters", strconv.Itoa(f.iters),
			"--streams", strconv.Itoa(f.streams), "--chunk", f.chunk, "--window", f.window, "--rbuf", f.rbuf, "--wbuf", f.wbuf,
			"--hop-timeout", f.hopTimeout.String(), "--log-level", logLevel,
			"--transport", f.transport, "--shm-queues", strconv.Itoa(f.shmQueues), "--shm-slots", strconv.Itoa(f.shmSlots)}
		if f.cpuProfile != "" && i == 0 {
			args = append(args, "--cpuprofile", f.cpuProfile)
		}
		if f.bf16 {
			args = append(args, "--bf16")
		}
		if f.tls {
			args = append(args, "--tls", "--tls-dir", tlsDir)
		}
		c := exec.CommandContext(ctx, exe, args...)
		c.ExtraFiles = []*os.File{files[i]}
		if f.procs > 0 {
			c.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(f.procs))
		}
		c.Stderr = os.Stderr
		stdout, err := c.StdoutPipe()
		if err != nil {
			return err
		}
		if err := c.Start(); err != nil {
			return fmt.Errorf("bench allreduce: start rank %d: %w", i, err)
		}
		_ = files[i].Close()
		cmds[i] = c
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				var hop string
				if _, err := fmt.Sscanf(sc.Text(), "TRANSPORT %s", &hop); err == nil {
					mu.Lock()
					hops[hop]++
					mu.Unlock()
					continue
				}
				var r result
				var meanNs, minNs int64
				if _, err := fmt.Sscanf(sc.Text(), "RESULT %d %d %d %d", &r.size, &r.iters, &meanNs, &minNs); err == nil {
					r.mean, r.minimum = time.Duration(meanNs), time.Duration(minNs)
					mu.Lock()
					results[r.size] = append(results[r.size], r)
					mu.Unlock()
				}
			}
			if err := c.Wait(); err != nil {
				errs[i] = fmt.Errorf("rank %d: %w", i, err)
			}
		}(i)
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("bench allreduce: %w", err)
	}
	// Say what was measured: how each hop actually carried its data.
	var paths []string
	for hop, k := range hops {
		paths = append(paths, fmt.Sprintf("%d via %s", k, hop))
	}
	sort.Strings(paths)
	how := "data and control over gRPC on " + map[bool]string{false: "loopback TCP", true: "Unix sockets"}[f.unix]
	if hops[allreduce.TransportShm] == f.ranks && f.ranks > 1 {
		how = "data over shared memory, control over gRPC on " + map[bool]string{false: "loopback TCP", true: "Unix sockets"}[f.unix]
	}
	if f.tls {
		how += ", gRPC under mutual TLS with slot identities"
	}
	fmt.Fprintf(out, "# bmojo ring all-reduce: %d ranks (processes) on one host, %s, float32 buffers, wire %s\n",
		f.ranks, how, map[bool]string{false: "float32", true: "bf16"}[f.bf16])
	fmt.Fprintf(out, "# transport %s: hops %s; chunk %s; grpc: streams/neighbour %d, window %s, read buffer %s, write buffer %s; shm: queues/neighbour %d, slots/queue %d\n",
		f.transport, strings.Join(paths, ", "), fmtBytes(cfg.ChunkBytes), cfg.Streams, fmtBytes(int(cfg.WindowBytes)), fmtBuf(cfg.ReadBufferBytes), fmtBuf(cfg.WriteBufferBytes), cfg.ShmQueues, cfg.ShmSlots)
	n := float64(f.ranks)
	fmt.Fprintf(out, "%12s %12s %6s %12s %12s %10s %10s\n", "size", "count", "iters", "time(us)", "min(us)", "algbw(GB/s)", "busbw(GB/s)")
	sort.Ints(sizes)
	for _, s := range sizes {
		rs := results[s]
		if len(rs) != f.ranks {
			return fmt.Errorf("bench allreduce: %d of %d ranks reported size %s", len(rs), f.ranks, fmtBytes(s))
		}
		// The collective is as slow as its slowest rank.
		var mean, mn time.Duration
		for _, r := range rs {
			mean = max(mean, r.mean)
			mn = max(mn, r.minimum)
		}
		alg := float64(s) / mean.Seconds() / 1e9
		fmt.Fprintf(out, "%12s %12d %6d %12.1f %12.1f %10.3f %10.3f\n", fmtBytes(s), s/4, rs[0].iters,
			float64(mean.Nanoseconds())/1e3, float64(mn.Nanoseconds())/1e3, alg, alg*2*(n-1)/n)
	}
	if rs, ok := results[1<<20]; ok {
		var mean, mn time.Duration
		for _, r := range rs {
			mean, mn = max(mean, r.mean), max(mn, r.minimum)
		}
		fmt.Fprintf(out, "# latency at 1MiB: mean %.1f us, best %.1f us\n", float64(mean.Nanoseconds())/1e3, float64(mn.Nanoseconds())/1e3)
	}
	return nil
}

func runBenchAllreduceRank(ctx context.Context, f *benchAllreduceFlags, rank int, peers []string, out io.Writer) error {
	if ctx == nil {
		ctx = context.Background()
	}
	sizes, err := f.sizeList()
	if err != nil {
		return err
	}
	cfg, err := f.config()
	if err != nil {
		return err
	}
	cfg.Rank, cfg.Peers, cfg.Epoch = rank, peers, 1
	cfg.Logger = newLogger().With("rank", rank)
	if f.tls {
		creds, err := benchRankFiles(f.tlsDir, rank).Load()
		if err != nil {
			return fmt.Errorf("rank %d: %w", rank, err)
		}
		cfg.ServerTLS, cfg.ClientTLS = creds.Server(), creds.Client()
		cfg.VerifyPeer = func(r int, cert *x509.Certificate) error {
			return pki.Check(cert, pki.RoleWorker, fmt.Sprintf("rank-%d", r))
		}
	}
	var lis net.Listener
	if len(peers) > 1 {
		lf := os.NewFile(3, "listener")
		if lis, err = net.FileListener(lf); err != nil {
			return fmt.Errorf("rank %d: listener from fd 3: %w", rank, err)
		}
		_ = lf.Close()
	}
	ring, err := allreduce.New(cfg, lis)
	if err != nil {
		return err
	}
	defer ring.Close()
	if f.cpuProfile != "" {
		pf, err := os.Create(f.cpuProfile)
		if err != nil {
			return fmt.Errorf("rank %d: --cpuprofile: %w", rank, err)
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return fmt.Errorf("rank %d: --cpuprofile: %w", rank, err)
		}
		defer pprof.StopCPUProfile()
	}
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := ring.Connect(cctx); err != nil {
		return err
	}
	if len(peers) > 1 {
		toSucc, _ := ring.Transport()
		fmt.Fprintf(out, "TRANSPORT %s\n", toSucc)
	}
	maxSize := 0
	for _, s := range sizes {
		maxSize = max(maxSize, s)
	}
	all := make([]float32, maxSize/4)
	for i := range all {
		all[i] = float32(i%7) * 0.25
	}
	w := bufio.NewWriter(out)
	defer w.Flush()
	for _, s := range sizes {
		buf := all[:s/4]
		iters := itersFor(s, f.iters)
		// Warm-up; its completion also lines the ranks up for the timed loop.
		for i := 0; i < 2; i++ {
			if err := ring.AllReduce(ctx, buf, allreduce.Sum); err != nil {
				return err
			}
		}
		var total, best time.Duration
		for i := 0; i < iters; i++ {
			t0 := time.Now()
			if err := ring.AllReduce(ctx, buf, allreduce.Sum); err != nil {
				return err
			}
			d := time.Since(t0)
			total += d
			if best == 0 || d < best {
				best = d
			}
		}
		fmt.Fprintf(w, "RESULT %d %d %d %d\n", s, iters, (total / time.Duration(iters)).Nanoseconds(), best.Nanoseconds())
		_ = w.Flush()
	}
	// Leave together: a rank that exits while others still send would look
	// like a failure to them.
	return ring.AllReduce(ctx, all[:1], allreduce.Sum)
}

// benchIdentities makes a job CA and a certificate per rank (rank-<i>) in a
// new directory, as a training run's launcher does for its workers.
func benchIdentities(ranks int) (string, error) {
	ca, err := pki.NewCA("bmojo bench", 24*time.Hour)
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "bmojo-bench-pki-")
	if err != nil {
		return "", fmt.Errorf("bench allreduce: %w", err)
	}
	for i := range ranks {
		id := fmt.Sprintf("rank-%d", i)
		leaf, err := ca.Issue(pki.RoleWorker, id, nil, 24*time.Hour)
		if err == nil {
			_, err = pki.Write(dir, id, ca.PEM, leaf)
		}
		if err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("bench allreduce: %w", err)
		}
	}
	return dir, nil
}

// benchRankFiles are rank's files in a benchIdentities directory.
func benchRankFiles(dir string, rank int) pki.Files {
	id := fmt.Sprintf("rank-%d", rank)
	return pki.Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, id+".pem"), Key: filepath.Join(dir, id+"-key.pem")}
}

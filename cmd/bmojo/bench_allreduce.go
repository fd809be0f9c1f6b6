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
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cuda"
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
	gpus       int // --transport cuda-ipc: rank r runs on GPU r % gpus
	tls        bool
	tlsDir     string // the rank command's: where the launcher put rank-<i> certificates
	reference  string
	repeat     int
	hosts      string
	wrap       string
	listenSelf bool // the rank command's: listen on its own --peers address, not fd 3
	perHost    int  // ranks per host: hierarchical (allreduce.Hier) when > 0
	// The rank command's, with perHost: its ring across hosts (its rank
	// there and every rank's address); --rank and --peers are then its
	// host's local ring.
	crossRank  int
	crossPeers string
}

// benchTransportTCP is the plain-TCP reference ring (allreduce.TCPRing).
const benchTransportTCP = "tcp"

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
	c.Flags().StringVar(&f.transport, "transport", d.Transport, `data path between ranks: "auto" (shared memory between ranks on one host, gRPC otherwise), "grpc" (gRPC streams), "socket" (plain data sockets negotiated over gRPC, the path between hosts), "cuda-ipc" (buffers in GPU memory, moved GPU to GPU through CUDA IPC; needs a -tags cuda build), or "tcp" (the reference: the same ring over plain TCP connections, no gRPC, no TLS)`)
	c.Flags().IntVar(&f.gpus, "gpus", 1, "with --transport cuda-ipc: GPUs to spread the ranks over (rank r on GPU r % gpus; 1: every rank on GPU 0)")
	c.Flags().StringVar(&f.reference, "reference", "", `also measure this transport ("tcp"), alternating runs with --transport, and print the busbw ratio`)
	c.Flags().IntVar(&f.repeat, "repeat", 1, "launch the ranks this many times (alternating with --reference) and report the median run")
	c.Flags().StringVar(&f.hosts, "hosts", "", "comma-separated host:port each rank listens on (default: loopback ports picked by the launcher)")
	c.Flags().IntVar(&f.perHost, "per-host", 0, `hierarchical all-reduce (allreduce.Hier) with this many consecutive ranks per host: shared memory inside a host, --transport across hosts; ranks of one host share --wrap's {host}`)
	c.Flags().StringVar(&f.wrap, "wrap", "", `command prefix each rank process is started under, {rank} replaced by its rank (e.g. "ip netns exec bmojo-ns{rank}"; {host} is the rank's host with --per-host; see scripts/netns-ring.sh)`)
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
	if f.transport == allreduce.TransportCUDAIPC {
		if f.bf16 {
			return c, fmt.Errorf("--transport cuda-ipc reduces float32 on the GPU: no --bf16")
		}
		if f.gpus < 1 {
			return c, fmt.Errorf("--gpus %d: need at least 1", f.gpus)
		}
		v.Transport = allreduce.TransportAuto // the rank sets Device; the launcher has none
	}
	if f.transport == benchTransportTCP {
		if f.tls {
			return c, fmt.Errorf("--transport tcp is the plain-TCP reference: it has no TLS (use --transport grpc --tls --reference tcp)")
		}
		c.Transport = allreduce.TransportGRPC // the reference ring ignores it
		v.Transport = c.Transport
	}
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
gRPC only as the control plane; --transport grpc measures the gRPC streams;
--transport socket the data sockets that gRPC negotiates (gRPC stays the
control plane; TLS inside them with --tls); --transport cuda-ipc keeps the
buffers in GPU memory (a -tags cuda build; rank r on GPU r % --gpus) and
moves chunks GPU to GPU through CUDA IPC, reducing them on the GPU;
--transport tcp measures the reference: the same ring schedule, chunks and
connections over plain TCP sockets (no gRPC, no TLS).

The "# cpu(ms)" line is the CPU time (user + system) of all rank processes
per collective: on a machine shared with other work it says more than the
wall-clock figures. --reference tcp runs the reference alternately with
--transport and prints the busbw ratio; --repeat R launches both R times and
reports the median run. --hosts and --wrap start each rank elsewhere, e.g. in
its own network namespace (scripts/netns-ring.sh).`,
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
	rankCmd.Flags().BoolVar(&rf.listenSelf, "listen-self", false, "listen on this rank's --peers address instead of the listener on fd 3")
	rankCmd.Flags().IntVar(&rf.crossRank, "cross-rank", 0, "with --per-host: this rank's rank in its ring across hosts")
	rankCmd.Flags().StringVar(&rf.crossPeers, "cross-peers", "", "with --per-host: comma-separated addresses of that ring (the listener on fd 3, or --listen-self)")
	benchCmd.AddCommand(launch, rankCmd)
}

// arBenchResult is one rank's timing of one size.
type arBenchResult struct {
	size, iters   int
	mean, minimum time.Duration
	cpu           time.Duration // the rank process's CPU time (user+system) per collective
}

// arBenchRun is one launch of the ranks: per size every rank's result, and
// how many ranks sent over each data path.
type arBenchRun struct {
	results map[int][]arBenchResult
	hops    map[string]int
}

// slowest is the collective's time at size s: the slowest rank's mean and
// best (the collective is as slow as its slowest rank).
func (r arBenchRun) slowest(s int) (mean, best, cpu time.Duration) {
	for _, x := range r.results[s] {
		mean, best = max(mean, x.mean), max(best, x.minimum)
		cpu += x.cpu
	}
	return mean, best, cpu
}

// processCPU is this process's CPU time so far, user plus system.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runBenchAllreduce launches the ranks --repeat times (alternating with the
// --reference transport, so both see the same machine load), then prints
// per size the median over the runs, and the ratio to the reference.
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
	if f.reference != "" && f.reference != benchTransportTCP {
		return fmt.Errorf("--reference %q: only %q", f.reference, benchTransportTCP)
	}
	if f.repeat < 1 {
		return fmt.Errorf("--repeat %d: need at least 1", f.repeat)
	}
	if f.perHost < 0 || (f.perHost > 0 && f.ranks%f.perHost != 0) {
		return fmt.Errorf("--per-host %d: must divide --ranks %d", f.perHost, f.ranks)
	}
	if f.perHost > 0 && (f.reference != "" || f.transport == benchTransportTCP || f.unix) {
		return fmt.Errorf("--per-host: the hierarchical all-reduce runs on gRPC rings (no --transport tcp, --reference or --unix)")
	}
	if f.transport == allreduce.TransportCUDAIPC {
		if !cuda.Built {
			return fmt.Errorf("--transport cuda-ipc: this bmojo was built without CUDA; build it with -tags cuda,kustomize_disable_go_plugin_support (or -tags cuda,cudaemu for the CPU emulation)")
		}
		if f.perHost > 0 {
			return fmt.Errorf("--transport cuda-ipc: no --per-host (the hierarchical all-reduce reduces host buffers)")
		}
	}
	var hosts []string
	if f.hosts != "" {
		if hosts = strings.Split(f.hosts, ","); len(hosts) != f.ranks {
			return fmt.Errorf("--hosts lists %d addresses for %d ranks", len(hosts), f.ranks)
		}
	}
	tlsDir := ""
	if f.tls {
		if tlsDir, err = benchIdentities(f.ranks); err != nil {
			return err
		}
		defer os.RemoveAll(tlsDir)
	}
	var runs, refs []arBenchRun
	for i := 0; i < f.repeat; i++ {
		r, err := launchBenchRanks(ctx, f, f.transport, hosts, tlsDir)
		if err != nil {
			return err
		}
		runs = append(runs, r)
		if f.reference != "" {
			r, err := launchBenchRanks(ctx, f, f.reference, hosts, tlsDir)
			if err != nil {
				return fmt.Errorf("reference %s: %w", f.reference, err)
			}
			refs = append(refs, r)
		}
	}
	sort.Ints(sizes)
	where := "on one host"
	link := map[bool]string{false: "loopback TCP", true: "Unix sockets"}[f.unix]
	if hosts != nil {
		where, link = "at "+f.hosts, "TCP"
		if f.wrap != "" {
			where += " (each started under " + strconv.Quote(f.wrap) + ")"
		}
	}
	// Say what was measured: how each hop actually carried its data.
	var paths []string
	for hop, k := range runs[0].hops {
		paths = append(paths, fmt.Sprintf("%d via %s", k, hop))
	}
	sort.Strings(paths)
	how := "data and control over gRPC on " + link
	switch {
	case f.transport == benchTransportTCP:
		how = "data over plain TCP connections (reference ring: no gRPC, no TLS) on " + link
	case f.perHost > 0:
		how = fmt.Sprintf("hierarchical (allreduce.Hier): %d hosts × %d ranks, inside a host over its local ring (Unix-socket control), across hosts over --transport %s on %s",
			f.ranks/f.perHost, f.perHost, f.transport, link)
	case f.transport == allreduce.TransportCUDAIPC:
		how = fmt.Sprintf("float32 buffers in GPU memory (%d GPU(s)%s), data GPU to GPU over CUDA IPC where both ends could map it (else host shared memory or gRPC, see hops), control over gRPC on %s",
			f.gpus, map[bool]string{false: "", true: ", CPU emulation"}[cuda.Emulated], link)
	case runs[0].hops[allreduce.TransportShm] == f.ranks && f.ranks > 1:
		how = "data over shared memory, control over gRPC on " + link
	case runs[0].hops[allreduce.TransportSocket] == f.ranks && f.ranks > 1:
		how = "data over plain sockets negotiated over gRPC, control over gRPC on " + link
	}
	if f.tls && f.transport != benchTransportTCP {
		how += ", gRPC under mutual TLS with slot identities"
		if runs[0].hops[allreduce.TransportSocket] > 0 {
			how += " (data sockets too)"
		}
	}
	fmt.Fprintf(out, "# bmojo ring all-reduce: %d ranks (processes) %s, %s, float32 buffers, wire %s\n",
		f.ranks, where, how, map[bool]string{false: "float32", true: "bf16"}[f.bf16])
	fmt.Fprintf(out, "# transport %s: hops %s; chunk %s; grpc: streams/neighbour %d, window %s, read buffer %s, write buffer %s; shm: queues/neighbour %d, slots/queue %d\n",
		f.transport, strings.Join(paths, ", "), fmtBytes(cfg.ChunkBytes), cfg.Streams, fmtBytes(int(cfg.WindowBytes)), fmtBuf(cfg.ReadBufferBytes), fmtBuf(cfg.WriteBufferBytes), cfg.ShmQueues, cfg.ShmSlots)
	if f.repeat > 1 {
		fmt.Fprintf(out, "# %d runs; each row is the run with the median time (slowest rank's mean)\n", f.repeat)
	}
	n := float64(f.ranks)
	busbw := func(s int, mean time.Duration) float64 {
		return float64(s) / mean.Seconds() / 1e9 * 2 * (n - 1) / n
	}
	// The rows keep the 7 columns other tools parse (bench scale); the
	// reference's rows are comments, and CPU time goes on a comment line.
	table := func(runs []arBenchRun, pre string) (map[int]time.Duration, error) {
		fmt.Fprintf(out, "%s%12s %12s %6s %12s %12s %10s %10s\n", pre, "size", "count", "iters", "time(us)", "min(us)", "algbw(GB/s)", "busbw(GB/s)")
		medians := map[int]time.Duration{}
		var cpus []string
		for _, s := range sizes {
			type row struct{ mean, best, cpu time.Duration }
			var rows []row
			for _, r := range runs {
				if len(r.results[s]) != f.ranks {
					return nil, fmt.Errorf("bench allreduce: %d of %d ranks reported size %s", len(r.results[s]), f.ranks, fmtBytes(s))
				}
				m, b, c := r.slowest(s)
				rows = append(rows, row{m, b, c})
			}
			sort.Slice(rows, func(i, j int) bool { return rows[i].mean < rows[j].mean })
			med := rows[len(rows)/2]
			medians[s] = med.mean
			fmt.Fprintf(out, "%s%12s %12d %6d %12.1f %12.1f %10.3f %10.3f\n", pre, fmtBytes(s), s/4, runs[0].results[s][0].iters,
				float64(med.mean.Nanoseconds())/1e3, float64(med.best.Nanoseconds())/1e3, float64(s)/med.mean.Seconds()/1e9, busbw(s, med.mean))
			cpus = append(cpus, fmt.Sprintf("%s %.1f", fmtBytes(s), float64(med.cpu.Nanoseconds())/1e6))
		}
		fmt.Fprintf(out, "# cpu(ms) per collective, all ranks, user+system: %s\n", strings.Join(cpus, ", "))
		if m, ok := medians[1<<20]; ok {
			fmt.Fprintf(out, "# latency at 1MiB: mean %.1f us\n", float64(m.Nanoseconds())/1e3)
		}
		return medians, nil
	}
	got, err := table(runs, "")
	if err != nil {
		return err
	}
	if f.reference == "" {
		return nil
	}
	fmt.Fprintf(out, "# reference: the same ring schedule, chunks and connections over plain TCP (--transport %s), run alternately with the above\n", f.reference)
	ref, err := table(refs, "# ")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "# ratio: busbw of --transport %s / busbw of the %s reference (medians)\n", f.transport, f.reference)
	fmt.Fprintf(out, "# %10s %12s %12s %8s\n", "size", f.transport, f.reference, "ratio")
	for _, s := range sizes {
		fmt.Fprintf(out, "# %10s %12.3f %12.3f %8.2f\n", fmtBytes(s), busbw(s, got[s]), busbw(s, ref[s]), float64(ref[s])/float64(got[s]))
	}
	return nil
}

// launchBenchRanks starts one process per rank and collects their timings.
// Without hosts it opens one loopback listener per rank (so every address
// is known before any process starts) and hands it to the child as fd 3;
// with hosts every rank listens on its own address (e.g. inside its own
// network namespace, entered through --wrap).
func launchBenchRanks(ctx context.Context, f *benchAllreduceFlags, transport string, hosts []string, tlsDir string) (arBenchRun, error) {
	run := arBenchRun{results: map[int][]arBenchResult{}, hops: map[string]int{}}
	exe, err := os.Executable()
	if err != nil {
		return run, fmt.Errorf("bench allreduce: find own binary: %w", err)
	}
	files := make([]*os.File, f.ranks)
	addrs := make([]string, f.ranks)
	copy(addrs, hosts)
	sockDir := ""
	if (f.unix && hosts == nil) || f.perHost > 0 {
		if sockDir, err = os.MkdirTemp("", "bmojo-bench-"); err != nil {
			return run, fmt.Errorf("bench allreduce: %w", err)
		}
		defer os.RemoveAll(sockDir)
	}
	for i := range files {
		if hosts != nil {
			break
		}
		var l net.Listener
		if f.unix {
			path := fmt.Sprintf("%s/rank%d.sock", sockDir, i)
			l, err = net.Listen("unix", path)
			addrs[i] = "unix:" + path
		} else {
			l, err = net.Listen("tcp", "127.0.0.1:0")
		}
		if err != nil {
			return run, fmt.Errorf("bench allreduce: listen for rank %d: %w", i, err)
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
			return run, fmt.Errorf("bench allreduce: listener fd for rank %d: %w", i, err)
		}
	}

	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make([]error, f.ranks)
	for i := 0; i < f.ranks; i++ {
		rank, peers, host := i, addrs, i
		var hier []string
		if L := f.perHost; L > 0 {
			// Rank i is local rank i%L of host i/L: its local ring is
			// its host's ranks over Unix sockets (shared memory between
			// them), its cross ring the ranks of its local index on every
			// host, at the addresses above.
			host, rank = i/L, i%L
			peers = nil
			for l := range L {
				peers = append(peers, fmt.Sprintf("unix:%s/h%d-l%d.sock", sockDir, host, l))
			}
			var cross []string
			for h := range f.ranks / L {
				cross = append(cross, addrs[h*L+rank])
			}
			hier = []string{"--per-host", strconv.Itoa(L), "--cross-rank", strconv.Itoa(host), "--cross-peers", strings.Join(cross, ",")}
		}
		args := []string{"bench", "allreduce-rank", "--rank", strconv.Itoa(rank), "--peers", strings.Join(peers, ","),
			"--ranks", strconv.Itoa(f.ranks), "--size", f.size, "--sizes", f.sizes, "--iters", strconv.Itoa(f.iters),
			"--streams", strconv.Itoa(f.streams), "--chunk", f.chunk, "--window", f.window, "--rbuf", f.rbuf, "--wbuf", f.wbuf,
			"--hop-timeout", f.hopTimeout.String(), "--log-level", logLevel,
			"--transport", transport, "--shm-queues", strconv.Itoa(f.shmQueues), "--shm-slots", strconv.Itoa(f.shmSlots),
			"--gpus", strconv.Itoa(f.gpus)}
		if f.cpuProfile != "" && i == 0 {
			args = append(args, "--cpuprofile", f.cpuProfile+map[bool]string{false: "", true: "." + transport}[transport != f.transport])
		}
		if f.bf16 {
			args = append(args, "--bf16")
		}
		if f.tls && transport != benchTransportTCP { // the reference has no TLS
			args = append(args, "--tls", "--tls-dir", tlsDir)
		}
		if hosts != nil {
			args = append(args, "--listen-self")
		}
		args = append(args, hier...)
		name, argv := exe, args
		if f.wrap != "" {
			w := strings.Fields(strings.NewReplacer("{rank}", strconv.Itoa(i), "{host}", strconv.Itoa(host)).Replace(f.wrap))
			name, argv = w[0], append(append(w[1:], exe), args...)
		}
		c := exec.CommandContext(ctx, name, argv...)
		if files[i] != nil {
			c.ExtraFiles = []*os.File{files[i]}
		}
		if f.procs > 0 {
			c.Env = append(os.Environ(), "GOMAXPROCS="+strconv.Itoa(f.procs))
		}
		c.Stderr = os.Stderr
		stdout, err := c.StdoutPipe()
		if err != nil {
			return run, err
		}
		if err := c.Start(); err != nil {
			return run, fmt.Errorf("bench allreduce: start rank %d: %w", i, err)
		}
		if files[i] != nil {
			_ = files[i].Close()
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				var hop string
				if _, err := fmt.Sscanf(sc.Text(), "TRANSPORT %s", &hop); err == nil {
					mu.Lock()
					run.hops[hop]++
					mu.Unlock()
					continue
				}
				var r arBenchResult
				var meanNs, minNs, cpuNs int64
				if _, err := fmt.Sscanf(sc.Text(), "RESULT %d %d %d %d %d", &r.size, &r.iters, &meanNs, &minNs, &cpuNs); err == nil {
					r.mean, r.minimum, r.cpu = time.Duration(meanNs), time.Duration(minNs), time.Duration(cpuNs)
					mu.Lock()
					run.results[r.size] = append(run.results[r.size], r)
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
		return run, fmt.Errorf("bench allreduce: %w", err)
	}
	return run, nil
}

// benchHier is a rank of the hierarchical all-reduce with its two rings,
// which it connects and closes.
type benchHier struct{ allreduce.Hier }

// connect connects the local ring, then the cross ring: every rank does
// both in this order, so each ring's members are connecting at once.
func (h *benchHier) connect(ctx context.Context) error {
	if err := h.Local.Connect(ctx); err != nil {
		return fmt.Errorf("local ring: %w", err)
	}
	if err := h.Cross.Connect(ctx); err != nil {
		return fmt.Errorf("ring across hosts: %w", err)
	}
	return nil
}

func (h *benchHier) Close() error { return errors.Join(h.Local.Close(), h.Cross.Close()) }

// arBenchRing is what a rank process measures: the gRPC/shm Ring, or the
// plain-TCP reference.
type arBenchRing interface {
	AllReduce(ctx context.Context, buf []float32, op allreduce.Op) error
	Close() error
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
	// global is this process's rank among all of them (its certificate's
	// name); with --per-host, rank is its local rank on host crossRank.
	global, listenPeers := rank, peers
	if f.perHost > 0 {
		global, listenPeers = f.crossRank*f.perHost+rank, strings.Split(f.crossPeers, ",")
	}
	cfg.Rank, cfg.Peers, cfg.Epoch = rank, peers, 1
	cfg.Logger = newLogger().With("rank", global)
	// verify checks that ring slot r holds the rank globalOf(r).
	var verify func(globalOf func(int) int) func(int, *x509.Certificate) error
	if f.tls {
		creds, err := benchRankFiles(f.tlsDir, global).Load()
		if err != nil {
			return fmt.Errorf("rank %d: %w", global, err)
		}
		cfg.ServerTLS, cfg.ClientTLS = creds.Server(), creds.Client()
		verify = func(globalOf func(int) int) func(int, *x509.Certificate) error {
			return func(r int, cert *x509.Certificate) error {
				return pki.Check(cert, pki.RoleWorker, fmt.Sprintf("rank-%d", globalOf(r)))
			}
		}
		cfg.VerifyPeer = verify(func(r int) int { return r })
	}
	var lis net.Listener
	if len(listenPeers) > 1 && !f.listenSelf {
		lf := os.NewFile(3, "listener")
		if lis, err = net.FileListener(lf); err != nil {
			return fmt.Errorf("rank %d: listener from fd 3: %w", rank, err)
		}
		_ = lf.Close()
	}
	var ring arBenchRing
	var connect func(context.Context) error
	var grpcRing *allreduce.Ring
	var hier *benchHier
	var dev *benchDevice
	if f.perHost > 0 {
		// The local ring listens on its own Unix socket; the cross ring
		// on fd 3 (or its --cross-peers address).
		local, cross := cfg, cfg
		local.Transport = allreduce.TransportAuto
		cross.Rank, cross.Peers = f.crossRank, listenPeers
		if f.tls {
			local.VerifyPeer = verify(func(r int) int { return f.crossRank*f.perHost + r })
			cross.VerifyPeer = verify(func(r int) int { return r*f.perHost + rank })
		}
		h := &benchHier{}
		if h.Local, err = allreduce.New(local, nil); err != nil {
			return err
		}
		if h.Cross, err = allreduce.New(cross, lis); err != nil {
			h.Local.Close()
			return err
		}
		hier, ring, connect = h, h, h.connect
	} else if f.transport == allreduce.TransportCUDAIPC {
		if dev, err = openBenchDevice(rank%f.gpus, maxBytes(sizes)); err != nil {
			return fmt.Errorf("rank %d: %w", rank, err)
		}
		defer dev.close()
		cfg.Device = dev.mem
		if grpcRing, err = allreduce.New(cfg, lis); err != nil {
			return err
		}
		ring, connect = &benchDeviceRing{grpcRing, dev}, grpcRing.Connect
	} else if f.transport == benchTransportTCP {
		tr, err := allreduce.NewTCPRing(cfg, lis)
		if err != nil {
			return err
		}
		ring, connect = tr, tr.Connect
	} else {
		if grpcRing, err = allreduce.New(cfg, lis); err != nil {
			return err
		}
		ring, connect = grpcRing, grpcRing.Connect
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
	if err := connect(cctx); err != nil {
		return err
	}
	switch {
	case hier != nil:
		for _, r := range []*allreduce.Ring{hier.Local, hier.Cross} {
			if r.Size() > 1 {
				toSucc, _ := r.Transport()
				fmt.Fprintf(out, "TRANSPORT %s\n", toSucc)
			}
		}
	case len(peers) > 1:
		toSucc := benchTransportTCP
		if grpcRing != nil {
			toSucc, _ = grpcRing.Transport()
		}
		fmt.Fprintf(out, "TRANSPORT %s\n", toSucc)
	}
	all := make([]float32, maxBytes(sizes)/4)
	for i := range all {
		all[i] = float32(i%7) * 0.25
	}
	if dev != nil {
		dev.mem.Upload(dev.buf, all)
		if err := dev.mem.Fence(); err != nil {
			return fmt.Errorf("rank %d: %w", rank, err)
		}
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
		cpu0 := processCPU()
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
		cpu := (processCPU() - cpu0) / time.Duration(iters)
		fmt.Fprintf(w, "RESULT %d %d %d %d %d\n", s, iters, (total / time.Duration(iters)).Nanoseconds(), best.Nanoseconds(), cpu.Nanoseconds())
		_ = w.Flush()
	}
	// Leave together: a rank that exits while others still send would look
	// like a failure to them.
	return ring.AllReduce(ctx, all[:1], allreduce.Sum)
}

func maxBytes(sizes []int) int {
	m := 0
	for _, s := range sizes {
		m = max(m, s)
	}
	return m
}

// benchDevice is a cuda-ipc rank's GPU: its backend (allreduce.DeviceMem)
// and the device buffer every size's collective reduces a prefix of.
type benchDevice struct {
	d   *cuda.Device
	mem allreduce.DeviceMem
	buf kernels.Buffer
}

// openBenchDevice opens GPU ordinal and allocates bytes of float32 on it.
func openBenchDevice(ordinal, bytes int) (*benchDevice, error) {
	d, err := cuda.Open(ordinal, cuda.Options{})
	if err != nil {
		return nil, fmt.Errorf("--transport cuda-ipc: opening GPU %d: %w", ordinal, err)
	}
	mem, ok := d.Backend().(allreduce.DeviceMem)
	if !ok {
		d.Close()
		return nil, fmt.Errorf("--transport cuda-ipc: the GPU backend of this build cannot share memory between processes")
	}
	buf := mem.(kernels.Backend[float32]).Alloc(bytes / 4)
	if err := mem.Fence(); err != nil {
		d.Close()
		return nil, fmt.Errorf("--transport cuda-ipc: allocating %s on GPU %d: %w", fmtBytes(bytes), ordinal, err)
	}
	return &benchDevice{d: d, mem: mem, buf: buf}, nil
}

func (b *benchDevice) close() { _ = b.d.Close() }

// benchDeviceRing measures device collectives: AllReduce reduces the same
// prefix of the device buffer as the host rank would of its slice (the
// values are the same; the host slice is not read).
type benchDeviceRing struct {
	*allreduce.Ring
	dev *benchDevice
}

func (b *benchDeviceRing) AllReduce(ctx context.Context, buf []float32, op allreduce.Op) error {
	return b.Ring.AllReduceDevice(ctx, b.dev.mem.Slice(b.dev.buf, 0, len(buf)), op)
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

package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	devicepkg "github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/worker"
)

func init() {
	var (
		cfg      worker.Config
		etcdCfg  etcdserver.ClientConfig
		flags    *etcdFlags
		health   string
		device   string
		leaseTTL time.Duration
		overlap  bool
	)
	cmd := &cobra.Command{
		Use:   "worker",
		Short: "Run one data-parallel worker of a job (one per GPU, or per CPU share)",
		Long: `Run one worker. It registers in etcd under a lease, waits for the
coordinator's ring, trains its share of every global batch and all-reduces
gradients with its ring neighbours over gRPC. If it is killed the others
re-form the ring and continue; if it joins mid-run it receives the current
parameters and optimizer state from a peer.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, _, err := devicepkg.Parse(device); err != nil {
				return fmt.Errorf("worker: --device: %w", err)
			}
			cfg.Device = device
			cfg.SyncCopies = !overlap
			if leaseTTL < 0 || leaseTTL%time.Second != 0 {
				return fmt.Errorf("worker: --lease-ttl %v: want whole seconds, e.g. 3s", leaseTTL)
			}
			cfg.LeaseTTL = int(leaseTTL / time.Second)
			creds, err := flags.fill()
			if err != nil {
				return fmt.Errorf("worker: %w", err)
			}
			cfg.TLS = creds
			if cfg.ID == "" && creds != nil {
				// The certificate says who this worker is.
				_, cfg.ID = creds.Identity()
			}
			if cfg.ID == "" {
				host, _ := os.Hostname()
				cfg.ID = fmt.Sprintf("%s-%d", host, os.Getpid())
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			log := newLogger()
			etcdCfg.Logger = log.Named("etcd")
			cli, err := etcdserver.Connect(ctx, etcdCfg)
			if err != nil {
				return err
			}
			defer cli.Close()
			cfg.Etcd = cli
			cfg.Logger = log
			stopHealth, setHealth, err := serveHealth(health, log)
			if err != nil {
				return err
			}
			defer stopHealth()
			setHealth(false, true) // not ready until registered and in the ring
			cfg.Health = func(ready, live bool, _ string) { setHealth(ready, live) }
			return worker.Run(ctx, cfg)
		},
	}
	fl := cmd.Flags()
	flags = etcdClientFlags(fl, &etcdCfg)
	fl.StringVar(&cfg.Job, "job", "", "job name (the etcd prefix the job was created under)")
	fl.StringVar(&cfg.ID, "id", "", "unique worker id (default: the id --tls-cert names, else hostname-pid)")
	fl.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "all-reduce listen address")
	fl.StringVar(&cfg.Advertise, "advertise", "", "address peers dial (default: the listen address)")
	fl.StringVar(&cfg.Host, "host", "", "the machine this worker runs on, for the hierarchical all-reduce: workers with the same --host form a ring inside the host (default: the hostname; on Kubernetes pass the node name)")
	fl.BoolVar(&cfg.DataSockets, "data-sockets", true, "carry the ring's payloads between hosts on plain sockets negotiated over gRPC (TLS and identities as for gRPC); false: on gRPC streams, about 0.6x the busbw (docs/allreduce.md)")
	fl.BoolVar(&cfg.HostRing, "host-ring", false, "keep a GPU worker's gradients on host memory for the all-reduce; default: workers on one host exchange them GPU to GPU over CUDA IPC (host shared memory where that cannot be set up)")
	fl.BoolVar(&overlap, "overlap-copies", true, "copy each layer's gradient off the GPU asynchronously, overlapping backward; false: synchronous copies, the reference path (bench step --workers 2 measures both ways)")
	fl.StringVar(&cfg.LocalListen, "local-listen", "", "listen address of the ring inside the host (hierarchical all-reduce; default: the --listen IP, a free port); peers dial the --advertise host at its port")
	fl.IntVar(&cfg.Threads, "threads", 0, "kernel threads (0 = all cores)")
	fl.DurationVar(&leaseTTL, "lease-ttl", 0, "membership lease TTL, whole seconds (default 3s)")
	fl.DurationVar(&cfg.HopTimeout, "hop-timeout", 0, "all-reduce per-hop deadline (default 30s)")
	fl.StringVar(&health, "health", "", "serve the gRPC health service here (e.g. :7101) for probes")
	fl.StringVar(&device, "device", "auto", "compute device: auto (a GPU if this build has -tags cuda and one is present, else the CPU), cpu, cuda or cuda:N")
	_ = cmd.MarkFlagRequired("job")
	rootCmd.AddCommand(cmd)
}

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/bmojo/bmojo/coordinator"
	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/pki"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/job/spec"
	"github.com/bmojo/bmojo/train"
)

// etcdFlags are the flags of a job process that reaches etcd: where etcd
// is, its credentials, and the job identity (--tls-*).
type etcdFlags struct {
	cfg       *etcdserver.ClientConfig
	endpoints string
	tls       pki.Files
}

// etcdClientFlags adds the flags that say how to reach etcd and the job's
// TLS identity; fill sets cfg from them after parsing.
func etcdClientFlags(fl *pflag.FlagSet, cfg *etcdserver.ClientConfig) *etcdFlags {
	f := &etcdFlags{cfg: cfg}
	fl.StringVar(&f.endpoints, "etcd-endpoints", "http://127.0.0.1:2379", "etcd client URLs, comma-separated (https:// with TLS)")
	fl.StringVar(&cfg.CertFile, "etcd-cert", "", "client certificate for etcd mutual TLS (PEM; default --tls-cert)")
	fl.StringVar(&cfg.KeyFile, "etcd-key", "", "client key for etcd mutual TLS (PEM; default --tls-key)")
	fl.StringVar(&cfg.CAFile, "etcd-ca", "", "CA bundle that signed the etcd servers' certificates; enables TLS (default --tls-ca)")
	fl.StringVar(&cfg.Username, "etcd-user", "", "etcd username (when etcd auth is on)")
	fl.StringVar(&cfg.Password, "etcd-password", "", "etcd password (or set BMOJO_ETCD_PASSWORD)")
	fl.StringVar(&f.tls.CA, "tls-ca", "", "the job CA (PEM): peers must present certificates it signed (mutual TLS)")
	fl.StringVar(&f.tls.Cert, "tls-cert", "", "this process's job certificate (PEM), naming its role and id")
	fl.StringVar(&f.tls.Key, "tls-key", "", "the key of --tls-cert (PEM)")
	return f
}

// fill sets the etcd client config from the flags and loads the job
// identity: nil when no --tls-* flag is given. The identity is also the
// etcd client's certificate unless --etcd-* name others.
func (f *etcdFlags) fill() (*pki.Creds, error) {
	cfg := f.cfg
	var creds *pki.Creds
	if f.tls.Set() {
		var err error
		if creds, err = f.tls.Load(); err != nil {
			return nil, err
		}
		if cfg.CAFile == "" && cfg.CertFile == "" && cfg.KeyFile == "" {
			cfg.CAFile, cfg.CertFile, cfg.KeyFile = f.tls.CA, f.tls.Cert, f.tls.Key
		}
	}
	scheme := "http://"
	if cfg.CAFile != "" || cfg.CertFile != "" {
		scheme = "https://"
	}
	cfg.Endpoints = nil
	for _, e := range strings.Split(f.endpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			if !strings.Contains(e, "://") {
				e = scheme + e
			}
			cfg.Endpoints = append(cfg.Endpoints, e)
		}
	}
	if cfg.Password == "" {
		cfg.Password = os.Getenv("BMOJO_ETCD_PASSWORD")
	}
	return creds, nil
}

func init() {
	cfg := coordinator.Default()
	cmd := &cobra.Command{
		Use:   "coordinator",
		Short: "Run one coordinator replica (several may run; one leads through etcd election)",
		Long: `Run one coordinator replica of a job. Replicas campaign in an etcd
election; the leader watches the job's members, publishes the ring at each
membership change (join, lease expiry, a reported failure) and starts each
epoch once its members are ready. Standbys wait in the election and take
over when the leader dies. It exits when the job is done, or with --linger
keeps serving its health and monitor endpoints until it is stopped (as a
Kubernetes Deployment needs: an exited replica is restarted, and a
replica that keeps exiting is put in CrashLoopBackOff).`,
		Args: cobra.NoArgs,
	}
	fill := etcdClientFlags(cmd.Flags(), &cfg.Etcd)
	cmd.Flags().StringVar(&cfg.JobName, "job", "", "job name (the etcd prefix the job was created under)")
	cmd.Flags().DurationVar(&cfg.ReadyTimeout, "ready-timeout", cfg.ReadyTimeout, "how long ring members have to report ready before they are dropped")
	cmd.Flags().DurationVar(&cfg.BootstrapTimeout, "bootstrap-timeout", cfg.BootstrapTimeout, "how long the first ring waits for all the job's workers before starting with fewer (at least min_ring)")
	cmd.Flags().DurationVar(&cfg.LeaseTTL, "lease-ttl", cfg.LeaseTTL, "election lease TTL (whole seconds): how long a crashed leader blocks a standby")
	cmd.Flags().StringVar(&cfg.ID, "id", "", "replica name in the election and logs (default hostname-pid)")
	var (
		jobFile             string
		workers, minWorkers int
		healthAddr          string
		linger              bool
	)
	cmd.Flags().StringVar(&jobFile, "job-file", "", "create the job from this job file if etcd does not hold it yet (how Kubernetes launches start a job)")
	cmd.Flags().IntVar(&workers, "workers", 1, "with --job-file: workers the first ring waits for")
	cmd.Flags().IntVar(&minWorkers, "min-workers", 1, "with --job-file: the smallest ring that may train")
	cmd.Flags().StringVar(&healthAddr, "health", "", "serve the gRPC health service here (e.g. :7000) for probes")
	cmd.Flags().BoolVar(&linger, "linger", false, "when the job is done, keep serving health and the monitor until SIGTERM instead of exiting")
	// --listen was this flag's name before --health meant health on every role.
	cmd.Flags().StringVar(&healthAddr, "listen", "", "")
	_ = cmd.Flags().MarkDeprecated("listen", "use --health (the worker's --listen is its all-reduce address)")
	mon := monitorFlags(cmd.Flags(), "")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if _, err := fill.fill(); err != nil {
			return fmt.Errorf("coordinator: %w", err)
		}
		log := newLogger().Named("coordinator")
		cfg.Logger = log
		cfg.Etcd.Logger = log.Named("etcd")
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		if jobFile != "" {
			j, err := job.Load(jobFile)
			if err != nil {
				return err
			}
			if cfg.JobName == "" {
				cfg.JobName = j.Name
			}
			if j.Name != cfg.JobName {
				return fmt.Errorf("coordinator: --job %q but the job file %s names job %q", cfg.JobName, jobFile, j.Name)
			}
			// As bmojo train does: the dataset's tokenizer, checked against
			// the job's, and the model's vocabulary padded to it.
			if j, err = train.ResolveTokenizer(j); err != nil {
				return fmt.Errorf("coordinator: %w", err)
			}
			cli, err := etcdserver.Connect(ctx, cfg.Etcd)
			if err != nil {
				return err
			}
			defer cli.Close()
			if _, resumed, err := spec.Put(ctx, cli, j, workers, minWorkers, job.CodeHash()); err != nil {
				return err
			} else if resumed {
				log.Info("job exists in etcd; continuing it", "job", j.Name)
			}
			cfg.Client = cli
		}
		if err := cfg.Validate(); err != nil {
			return err
		}
		stopHealth, _, err := serveHealth(healthAddr, log)
		if err != nil {
			return err
		}
		defer stopHealth()
		stopMon, err := mon.start(ctx, cfg.JobName, cfg.Client, cfg.Etcd, false, log.Named("monitor"))
		if err != nil {
			return err
		}
		defer stopMon()
		err = coordinator.Run(ctx, cfg)
		if err == nil && linger {
			log.Info("job done; serving health and the monitor until stopped (--linger)")
			<-ctx.Done()
			err = ctx.Err()
		}
		if errors.Is(err, context.Canceled) {
			log.Info("stopped")
			return nil
		}
		return err
	}
	rootCmd.AddCommand(cmd)
}

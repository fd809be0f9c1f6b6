package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/monitor"
)

// monitorOpts are the flags of a command that serves the monitor.
type monitorOpts struct {
	http, token, tensorboard string
	httpCert, httpKey        string
}

// monitorFlags adds --http, --token and --tensorboard; defHTTP is the
// default address ("" = no server).
func monitorFlags(fl *pflag.FlagSet, defHTTP string) *monitorOpts {
	o := &monitorOpts{}
	fl.StringVar(&o.http, "http", defHTTP, "serve the dashboard, /metrics and /api/v1/status here (host:port; empty = off)")
	fl.StringVar(&o.token, "token", "", "bearer token the HTTP API requires (or set BMOJO_TOKEN; empty = none)")
	fl.StringVar(&o.tensorboard, "tensorboard", "", "write TensorBoard scalar event files (loss, val_loss, tokens_per_s) to this directory")
	fl.StringVar(&o.httpCert, "http-cert", "", "serve --http over HTTPS with this certificate (PEM)")
	fl.StringVar(&o.httpKey, "http-key", "", "the key of --http-cert (PEM)")
	return o
}

func (o *monitorOpts) tokenOrEnv() string {
	if o.token != "" {
		return o.token
	}
	return os.Getenv("BMOJO_TOKEN")
}

// start serves the monitor of job in the background until stop; with
// neither --http nor --tensorboard it does nothing. cli may be nil (then it
// connects with ec). fallback picks a free port when --http's is taken.
func (o *monitorOpts) start(ctx context.Context, job string, cli *clientv3.Client, ec etcdserver.ClientConfig, fallback bool, log hclog.Logger) (stop func(), err error) {
	if o.http == "" && o.tensorboard == "" {
		return func() {}, nil
	}
	var tc *tls.Config
	if o.httpCert != "" || o.httpKey != "" {
		cert, err := tls.LoadX509KeyPair(o.httpCert, o.httpKey)
		if err != nil {
			return nil, fmt.Errorf("monitor: --http-cert %q and --http-key %q: %w", o.httpCert, o.httpKey, err)
		}
		tc = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	}
	return monitor.Start(ctx, monitor.Config{JobName: job, Client: cli, Etcd: ec, Token: o.tokenOrEnv(),
		TensorBoardDir: o.tensorboard, TLS: tc, Logger: log}, o.http, fallback, func(url string) {
		log.Info("dashboard", "url", url, "token_required", o.tokenOrEnv() != "")
	})
}

func init() {
	var ec etcdserver.ClientConfig
	var job string
	cmd := &cobra.Command{
		Use:   "monitor",
		Short: "Serve a job's dashboard, Prometheus /metrics and /api/v1/status from etcd (read-only)",
		Long: `Serve one job's monitoring from etcd: a dashboard at /, Prometheus
metrics at /metrics, the status JSON at /api/v1/status (what bmojo status
reads) and /healthz. It only reads etcd, so any number may run; coordinators
serve the same with --http, and bmojo train --workers N on 127.0.0.1:8080.`,
		Args: cobra.NoArgs,
	}
	fill := etcdClientFlags(cmd.Flags(), &ec)
	cmd.Flags().StringVar(&job, "job", "", "job name (the etcd prefix the job was created under)")
	mon := monitorFlags(cmd.Flags(), "127.0.0.1:8080")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if _, err := fill.fill(); err != nil {
			return fmt.Errorf("monitor: %w", err)
		}
		log := newLogger().Named("monitor")
		ec.Logger = log.Named("etcd")
		if mon.http == "" && mon.tensorboard == "" {
			return errors.New("monitor: nothing to do: give --http or --tensorboard")
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		stopMon, err := mon.start(ctx, job, nil, ec, false, log)
		if err != nil {
			return err
		}
		<-ctx.Done()
		stopMon()
		log.Info("stopped")
		return nil
	}
	rootCmd.AddCommand(cmd)
}

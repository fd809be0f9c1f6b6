package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/internal/etcdserver"
)

func init() {
	var cfg etcdserver.Config
	cmd := &cobra.Command{
		Use:   "etcd",
		Short: "Run an embedded single-node etcd (for laptops and tests; production uses an etcd cluster)",
		Long: `Run an embedded single-node etcd until SIGINT or SIGTERM. Its data stays
in --data-dir: starting again on the same directory keeps every job's keys.
It prints the client URL to give the other commands as --etcd-endpoints.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := newLogger().Named("etcd")
			cfg.Logger = log
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			s, err := etcdserver.Start(ctx, cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			log.Info("serving", "endpoints", strings.Join(s.Endpoints(), ","), "data_dir", cfg.DataDir)
			fmt.Println(strings.Join(s.Endpoints(), ","))
			select {
			case <-ctx.Done():
				log.Info("stopping")
				return nil
			case err := <-s.Err():
				if err != nil {
					return fmt.Errorf("etcd: %w", err)
				}
				return nil
			}
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&cfg.DataDir, "data-dir", "bmojo-etcd", "directory of etcd's WAL and database (created if missing)")
	fl.StringVar(&cfg.ClientURL, "listen-client", "http://127.0.0.1:2379", "client URL to listen on (empty: a free port on 127.0.0.1)")
	fl.StringVar(&cfg.PeerURL, "listen-peer", "http://127.0.0.1:2380", "peer URL to listen on (empty: a free port on 127.0.0.1)")
	fl.StringVar(&cfg.CertFile, "cert-file", "", "serve clients over TLS with this certificate (--listen-client must be https)")
	fl.StringVar(&cfg.KeyFile, "key-file", "", "the key of --cert-file")
	fl.StringVar(&cfg.ClientCAFile, "client-ca-file", "", "require client certificates signed by this CA (mutual TLS)")
	fl.StringVar(&cfg.PeerCertFile, "peer-cert-file", "", "serve the peer port over TLS with this certificate (--listen-peer must be https)")
	fl.StringVar(&cfg.PeerKeyFile, "peer-key-file", "", "the key of --peer-cert-file")
	fl.StringVar(&cfg.PeerCAFile, "peer-client-ca-file", "", "require peer certificates signed by this CA (peer mutual TLS)")
	rootCmd.AddCommand(cmd)
}

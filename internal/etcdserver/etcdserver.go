// Package etcdserver starts an embedded single-node etcd (for `bmojo train`,
// `bmojo etcd` and tests) and connects clients to any etcd (embedded or a
// production cluster) with retry. It owns nothing of the job's keys: those
// are package job's.
package etcdserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
)

// Errors of this package; match them with errors.Is.
var (
	// ErrBadConfig: a Config or ClientConfig field is invalid (the error names it).
	ErrBadConfig = errors.New("etcdserver: invalid config")
	// ErrStart: the embedded server did not start.
	ErrStart = errors.New("etcdserver: start failed")
	// ErrUnreachable: no endpoint answered before the context ended.
	ErrUnreachable = errors.New("etcdserver: etcd unreachable")
	// ErrAuth: etcd rejected the username or password.
	ErrAuth = errors.New("etcdserver: etcd authentication failed")
)

// Config configures the embedded server.
type Config struct {
	// DataDir holds the server's WAL and database; created if missing.
	// Starting again on the same DataDir keeps every key. Required.
	DataDir string
	// Name is the member name. Default "bmojo".
	Name string
	// ClientURL is where clients connect, e.g. http://127.0.0.1:2379.
	// Default: http://127.0.0.1 on a free port.
	ClientURL string
	// PeerURL is the raft peer URL (unused by a single node, but etcd binds
	// it). Default: http://127.0.0.1 on a free port.
	PeerURL string
	// CertFile and KeyFile serve the client port over TLS (ClientURL must
	// be https); with ClientCAFile, clients must present a certificate
	// that CA signed (mutual TLS).
	CertFile, KeyFile, ClientCAFile string
	// PeerCertFile and PeerKeyFile serve the peer port over TLS (PeerURL
	// must be https); with PeerCAFile, peers must present a certificate
	// that CA signed. A single member has no peers, but it binds the port.
	PeerCertFile, PeerKeyFile, PeerCAFile string
	// StartTimeout bounds the wait for the server to become ready.
	// Default 10 s.
	StartTimeout time.Duration
	// Logger receives etcd's warnings and errors. Default: hclog.NewNullLogger.
	Logger hclog.Logger
}

// Server is a running embedded etcd.
type Server struct {
	etcd      *embed.Etcd
	endpoints []string
	log       hclog.Logger
	once      sync.Once
	streams   *streamSet
}

// Start starts an embedded single-node etcd and waits until it serves.
func Start(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, fmt.Errorf("%w: DataDir (--data-dir) is empty", ErrBadConfig)
	}
	if cfg.Name == "" {
		cfg.Name = "bmojo"
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = 10 * time.Second
	}
	scheme := "http"
	if cfg.CertFile != "" {
		scheme = "https"
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: data dir: %w", ErrStart, err)
	}
	// etcd warns about (but accepts) a data dir others can read.
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: data dir: %w", ErrStart, err)
	}

	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, fmt.Errorf("%w: CertFile and KeyFile go together", ErrBadConfig)
	}
	if (cfg.PeerCertFile == "") != (cfg.PeerKeyFile == "") {
		return nil, fmt.Errorf("%w: PeerCertFile and PeerKeyFile go together", ErrBadConfig)
	}
	// A port picked free can be taken by another process before etcd binds
	// it: then pick again (a port the caller named is not retried).
	for attempt := 1; ; attempt++ {
		s, err := start(ctx, cfg, scheme)
		var inUse bool
		if err != nil {
			inUse = errors.Is(err, syscall.EADDRINUSE) && (cfg.ClientURL == "" || cfg.PeerURL == "")
		}
		if !inUse || attempt == 5 {
			return s, err
		}
		cfg.Logger.Debug("a free port was taken before etcd bound it; picking another", "error", err)
	}
}

// start is one attempt of Start.
func start(ctx context.Context, cfg Config, scheme string) (*Server, error) {
	curl, err := urlOrFree(cfg.ClientURL, "ClientURL (--listen-client)", scheme)
	if err != nil {
		return nil, err
	}
	peerScheme := "http"
	if cfg.PeerCertFile != "" {
		peerScheme = "https"
	}
	purl, err := urlOrFree(cfg.PeerURL, "PeerURL (--listen-peer)", peerScheme)
	if err != nil {
		return nil, err
	}
	if (cfg.PeerCertFile != "") != (purl.Scheme == "https") {
		return nil, fmt.Errorf("%w: PeerURL %s: peer TLS needs https and a certificate, plain needs http", ErrBadConfig, purl)
	}
	if (cfg.CertFile != "") != (curl.Scheme == "https") {
		return nil, fmt.Errorf("%w: ClientURL %s: TLS needs https and a certificate, plain needs http", ErrBadConfig, curl)
	}
	ec := embed.NewConfig()
	ec.Name = cfg.Name
	if cfg.CertFile != "" {
		ec.ClientTLSInfo.CertFile, ec.ClientTLSInfo.KeyFile = cfg.CertFile, cfg.KeyFile
		ec.ClientTLSInfo.TrustedCAFile = cfg.ClientCAFile
		ec.ClientTLSInfo.ClientCertAuth = cfg.ClientCAFile != ""
	}
	if cfg.PeerCertFile != "" {
		ec.PeerTLSInfo.CertFile, ec.PeerTLSInfo.KeyFile = cfg.PeerCertFile, cfg.PeerKeyFile
		ec.PeerTLSInfo.TrustedCAFile = cfg.PeerCAFile
		ec.PeerTLSInfo.ClientCertAuth = cfg.PeerCAFile != ""
	}
	ec.Dir = cfg.DataDir
	ec.ListenClientUrls = []url.URL{*curl}
	ec.AdvertiseClientUrls = []url.URL{*curl}
	ec.ListenPeerUrls = []url.URL{*purl}
	ec.AdvertisePeerUrls = []url.URL{*purl}
	ec.InitialCluster = ec.InitialClusterFromName(cfg.Name)
	ec.LogLevel = "warn"
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zapLogger(cfg.Logger, zapcore.WarnLevel))
	// A single node elects itself after one tick (InitialElectionTickAdvance);
	// short ticks make that, and start-up, fast.
	ec.TickMs = 10
	ec.ElectionMs = 100
	// Keep a bounded history: watches resume from their revision after a
	// restart, and an hour of revisions is plenty for that.
	ec.AutoCompactionMode = embed.CompactorModePeriodic
	ec.AutoCompactionRetention = "1h"

	// No HTTP/JSON gateway: every component speaks gRPC through clientv3.
	ec.EnableGRPCGateway = false
	streams := newStreamSet()
	ec.GRPCAdditionalServerOptions = []grpc.ServerOption{grpc.ChainStreamInterceptor(streams.interceptor)}

	e, err := embed.StartEtcd(ec)
	if err != nil {
		return nil, fmt.Errorf("%w: %s on %s: %w", ErrStart, cfg.DataDir, curl, err)
	}
	timer := time.NewTimer(cfg.StartTimeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("%w: %s: %w", ErrStart, cfg.DataDir, err)
	case <-timer.C:
		e.Close()
		return nil, fmt.Errorf("%w: %s: not ready after %s", ErrStart, cfg.DataDir, cfg.StartTimeout)
	case <-ctx.Done():
		e.Close()
		return nil, fmt.Errorf("%w: %w", ErrStart, ctx.Err())
	}
	s := &Server{etcd: e, log: cfg.Logger, streams: streams}
	for _, l := range e.Clients {
		s.endpoints = append(s.endpoints, curl.Scheme+"://"+l.Addr().String())
	}
	return s, nil
}

// Endpoints returns the client URLs, for ClientConfig.Endpoints.
func (s *Server) Endpoints() []string { return append([]string(nil), s.endpoints...) }

// Err delivers a fatal error of the running server.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

// Close stops the server; its data stays in DataDir. It is idempotent.
func (s *Server) Close() {
	s.once.Do(func() {
		s.streams.closeAll()
		s.etcd.Close()
	})
}

// urlOrFree parses u, or returns scheme://127.0.0.1:<a free port> when empty.
func urlOrFree(u, field, scheme string) (*url.URL, error) {
	if u == "" {
		port, err := freePort()
		if err != nil {
			return nil, fmt.Errorf("%w: %s: no free port: %w", ErrStart, field, err)
		}
		u = scheme + "://127.0.0.1:" + strconv.Itoa(port)
	}
	p, err := url.Parse(u)
	if err != nil || p.Host == "" || (p.Scheme != "http" && p.Scheme != "https") {
		return nil, fmt.Errorf("%w: %s is %q, want http://HOST:PORT", ErrBadConfig, field, u)
	}
	return p, nil
}

// freePort asks the kernel for a free port. Another process could take it
// before etcd binds it; on a test machine that is rare enough.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

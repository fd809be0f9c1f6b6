package etcdserver

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// ClientConfig configures a connection to etcd.
type ClientConfig struct {
	// Endpoints are client URLs (http://host:2379 or https://...). Required.
	Endpoints []string
	// CertFile, KeyFile: client certificate for mutual TLS (both or neither).
	CertFile, KeyFile string
	// CAFile verifies the servers' certificates; setting it (or a
	// certificate) turns TLS on.
	CAFile string
	// Username and Password authenticate when etcd has auth enabled.
	Username, Password string
	// DialTimeout bounds one connection attempt. Default 2 s.
	DialTimeout time.Duration
	// MaxBackoff caps the wait between attempts. Default 5 s.
	MaxBackoff time.Duration
	// CallTimeout bounds each request made with a context that has no
	// deadline (see Bound). Default DefaultCallTimeout.
	CallTimeout time.Duration
	// Logger receives retry warnings and the client's own warnings.
	// Default: hclog.NewNullLogger.
	Logger hclog.Logger
}

// Validate checks the config without side effects.
func (c ClientConfig) Validate() error {
	if len(c.Endpoints) == 0 {
		return fmt.Errorf("%w: Endpoints (--etcd-endpoints) is empty", ErrBadConfig)
	}
	for _, e := range c.Endpoints {
		if strings.TrimSpace(e) == "" {
			return fmt.Errorf("%w: Endpoints (--etcd-endpoints) has an empty entry", ErrBadConfig)
		}
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		return fmt.Errorf("%w: CertFile (--etcd-cert) and KeyFile (--etcd-key) go together", ErrBadConfig)
	}
	if c.Password != "" && c.Username == "" {
		return fmt.Errorf("%w: Password (--etcd-password) without Username (--etcd-user)", ErrBadConfig)
	}
	if c.DialTimeout < 0 || c.MaxBackoff < 0 || c.CallTimeout < 0 {
		return fmt.Errorf("%w: DialTimeout, MaxBackoff and CallTimeout must not be negative", ErrBadConfig)
	}
	return nil
}

func isAuthErr(err error) bool {
	if err == nil {
		return false
	}
	// The client returns rpctypes errors, sometimes still as gRPC status.
	msg := rpctypes.ErrorDesc(err)
	return errors.Is(err, rpctypes.ErrAuthFailed) || errors.Is(err, rpctypes.ErrPermissionDenied) ||
		msg == rpctypes.ErrAuthFailed.Error() || msg == rpctypes.ErrPermissionDenied.Error() ||
		errors.Is(err, rpctypes.ErrUserEmpty) || errors.Is(err, rpctypes.ErrAuthNotEnabled)
}

// Connect returns a client whose endpoints answered a read, with every
// request bounded by Bound (cfg.CallTimeout). While none
// answers it retries with exponential back-off (each attempt logged at warn
// with its number) until ctx ends, then fails with ErrUnreachable naming the
// endpoints and the last error. Rejected credentials fail at once with
// ErrAuth.
func Connect(ctx context.Context, cfg ClientConfig) (*clientv3.Client, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 2 * time.Second
	}
	if cfg.MaxBackoff == 0 {
		cfg.MaxBackoff = 5 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	var tlsCfg *tls.Config
	if cfg.CAFile != "" || cfg.CertFile != "" {
		info := transport.TLSInfo{CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, TrustedCAFile: cfg.CAFile}
		var err error
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("%w: TLS files: %w", ErrBadConfig, err)
		}
	}
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:            cfg.Endpoints,
			DialTimeout:          cfg.DialTimeout,
			DialKeepAliveTime:    5 * time.Second,
			DialKeepAliveTimeout: 3 * time.Second,
			TLS:                  tlsCfg,
			Username:             cfg.Username,
			Password:             cfg.Password,
			// The client warns on every failed RPC; Connect and its callers
			// report failures themselves.
			Logger: zapLogger(log, zapcore.ErrorLevel),
			// Reconnect within about a second of etcd coming back (gRPC's
			// default backoff grows to 2 minutes): leases of a few seconds
			// must be kept alive across a short etcd restart.
			DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           grpcbackoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
				MinConnectTimeout: cfg.DialTimeout,
			})},
		})
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout)
			// A linearizable read proves a leader, auth and a working path.
			_, err = cli.Get(pctx, "/bmojo/", clientv3.WithCountOnly())
			cancel()
			if err == nil {
				return Bound(cli, cfg.CallTimeout), nil
			}
			cli.Close()
		}
		if isAuthErr(err) {
			// Retrying cannot help: say so now.
			return nil, fmt.Errorf("%w: %s as user %q: %w", ErrAuth, strings.Join(cfg.Endpoints, ","), cfg.Username, err)
		}
		if tlsCfg != nil {
			// gRPC reports a refused certificate as a timeout; a
			// handshake of our own tells it from an etcd not up yet.
			if terr := tlsRefused(ctx, cfg.Endpoints[0], tlsCfg, cfg.DialTimeout); terr != nil {
				return nil, fmt.Errorf("%w: %s: TLS (--etcd-ca/--etcd-cert or --tls-*): %w", ErrAuth, cfg.Endpoints[0], terr)
			}
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w: %s: gave up after %d attempts: %w", ErrUnreachable,
				strings.Join(cfg.Endpoints, ","), attempt, err)
		}
		log.Warn("etcd unreachable, retrying", "attempt", attempt, "endpoints", strings.Join(cfg.Endpoints, ","),
			"backoff", backoff, "error", err)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %s: gave up after %d attempts: %w", ErrUnreachable,
				strings.Join(cfg.Endpoints, ","), attempt, err)
		}
		backoff = min(2*backoff, cfg.MaxBackoff)
	}
}

// ClientOr returns cli when it is set (release does nothing), or connects
// with cfg (logging under log when cfg has no logger; release closes the
// new client). Components that accept either a client or a config use it.
func ClientOr(ctx context.Context, cli *clientv3.Client, cfg ClientConfig, log hclog.Logger) (c *clientv3.Client, release func(), err error) {
	if cli != nil {
		return cli, func() {}, nil
	}
	if cfg.Logger == nil {
		cfg.Logger = log
	}
	c, err = Connect(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	return c, func() { c.Close() }, nil
}

// tlsRefused makes one TLS connection to endpoint and reports a
// certificate either side refused: the server's, not signed by our CA or
// not for its name, or ours, which the server answers with an alert. A
// connection that fails otherwise (nothing listening yet) or that the server
// keeps open reports nil.
func tlsRefused(ctx context.Context, endpoint string, cfg *tls.Config, timeout time.Duration) error {
	u, err := url.Parse(endpoint)
	if err != nil || u.Host == "" {
		return nil
	}
	d := net.Dialer{Timeout: timeout}
	raw, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return nil
	}
	defer raw.Close()
	c := cfg.Clone()
	if c.ServerName == "" {
		c.ServerName = u.Hostname()
	}
	c.NextProtos = []string{"h2"}
	conn := tls.Client(raw, c)
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if err := conn.HandshakeContext(ctx); err != nil {
		return certErr(err)
	}
	// TLS 1.3 refuses a client certificate after the client's handshake:
	// the alert comes with the server's first bytes. An accepted client
	// hears the HTTP/2 server's settings once it sends the preface.
	_ = conn.SetDeadline(time.Now().Add(min(timeout, 500*time.Millisecond)))
	if _, err := conn.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")); err != nil {
		return certErr(err)
	}
	var b [1]byte
	if _, err := conn.Read(b[:]); err != nil {
		return certErr(err)
	}
	return nil
}

// certErr keeps the errors that name a refused certificate: ours (the
// server's alert, which crypto/tls reports as a "remote error") or the
// server's.
func certErr(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" {
		return err
	}
	var alert tls.AlertError
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var host x509.HostnameError
	var verify *tls.CertificateVerificationError
	if errors.As(err, &alert) || errors.As(err, &unknown) || errors.As(err, &invalid) || errors.As(err, &host) || errors.As(err, &verify) {
		return err
	}
	return nil
}

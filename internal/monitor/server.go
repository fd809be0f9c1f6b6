package monitor

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

//go:embed web
var webFS embed.FS

// Handler serves /metrics, /api/v1/status, /healthz and the dashboard.
//
// With a token, /metrics and /api/v1/status need "Authorization: Bearer
// <token>". The dashboard's files (/, /app.js, /style.css) hold no job
// data and are served to anyone: a browser cannot send a header when it
// navigates, so the page takes ?token= once and sends the header itself.
func (m *Monitor) Handler() http.Handler {
	reg := prometheus.NewRegistry()
	prometheus.WrapRegistererWith(prometheus.Labels{"bmojo_job": m.cfg.JobName}, reg).MustRegister(collector{m})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.auth(promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: nil})))
	mux.Handle("GET /api/v1/status", m.auth(http.HandlerFunc(m.serveStatus)))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		code, synced := http.StatusOK, m.Synced()
		if !synced {
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, map[string]any{"ok": synced, "job": m.cfg.JobName})
	})
	static, _ := fs.Sub(webFS, "web") // web/ is embedded: Sub cannot fail
	files := http.FileServerFS(static)
	mux.Handle("GET /", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	}))
	return mux
}

func (m *Monitor) serveStatus(w http.ResponseWriter, _ *http.Request) {
	s, err := m.Status()
	if err == nil && m.cfg.Token == "" {
		// Without a token anyone who reaches the port reads this: leave out
		// where the workers listen.
		for i := range s.Workers {
			s.Workers[i].Endpoint = ""
		}
	}
	switch {
	case errors.Is(err, ErrNoJob):
		writeJSON(w, http.StatusNotFound, errorBody{Error: err.Error(), Job: m.cfg.JobName})
	case err != nil:
		writeJSON(w, http.StatusServiceUnavailable, errorBody{Error: err.Error(), Job: m.cfg.JobName})
	default:
		writeJSON(w, http.StatusOK, s)
	}
}

type errorBody struct {
	Error string `json:"error"`
	Job   string `json:"job,omitempty"`
}

func (m *Monitor) auth(next http.Handler) http.Handler {
	if m.cfg.Token == "" {
		return next
	}
	want := []byte("Bearer " + m.cfg.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := r.Header.Get("Authorization")
		if subtle.ConstantTimeCompare([]byte(got), want) == 1 {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="bmojo"`)
		msg := "missing bearer token: send the header Authorization: Bearer <token> (bmojo status --token, or BMOJO_TOKEN)"
		if got != "" {
			msg = "wrong bearer token"
		}
		writeJSON(w, http.StatusUnauthorized, errorBody{Error: msg})
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v) // the client went away: nothing to do
}

// HostCheck guards next against DNS rebinding when ln is a loopback
// address: a browser tricked into sending a page's requests to 127.0.0.1
// still sends the attacker's host name, and gets 421 Misdirected Request.
// Requests naming localhost or a loopback IP (any port) pass. On other
// addresses the check is left to the token and the network.
func HostCheck(ln net.Listener, next http.Handler) http.Handler {
	a, ok := ln.Addr().(*net.TCPAddr)
	if !ok || !a.IP.IsLoopback() {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
		host = strings.Trim(host, "[]")
		if ip := net.ParseIP(host); !(strings.EqualFold(host, "localhost") || ip != nil && ip.IsLoopback()) {
			http.Error(w, fmt.Sprintf("monitor: host %q is not this loopback server's: open it as http://127.0.0.1:%d/", r.Host, a.Port),
				http.StatusMisdirectedRequest)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Listen listens on addr; when fallback is set and addr's port is taken,
// it listens on a free port of the same host instead.
func Listen(addr string, fallback bool) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil && fallback && errors.Is(err, syscall.EADDRINUSE) {
		host, _, serr := net.SplitHostPort(addr)
		if serr == nil {
			ln, err = net.Listen("tcp", net.JoinHostPort(host, "0"))
		}
	}
	if err != nil {
		return nil, fmt.Errorf("monitor: listen on %s: %w", addr, err)
	}
	return ln, nil
}

// URL is the address a person opens for ln: an unspecified host
// (0.0.0.0, ::) is shown as 127.0.0.1.
func URL(ln net.Listener) string {
	a := ln.Addr().(*net.TCPAddr)
	host := a.IP.String()
	if a.IP.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, fmt.Sprint(a.Port)) + "/"
}

// Serve runs the cache (Run) and the HTTP server on ln until ctx ends.
func (m *Monitor) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{Handler: HostCheck(ln, m.Handler()),
		// Bounded everything: the dashboard polls small JSON documents.
		ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- m.Run(ctx) }()
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	var err error
	ran := false
	select {
	case <-ctx.Done():
	case err = <-runErr:
		ran = true
	case err = <-serveErr:
		err = fmt.Errorf("monitor: serve: %w", err)
	}
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer scancel()
	_ = srv.Shutdown(sctx) // the dashboard polls: nothing long-lived to drain
	if !ran {
		if rerr := <-runErr; err == nil && rerr != nil {
			err = rerr
		}
	}
	return err
}

// Start runs a monitor for cfg in the background: serving HTTP on addr
// (fallback: a free port of the same host when addr's is taken; onURL, if
// set, gets the URL), or only following the job (TensorBoard export) when
// addr is empty. stop ends it and waits.
func Start(ctx context.Context, cfg Config, addr string, fallback bool, onURL func(url string)) (stop func(), err error) {
	m, err := New(cfg)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	if addr == "" {
		go func() { done <- m.Run(ctx) }()
	} else {
		ln, err := Listen(addr, fallback)
		if err != nil {
			cancel()
			return nil, err
		}
		url := URL(ln)
		if cfg.TLS != nil {
			ln = tls.NewListener(ln, cfg.TLS)
			url = "https" + strings.TrimPrefix(url, "http")
		}
		if onURL != nil {
			onURL(url)
		}
		go func() { done <- m.Serve(ctx, ln) }()
	}
	return func() {
		cancel()
		if err := <-done; err != nil && cfg.Logger != nil {
			cfg.Logger.Warn("monitor stopped", "error", err)
		}
	}, nil
}

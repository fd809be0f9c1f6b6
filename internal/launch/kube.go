package launch

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"syscall"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Sentinel errors, wrapped by Apply, Delete and Status, so the CLI (and
// `bmojo status --k8s`) can tell the user what to do.
var (
	ErrKubeconfig  = errors.New("kubeconfig")
	ErrForbidden   = errors.New("forbidden")
	ErrUnreachable = errors.New("cannot reach the Kubernetes API server")
	ErrNotFound    = errors.New("job not found")
	ErrImmutable   = errors.New("job already exists with a different spec")
)

// requestTimeout bounds each API call, so an unreachable server fails in
// seconds instead of hanging on TCP retries.
const requestTimeout = 30 * time.Second

// KubeConfig is the caller's cluster, resolved like kubectl resolves it.
type KubeConfig struct {
	REST      *rest.Config
	Namespace string // the context's namespace, or DefaultNamespace
	Context   string // the context used ("" when in-cluster)
}

// LoadKubeConfig resolves the kubeconfig the way kubectl does: an explicit
// path, else $KUBECONFIG (a list), else ~/.kube/config, else the in-cluster
// service account; context "" means the current context.
func LoadKubeConfig(path, kubeContext string) (*KubeConfig, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = path
	overrides := &clientcmd.ConfigOverrides{CurrentContext: kubeContext}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, overrides)
	raw, err := cc.RawConfig()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKubeconfig, err)
	}
	if kubeContext != "" {
		if _, ok := raw.Contexts[kubeContext]; !ok {
			return nil, fmt.Errorf("%w: context %q not found in %s (have: %s)", ErrKubeconfig, kubeContext,
				sources(rules), strings.Join(contextNames(raw.Contexts), ", "))
		}
	}
	cfg, err := cc.ClientConfig()
	if err != nil {
		if clientcmd.IsEmptyConfig(err) {
			return nil, fmt.Errorf("%w: none found (looked in %s); pass --kubeconfig, set KUBECONFIG, or run inside a cluster", ErrKubeconfig, sources(rules))
		}
		return nil, fmt.Errorf("%w: %v", ErrKubeconfig, err)
	}
	ns, _, err := cc.Namespace()
	if err != nil || ns == "" {
		ns = DefaultNamespace
	}
	cfg.Timeout = requestTimeout
	cfg.UserAgent = "bmojo-launch"
	ctxName := kubeContext
	if ctxName == "" {
		ctxName = raw.CurrentContext
	}
	return &KubeConfig{REST: cfg, Namespace: ns, Context: ctxName}, nil
}

func sources(r *clientcmd.ClientConfigLoadingRules) string {
	if r.ExplicitPath != "" {
		return r.ExplicitPath
	}
	if len(r.Precedence) > 0 {
		return strings.Join(r.Precedence, ":")
	}
	return clientcmd.RecommendedHomeFile
}

func contextNames[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	if len(out) == 0 {
		return []string{"none"}
	}
	return out
}

// explain turns client-go errors into ones a user can act on, keeping the
// original wrapped. host is the API server's address.
func explain(host string, err error) error {
	if err == nil {
		return nil
	}
	var st apierrors.APIStatus
	switch {
	case apierrors.IsForbidden(err):
		msg := err.Error()
		if errors.As(err, &st) {
			msg = st.Status().Message
		}
		return fmt.Errorf("%w: %s (your kubeconfig's user lacks RBAC permission for this; k8s/README.md lists what launch needs)", ErrForbidden, msg)
	case apierrors.IsUnauthorized(err):
		return fmt.Errorf("unauthorized: the API server at %s rejected the kubeconfig's credentials (expired token?): %w", host, err)
	case errors.Is(err, context.DeadlineExceeded), isNetErr(err):
		return fmt.Errorf("%w at %s: %w", ErrUnreachable, host, err)
	}
	return err
}

func isNetErr(err error) bool {
	var op *net.OpError
	var dns *net.DNSError
	var ue *url.Error
	if errors.As(err, &op) || errors.As(err, &dns) || errors.Is(err, syscall.ECONNREFUSED) {
		return true
	}
	// client-go wraps dial failures in *url.Error; a timeout there is the
	// server not answering.
	return errors.As(err, &ue) && (ue.Timeout() || strings.Contains(ue.Error(), "connect"))
}

// Command node-dns is the one-node cluster's DNS (scripts/kube-node.sh),
// standing in for CoreDNS, whose image the node cannot pull: it answers the
// A records Kubernetes' DNS specification gives Services and pods, from the
// API server's Services and pods (informers), so pods reach each other by
// the names the manifests use:
//
//	<service>.<ns>.svc.<domain>           a ClusterIP, or a headless Service's pods
//	<hostname>.<subdomain>.<ns>.svc.<domain>  a pod whose subdomain names a headless Service
//
// A headless Service's pods are published once ready, or at once with
// publishNotReadyAddresses, as the EndpointSlice controller does. Any other
// name gets NXDOMAIN (the node has no upstream resolver), AAAA an empty answer.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listers "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/clientcmd"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster (required)")
	listen := flag.String("listen", "", "UDP address to serve, e.g. 10.244.0.1:53 (required)")
	domain := flag.String("domain", "cluster.local", "the cluster domain")
	flag.Parse()
	log := hclog.New(&hclog.LoggerOptions{Name: "node-dns", Output: os.Stderr})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, log, *kubeconfig, *listen, *domain); err != nil {
		log.Error("failed", "error", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, log hclog.Logger, kubeconfig, listen, domain string) error {
	if kubeconfig == "" || listen == "" {
		return errors.New("node-dns: -kubeconfig and -listen are required")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("node-dns: kubeconfig: %w", err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("node-dns: client: %w", err)
	}
	f := informers.NewSharedInformerFactory(cs, 10*time.Minute)
	r := &resolver{pods: f.Core().V1().Pods().Lister(), svcs: f.Core().V1().Services().Lister(),
		suffix: ".svc." + strings.Trim(domain, ".") + "."}
	f.Start(ctx.Done())
	for typ, ok := range f.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("node-dns: %v informer did not sync", typ)
		}
	}
	pc, err := net.ListenPacket("udp", listen)
	if err != nil {
		return fmt.Errorf("node-dns: listen: %w", err)
	}
	go func() {
		<-ctx.Done()
		pc.Close()
	}()
	log.Info("serving", "listen", listen, "domain", domain)
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("node-dns: read: %w", err)
		}
		resp, name, err := r.answer(buf[:n])
		if err != nil {
			log.Warn("bad query", "from", from, "error", err)
			continue
		}
		log.Debug("query", "name", name)
		if _, err := pc.WriteTo(resp, from); err != nil {
			log.Warn("reply", "to", from, "error", err)
		}
	}
}

type resolver struct {
	pods   listers.PodLister
	svcs   listers.ServiceLister
	suffix string // ".svc.cluster.local."
}

// answer builds the reply to one query message.
func (r *resolver) answer(query []byte) ([]byte, string, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, "", fmt.Errorf("node-dns: header: %w", err)
	}
	q, err := p.Question()
	if err != nil {
		return nil, "", fmt.Errorf("node-dns: question: %w", err)
	}
	name := strings.ToLower(q.Name.String())
	ips, found := r.lookup(name)
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: found, RecursionDesired: h.RecursionDesired, RCode: dnsmessage.RCodeSuccess}
	if !found {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, name, fmt.Errorf("node-dns: %w", err)
	}
	if err := b.Question(q); err != nil {
		return nil, name, fmt.Errorf("node-dns: %w", err)
	}
	if err := b.StartAnswers(); err != nil {
		return nil, name, fmt.Errorf("node-dns: %w", err)
	}
	if q.Type == dnsmessage.TypeA {
		for _, ip := range ips {
			rr := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 5}
			if err := b.AResource(rr, dnsmessage.AResource{A: ip.As4()}); err != nil {
				return nil, name, fmt.Errorf("node-dns: %w", err)
			}
		}
	}
	out, err := b.Finish()
	if err != nil {
		return nil, name, fmt.Errorf("node-dns: %w", err)
	}
	return out, name, nil
}

// lookup resolves a cluster name; found is false for a name that does not
// exist (NXDOMAIN).
func (r *resolver) lookup(name string) (ips []netip.Addr, found bool) {
	rest, ok := strings.CutSuffix(name, r.suffix)
	if !ok {
		return nil, false
	}
	parts := strings.Split(rest, ".")
	switch len(parts) {
	case 2: // service.namespace
		svc, err := r.svcs.Services(parts[1]).Get(parts[0])
		if err != nil {
			return nil, false
		}
		if svc.Spec.ClusterIP != corev1.ClusterIPNone {
			ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
			return []netip.Addr{ip}, err == nil
		}
		pods, err := r.pods.Pods(parts[1]).List(labels.SelectorFromSet(svc.Spec.Selector))
		if err != nil {
			return nil, true
		}
		for _, p := range pods {
			if ip, ok := published(svc, p); ok {
				ips = append(ips, ip)
			}
		}
		return ips, true
	case 3: // hostname.subdomain.namespace
		svc, err := r.svcs.Services(parts[2]).Get(parts[1])
		if err != nil || svc.Spec.ClusterIP != corev1.ClusterIPNone {
			return nil, false
		}
		pods, err := r.pods.Pods(parts[2]).List(labels.SelectorFromSet(svc.Spec.Selector))
		if err != nil {
			return nil, false
		}
		for _, p := range pods {
			if p.Spec.Hostname == parts[0] && p.Spec.Subdomain == parts[1] {
				if ip, ok := published(svc, p); ok {
					return []netip.Addr{ip}, true
				}
			}
		}
	}
	return nil, false
}

// published is a pod's address if a headless Service publishes it: the pod
// has an IP, is not terminating, and is ready or the Service publishes
// addresses that are not.
func published(svc *corev1.Service, p *corev1.Pod) (netip.Addr, bool) {
	ip, err := netip.ParseAddr(p.Status.PodIP)
	if err != nil || p.DeletionTimestamp != nil || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return netip.Addr{}, false
	}
	if svc.Spec.PublishNotReadyAddresses {
		return ip, true
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

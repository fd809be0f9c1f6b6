package launch

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// FieldManager owns the fields bmojo applies; a second manager (kubectl
// edit, an operator) changing them shows up as a conflict bmojo overrides,
// because the launch spec is the source of truth for a launched job.
const FieldManager = "bmojo"

// Client applies, lists and deletes a job's objects in one job.
type Client struct {
	host   string
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

// NewClient connects lazily: nothing is sent until the first call.
func NewClient(cfg *rest.Config) (*Client, error) {
	// client-go's default of 5 requests/s throttles a launch (two calls per
	// object) to seconds; kubectl raises it the same way.
	cfg = rest.CopyConfig(cfg)
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 50, 100
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("launch: discovery client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("launch: dynamic client: %w", err)
	}
	return &Client{
		host:   cfg.Host,
		dyn:    dyn,
		mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)),
	}, nil
}

// Applied is what happened to one object.
type Applied struct {
	Kind, Name      string
	Action          string // created, configured, unchanged (with DryRun: what would happen)
	ResourceVersion string // after the apply; "" in a dry run that creates
}

func (a Applied) String() string {
	return fmt.Sprintf("%s/%s %s", strings.ToLower(a.Kind), a.Name, a.Action)
}

// ApplyOptions tune Apply.
type ApplyOptions struct {
	// DryRun sends every object with dryRun=All: the server runs defaulting,
	// validation and admission and persists nothing.
	DryRun bool
}

// Apply server-side-applies every object into namespace ns, in order. It is
// idempotent: applying the same manifests again changes nothing (the server
// skips no-op writes, so resourceVersions stay). It stops at the first
// error, naming the object.
func (c *Client) Apply(ctx context.Context, ns string, m *Manifests, opts ApplyOptions) ([]Applied, error) {
	if ph := m.Placeholders(); len(ph) > 0 {
		return nil, fmt.Errorf("launch: %w: Secrets %s are unfilled placeholders (FillSecrets makes their data); pods would start without credentials", ErrCredentials, strings.Join(ph, ", "))
	}
	var out []Applied
	for _, obj := range m.Objects {
		a, err := c.applyOne(ctx, ns, obj, opts)
		if err != nil {
			return out, err
		}
		out = append(out, a)
	}
	return out, nil
}

func (c *Client) resource(gvk schema.GroupVersionKind, ns string) (dynamic.ResourceInterface, error) {
	mapping, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		if meta.IsNoMatchError(err) {
			return nil, fmt.Errorf("the cluster does not serve %s: %w", gvk, err)
		}
		return nil, explain(c.host, err)
	}
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		return c.dyn.Resource(mapping.Resource).Namespace(ns), nil
	}
	return c.dyn.Resource(mapping.Resource), nil
}

func (c *Client) applyOne(ctx context.Context, ns string, obj *unstructured.Unstructured, opts ApplyOptions) (Applied, error) {
	obj = obj.DeepCopy()
	obj.SetNamespace(ns)
	kind, name := obj.GetKind(), obj.GetName()
	a := Applied{Kind: kind, Name: name}
	fail := func(err error) (Applied, error) {
		return a, fmt.Errorf("launch: apply %s/%s in namespace %s: %w", strings.ToLower(kind), name, ns, err)
	}
	ri, err := c.resource(obj.GroupVersionKind(), ns)
	if err != nil {
		return fail(err)
	}
	before, err := ri.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		before = nil
	case err != nil:
		return fail(explain(c.host, err))
	}
	ao := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	if opts.DryRun {
		ao.DryRun = []string{metav1.DryRunAll}
	}
	after, err := ri.Apply(ctx, name, obj, ao)
	if err != nil {
		return fail(c.explainApply(ns, kind, err))
	}
	a.ResourceVersion = after.GetResourceVersion()
	switch {
	case before == nil:
		a.Action = "created"
	case before.GetResourceVersion() == after.GetResourceVersion():
		a.Action = "unchanged"
	default:
		a.Action = "configured"
	}
	return a, nil
}

func (c *Client) explainApply(ns, kind string, err error) error {
	if apierrors.IsNotFound(err) && strings.Contains(err.Error(), "namespaces") {
		return fmt.Errorf("namespace %q does not exist; create it (kubectl create namespace %s) or pick another with -n: %w", ns, ns, err)
	}
	if apierrors.IsInvalid(err) && kind == "Job" && strings.Contains(err.Error(), "immutable") {
		return fmt.Errorf("%w: a Job's pod template cannot change while it exists; run `bmojo delete` for it (checkpoints are kept) and launch again to resume: %w", ErrImmutable, err)
	}
	return explain(c.host, err)
}

// jobKinds are the kinds a job consists of, in delete order (workloads first,
// so nothing restarts into a half-deleted job). Pods are left to their
// controllers' garbage collection.
var jobKinds = []schema.GroupVersionKind{
	{Group: "batch", Version: "v1", Kind: "Job"},
	{Group: "apps", Version: "v1", Kind: "Deployment"},
	{Group: "apps", Version: "v1", Kind: "StatefulSet"},
	{Group: "policy", Version: "v1", Kind: "PodDisruptionBudget"},
	{Group: "networking.k8s.io", Version: "v1", Kind: "NetworkPolicy"},
	{Version: "v1", Kind: "Service"},
	{Version: "v1", Kind: "ConfigMap"},
	{Version: "v1", Kind: "Secret"},
	// Jobs hold no Role now; listed so that delete removes the Role and
	// RoleBinding that launches by older versions made.
	{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "RoleBinding"},
	{Group: "rbac.authorization.k8s.io", Version: "v1", Kind: "Role"},
	{Version: "v1", Kind: "ServiceAccount"},
	{Version: "v1", Kind: "PersistentVolumeClaim"},
}

// Selector matches every object of job, including the etcd data claims the
// StatefulSet creates from its template.
func Selector(job string) string {
	return LabelInstance + "=" + job + "," + LabelName + "=bmojo"
}

// Object names one object of a job.
type Object struct{ Kind, Name string }

func (o Object) String() string { return strings.ToLower(o.Kind) + "/" + o.Name }

// List returns the job's objects in namespace ns, in delete order.
func (c *Client) List(ctx context.Context, ns, job string) ([]Object, error) {
	var out []Object
	for _, gvk := range jobKinds {
		ri, err := c.resource(gvk, ns)
		if err != nil {
			return nil, fmt.Errorf("launch: list %s: %w", gvk.Kind, err)
		}
		l, err := ri.List(ctx, metav1.ListOptions{LabelSelector: Selector(job)})
		if err != nil {
			return nil, fmt.Errorf("launch: list %s in namespace %s: %w", strings.ToLower(gvk.Kind)+"s", ns, explain(c.host, err))
		}
		names := make([]string, 0, len(l.Items))
		for _, it := range l.Items {
			names = append(names, it.GetName())
		}
		sort.Strings(names)
		for _, n := range names {
			out = append(out, Object{Kind: gvk.Kind, Name: n})
		}
	}
	return out, nil
}

// DeleteOptions tune Delete.
type DeleteOptions struct {
	// Purge also deletes the checkpoint and etcd data claims; without it a
	// later launch of the same name resumes from the latest checkpoint.
	Purge  bool
	DryRun bool
}

// Delete removes the job's objects from namespace ns and returns what it
// deleted. Dependents (pods, ReplicaSets) go by background garbage
// collection, so Delete does not wait on kubelets. ErrNotFound when the job
// has no objects there.
func (c *Client) Delete(ctx context.Context, ns, job string, opts DeleteOptions) ([]Object, error) {
	objs, err := c.List(ctx, ns, job)
	if err != nil {
		return nil, err
	}
	if len(objs) == 0 {
		return nil, fmt.Errorf("launch: %w: no objects labelled %s in namespace %s", ErrNotFound, Selector(job), ns)
	}
	bg := metav1.DeletePropagationBackground
	do := metav1.DeleteOptions{PropagationPolicy: &bg}
	if opts.DryRun {
		do.DryRun = []string{metav1.DryRunAll}
	}
	var deleted []Object
	for _, o := range objs {
		if o.Kind == "PersistentVolumeClaim" && !opts.Purge {
			continue
		}
		gvk := kindGVK(o.Kind)
		ri, err := c.resource(gvk, ns)
		if err != nil {
			return deleted, fmt.Errorf("launch: delete %s: %w", o, err)
		}
		if err := ri.Delete(ctx, o.Name, do); err != nil && !apierrors.IsNotFound(err) {
			return deleted, fmt.Errorf("launch: delete %s in namespace %s: %w", o, ns, explain(c.host, err))
		}
		deleted = append(deleted, o)
	}
	return deleted, nil
}

func kindGVK(kind string) schema.GroupVersionKind {
	for _, g := range jobKinds {
		if g.Kind == kind {
			return g
		}
	}
	return schema.GroupVersionKind{Kind: kind}
}

// IsForbidden reports whether err is an RBAC denial from any of this
// package's calls.
func IsForbidden(err error) bool { return errors.Is(err, ErrForbidden) }

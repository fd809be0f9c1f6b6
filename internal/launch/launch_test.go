package launch

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/rest"

	"github.com/bmojo/bmojo/job"
	k8sfs "github.com/bmojo/bmojo/k8s"
)

func loadExample(t *testing.T, name string) Spec {
	t.Helper()
	s, err := LoadSpec(filepath.Join("..", "..", "examples", name))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return s
}

func TestValidateNamesTheField(t *testing.T) {
	base := loadExample(t, "launch.yaml")
	cases := []struct {
		name, field string
		edit        func(*Spec)
	}{
		{"image without tag", "image", func(s *Spec) { s.Image = "registry.example.com:5000/bmojo" }},
		{"image latest", "image", func(s *Spec) { s.Image = "bmojo:latest" }},
		{"no image", "image", func(s *Spec) { s.Image = "" }},
		{"gpus on cpu-demo", "gpus_per_worker", func(s *Spec) { s.GPUsPerWorker = 1 }},
		{"workers below minimum", "workers", func(s *Spec) { s.Workers, s.MinWorkers = 2, 4 }},
		{"zero workers", "workers", func(s *Spec) { s.Workers, s.MinWorkers = 0, 0 }},
		{"bad name", "name", func(s *Spec) { s.Name = "Tiny_Demo" }},
		{"name too long", "name", func(s *Spec) { s.Name = strings.Repeat("a", MaxNameLen+1) }},
		{"bad namespace", "namespace", func(s *Spec) { s.Namespace = "-x" }},
		{"unknown overlay", "overlay", func(s *Spec) { s.Overlay = "tpu" }},
		{"bad size", "checkpoint.size", func(s *Spec) { s.Checkpoint.Size = "lots" }},
		{"bad memory", "worker_memory", func(s *Spec) { s.WorkerMemory = "32GB" }},
		{"data path without claim", "data.path", func(s *Spec) { s.Data.Path = "x" }},
		{"reserved train key", "train.checkpoint_dir", func(s *Spec) { s.Train = map[string]any{"checkpoint_dir": "/x"} }},
		{"bad train value", "steps", func(s *Spec) { s.Train = map[string]any{"steps": -1} }},
		{"unknown train key", "stepz", func(s *Spec) { s.Train = map[string]any{"stepz": 3} }},
		{"bad preset", "preset", func(s *Spec) { s.Preset = "gpt-9000" }},
		{"version", "version", func(s *Spec) { s.Version = 2 }},
		{"bad monitor namespace", "monitor.namespace", func(s *Spec) { s.Monitor.Namespace = "Monitoring" }},
		{"etcd image latest", "etcd_image", func(s *Spec) { s.EtcdImage = "quay.io/coreos/etcd:latest" }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := base
			s.Train = map[string]any{}
			c.edit(&s)
			err := s.Validate()
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrSpec) || !strings.Contains(err.Error(), c.field) {
				t.Fatalf("error %q does not name %q (or is not ErrSpec)", err, c.field)
			}
		})
	}
}

func TestParseSpecRejectsUnknownKeys(t *testing.T) {
	_, err := ParseSpec("x.yaml", []byte("version: 1\nworkerz: 3\n"))
	if err == nil || !strings.Contains(err.Error(), "workerz") {
		t.Fatalf("got %v, want an error naming workerz", err)
	}
}

// hardened checks the pod security settings the issue requires on every
// workload of a render.
func hardened(t *testing.T, m *Manifests) {
	t.Helper()
	workloads := 0
	for _, o := range m.Objects {
		var path []string
		switch o.GetKind() {
		case "Deployment", "StatefulSet", "Job":
			path = []string{"spec", "template", "spec"}
		case "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding":
			// Nothing in a job talks to the Kubernetes API.
			t.Errorf("%s/%s: a job needs no API access", o.GetKind(), o.GetName())
			continue
		case "ServiceAccount":
			if v, ok, _ := unstructured.NestedBool(o.Object, "automountServiceAccountToken"); !ok || v {
				t.Errorf("ServiceAccount/%s mounts its token", o.GetName())
			}
			continue
		default:
			continue
		}
		workloads++
		spec, _, _ := unstructured.NestedMap(o.Object, path...)
		id := o.GetKind() + "/" + o.GetName()
		if v, ok, _ := unstructured.NestedBool(spec, "automountServiceAccountToken"); !ok || v {
			t.Errorf("%s: the pod mounts a service-account token", id)
		}
		if v, _, _ := unstructured.NestedBool(spec, "securityContext", "runAsNonRoot"); !v {
			t.Errorf("%s: runAsNonRoot not set", id)
		}
		if v, _, _ := unstructured.NestedString(spec, "securityContext", "seccompProfile", "type"); v != "RuntimeDefault" {
			t.Errorf("%s: seccompProfile %q", id, v)
		}
		cs, _, _ := unstructured.NestedSlice(spec, "containers")
		for _, c := range cs {
			c := c.(map[string]any)
			if v, _, _ := unstructured.NestedBool(c, "securityContext", "readOnlyRootFilesystem"); !v {
				t.Errorf("%s: readOnlyRootFilesystem not set", id)
			}
			if v, ok, _ := unstructured.NestedBool(c, "securityContext", "allowPrivilegeEscalation"); !ok || v {
				t.Errorf("%s: allowPrivilegeEscalation not false", id)
			}
			if v, _, _ := unstructured.NestedStringSlice(c, "securityContext", "capabilities", "drop"); len(v) != 1 || v[0] != "ALL" {
				t.Errorf("%s: capabilities drop %v", id, v)
			}
			if _, ok := c["readinessProbe"]; !ok {
				t.Errorf("%s: no readiness probe", id)
			}
			if o.GetKind() != "StatefulSet" { // etcd probes HTTP /readyz
				if _, ok, _ := unstructured.NestedMap(c, "readinessProbe", "grpc"); !ok {
					t.Errorf("%s: readiness probe is not on the gRPC health service", id)
				}
			}
		}
	}
	if workloads != 3 {
		t.Errorf("%d workloads, want etcd, coordinator and worker", workloads)
	}
}

func find(t *testing.T, m *Manifests, kind, name string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range m.Objects {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s/%s in the render", kind, name)
	return nil
}

func TestRenderOverlays(t *testing.T) {
	for _, o := range k8sfs.Overlays {
		t.Run(o, func(t *testing.T) {
			m, err := RenderOverlay(o)
			if err != nil {
				t.Fatal(err)
			}
			hardened(t, m)
			if n, _, _ := unstructured.NestedInt64(find(t, m, "StatefulSet", "bmojo-etcd").Object, "spec", "replicas"); n != 3 {
				t.Errorf("etcd replicas %d, want 3", n)
			}
			if n, _, _ := unstructured.NestedInt64(find(t, m, "Deployment", "bmojo-coordinator").Object, "spec", "replicas"); n != 2 {
				t.Errorf("coordinator replicas %d, want 2", n)
			}
			job := find(t, m, "Job", "bmojo-worker")
			if sd, _, _ := unstructured.NestedString(job.Object, "spec", "template", "spec", "subdomain"); sd != "bmojo-worker" {
				t.Errorf("worker subdomain %q, want the headless service bmojo-worker", sd)
			}
			find(t, m, "Service", "bmojo-worker")
			find(t, m, "PersistentVolumeClaim", "bmojo-checkpoints")
		})
	}
}

func TestRenderSpec(t *testing.T) {
	s := loadExample(t, "launch-gpu.yaml")
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	hardened(t, m)
	for _, o := range m.Objects {
		if !strings.HasPrefix(o.GetName(), s.Name+"-") {
			t.Errorf("%s/%s is not prefixed with the job name", o.GetKind(), o.GetName())
		}
		if o.GetNamespace() != s.Namespace {
			t.Errorf("%s/%s namespace %q", o.GetKind(), o.GetName(), o.GetNamespace())
		}
		if l := o.GetLabels(); l[LabelInstance] != s.Name || l[LabelManagedBy] != "bmojo" {
			t.Errorf("%s/%s labels %v", o.GetKind(), o.GetName(), l)
		}
	}
	wjob := find(t, m, "Job", s.Name+"-worker")
	if n, _, _ := unstructured.NestedInt64(wjob.Object, "spec", "completions"); n != int64(s.Workers) {
		t.Errorf("completions %d, want %d", n, s.Workers)
	}
	if wjob.GetLabels()[LabelQueue] != s.Queue {
		t.Errorf("queue label %q, want %q", wjob.GetLabels()[LabelQueue], s.Queue)
	}
	cs, _, _ := unstructured.NestedSlice(wjob.Object, "spec", "template", "spec", "containers")
	c := cs[0].(map[string]any)
	if g, _, _ := unstructured.NestedFieldNoCopy(c, "resources", "limits", "nvidia.com/gpu"); g != int64(s.GPUsPerWorker) {
		t.Errorf("nvidia.com/gpu %v (%T), want %d", g, g, s.GPUsPerWorker)
	}
	if img, _, _ := unstructured.NestedString(c, "image"); img != s.Image {
		t.Errorf("image %q, want %q", img, s.Image)
	}
	if tol, _, _ := unstructured.NestedSlice(wjob.Object, "spec", "template", "spec", "tolerations"); len(tol) == 0 {
		t.Error("gpu workers have no toleration for the nvidia.com/gpu taint")
	}
	if n, _, _ := unstructured.NestedInt64(find(t, m, "PodDisruptionBudget", s.Name+"-worker").Object, "spec", "minAvailable"); n != int64(s.MinWorkers) {
		t.Errorf("worker PDB minAvailable %d, want %d", n, s.MinWorkers)
	}
	var jobFile string
	for _, o := range m.Objects {
		if o.GetKind() == "ConfigMap" {
			jobFile, _, _ = unstructured.NestedString(o.Object, "data", "job.yaml")
		}
	}
	j, err := job.Parse("configmap", []byte(jobFile))
	if err != nil {
		t.Fatalf("the job ConfigMap does not parse as a job file: %v\n%s", err, jobFile)
	}
	if j.Name != s.Name || j.Preset != s.Preset || j.CheckpointDir != "/ckpt" || j.Data != "/data/pile-subset" || j.Steps != 20000 {
		t.Errorf("job file %+v does not carry the spec", j)
	}
}

func TestRenderIsDeterministic(t *testing.T) {
	s := loadExample(t, "launch.yaml")
	a, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if string(a.YAML) != string(b.YAML) {
		t.Error("two renders of one spec differ: a relaunch would not be a no-op")
	}
}

func TestKubeConfigErrors(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config")
	if err := os.WriteFile(cfg, []byte(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: u
  user: {token: t}
contexts:
- name: dev
  context: {cluster: c, user: u, namespace: team-a}
current-context: dev
`), 0o600); err != nil {
		t.Fatal(err)
	}
	kc, err := LoadKubeConfig(cfg, "")
	if err != nil {
		t.Fatal(err)
	}
	if kc.Namespace != "team-a" || kc.Context != "dev" {
		t.Errorf("namespace %q context %q, want the context's team-a, dev", kc.Namespace, kc.Context)
	}
	_, err = LoadKubeConfig(cfg, "prod")
	if !errors.Is(err, ErrKubeconfig) || !strings.Contains(err.Error(), `context "prod" not found`) {
		t.Errorf("missing context: %v", err)
	}
	_, err = LoadKubeConfig(filepath.Join(dir, "nope"), "")
	if !errors.Is(err, ErrKubeconfig) || !strings.Contains(err.Error(), "nope") {
		t.Errorf("missing file: %v", err)
	}
	t.Setenv("KUBECONFIG", filepath.Join(dir, "absent"))
	t.Setenv("HOME", dir)
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	_, err = LoadKubeConfig("", "")
	if !errors.Is(err, ErrKubeconfig) {
		t.Errorf("no kubeconfig at all: %v", err)
	}
}

func TestUnreachableServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	cfg := &rest.Config{Host: "https://" + addr, BearerToken: "x", Timeout: 5 * time.Second}
	cfg.Insecure = true
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := loadExample(t, "launch.yaml")
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.FillSecrets(ctx, "bmojo", s, m, time.Now()); !errors.Is(err, ErrUnreachable) {
		t.Errorf("reading the Secrets: %v, want ErrUnreachable", err)
	}
	if _, err := Fill(s, m, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	_, err = c.Apply(ctx, "bmojo", m, ApplyOptions{})
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), addr) {
		t.Errorf("apply: %v, want ErrUnreachable naming %s", err, addr)
	}
	_, err = Status(ctx, cfg, "bmojo", "tiny-demo")
	if !errors.Is(err, ErrUnreachable) {
		t.Errorf("status: %v, want ErrUnreachable", err)
	}
}

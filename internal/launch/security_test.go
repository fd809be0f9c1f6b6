package launch

// Rendering tests for the job's security posture: who may connect to which
// port (NetworkPolicies), which credentials each container mounts, and that
// launch's Secrets are reused rather than rotated.

import (
	"bytes"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/bmojo/bmojo/internal/pki"
	k8sfs "github.com/bmojo/bmojo/k8s"
)

// peer is one `from` entry of an ingress rule, reduced to what it admits.
type peer struct {
	pods       map[string]string // podSelector.matchLabels; nil = no podSelector
	namespace  string            // namespaceSelector kubernetes.io/metadata.name; "" = none
	everything bool              // an empty from: any source
}

func (p peer) String() string {
	switch {
	case p.everything:
		return "anyone"
	case p.namespace != "":
		return "namespace " + p.namespace
	case len(p.pods) == 0:
		return "every pod of the namespace"
	}
	keys := slices.Sorted(maps.Keys(p.pods))
	var b strings.Builder
	for _, k := range keys {
		if k == LabelComponent {
			b.WriteString("component=" + p.pods[k] + " ")
		}
	}
	return "pods " + strings.TrimSpace(b.String()) + " of job " + p.pods[LabelInstance]
}

func subset(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// admitted lists who the NetworkPolicies in m let reach port on a pod with
// labels, and whether any policy selects the pod for ingress at all (a pod
// no policy selects is open to everyone).
func admitted(t *testing.T, m *Manifests, labels map[string]string, port int64) (peers []peer, selected bool) {
	t.Helper()
	for _, o := range m.Objects {
		if o.GetKind() != "NetworkPolicy" {
			continue
		}
		sel, _, _ := unstructured.NestedStringMap(o.Object, "spec", "podSelector", "matchLabels")
		if !subset(sel, labels) {
			continue
		}
		types, _, _ := unstructured.NestedStringSlice(o.Object, "spec", "policyTypes")
		if !slices.Contains(types, "Ingress") {
			continue
		}
		selected = true
		rules, _, _ := unstructured.NestedSlice(o.Object, "spec", "ingress")
		for _, r := range rules {
			r := r.(map[string]any)
			ports, _, _ := unstructured.NestedSlice(r, "ports")
			match := len(ports) == 0 // no ports: every port
			for _, p := range ports {
				n, _, _ := unstructured.NestedInt64(p.(map[string]any), "port")
				match = match || n == port
			}
			if !match {
				continue
			}
			from, _, _ := unstructured.NestedSlice(r, "from")
			if len(from) == 0 {
				peers = append(peers, peer{everything: true})
			}
			for _, f := range from {
				f := f.(map[string]any)
				var p peer
				if ps, ok := f["podSelector"].(map[string]any); ok {
					p.pods, _, _ = unstructured.NestedStringMap(ps, "matchLabels")
					if p.pods == nil {
						p.pods = map[string]string{}
					}
				}
				if _, ok := f["namespaceSelector"]; ok {
					p.namespace, _, _ = unstructured.NestedString(f, "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name")
					if p.namespace == "" {
						p.everything = true // a namespaceSelector not naming one namespace
					}
				}
				if _, ok := f["ipBlock"]; ok {
					p.everything = true
				}
				peers = append(peers, p)
			}
		}
	}
	return peers, selected
}

// podTemplate is a workload's pod template labels and spec.
func podTemplate(t *testing.T, o *unstructured.Unstructured) (map[string]string, map[string]any) {
	t.Helper()
	labels, _, _ := unstructured.NestedStringMap(o.Object, "spec", "template", "metadata", "labels")
	spec, _, _ := unstructured.NestedMap(o.Object, "spec", "template", "spec")
	return labels, spec
}

func workload(t *testing.T, m *Manifests, component string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range m.Objects {
		switch o.GetKind() {
		case "Deployment", "StatefulSet", "Job":
			if o.GetLabels()[LabelComponent] == component {
				return o
			}
		}
	}
	t.Fatalf("no %s workload in the render", component)
	return nil
}

// checkNetworkPolicies: every pod of the job is under a default deny; the
// rings (7100, and 7102 inside a node) only from the job's workers, etcd's client port only from the job's
// pods, its peer port only from its members, the monitor only from
// monitorNS ("" = the job's namespace), and no other port from any pod.
func checkNetworkPolicies(t *testing.T, m *Manifests, job, monitorNS string) {
	t.Helper()
	jobPods := map[string]string{LabelName: "bmojo", "app.kubernetes.io/part-of": "bmojo", LabelInstance: job}
	with := func(component string) map[string]string {
		l := maps.Clone(jobPods)
		l[LabelComponent] = component
		return l
	}
	monitor := peer{pods: map[string]string{}}
	if monitorNS != "" {
		monitor = peer{namespace: monitorNS}
	}
	want := map[string]map[int64][]peer{
		"worker":      {7100: {{pods: with("worker")}}, 7102: {{pods: with("worker")}}},
		"etcd":        {2379: {{pods: jobPods}}, 2380: {{pods: with("etcd")}}},
		"coordinator": {8080: {monitor}},
	}
	for component, ports := range want {
		labels, spec := podTemplate(t, workload(t, m, component))
		if !subset(jobPods, labels) {
			t.Errorf("%s pods lack the job's labels: %v", component, labels)
		}
		// Every port a container declares, and the ones policies name.
		declared := map[int64]bool{}
		cs, _, _ := unstructured.NestedSlice(spec, "containers")
		for _, c := range cs {
			ps, _, _ := unstructured.NestedSlice(c.(map[string]any), "ports")
			for _, p := range ps {
				n, _, _ := unstructured.NestedInt64(p.(map[string]any), "containerPort")
				declared[n] = true
			}
		}
		for port := range ports {
			if !declared[port] {
				t.Errorf("%s: the policies open port %d, which no container declares", component, port)
			}
		}
		for port := range declared {
			got, selected := admitted(t, m, labels, port)
			if !selected {
				t.Errorf("%s: no NetworkPolicy selects its pods: open to everyone", component)
				continue
			}
			w := ports[port]
			if !slices.EqualFunc(got, w, func(a, b peer) bool {
				return a.everything == b.everything && a.namespace == b.namespace && (a.pods == nil) == (b.pods == nil) && maps.Equal(a.pods, b.pods)
			}) {
				t.Errorf("%s port %d admits %v, want %v", component, port, got, w)
			}
		}
	}
}

func TestNetworkPolicies(t *testing.T) {
	for _, o := range k8sfs.Overlays {
		t.Run(o, func(t *testing.T) {
			m, err := RenderOverlay(o)
			if err != nil {
				t.Fatal(err)
			}
			checkNetworkPolicies(t, m, "bmojo", "")
		})
	}
	t.Run("monitor.namespace", func(t *testing.T) {
		s := loadExample(t, "launch-gpu.yaml")
		s.Monitor.Namespace = "monitoring"
		m, err := Render(s)
		if err != nil {
			t.Fatal(err)
		}
		checkNetworkPolicies(t, m, s.Name, "monitoring")
	})
}

// mount is one container's view of a Secret volume.
type mount struct{ secret, path string }

// secretMounts lists, per container, the Secrets it mounts (volumes and
// projected sources) and the Secrets its env reads.
func secretMounts(t *testing.T, spec map[string]any) map[string][]mount {
	t.Helper()
	vols := map[string][]string{}
	vs, _, _ := unstructured.NestedSlice(spec, "volumes")
	for _, v := range vs {
		v := v.(map[string]any)
		name, _ := v["name"].(string)
		if s, ok, _ := unstructured.NestedString(v, "secret", "secretName"); ok {
			vols[name] = append(vols[name], s)
		}
		srcs, _, _ := unstructured.NestedSlice(v, "projected", "sources")
		for _, src := range srcs {
			if s, ok, _ := unstructured.NestedString(src.(map[string]any), "secret", "name"); ok {
				vols[name] = append(vols[name], s)
			}
		}
	}
	out := map[string][]mount{}
	for _, field := range []string{"initContainers", "containers"} {
		cs, _, _ := unstructured.NestedSlice(spec, field)
		for _, c := range cs {
			c := c.(map[string]any)
			cname, _ := c["name"].(string)
			out[cname] = []mount{}
			vms, _, _ := unstructured.NestedSlice(c, "volumeMounts")
			for _, vm := range vms {
				vm := vm.(map[string]any)
				for _, s := range vols[vm["name"].(string)] {
					out[cname] = append(out[cname], mount{s, vm["mountPath"].(string)})
				}
			}
			env, _, _ := unstructured.NestedSlice(c, "env")
			for _, e := range env {
				if s, ok, _ := unstructured.NestedString(e.(map[string]any), "valueFrom", "secretKeyRef", "name"); ok {
					out[cname] = append(out[cname], mount{s, "env"})
				}
			}
			from, _, _ := unstructured.NestedSlice(c, "envFrom")
			for _, e := range from {
				if s, ok, _ := unstructured.NestedString(e.(map[string]any), "secretRef", "name"); ok {
					out[cname] = append(out[cname], mount{s, "envFrom"})
				}
			}
		}
	}
	return out
}

// checkCredentials: every container mounts its own certificate Secret and
// names files in it, the coordinator reads the token from its Secret, and
// no container reaches the CA Secret (its key) in any way.
func checkCredentials(t *testing.T, m *Manifests, job string) {
	t.Helper()
	want := map[string][]mount{
		"etcd":        {{job + "-etcd-tls", "/etc/etcd-tls"}},
		"coordinator": {{job + "-coordinator-tls", "/etc/bmojo-tls"}, {job + "-monitor-token", "env"}},
		"worker":      {{job + "-worker-tls", "/etc/bmojo-tls"}},
	}
	for component, w := range want {
		o := workload(t, m, component)
		_, spec := podTemplate(t, o)
		got := secretMounts(t, spec)
		for c, ms := range got {
			for _, mt := range ms {
				if mt.secret == job+"-ca" {
					t.Errorf("%s container %s mounts the CA Secret %s (its key) at %s", component, c, mt.secret, mt.path)
				}
			}
			if !slices.Equal(ms, w) {
				t.Errorf("%s container %s reaches Secrets %v, want %v", component, c, ms, w)
			}
		}
		if _, ok := got[component]; !ok {
			t.Errorf("%s: no container named %s", component, component)
		}
		// The flags or env name files of that mount.
		cs, _, _ := unstructured.NestedSlice(spec, "containers")
		text := ""
		for _, c := range cs {
			args, _, _ := unstructured.NestedStringSlice(c.(map[string]any), "args")
			text += strings.Join(args, " ")
			env, _, _ := unstructured.NestedSlice(c.(map[string]any), "env")
			for _, e := range env {
				v, _, _ := unstructured.NestedString(e.(map[string]any), "value")
				text += " " + v
			}
		}
		var need []string
		switch component {
		case "etcd":
			need = []string{"/etc/etcd-tls/tls.crt", "/etc/etcd-tls/tls.key", "/etc/etcd-tls/ca.crt"}
		case "coordinator":
			need = []string{"--tls-ca=/etc/bmojo-tls/ca.crt", "--tls-cert=/etc/bmojo-tls/tls.crt", "--tls-key=/etc/bmojo-tls/tls.key"}
		case "worker":
			need = []string{"--tls-ca=/etc/bmojo-tls/ca.crt", "--tls-cert=/etc/bmojo-tls/worker-$(WORKER_INDEX).crt", "--tls-key=/etc/bmojo-tls/worker-$(WORKER_INDEX).key"}
		}
		for _, n := range need {
			if !strings.Contains(text, n) {
				t.Errorf("%s does not use %s", component, n)
			}
		}
		if strings.Contains(text, "http://$(JOB)-etcd") {
			t.Errorf("%s reaches etcd over plain http", component)
		}
	}
}

func TestCredentialsMounted(t *testing.T) {
	for _, o := range k8sfs.Overlays {
		t.Run(o, func(t *testing.T) {
			m, err := RenderOverlay(o)
			if err != nil {
				t.Fatal(err)
			}
			checkCredentials(t, m, "bmojo")
		})
	}
	t.Run("launch-gpu.yaml", func(t *testing.T) {
		s := loadExample(t, "launch-gpu.yaml")
		m, err := Render(s)
		if err != nil {
			t.Fatal(err)
		}
		checkCredentials(t, m, s.Name)
	})
}

// secrets returns the filled Secrets of m by name, decoded.
func secrets(t *testing.T, m *Manifests) Existing {
	t.Helper()
	out := Existing{}
	for _, o := range m.Objects {
		if o.GetKind() != "Secret" {
			continue
		}
		d, err := secretData(o)
		if err != nil {
			t.Fatal(err)
		}
		out[o.GetName()] = d
	}
	return out
}

func parseCert(t *testing.T, b []byte) *x509.Certificate {
	t.Helper()
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("no PEM in %q", b)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func renderFilled(t *testing.T, s Spec, existing Existing, now time.Time) (*Manifests, []string) {
	t.Helper()
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if ph := m.Placeholders(); len(ph) != 5 {
		t.Fatalf("placeholders %v, want the job's 5 Secrets", ph)
	}
	notes, err := Fill(s, m, existing, now)
	if err != nil {
		t.Fatal(err)
	}
	if ph := m.Placeholders(); len(ph) != 0 {
		t.Fatalf("unfilled after Fill: %v", ph)
	}
	if bytes.Contains(m.YAML, []byte("PRIVATE KEY")) || bytes.Contains(m.YAML, []byte(base64.StdEncoding.EncodeToString([]byte("-----BEGIN")))) {
		t.Fatal("the printable YAML holds key material")
	}
	return m, notes
}

// The Secrets launch makes: identities per process, the worker pair each
// index's pod picks, etcd's names, and a relaunch that changes nothing.
func TestFillSecrets(t *testing.T) {
	s := loadExample(t, "launch.yaml")
	now := time.Now()
	m, notes := renderFilled(t, s, nil, now)
	got := secrets(t, m)
	t.Logf("first launch: %s", strings.Join(notes, "; "))
	ca, err := pki.ParseCA(got[s.Name+"-ca"][KeyCACert], got[s.Name+"-ca"][KeyCAKey])
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	check := func(secret, certKey, role, id string, hosts ...string) {
		t.Helper()
		d := got[secret]
		if !bytes.Equal(d[KeyCACert], ca.PEM) {
			t.Errorf("%s: ca.crt is not the job CA", secret)
		}
		if _, ok := d[KeyCAKey]; ok {
			t.Errorf("%s holds the CA key", secret)
		}
		c := parseCert(t, d[certKey])
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s %s: %v", secret, certKey, err)
		}
		if err := pki.Check(c, role, id); err != nil {
			t.Errorf("%s %s: %v", secret, certKey, err)
		}
		for _, h := range hosts {
			if err := c.VerifyHostname(h); err != nil {
				t.Errorf("%s %s: %v", secret, certKey, err)
			}
		}
	}
	check(s.Name+"-etcd-tls", KeyCert, pki.RoleEtcd, s.Name+"-etcd",
		"tiny-demo-etcd-0.tiny-demo-etcd.bmojo.svc", "tiny-demo-etcd-2.tiny-demo-etcd.bmojo.svc", "127.0.0.1")
	check(s.Name+"-coordinator-tls", KeyCert, pki.RoleCoordinator, CoordinatorID, "tiny-demo-coordinator.bmojo.svc")
	for i := 0; i < s.Workers; i++ {
		check(s.Name+"-worker-tls", WorkerCertKey(i), pki.RoleWorker, "tiny-demo-worker-"+strconv.Itoa(i))
	}
	if n := len(got[s.Name+"-worker-tls"]); n != 1+2*s.Workers {
		t.Errorf("worker Secret has %d keys, want ca.crt and %d pairs", n, s.Workers)
	}
	if tok := got[s.Name+"-monitor-token"][KeyToken]; len(tok) < 32 {
		t.Errorf("token %q is short", tok)
	}

	// A relaunch reuses every byte and says nothing.
	m2, notes := renderFilled(t, s, got, now)
	if len(notes) != 0 || !maps.EqualFunc(secrets(t, m2), got, func(a, b map[string][]byte) bool { return maps.EqualFunc(a, b, bytes.Equal) }) {
		t.Errorf("relaunch changed the Secrets: %v", notes)
	}

	// A larger ring adds the new indices' pairs from the same CA and keeps
	// the rest; a smaller one changes nothing.
	big := s
	big.Workers, big.MinWorkers = 4, 2
	m3, notes := renderFilled(t, big, got, now)
	grown := secrets(t, m3)
	if len(notes) != 2 || !strings.Contains(notes[0], "worker/tiny-demo-worker-2") || !strings.Contains(notes[1], "worker/tiny-demo-worker-3") {
		t.Errorf("growing to 4 workers: %v, want two new worker identities", notes)
	}
	for k, v := range got[s.Name+"-worker-tls"] {
		if !bytes.Equal(grown[s.Name+"-worker-tls"][k], v) {
			t.Errorf("growing the ring changed %s", k)
		}
	}
	small := s
	small.Workers, small.MinWorkers = 1, 1
	if _, notes := renderFilled(t, small, grown, now); len(notes) != 0 {
		t.Errorf("shrinking changed the Secrets: %v", notes)
	}

	// Close to expiry a certificate is issued again from the same CA.
	later := now.Add(leafValidity - renewBefore/2)
	m4, notes := renderFilled(t, s, got, later)
	if len(notes) != 4 || !strings.Contains(notes[0], "again: expires") {
		t.Errorf("expiring certificates: %v, want 4 issued again", notes)
	}
	if !bytes.Equal(secrets(t, m4)[s.Name+"-ca"][KeyCACert], ca.PEM) {
		t.Error("renewal made a new CA")
	}

	// A certificate that names another worker is replaced.
	swapped := maps.Clone(got)
	swapped[s.Name+"-worker-tls"] = maps.Clone(got[s.Name+"-worker-tls"])
	swapped[s.Name+"-worker-tls"][WorkerCertKey(0)] = got[s.Name+"-worker-tls"][WorkerCertKey(1)]
	swapped[s.Name+"-worker-tls"][WorkerKeyKey(0)] = got[s.Name+"-worker-tls"][WorkerKeyKey(1)]
	if _, notes := renderFilled(t, s, swapped, now); len(notes) != 1 || !strings.Contains(notes[0], "wrong identity") {
		t.Errorf("worker-0 holding worker-1's certificate: %v", notes)
	}

	// Without its CA the job's certificates cannot be kept: refused.
	noCA := maps.Clone(got)
	delete(noCA, s.Name+"-ca")
	bad := maps.Clone(got)
	bad[s.Name+"-ca"] = map[string][]byte{KeyCACert: got[s.Name+"-ca"][KeyCACert], KeyCAKey: got[s.Name+"-etcd-tls"][KeyKey]}
	for name, ex := range map[string]Existing{"CA gone": noCA, "CA key of another certificate": bad} {
		m, err := Render(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Fill(s, m, ex, now); !errors.Is(err, ErrCredentials) || !strings.Contains(err.Error(), "bmojo delete") {
			t.Errorf("%s: %v, want ErrCredentials saying what to do", name, err)
		}
	}
}

func TestApplyRefusesPlaceholders(t *testing.T) {
	m, err := RenderOverlay("cpu-demo")
	if err != nil {
		t.Fatal(err)
	}
	var c Client // never reached: the check comes first
	if _, err := c.Apply(t.Context(), "x", m, ApplyOptions{}); !errors.Is(err, ErrCredentials) {
		t.Errorf("applying unfilled Secrets: %v, want ErrCredentials", err)
	}
}

func TestWarnings(t *testing.T) {
	s := loadExample(t, "launch-gpu.yaml")
	if w := s.Warnings(); len(w) != 2 || !strings.Contains(w[0], "image ") || !strings.Contains(w[1], "etcd_image") {
		t.Errorf("tags in the gpu overlay: %v, want a warning for each image", w)
	}
	digest := "@sha256:" + strings.Repeat("a", 64)
	s.Image += digest
	s.EtcdImage = DefaultEtcdImage + digest
	if w := s.Warnings(); len(w) != 0 {
		t.Errorf("digests: %v", w)
	}
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(m.YAML, []byte("image: "+s.EtcdImage)) || !bytes.Contains(m.YAML, []byte("image: "+s.Image)) {
		t.Error("the images are not pinned by their digests in the render")
	}
	if w := loadExample(t, "launch.yaml").Warnings(); len(w) != 0 {
		t.Errorf("cpu-demo (local images, no registry): %v", w)
	}
}

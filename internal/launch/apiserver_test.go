package launch

// Tests against a real kube-apiserver (v1.37.2, built by
// scripts/kube-apiserver.sh) over a real etcd: server-side apply, dry runs,
// validation, RBAC. There are no nodes, controllers or scheduler, so nothing
// here starts a pod; what is checked is what the API server decides.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/bmojo/bmojo/internal/testpki"
	k8sfs "github.com/bmojo/bmojo/k8s"
)

// EnvKubeAPIServer names the kube-apiserver binary; etcd is expected beside
// it. Unset, the API-server tests skip (visibly).
const EnvKubeAPIServer = "BMOJO_KUBE_APISERVER"

type testCluster struct {
	admin, alice *rest.Config
	kubeconfig   string // admin and alice contexts, for LoadKubeConfig
}

func TestAPIServer(t *testing.T) {
	bin := os.Getenv(EnvKubeAPIServer)
	if bin == "" {
		t.Skipf("%s is not set: run `export %s=\"$(scripts/kube-apiserver.sh)\"` (builds kube-apiserver v1.37.2 once, about 10 minutes) to run the API-server tests", EnvKubeAPIServer, EnvKubeAPIServer)
	}
	if testing.Short() {
		t.Skip("-short: skipping the API-server tests")
	}
	tc := startCluster(t, bin)

	t.Run("every overlay applies", func(t *testing.T) { testOverlays(t, tc) })
	t.Run("launch is idempotent and delete removes it", func(t *testing.T) { testLaunchLifecycle(t, tc) })
	t.Run("invalid fields are rejected by name", func(t *testing.T) { testInvalid(t, tc) })
	t.Run("RBAC denial is reported as forbidden", func(t *testing.T) { testForbidden(t, tc) })
	t.Run("credentials without their CA are refused", func(t *testing.T) { testLostCA(t, tc) })
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func createNamespace(t *testing.T, tc *testCluster, ns string) {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(tc.admin)
	_, err := cs.CoreV1().Namespaces().Create(ctxT(t), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

func newClient(t *testing.T, cfg *rest.Config) *Client {
	t.Helper()
	c, err := NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func testOverlays(t *testing.T, tc *testCluster) {
	c := newClient(t, tc.admin)
	for _, o := range k8sfs.Overlays {
		t.Run(o, func(t *testing.T) {
			ctx := ctxT(t)
			ns := "overlay-" + o
			createNamespace(t, tc, ns)
			m, err := RenderOverlay(o)
			if err != nil {
				t.Fatal(err)
			}
			// As `bmojo launch --secrets-only` fills them for kubectl apply -k.
			if _, err := c.FillSecrets(ctx, ns, Spec{Name: "bmojo", Workers: 2}, m, time.Now()); err != nil {
				t.Fatal(err)
			}
			// dryRun=All runs defaulting, validation and admission and
			// stores nothing.
			res, err := c.Apply(ctx, ns, m, ApplyOptions{DryRun: true})
			if err != nil {
				t.Fatalf("server dry run: %v", err)
			}
			if len(res) != len(m.Objects) {
				t.Fatalf("dry run applied %d of %d objects", len(res), len(m.Objects))
			}
			kinds := map[string]int{}
			for _, a := range res {
				kinds[a.Kind]++
			}
			if kinds["Secret"] != 5 || kinds["NetworkPolicy"] != 4 || kinds["Role"]+kinds["RoleBinding"] != 0 {
				t.Errorf("dry run applied %v, want 5 Secrets, 4 NetworkPolicies and no Role", kinds)
			}
			if objs, err := c.List(ctx, ns, "bmojo"); err != nil || len(objs) != 0 {
				t.Fatalf("a dry run stored objects: %v %v", objs, err)
			}
			res, err = c.Apply(ctx, ns, m, ApplyOptions{})
			if err != nil {
				t.Fatalf("apply: %v", err)
			}
			for _, a := range res {
				if a.Action != "created" {
					t.Errorf("%s: want created", a)
				}
			}
			objs, err := c.List(ctx, ns, "bmojo")
			if err != nil {
				t.Fatal(err)
			}
			if len(objs) != len(m.Objects) {
				t.Errorf("found %d objects by label, applied %d: %v", len(objs), len(m.Objects), objs)
			}
		})
	}
}

func testLaunchLifecycle(t *testing.T, tc *testCluster) {
	ctx := ctxT(t)
	ns := "team-a"
	createNamespace(t, tc, ns)
	kc, err := LoadKubeConfig(tc.kubeconfig, "admin")
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, kc.REST)

	// The GPU example exercises the most: GPUs, tolerations, Kueue label,
	// a data claim, resource overrides.
	s := loadExample(t, "launch-gpu.yaml")
	s.Namespace = ns
	s.Monitor = Monitor{Namespace: "monitoring", HTTPS: true}
	render := func(s Spec) *Manifests {
		t.Helper()
		m, err := Render(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.FillSecrets(ctx, ns, s, m, time.Now()); err != nil {
			t.Fatal(err)
		}
		return m
	}
	m := render(s)
	first, err := c.Apply(ctx, ns, m, ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	secretsBefore := readSecrets(t, tc, ns, s.Name)
	if len(secretsBefore) != 5 {
		t.Fatalf("launch stored %d Secrets, want 5", len(secretsBefore))
	}
	// In a cluster the PV controller writes a new claim's status at once.
	// None runs here, and the API server's first write to a claim whose
	// status was never stored is not a no-op (phase Pending is defaulted on
	// read but absent in storage), so do the controller's write first.
	settleClaim(t, tc, ns, s.Name+"-checkpoints")
	// A second launch renders and fills afresh: the Secrets it sends are
	// the cluster's, so nothing rotates.
	second, err := c.Apply(ctx, ns, render(s), ApplyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range second {
		if second[i].Kind == "PersistentVolumeClaim" {
			first[i].ResourceVersion = second[i].ResourceVersion // settleClaim wrote it
		}
		if second[i].Action != "unchanged" || second[i].ResourceVersion != first[i].ResourceVersion {
			t.Errorf("second launch: %s (resourceVersion %s -> %s), want unchanged", second[i], first[i].ResourceVersion, second[i].ResourceVersion)
		}
	}

	st, err := Status(ctx, kc.REST, ns, s.Name)
	if err != nil {
		t.Fatal(err)
	}
	if st.Workers.Desired != int32(s.Workers) || st.Etcd.Desired != 3 || st.Coordinators.Desired != 2 || st.Checkpoint.Name != s.Name+"-checkpoints" {
		t.Errorf("status %+v does not match the launch", st)
	}
	var buf bytes.Buffer
	if err := st.Write(&buf); err != nil || !strings.Contains(buf.String(), "workers") {
		t.Errorf("status report: %v\n%s", err, buf.String())
	}

	// What may change in place does: fewer workers (an elastic Indexed Job
	// changes completions and parallelism together) and a smaller gang.
	s2 := s
	s2.Workers, s2.MinWorkers = 6, 6
	m2 := render(s2)
	res, err := c.Apply(ctx, ns, m2, ApplyOptions{})
	if err != nil {
		t.Fatalf("resize: %v", err)
	}
	changed := map[string]bool{}
	for _, a := range res {
		if a.Action == "configured" {
			changed[a.Kind] = true
		}
	}
	// The coordinator Deployment changes too: it is told the ring size to
	// wait for at the start.
	if !changed["Job"] || !changed["PodDisruptionBudget"] || !changed["Deployment"] || len(changed) != 3 {
		t.Errorf("resize changed %v, want the worker Job, its PDB and the coordinator Deployment only", changed)
	}

	// What may not change says what to do.
	for n, d := range readSecrets(t, tc, ns, s.Name) {
		if !maps.EqualFunc(d, secretsBefore[n], bytes.Equal) {
			t.Errorf("relaunching and resizing changed Secret %s", n)
		}
	}

	s3 := s2
	s3.Image = "registry.example.com/bmojo:0.2.0-cuda"
	m3 := render(s3)
	_, err = c.Apply(ctx, ns, m3, ApplyOptions{})
	if !errors.Is(err, ErrImmutable) || !strings.Contains(err.Error(), "bmojo delete") {
		t.Errorf("new image on a running job: %v, want ErrImmutable pointing at bmojo delete", err)
	}

	// delete keeps the checkpoint claim; --purge removes it too.
	deleted, err := c.Delete(ctx, ns, s.Name, DeleteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	left, err := c.List(ctx, ns, s.Name)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || left[0].Kind != "PersistentVolumeClaim" {
		t.Errorf("after delete (deleted %v) left %v, want only the checkpoint claim", deleted, left)
	}
	if n := len(readSecrets(t, tc, ns, s.Name)); n != 0 {
		t.Errorf("delete left %d of the job's Secrets", n)
	}
	if _, err := Status(ctx, kc.REST, ns, s.Name); !errors.Is(err, ErrNotFound) {
		t.Errorf("status after delete: %v, want ErrNotFound", err)
	}
	if _, err := c.Delete(ctx, ns, s.Name, DeleteOptions{Purge: true}); err != nil {
		t.Fatal(err)
	}
	if left, err := c.List(ctx, ns, s.Name); err != nil || len(left) != 0 {
		t.Errorf("after purge left %v (%v)", left, err)
	}
	if _, err := c.Delete(ctx, ns, s.Name, DeleteOptions{}); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleting a deleted job: %v, want ErrNotFound", err)
	}
}

// readSecrets returns the data of the job's Secrets in ns.
func readSecrets(t *testing.T, tc *testCluster, ns, job string) Existing {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(tc.admin)
	out := Existing{}
	for _, n := range SecretNames(job) {
		sec, err := cs.CoreV1().Secrets(ns).Get(ctxT(t), n, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		out[n] = sec.Data
	}
	return out
}

func settleClaim(t *testing.T, tc *testCluster, ns, name string) {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(tc.admin)
	pvc, err := cs.CoreV1().PersistentVolumeClaims(ns).Get(ctxT(t), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pvc.Status.Phase = corev1.ClaimPending
	if _, err := cs.CoreV1().PersistentVolumeClaims(ns).UpdateStatus(ctxT(t), pvc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func testInvalid(t *testing.T, tc *testCluster) {
	ctx := ctxT(t)
	c := newClient(t, tc.admin)
	ns := "invalid"
	createNamespace(t, tc, ns)

	// Caught before the cluster is contacted.
	s := loadExample(t, "launch.yaml")
	s.Namespace = ns
	s.Workers = 1 // below min_workers: 2
	if _, err := Render(s); err == nil || !strings.Contains(err.Error(), "workers") || !strings.Contains(err.Error(), "min_workers") {
		t.Errorf("workers below the minimum: %v", err)
	}

	// Caught by the API server's validation, which names the field: a
	// hand-edited manifest (as from --dry-run) with a negative parallelism.
	s = loadExample(t, "launch.yaml")
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Fill(s, m, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	for _, o := range m.Objects {
		if o.GetKind() == "Job" {
			if err := unstructured.SetNestedField(o.Object, int64(-1), "spec", "parallelism"); err != nil {
				t.Fatal(err)
			}
		}
	}
	_, err = c.Apply(ctx, ns, m, ApplyOptions{DryRun: true})
	if err == nil || !strings.Contains(err.Error(), "spec.parallelism") {
		t.Errorf("negative parallelism: %v, want the API server's error naming spec.parallelism", err)
	}

	// A namespace that does not exist says so.
	m, _ = Render(s)
	if _, err := Fill(s, m, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	_, err = c.Apply(ctx, "no-such-ns", m, ApplyOptions{})
	if err == nil || !strings.Contains(err.Error(), `namespace "no-such-ns" does not exist`) {
		t.Errorf("missing namespace: %v", err)
	}
}

// A job whose CA Secret was deleted cannot be relaunched in place (its
// certificates could be neither checked nor extended): launch says what to
// do and changes nothing.
func testLostCA(t *testing.T, tc *testCluster) {
	ctx := ctxT(t)
	ns := "lost-ca"
	createNamespace(t, tc, ns)
	c := newClient(t, tc.admin)
	s := loadExample(t, "launch.yaml")
	s.Namespace = ns
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.FillSecrets(ctx, ns, s, m, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, ns, m.OnlySecrets(), ApplyOptions{}); err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(tc.admin)
	if err := cs.CoreV1().Secrets(ns).Delete(ctx, s.Name+"-ca", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	m, err = Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.FillSecrets(ctx, ns, s, m, time.Now()); !errors.Is(err, ErrCredentials) || !strings.Contains(err.Error(), "bmojo delete") {
		t.Errorf("relaunch without the CA: %v, want ErrCredentials saying what to do", err)
	}
}

func testForbidden(t *testing.T, tc *testCluster) {
	ctx := ctxT(t)
	ns := "locked"
	createNamespace(t, tc, ns)
	kc, err := LoadKubeConfig(tc.kubeconfig, "alice")
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, kc.REST)
	s := loadExample(t, "launch.yaml")
	s.Namespace = ns
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.FillSecrets(ctx, ns, s, m, time.Now()); !IsForbidden(err) {
		t.Errorf("reading the job's Secrets as alice: %v, want forbidden", err)
	}
	if _, err := Fill(s, m, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	_, err = c.Apply(ctx, ns, m, ApplyOptions{})
	if !IsForbidden(err) || !strings.Contains(err.Error(), "forbidden: ") || !strings.Contains(err.Error(), `User "alice" cannot`) {
		t.Errorf("apply as alice: %v, want forbidden naming the user", err)
	}
	if _, err := Status(ctx, kc.REST, ns, s.Name); !IsForbidden(err) {
		t.Errorf("status as alice: %v, want forbidden", err)
	}
	if _, err := c.Delete(ctx, ns, s.Name, DeleteOptions{}); !IsForbidden(err) {
		t.Errorf("delete as alice: %v, want forbidden", err)
	}
}

// startCluster runs etcd and kube-apiserver on loopback ports with a token
// file (users admin in system:masters and alice in no group), RBAC
// authorization and a serving certificate from a CA made here.
func startCluster(t *testing.T, apiserver string) *testCluster {
	t.Helper()
	etcdBin := filepath.Join(filepath.Dir(apiserver), "etcd")
	for _, b := range []string{apiserver, etcdBin} {
		if _, err := os.Stat(b); err != nil {
			t.Fatalf("%s is set but %v (rebuild with scripts/kube-apiserver.sh)", EnvKubeAPIServer, err)
		}
	}
	dir := t.TempDir()
	clientPort, peerPort, securePort := freePort(t), freePort(t), freePort(t)
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	_ = start(t, dir, "etcd", etcdBin,
		"--data-dir", filepath.Join(dir, "etcd-data"),
		"--listen-client-url", etcdURL,
		"--listen-peer-url", fmt.Sprintf("http://127.0.0.1:%d", peerPort))
	waitTCP(t, fmt.Sprintf("127.0.0.1:%d", clientPort))

	caPEM, certPEM, keyPEM := selfSigned(t)
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	saPath := write("sa.key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}))
	tokens := write("tokens.csv", []byte("admin-token,admin,uid-admin,\"system:masters\"\nalice-token,alice,uid-alice\n"))
	exited := start(t, dir, "kube-apiserver", apiserver,
		"--etcd-servers", etcdURL,
		"--bind-address", "127.0.0.1",
		"--advertise-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(securePort),
		"--cert-dir", filepath.Join(dir, "certs"),
		"--tls-cert-file", write("serving.crt", certPEM),
		"--tls-private-key-file", write("serving.key", keyPEM),
		"--token-auth-file", tokens,
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", saPath,
		"--service-account-signing-key-file", saPath,
		"--service-cluster-ip-range", "10.96.0.0/24",
		// There is no kube-controller-manager to remove the pvc-protection
		// finalizer, so with this plugin a deleted claim would stay
		// Terminating forever.
		"--disable-admission-plugins", "StorageObjectInUseProtection",
		"--enable-priority-and-fairness=false",
		// The loopback address it serves on may not be published as the
		// kubernetes Service's endpoint; nothing here needs that Service.
		"--endpoint-reconciler-type", "none",
	)
	host := fmt.Sprintf("https://127.0.0.1:%d", securePort)
	cfg := func(token string) *rest.Config {
		return &rest.Config{Host: host, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{CAData: caPEM}, Timeout: 30 * time.Second}
	}
	tc := &testCluster{admin: cfg("admin-token"), alice: cfg("alice-token")}
	waitReady(t, tc.admin, exited)
	tc.kubeconfig = write("kubeconfig", fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: admin
  user: {token: admin-token}
- name: alice
  user: {token: alice-token}
contexts:
- name: admin
  context: {cluster: test, user: admin}
- name: alice
  context: {cluster: test, user: alice}
current-context: admin
`, host, b64(caPEM)))
	return tc
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// start runs a process for the test's lifetime, its output in dir/name.log,
// printed when the test fails.
func start(t *testing.T, dir, name, bin string, args ...string) <-chan error {
	t.Helper()
	return startCmd(t, dir, name, exec.Command(bin, args...))
}

// startCmd starts cmd for the test's lifetime, its output in dir/name.log,
// the log's tail printed when the test fails; the channel gets its exit.
func startCmd(t *testing.T, dir, name string, cmd *exec.Cmd) <-chan error {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("%s log tail:\n%s", name, b)
		}
	})
	return exited
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitTCP(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd did not listen on %s: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitReady polls /readyz, which includes the RBAC bootstrap roles.
func waitReady(t *testing.T, cfg *rest.Config, exited <-chan error) {
	t.Helper()
	cs := kubernetes.NewForConfigOrDie(cfg)
	deadline := time.Now().Add(2 * time.Minute)
	var err error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		cancel()
		if err == nil {
			return
		}
		select {
		case e := <-exited:
			t.Fatalf("kube-apiserver exited: %v", e)
		case <-time.After(250 * time.Millisecond):
		}
	}
	t.Fatalf("kube-apiserver not ready after 2 minutes: %v", err)
}

// selfSigned makes a CA and a serving certificate for 127.0.0.1/localhost.
func selfSigned(t *testing.T) (caPEM, certPEM, keyPEM []byte) {
	t.Helper()
	p, err := testpki.New("kube-apiserver")
	if err != nil {
		t.Fatal(err)
	}
	return p.CAPEM, p.CertPEM, p.KeyPEM
}

package launch

// The rendered pods' command lines, run as real processes: etcd with the
// StatefulSet's TLS settings, a coordinator and a worker with exactly the
// args and env of their containers (Secrets and the job ConfigMap written
// where the pod mounts them). Only what a node would supply differs:
// addresses (127.0.0.1 and free ports instead of pod IPs and DNS names) and
// the root of the mount paths.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/internal/testbin"
	"github.com/bmojo/bmojo/internal/testpki"
	"github.com/bmojo/bmojo/job"
)

// bmojoBinary builds cmd/bmojo for this test (testbin.Build), removed
// when it ends.
func bmojoBinary(t *testing.T) string {
	t.Helper()
	bin, cleanup, err := testbin.Build()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cleanup)
	return bin
}

// pod is what the kubelet would know about one pod of a workload.
type pod struct {
	name, namespace, ip string
	labels              map[string]string
	index               string // the Indexed Job's completion index
	root                string // where its mount paths live on this machine
}

// fieldRef answers a downward-API field the manifests use.
func (p pod) fieldRef(t *testing.T, path string) string {
	t.Helper()
	switch {
	case path == "metadata.name":
		return p.name
	case path == "metadata.namespace":
		return p.namespace
	case path == "status.podIP":
		return p.ip
	case path == "spec.nodeName":
		return "node-a"
	case path == "metadata.annotations['batch.kubernetes.io/job-completion-index']":
		return p.index
	case strings.HasPrefix(path, "metadata.labels['"):
		return p.labels[strings.TrimSuffix(strings.TrimPrefix(path, "metadata.labels['"), "']")]
	}
	t.Fatalf("the manifests use field %s, which this test does not supply", path)
	return ""
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expand is the kubelet's $(VAR) expansion; unknown references stay.
func expand(s string, env map[string]string) string {
	return varRef.ReplaceAllStringFunc(s, func(ref string) string {
		if v, ok := env[ref[2:len(ref)-1]]; ok {
			return v
		}
		return ref
	})
}

// container resolves a container's env (in order, as the kubelet does) and
// args, and writes its volumes under p.root.
func (p pod) container(t *testing.T, m *Manifests, w *unstructured.Unstructured, secrets Existing) (args []string, env map[string]string) {
	t.Helper()
	spec, _, _ := unstructured.NestedMap(w.Object, "spec", "template", "spec")
	cs, _, _ := unstructured.NestedSlice(spec, "containers")
	c := cs[0].(map[string]any)
	env = map[string]string{}
	es, _, _ := unstructured.NestedSlice(c, "env")
	for _, e := range es {
		e := e.(map[string]any)
		name := e["name"].(string)
		if v, ok := e["value"].(string); ok {
			env[name] = expand(v, env)
		} else if f, ok, _ := unstructured.NestedString(e, "valueFrom", "fieldRef", "fieldPath"); ok {
			env[name] = p.fieldRef(t, f)
		} else if s, ok, _ := unstructured.NestedString(e, "valueFrom", "secretKeyRef", "name"); ok {
			k, _, _ := unstructured.NestedString(e, "valueFrom", "secretKeyRef", "key")
			v, ok := secrets[s][k]
			if !ok {
				t.Fatalf("env %s: Secret %s has no key %s", name, s, k)
			}
			env[name] = string(v)
		} else {
			t.Fatalf("env %s: a source this test does not supply: %v", name, e)
		}
	}
	raw, _, _ := unstructured.NestedStringSlice(c, "args")
	if cmd, _, _ := unstructured.NestedStringSlice(c, "command"); len(cmd) > 0 {
		raw = append(cmd[1:], raw...) // etcd: the image's binary, replaced by ours
	}
	for _, a := range raw {
		args = append(args, expand(a, env))
	}

	// Volumes: the ConfigMap and Secrets with their data, the rest empty.
	vols := map[string]map[string]any{}
	vs, _, _ := unstructured.NestedSlice(spec, "volumes")
	for _, v := range vs {
		v := v.(map[string]any)
		vols[v["name"].(string)] = v
	}
	vms, _, _ := unstructured.NestedSlice(c, "volumeMounts")
	var mounts []string
	for _, vm := range vms {
		vm := vm.(map[string]any)
		dir := filepath.Join(p.root, vm["mountPath"].(string))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		v := vols[vm["name"].(string)]
		files := map[string][]byte{}
		if s, ok, _ := unstructured.NestedString(v, "secret", "secretName"); ok {
			files = secrets[s]
			if len(files) == 0 {
				t.Fatalf("volume %s: Secret %s is empty", vm["name"], s)
			}
		}
		if cm, ok, _ := unstructured.NestedString(v, "configMap", "name"); ok {
			d, _, _ := unstructured.NestedStringMap(find(t, m, "ConfigMap", cm).Object, "data")
			for k, s := range d {
				files[k] = []byte(s)
			}
		}
		for k, b := range files {
			if err := os.WriteFile(filepath.Join(dir, k), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		mounts = append(mounts, vm["mountPath"].(string))
	}
	// Paths the process is given point into the mounts on this machine.
	for i, a := range args {
		if name, v, ok := strings.Cut(a, "="); ok {
			args[i] = name + "=" + p.local(mounts, v)
		}
	}
	for k, v := range env {
		env[k] = p.local(mounts, v)
	}
	return args, env
}

// local maps a path inside one of the pod's mounts to this machine.
func (p pod) local(mounts []string, path string) string {
	for _, mp := range mounts {
		if strings.HasPrefix(path, mp+"/") {
			return filepath.Join(p.root, path)
		}
	}
	return path
}

// setFlag replaces --name=... in args (it must be there once).
func setFlag(t *testing.T, args []string, name, value string) {
	t.Helper()
	n := 0
	for i, a := range args {
		if strings.HasPrefix(a, "--"+name+"=") {
			args[i] = "--" + name + "=" + value
			n++
		}
	}
	if n != 1 {
		t.Fatalf("the rendered args have %d --%s flags, want 1: %q", n, name, args)
	}
}

func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// runProcess runs bin with args and env (nothing inherited but PATH and
// HOME) until the test ends; its output goes to dir/name.log, shown on
// failure.
func runProcess(t *testing.T, dir, name, bin string, args []string, env map[string]string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "TMPDIR=" + dir}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	startCmd(t, dir, name, cmd)
}

// waitFor polls cond every 100 ms until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %s: %v", what, d, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRenderedJobRuns runs the rendered job's processes for the cpu-demo
// overlay as kubectl apply -k deploys it (job bmojo, Secrets from
// launch --secrets-only) and for launch.yaml with monitor.https: etcd
// refuses a client without a job certificate, the coordinator connects
// with its own, its monitor answers 401 to /api/v1/status without the
// token from the Secret and 200 with it, and worker 0 registers under the
// id its certificate names.
func TestRenderedJobRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the tests that run bmojo processes")
	}
	bin := bmojoBinary(t)
	overlay, err := RenderOverlay("cpu-demo")
	if err != nil {
		t.Fatal(err)
	}
	bare := Spec{Name: "bmojo", Namespace: "bmojo", Workers: 2}
	if _, err := Fill(bare, overlay, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	https := loadExample(t, "launch.yaml")
	https.Monitor.HTTPS = true
	launched, err := Render(https)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Fill(https, launched, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	t.Run("cpu-demo overlay", func(t *testing.T) { runJob(t, bin, overlay, bare, false) })
	t.Run("launch.yaml with monitor.https", func(t *testing.T) { runJob(t, bin, launched, https, true) })
}

func runJob(t *testing.T, bin string, m *Manifests, s Spec, https bool) {
	dir := t.TempDir()
	secrets := secrets(t, m)
	jobLabels := map[string]string{LabelInstance: s.Name}

	// etcd: the StatefulSet's settings, mapped onto bmojo etcd's flags.
	ep := pod{name: s.Name + "-etcd-0", namespace: s.Namespace, ip: "127.0.0.1", labels: jobLabels, root: filepath.Join(dir, "etcd")}
	_, eenv := ep.container(t, m, find(t, m, "StatefulSet", s.Name+"-etcd"), secrets)
	for k, want := range map[string]string{"ETCD_CLIENT_CERT_AUTH": "true", "ETCD_PEER_CLIENT_CERT_AUTH": "true", "ETCD_PEER_CERT_ALLOWED_CN": EtcdID(s.Name)} {
		if eenv[k] != want {
			t.Errorf("etcd %s=%q, want %q", k, eenv[k], want)
		}
	}
	for _, k := range []string{"ETCD_LISTEN_CLIENT_URLS", "ETCD_LISTEN_PEER_URLS", "ETCD_ADVERTISE_CLIENT_URLS", "ETCD_INITIAL_CLUSTER"} {
		if !strings.HasPrefix(eenv[k], "https://") && !strings.Contains(eenv[k], "=https://") {
			t.Errorf("etcd %s=%q is not https", k, eenv[k])
		}
	}
	clientPort, peerPort := freePort(t), freePort(t)
	etcdURL := fmt.Sprintf("https://127.0.0.1:%d", clientPort)
	runProcess(t, dir, "etcd", bin, []string{"etcd", "--data-dir", filepath.Join(dir, "etcd-data"),
		"--listen-client", etcdURL, "--listen-peer", fmt.Sprintf("https://127.0.0.1:%d", peerPort),
		"--cert-file", eenv["ETCD_CERT_FILE"], "--key-file", eenv["ETCD_KEY_FILE"], "--client-ca-file", eenv["ETCD_TRUSTED_CA_FILE"],
		"--peer-cert-file", eenv["ETCD_PEER_CERT_FILE"], "--peer-key-file", eenv["ETCD_PEER_KEY_FILE"],
		"--peer-client-ca-file", eenv["ETCD_PEER_TRUSTED_CA_FILE"]}, nil)
	waitTCP(t, fmt.Sprintf("127.0.0.1:%d", clientPort))

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	caFile := eenv["ETCD_TRUSTED_CA_FILE"]
	{
		c, cancel := context.WithTimeout(ctx, 20*time.Second)
		cli, err := etcdserver.Connect(c, etcdserver.ClientConfig{Endpoints: []string{etcdURL}, CAFile: caFile})
		cancel()
		if err == nil {
			cli.Close()
			t.Fatal("etcd served a client without a job certificate")
		}
		if !errors.Is(err, etcdserver.ErrAuth) {
			t.Errorf("a client without a certificate: %v, want ErrAuth", err)
		}
	}

	// The coordinator, exactly as rendered, but for addresses.
	cp := pod{name: s.Name + "-coordinator-abc12", namespace: s.Namespace, ip: "127.0.0.1", labels: jobLabels, root: filepath.Join(dir, "coordinator")}
	cargs, cenv := cp.container(t, m, find(t, m, "Deployment", s.Name+"-coordinator"), secrets)
	httpPort := freePort(t)
	setFlag(t, cargs, "etcd-endpoints", etcdURL)
	setFlag(t, cargs, "health", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	setFlag(t, cargs, "http", fmt.Sprintf("127.0.0.1:%d", httpPort))
	if (flagValue(cargs, "http-cert") != "") != https {
		t.Fatalf("monitor.https %v but --http-cert=%q", https, flagValue(cargs, "http-cert"))
	}
	token := cenv["BMOJO_TOKEN"]
	if token == "" || token != string(secrets[s.Name+"-monitor-token"][KeyToken]) {
		t.Fatalf("the coordinator's BMOJO_TOKEN %q is not the Secret's token", token)
	}
	runProcess(t, dir, "coordinator", bin, cargs, cenv)

	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	tr := &http.Transport{DisableKeepAlives: true, TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	scheme := "http"
	if https {
		scheme = "https"
	}
	base := fmt.Sprintf("%s://127.0.0.1:%d", scheme, httpPort)
	get := func(path, tok string) (int, string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+path, nil)
		if err != nil {
			return 0, "", err
		}
		if tok != "" {
			req.Header.Set("Authorization", "Bearer "+tok)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	waitFor(t, time.Minute, "the coordinator's monitor serving the job", func() error {
		code, body, err := get("/api/v1/status", token)
		if err == nil && code != http.StatusOK {
			err = fmt.Errorf("status %d: %s", code, body)
		}
		return err
	})
	for name, tok := range map[string]string{"no token": "", "a wrong token": "x" + token} {
		code, body, err := get("/api/v1/status", tok)
		if err != nil || code != http.StatusUnauthorized {
			t.Errorf("/api/v1/status with %s: %d %s %v, want 401", name, code, body, err)
		}
		if code, _, _ := get("/metrics", tok); code != http.StatusUnauthorized {
			t.Errorf("/metrics with %s: %d, want 401", name, code)
		}
	}
	if https {
		plain := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
		if resp, err := plain.Get(fmt.Sprintf("http://127.0.0.1:%d/api/v1/status", httpPort)); err == nil {
			if resp.StatusCode == http.StatusOK {
				t.Error("the HTTPS monitor answered plain HTTP with the status")
			}
			resp.Body.Close()
		}
	}

	// Worker 0 as its pod runs it: it picks its certificate by index and
	// registers in etcd under the id that certificate names.
	wp := pod{name: s.Name + "-worker-0-xyz98", namespace: s.Namespace, ip: "127.0.0.1", labels: jobLabels, index: "0", root: filepath.Join(dir, "worker-0")}
	wargs, wenv := wp.container(t, m, find(t, m, "Job", s.Name+"-worker"), secrets)
	ringPort := freePort(t)
	setFlag(t, wargs, "etcd-endpoints", etcdURL)
	setFlag(t, wargs, "listen", fmt.Sprintf("127.0.0.1:%d", ringPort))
	setFlag(t, wargs, "advertise", fmt.Sprintf("127.0.0.1:%d", ringPort))
	setFlag(t, wargs, "health", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	setFlag(t, wargs, "local-listen", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	if h := flagValue(wargs, "host"); h != "node-a" {
		t.Errorf("the worker is given --host=%q, not its node's name", h)
	}
	if flagValue(wargs, "id") != "" {
		t.Errorf("the worker is given --id=%s; its certificate names it", flagValue(wargs, "id"))
	}
	runProcess(t, dir, "worker-0", bin, wargs, wenv)

	cli, err := etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: []string{etcdURL}, CAFile: caFile,
		CertFile: flagValue(cargs, "tls-cert"), KeyFile: flagValue(cargs, "tls-key")})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	key := job.Prefix(s.Name) + job.KeyMembers + WorkerID(s.Name, 0)
	waitFor(t, time.Minute, "worker 0 registered as "+WorkerID(s.Name, 0), func() error {
		resp, err := cli.Get(ctx, key)
		if err == nil && len(resp.Kvs) == 0 {
			err = fmt.Errorf("no key %s", key)
		}
		return err
	})
}

// etcdBinary is a real etcd (BMOJO_ETCD_BIN, else Debian's etcd-server at
// /usr/bin/etcd, which CI installs), or "" when there is none.
func etcdBinary() string {
	if b := os.Getenv("BMOJO_ETCD_BIN"); b != "" {
		return b
	}
	if _, err := os.Stat("/usr/bin/etcd"); err == nil {
		return "/usr/bin/etcd"
	}
	return ""
}

// TestRenderedEtcdCluster runs the etcd StatefulSet's three members with a
// real etcd reading the rendered ETCD_* environment (only the URLs point at
// 127.0.0.1 ports instead of the members' DNS names): the cluster forms over
// peer TLS, serves a client with a job certificate, and its peer port
// refuses a worker's certificate (ETCD_PEER_CERT_ALLOWED_CN).
func TestRenderedEtcdCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: skipping the tests that run etcd processes")
	}
	bin := etcdBinary()
	if bin == "" {
		t.Skip("no etcd binary: set BMOJO_ETCD_BIN or install Debian's etcd-server (/usr/bin/etcd)")
	}
	s := loadExample(t, "launch.yaml")
	m, err := Render(s)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Fill(s, m, nil, time.Now()); err != nil {
		t.Fatal(err)
	}
	secrets := secrets(t, m)
	dir := t.TempDir()
	type member struct {
		name               string
		client, peer, metr int
		env                map[string]string
	}
	var members []member
	var cluster []string
	for i := 0; i < 3; i++ {
		p := pod{name: fmt.Sprintf("%s-etcd-%d", s.Name, i), namespace: s.Namespace, ip: "127.0.0.1",
			labels: map[string]string{LabelInstance: s.Name}, root: filepath.Join(dir, fmt.Sprint(i))}
		_, env := p.container(t, m, find(t, m, "StatefulSet", s.Name+"-etcd"), secrets)
		mb := member{name: p.name, client: freePort(t), peer: freePort(t), metr: freePort(t), env: env}
		members = append(members, mb)
		cluster = append(cluster, fmt.Sprintf("%s=https://127.0.0.1:%d", mb.name, mb.peer))
	}
	for _, mb := range members {
		if mb.env["ETCD_NAME"] != mb.name {
			t.Fatalf("ETCD_NAME %q, want %q", mb.env["ETCD_NAME"], mb.name)
		}
		for _, k := range []string{"ETCD_INITIAL_CLUSTER"} {
			if strings.Count(mb.env[k], "=https://") != 3 {
				t.Fatalf("%s=%q does not list three https members", k, mb.env[k])
			}
		}
		mb.env["ETCD_LISTEN_CLIENT_URLS"] = fmt.Sprintf("https://127.0.0.1:%d", mb.client)
		mb.env["ETCD_ADVERTISE_CLIENT_URLS"] = mb.env["ETCD_LISTEN_CLIENT_URLS"]
		mb.env["ETCD_LISTEN_PEER_URLS"] = fmt.Sprintf("https://127.0.0.1:%d", mb.peer)
		mb.env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] = mb.env["ETCD_LISTEN_PEER_URLS"]
		mb.env["ETCD_LISTEN_METRICS_URLS"] = fmt.Sprintf("http://127.0.0.1:%d", mb.metr)
		mb.env["ETCD_INITIAL_CLUSTER"] = strings.Join(cluster, ",")
		runProcess(t, dir, mb.name, bin, nil, mb.env)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var eps []string
	for _, mb := range members {
		eps = append(eps, fmt.Sprintf("https://127.0.0.1:%d", mb.client))
	}
	tlsDir := filepath.Join(dir, "client")
	if err := os.MkdirAll(tlsDir, 0o700); err != nil {
		t.Fatal(err)
	}
	coord := secrets[s.Name+"-coordinator-tls"]
	files := map[string][]byte{"ca.crt": coord[KeyCACert], "tls.crt": coord[KeyCert], "tls.key": coord[KeyKey]}
	for k, b := range files {
		if err := os.WriteFile(filepath.Join(tlsDir, k), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cli, err := etcdserver.Connect(ctx, etcdserver.ClientConfig{Endpoints: eps, CAFile: filepath.Join(tlsDir, "ca.crt"),
		CertFile: filepath.Join(tlsDir, "tls.crt"), KeyFile: filepath.Join(tlsDir, "tls.key")})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	waitFor(t, 45*time.Second, "a three-member cluster with a leader", func() error {
		if _, err := cli.Put(ctx, "probe", "1"); err != nil {
			return err
		}
		ml, err := cli.MemberList(ctx)
		if err != nil {
			return err
		}
		started := 0
		for _, mm := range ml.Members {
			if mm.Name != "" && len(mm.PeerURLs) == 1 && strings.HasPrefix(mm.PeerURLs[0], "https://") {
				started++
			}
		}
		if started != 3 {
			return fmt.Errorf("%d of 3 members started with https peer URLs: %v", started, ml.Members)
		}
		return nil
	})

	// The peer port: etcd's own certificate is a peer, a worker's is not.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(coord[KeyCACert])
	peerDial := func(certPEM, keyPEM []byte) error {
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		return testpki.DialPeer(fmt.Sprintf("127.0.0.1:%d", members[0].peer), pool, []tls.Certificate{pair})
	}
	etcdTLS, workers := secrets[s.Name+"-etcd-tls"], secrets[s.Name+"-worker-tls"]
	if err := peerDial(etcdTLS[KeyCert], etcdTLS[KeyKey]); err != nil {
		t.Errorf("etcd's own certificate on the peer port: %v", err)
	}
	if err := peerDial(workers[WorkerCertKey(0)], workers[WorkerKeyKey(0)]); err == nil {
		t.Error("the peer port served a worker's certificate")
	}
}

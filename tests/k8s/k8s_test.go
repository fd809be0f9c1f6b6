// Package k8s launches a job on a real one-node Kubernetes cluster
// (scripts/kube-node.sh: kube-apiserver, kube-controller-manager,
// kube-scheduler and a kubelet v1.37.2 with Debian's containerd and runc)
// the way a user does, and sees it finish:
//
//  1. bmojo launch -f examples/launch.yaml (cpu-demo, 2 workers, bmojo-tiny);
//  2. bmojo status --k8s until every pod is ready, and the coordinator's
//     monitor (bmojo status --addr POD_IP:8080) until training has made
//     progress;
//  3. the containers' processes, read from /proc, run as the non-root user
//     with no capabilities, no privilege escalation, seccomp and a read-only
//     root, as the manifests ask;
//  4. one worker pod is deleted mid-run; the Job controller replaces it, the
//     ring re-forms and the Job completes, its newest checkpoint (on the
//     node's volume, hashes verified) the job's last step;
//  5. bmojo delete removes the job's pods.
//
// The run is recorded in the test's log (go test -v): the events as kubectl
// get events prints them, bmojo status --k8s along the way, the time to
// finish. It needs root and the cached binaries:
//
//	export BMOJO_KUBE_NODE="$(scripts/kube-node.sh build)"
//	sudo -E go test -v -timeout 20m ./tests/k8s/
//
// Without BMOJO_KUBE_NODE it skips; with it, a machine that cannot run the
// node fails naming what is missing.
package k8s

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/internal/launch"
	"github.com/bmojo/bmojo/internal/testleak"
)

// EnvKubeNode is the directory scripts/kube-node.sh build prints; unset,
// the test skips.
const EnvKubeNode = "BMOJO_KUBE_NODE"

const launchFile = "../../examples/launch.yaml"

func TestMain(m *testing.M) { testleak.Main(m) }

// node is a started one-node cluster.
type node struct {
	dir, kubeconfig, bmojo string
	cs                     *kubernetes.Clientset
	volumes                map[string]string // claim name: its volume's directory on this machine
}

func TestLaunchOnKubelet(t *testing.T) {
	bins := os.Getenv(EnvKubeNode)
	if bins == "" {
		t.Skipf("%s is not set: run `export %s=\"$(scripts/kube-node.sh build)\"` (builds the kubelet, controller manager and scheduler v1.37.2 once) and run as root with containerd, runc and containernetworking-plugins installed (CI runs it in a step of its own)", EnvKubeNode, EnvKubeNode)
	}
	if testing.Short() {
		t.Skip("-short: skipping the Kubernetes end-to-end test")
	}
	if _, err := os.Stat(filepath.Join(bins, "kubelet")); err != nil {
		t.Fatalf("%s is set but %v (rebuild with scripts/kube-node.sh build)", EnvKubeNode, err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("%s is set but this is not root: the kubelet and containerd need root (sudo -E go test ./tests/k8s/)", EnvKubeNode)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	n := startNode(ctx, t)

	spec, err := launch.LoadSpec(launchFile)
	if err != nil {
		t.Fatal(err)
	}
	ns, job := spec.Namespace, spec.Name
	if _, err := n.cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	m, err := launch.Render(spec)
	if err != nil {
		t.Fatal(err)
	}
	n.provisionVolumes(ctx, t, ns, m)

	// 1. Launch, as a user would.
	began := time.Now()
	t.Logf("$ bmojo launch -f examples/launch.yaml\n%s", n.run(ctx, t, "launch", "-f", launchFile))

	// 2. Every pod ready, through bmojo status --k8s.
	readyRE := regexp.MustCompile(`(?m)^(etcd|coordinators|workers)\s+(\d+)/(\d+) ready`)
	var st string
	waitFor(ctx, t, 4*time.Minute, "every pod of the job ready (bmojo status --k8s)", func() error {
		st = n.run(ctx, t, "status", "--k8s", job, "-n", ns)
		found := readyRE.FindAllStringSubmatch(st, -1)
		if len(found) != 3 {
			return fmt.Errorf("status does not show etcd, coordinators and workers:\n%s", st)
		}
		for _, f := range found {
			if f[2] != f[3] || f[2] == "0" {
				return fmt.Errorf("%s %s/%s ready", f[1], f[2], f[3])
			}
		}
		return nil
	})
	t.Logf("all ready after %s:\n$ bmojo status --k8s %s -n %s\n%s", time.Since(began).Round(time.Second), job, ns, st)

	token := n.secret(ctx, t, ns, job+"-monitor-token", launch.KeyToken)
	first := n.monitor(ctx, t, ns, job, token, 2*time.Minute, func(s monitorStatus) bool { return s.Step > 0 })
	t.Logf("training: step %d of %d after %s", first.Step, first.Steps, time.Since(began).Round(time.Second))
	if first.Steps < 100 {
		t.Fatalf("the job trains %d steps; examples/launch.yaml should ask for a few hundred", first.Steps)
	}

	// 3. The containers' processes as the kernel sees them.
	n.checkHardening(ctx, t, ns, job)

	// 4. Delete one worker pod mid-run, as kubectl delete pod does.
	mid := n.monitor(ctx, t, ns, job, token, 3*time.Minute, func(s monitorStatus) bool { return s.Step >= s.Steps/4 })
	victim := n.workerPod(ctx, t, ns, job, "1")
	if err := n.cs.CoreV1().Pods(ns).Delete(ctx, victim.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	t.Logf("deleted pod %s (worker index 1) at step %d, ring epoch %d", victim.Name, mid.Step, mid.Epoch)
	var replacement *corev1.Pod
	waitFor(ctx, t, 3*time.Minute, "a ready replacement for worker index 1", func() error {
		p := n.workerPod(ctx, t, ns, job, "1")
		if p == nil || p.UID == victim.UID {
			return fmt.Errorf("no new pod yet")
		}
		if !ready(p) {
			return fmt.Errorf("%s is %s, not ready", p.Name, p.Status.Phase)
		}
		replacement = p
		return nil
	})
	t.Logf("replacement %s ready %s after the deletion:\n$ bmojo status --k8s %s -n %s\n%s", replacement.Name,
		time.Since(deleted).Round(time.Second), job, ns, n.run(ctx, t, "status", "--k8s", job, "-n", ns))
	after := n.monitor(ctx, t, ns, job, token, 3*time.Minute, func(s monitorStatus) bool {
		return s.Epoch > mid.Epoch && s.RingSize == spec.Workers && s.Step > mid.Step
	})
	t.Logf("the ring re-formed: epoch %d, %d workers, step %d", after.Epoch, after.RingSize, after.Step)

	// The Job completes: both indices succeed.
	waitFor(ctx, t, 8*time.Minute, "the worker Job complete", func() error {
		j, err := n.cs.BatchV1().Jobs(ns).Get(ctx, job+"-worker", metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range j.Status.Conditions {
			if c.Type == "Failed" && c.Status == corev1.ConditionTrue {
				t.Fatalf("the worker Job failed: %s: %s", c.Reason, c.Message)
			}
			if c.Type == "Complete" && c.Status == corev1.ConditionTrue {
				if int(j.Status.Succeeded) != spec.Workers {
					t.Fatalf("the Job completed with %d of %d workers succeeded", j.Status.Succeeded, spec.Workers)
				}
				return nil
			}
		}
		return fmt.Errorf("active %d, succeeded %d, failed %d", j.Status.Active, j.Status.Succeeded, j.Status.Failed)
	})
	finished := time.Since(began)
	// The coordinators stay up once the job is done (--linger): a
	// Deployment restarts a replica that exits, into CrashLoopBackOff.
	coordRestarts := func() (map[string]int32, error) {
		pods, err := n.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: launch.LabelInstance + "=" + job + "," + launch.LabelComponent + "=coordinator"})
		if err != nil {
			return nil, err
		}
		out := map[string]int32{}
		for _, p := range pods.Items {
			if p.Status.Phase != corev1.PodRunning || len(p.Status.ContainerStatuses) == 0 {
				return nil, fmt.Errorf("coordinator pod %s is %s", p.Name, p.Status.Phase)
			}
			out[p.Name] = p.Status.ContainerStatuses[0].RestartCount
		}
		return out, nil
	}
	atDone, err := coordRestarts()
	if err != nil {
		t.Fatalf("when the Job completed: %v", err)
	}
	time.Sleep(15 * time.Second) // a restart of an exited replica comes within seconds
	if later, err := coordRestarts(); err != nil || fmt.Sprint(later) != fmt.Sprint(atDone) {
		t.Errorf("the coordinators did not stay up after the job was done: restarts %v at completion, %v 15 s later (%v)", atDone, later, err)
	}
	st = n.run(ctx, t, "status", "--k8s", job, "-n", ns)
	if !regexp.MustCompile(`(?m)^phase\s+Succeeded`).MatchString(st) {
		t.Errorf("bmojo status --k8s after the Job completed does not say Succeeded:\n%s", st)
	}
	// Every step was trained: the newest checkpoint on the claim (read on
	// the node, every file's hash verified) is the last step's.
	claim := job + "-checkpoints"
	man, err := checkpoint.Latest(n.volumes[claim], func(dir string, err error) { t.Errorf("checkpoint %s: %v", dir, err) })
	if err != nil {
		t.Fatalf("claim %s: %v", claim, err)
	}
	if man.Step != first.Steps {
		t.Errorf("the newest checkpoint on %s is step %d, want the job's last, %d", claim, man.Step, first.Steps)
	}
	t.Logf("finished: the Job complete, checkpoint %s (step %d of %d) on claim %s, %s from launch to the Job's completion\n$ bmojo status --k8s %s -n %s\n%s",
		filepath.Base(man.Dir), man.Step, first.Steps, claim, finished.Round(time.Second), job, ns, st)
	t.Logf("$ kubectl get events -n %s --sort-by=.lastTimestamp\n%s", ns, n.events(ctx, t, ns))

	// 5. Delete the job: its pods go.
	t.Logf("$ bmojo delete %s -n %s\n%s", job, ns, n.run(ctx, t, "delete", job, "-n", ns))
	waitFor(ctx, t, 2*time.Minute, "the job's pods gone after bmojo delete", func() error {
		pods, err := n.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: launch.LabelInstance + "=" + job})
		if err != nil {
			return err
		}
		if len(pods.Items) > 0 {
			return fmt.Errorf("%d pods left, e.g. %s", len(pods.Items), pods.Items[0].Name)
		}
		return nil
	})
}

// startNode builds the static bmojo binary and its image, and starts the
// cluster (scripts/kube-node.sh start), stopped when the test ends.
func startNode(ctx context.Context, t *testing.T) *node {
	t.Helper()
	dir := t.TempDir()
	script, err := filepath.Abs("../../scripts/kube-node.sh")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{dir: dir, bmojo: filepath.Join(dir, "bmojo"), volumes: map[string]string{}}
	// The image holds the binary alone, as deploy/Dockerfile's does: static.
	built := time.Now()
	build := exec.CommandContext(ctx, "go", "build", "-o", n.bmojo, "github.com/bmojo/bmojo/cmd/bmojo")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build bmojo: %v\n%s", err, out)
	}
	t.Logf("built the static bmojo binary in %s", time.Since(built).Round(100*time.Millisecond))

	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(sctx, script, "stop", dir).CombinedOutput()
		if err != nil {
			t.Errorf("kube-node.sh stop: %v\n%s", err, out)
		}
		if t.Failed() {
			logTails(t, filepath.Join(dir, "logs"))
		}
	})
	sctx, cancel := context.WithTimeout(ctx, 4*time.Minute)
	defer cancel()
	var stderr bytes.Buffer
	start := exec.CommandContext(sctx, script, "start", dir)
	start.Stderr = &stderr
	began := time.Now()
	out, err := start.Output()
	if err != nil {
		t.Fatalf("kube-node.sh start: %v\n%s", err, stderr.Bytes())
	}
	n.kubeconfig = strings.TrimSpace(string(out))
	t.Logf("node ready in %s", time.Since(began).Round(100*time.Millisecond))
	if out, err := exec.CommandContext(sctx, script, "image", dir, n.bmojo, imageOf(t)).CombinedOutput(); err != nil {
		t.Fatalf("kube-node.sh image: %v\n%s", err, out)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", n.kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Timeout = 30 * time.Second
	if n.cs, err = kubernetes.NewForConfig(cfg); err != nil {
		t.Fatal(err)
	}
	return n
}

// imageOf is the bmojo image the launch file names.
func imageOf(t *testing.T) string {
	t.Helper()
	s, err := launch.LoadSpec(launchFile)
	if err != nil {
		t.Fatal(err)
	}
	return s.Image
}

// logTails prints the end of every component's log.
func logTails(t *testing.T, dir string) {
	t.Helper()
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		if len(b) > 3000 {
			b = b[len(b)-3000:]
		}
		t.Logf("%s tail:\n%s", filepath.Base(l), b)
	}
}

// run runs the bmojo CLI against the node, with a deadline.
func (n *node) run(ctx context.Context, t *testing.T, args ...string) string {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, n.bmojo, append(args, "--kubeconfig", n.kubeconfig)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bmojo %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// provisionVolumes is the node's storage: one hostPath PersistentVolume,
// pre-bound, for every claim the job makes (the checkpoint claim, one per
// etcd member), owned by the user its pods run as. There is no dynamic
// provisioner on the node.
func (n *node) provisionVolumes(ctx context.Context, t *testing.T, ns string, m *launch.Manifests) {
	t.Helper()
	type claim struct {
		name string
		size resource.Quantity
		uid  int64
	}
	var claims []claim
	request := func(obj map[string]any) resource.Quantity {
		s, _, _ := unstructured.NestedString(obj, "spec", "resources", "requests", "storage")
		q, err := resource.ParseQuantity(s)
		if err != nil {
			t.Fatalf("claim size %q: %v", s, err)
		}
		return q
	}
	for _, o := range m.Objects {
		switch o.GetKind() {
		case "PersistentVolumeClaim":
			claims = append(claims, claim{o.GetName(), request(o.Object), runAs(t, m, o.GetName())})
		case "StatefulSet":
			tmpls, _, _ := unstructured.NestedSlice(o.Object, "spec", "volumeClaimTemplates")
			replicas, _, _ := unstructured.NestedInt64(o.Object, "spec", "replicas")
			uid, _, _ := unstructured.NestedInt64(o.Object, "spec", "template", "spec", "securityContext", "runAsUser")
			for _, tm := range tmpls {
				tm := tm.(map[string]any)
				name, _, _ := unstructured.NestedString(tm, "metadata", "name")
				for i := range replicas {
					claims = append(claims, claim{fmt.Sprintf("%s-%s-%d", name, o.GetName(), i), request(tm), uid})
				}
			}
		}
	}
	for _, c := range claims {
		dir := filepath.Join(n.dir, "volumes", c.name)
		n.volumes[c.name] = dir
		if err := os.MkdirAll(dir, 0o770); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, int(c.uid), int(c.uid)); err != nil {
			t.Fatal(err)
		}
		dirType := corev1.HostPathDirectory
		pv := &corev1.PersistentVolume{
			ObjectMeta: metav1.ObjectMeta{Name: ns + "-" + c.name},
			Spec: corev1.PersistentVolumeSpec{
				Capacity:                      corev1.ResourceList{corev1.ResourceStorage: c.size},
				AccessModes:                   []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce, corev1.ReadWriteMany},
				PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimRetain,
				PersistentVolumeSource:        corev1.PersistentVolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: dir, Type: &dirType}},
				ClaimRef:                      &corev1.ObjectReference{Namespace: ns, Name: c.name},
			},
		}
		if _, err := n.cs.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if len(claims) < 2 {
		t.Fatalf("the job makes %d claims; want the checkpoint claim and etcd's", len(claims))
	}
}

// runAs is the user of the pods that mount claim.
func runAs(t *testing.T, m *launch.Manifests, claim string) int64 {
	t.Helper()
	for _, o := range m.Objects {
		vols, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "volumes")
		for _, v := range vols {
			if c, _, _ := unstructured.NestedString(v.(map[string]any), "persistentVolumeClaim", "claimName"); c == claim {
				uid, _, _ := unstructured.NestedInt64(o.Object, "spec", "template", "spec", "securityContext", "runAsUser")
				return uid
			}
		}
	}
	t.Fatalf("no pod mounts claim %s", claim)
	return 0
}

func (n *node) secret(ctx context.Context, t *testing.T, ns, name, key string) string {
	t.Helper()
	s, err := n.cs.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Data[key]) == 0 {
		t.Fatalf("Secret %s has no %s", name, key)
	}
	return string(s.Data[key])
}

// monitorStatus is what the test reads of /api/v1/status.
type monitorStatus struct {
	Step     int `json:"step"`
	Steps    int `json:"steps"`
	Epoch    int `json:"epoch"`
	RingSize int `json:"ring_size"`
}

// monitor polls the leading coordinator's monitor, at its pod IP (the node
// has no kube-proxy) with `bmojo status --json` and the job's token, until
// cond holds.
func (n *node) monitor(ctx context.Context, t *testing.T, ns, job, token string, d time.Duration, cond func(monitorStatus) bool) monitorStatus {
	t.Helper()
	var last monitorStatus
	waitFor(ctx, t, d, "the coordinator's monitor", func() error {
		pods, err := n.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: launch.LabelInstance + "=" + job + "," + launch.LabelComponent + "=coordinator"})
		if err != nil {
			return err
		}
		var errs []string
		for _, p := range pods.Items {
			// Not only ready ones: a coordinator stops serving health once
			// the job is done, and its monitor still has the final status.
			if p.Status.PodIP == "" || p.Status.Phase != corev1.PodRunning {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			out, err := exec.CommandContext(cctx, n.bmojo, "status", "--json", "--addr", "http://"+p.Status.PodIP+":8080", "--token", token).Output()
			cancel()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", p.Name, err))
				continue
			}
			var s monitorStatus
			if err := json.Unmarshal(out, &s); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", p.Name, err))
				continue
			}
			if s.Step >= last.Step {
				last = s
			}
		}
		if last.Steps > 0 && cond(last) {
			return nil
		}
		return fmt.Errorf("last status %+v %v", last, errs)
	})
	return last
}

// workerPod is the live pod of a worker index, or nil.
func (n *node) workerPod(ctx context.Context, t *testing.T, ns, job, index string) *corev1.Pod {
	t.Helper()
	pods, err := n.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: launch.LabelInstance + "=" + job + "," + launch.LabelComponent + "=worker"})
	if err != nil {
		t.Fatal(err)
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Annotations["batch.kubernetes.io/job-completion-index"] == index && p.DeletionTimestamp == nil &&
			p.Status.Phase != corev1.PodFailed && p.Status.Phase != corev1.PodSucceeded {
			return p
		}
	}
	return nil
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
			return true
		}
	}
	return false
}

// checkHardening reads every running container's main process from /proc
// (its PID from containerd): user and group 65532, no capabilities at all,
// no_new_privs, a seccomp filter, and a read-only root file system.
func (n *node) checkHardening(ctx context.Context, t *testing.T, ns, job string) {
	t.Helper()
	pids := n.taskPIDs(ctx, t)
	pods, err := n.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: launch.LabelInstance + "=" + job})
	if err != nil {
		t.Fatal(err)
	}
	checked := map[string]int{}
	for _, p := range pods.Items {
		for _, c := range p.Status.ContainerStatuses {
			id, ok := strings.CutPrefix(c.ContainerID, "containerd://")
			if !ok || c.State.Running == nil {
				continue
			}
			pid, ok := pids[id]
			if !ok {
				t.Errorf("%s/%s: containerd has no task %s", p.Name, c.Name, id)
				continue
			}
			status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				t.Errorf("%s/%s: %v", p.Name, c.Name, err)
				continue
			}
			mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
			if err != nil {
				t.Errorf("%s/%s: %v", p.Name, c.Name, err)
				continue
			}
			for _, v := range hardeningViolations(string(status), string(mi)) {
				t.Errorf("%s/%s (pid %d): %s", p.Name, c.Name, pid, v)
			}
			checked[p.Labels[launch.LabelComponent]]++
		}
	}
	for _, comp := range []string{"etcd", "coordinator", "worker"} {
		if checked[comp] == 0 {
			t.Errorf("no running %s container was checked (checked %v)", comp, checked)
		}
	}
	t.Logf("containers checked for user 65532, no capabilities, no_new_privs, seccomp, read-only root: %v", checked)
}

// taskPIDs maps containerd task (container) ids to their main PIDs.
func (n *node) taskPIDs(ctx context.Context, t *testing.T) map[string]int {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, "ctr", "-a", filepath.Join(n.dir, "containerd", "containerd.sock"), "-n", "k8s.io", "tasks", "ls").Output()
	if err != nil {
		t.Fatalf("ctr tasks ls: %v", err)
	}
	pids := map[string]int{}
	for _, line := range strings.Split(string(out), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "RUNNING" {
			if pid, err := strconv.Atoi(f[1]); err == nil {
				pids[f[0]] = pid
			}
		}
	}
	return pids
}

// hardeningViolations lists how a process, given its /proc status and
// mountinfo, differs from what the manifests ask of every container.
func hardeningViolations(status, mountinfo string) []string {
	fields := procFields(status)
	want := map[string]string{
		"Uid": "65532\t65532\t65532\t65532", "Gid": "65532\t65532\t65532\t65532",
		"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000",
		"CapBnd": "0000000000000000", "CapAmb": "0000000000000000",
		"NoNewPrivs": "1", "Seccomp": "2",
	}
	var out []string
	for _, k := range []string{"Uid", "Gid", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"} {
		if fields[k] != want[k] {
			out = append(out, fmt.Sprintf("%s %q, want %q", k, fields[k], want[k]))
		}
	}
	if !rootReadOnly(mountinfo) {
		out = append(out, "the root file system is writable")
	}
	return out
}

func procFields(status string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(status, "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// rootReadOnly says whether the mount at / in a mountinfo is read-only.
func rootReadOnly(mountinfo string) bool {
	for _, line := range strings.Split(mountinfo, "\n") {
		f := strings.Fields(line)
		if len(f) > 5 && f[4] == "/" {
			return strings.HasPrefix(f[5], "ro")
		}
	}
	return false
}

// events prints the namespace's events as kubectl get events does.
func (n *node) events(ctx context.Context, t *testing.T, ns string) string {
	t.Helper()
	evs, err := n.cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	when := func(e corev1.Event) time.Time {
		if !e.LastTimestamp.IsZero() {
			return e.LastTimestamp.Time
		}
		return e.EventTime.Time
	}
	sort.SliceStable(evs.Items, func(i, j int) bool { return when(evs.Items[i]).Before(when(evs.Items[j])) })
	var b strings.Builder
	fmt.Fprintf(&b, "%-9s %-8s %-26s %-45s %s\n", "LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE")
	for _, e := range evs.Items {
		obj := strings.ToLower(e.InvolvedObject.Kind) + "/" + e.InvolvedObject.Name
		fmt.Fprintf(&b, "%-9s %-8s %-26s %-45s %s\n", time.Since(when(e)).Round(time.Second), e.Type, e.Reason, obj, e.Message)
	}
	return b.String()
}

// waitFor polls cond every half second until it holds, d passes (fatal,
// with cond's last error) or ctx ends.
func waitFor(ctx context.Context, t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("%s: not after %s: %v", what, d, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

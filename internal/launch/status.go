package launch

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// JobStatus is what Kubernetes knows about a launched job: controllers'
// counts and each pod. Training progress (step, loss, ETA) lives in etcd and
// is `bmojo status`'s business, not this package's.
type JobStatus struct {
	Name, Namespace string
	Phase           string // Queued, Pending, Running, Succeeded, Failed

	Etcd         Replicas
	Coordinators Replicas
	Workers      Workers

	Checkpoint ClaimStatus
	Pods       []PodStatus
}

// Replicas counts a Deployment's or StatefulSet's pods.
type Replicas struct{ Desired, Ready int32 }

// Workers counts the worker Job's pods.
type Workers struct {
	Desired, Active, Ready, Succeeded, Failed int32
	Suspended                                 bool // Kueue has not admitted the gang yet
}

// ClaimStatus is the checkpoint claim's binding.
type ClaimStatus struct {
	Name, Phase, Capacity string
}

// PodStatus is one pod of the job.
type PodStatus struct {
	Name, Component, Phase, Node, Reason string
	Ready                                bool
	Restarts                             int32
}

// Status reads job's state in namespace ns. ErrNotFound when none of its
// controllers exist; ErrForbidden and ErrUnreachable as for Apply.
func Status(ctx context.Context, cfg *rest.Config, ns, job string) (*JobStatus, error) {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("launch: status: %w", err)
	}
	st := &JobStatus{Name: job, Namespace: ns}
	fail := func(what string, err error) (*JobStatus, error) {
		return nil, fmt.Errorf("launch: status of %s in namespace %s: %s: %w", job, ns, what, explain(cfg.Host, err))
	}
	found := 0
	if j, err := cs.BatchV1().Jobs(ns).Get(ctx, job+"-worker", metav1.GetOptions{}); err == nil {
		found++
		st.Workers = workers(j)
		st.Phase = jobPhase(j)
	} else if !apierrors.IsNotFound(err) {
		return fail("worker job", err)
	}
	if d, err := cs.AppsV1().Deployments(ns).Get(ctx, job+"-coordinator", metav1.GetOptions{}); err == nil {
		found++
		st.Coordinators = Replicas{Desired: deref(d.Spec.Replicas), Ready: d.Status.ReadyReplicas}
	} else if !apierrors.IsNotFound(err) {
		return fail("coordinator deployment", err)
	}
	if s, err := cs.AppsV1().StatefulSets(ns).Get(ctx, job+"-etcd", metav1.GetOptions{}); err == nil {
		found++
		st.Etcd = Replicas{Desired: deref(s.Spec.Replicas), Ready: s.Status.ReadyReplicas}
	} else if !apierrors.IsNotFound(err) {
		return fail("etcd statefulset", err)
	}
	if found == 0 {
		return nil, fmt.Errorf("launch: %w: %s in namespace %s (no worker job, coordinator or etcd)", ErrNotFound, job, ns)
	}
	if pvc, err := cs.CoreV1().PersistentVolumeClaims(ns).Get(ctx, job+"-checkpoints", metav1.GetOptions{}); err == nil {
		st.Checkpoint = ClaimStatus{Name: pvc.Name, Phase: string(pvc.Status.Phase)}
		if q, ok := pvc.Status.Capacity[corev1.ResourceStorage]; ok {
			st.Checkpoint.Capacity = q.String()
		}
	} else if !apierrors.IsNotFound(err) {
		return fail("checkpoint claim", err)
	}
	pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: Selector(job)})
	if err != nil {
		return fail("pods", err)
	}
	for _, p := range pods.Items {
		st.Pods = append(st.Pods, podStatus(&p))
	}
	sort.Slice(st.Pods, func(i, j int) bool { return st.Pods[i].Name < st.Pods[j].Name })
	if st.Phase == "" {
		st.Phase = "Pending"
	}
	return st, nil
}

func deref(p *int32) int32 {
	if p == nil {
		return 1
	}
	return *p
}

func workers(j *batchv1.Job) Workers {
	w := Workers{Active: j.Status.Active, Succeeded: j.Status.Succeeded, Failed: j.Status.Failed}
	if j.Spec.Completions != nil {
		w.Desired = *j.Spec.Completions
	}
	if j.Status.Ready != nil {
		w.Ready = *j.Status.Ready
	}
	w.Suspended = j.Spec.Suspend != nil && *j.Spec.Suspend
	return w
}

func jobPhase(j *batchv1.Job) string {
	for _, c := range j.Status.Conditions {
		if c.Status != corev1.ConditionTrue {
			continue
		}
		switch c.Type {
		case batchv1.JobComplete:
			return "Succeeded"
		case batchv1.JobFailed:
			return "Failed"
		}
	}
	switch {
	case j.Spec.Suspend != nil && *j.Spec.Suspend:
		return "Queued"
	case j.Status.Active > 0:
		return "Running"
	}
	return "Pending"
}

func podStatus(p *corev1.Pod) PodStatus {
	ps := PodStatus{
		Name:      p.Name,
		Component: p.Labels[LabelComponent],
		Phase:     string(p.Status.Phase),
		Node:      p.Spec.NodeName,
		Reason:    p.Status.Reason,
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			ps.Ready = c.Status == corev1.ConditionTrue
		}
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && ps.Reason == "" {
			ps.Reason = c.Reason + ": " + c.Message
		}
	}
	for _, cs := range p.Status.ContainerStatuses {
		ps.Restarts += cs.RestartCount
		if w := cs.State.Waiting; w != nil && ps.Reason == "" {
			ps.Reason = w.Reason
		}
	}
	return ps
}

// Write prints the status as a short report.
func (s *JobStatus) Write(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "job\t%s (namespace %s)\n", s.Name, s.Namespace)
	fmt.Fprintf(tw, "phase\t%s\n", s.Phase)
	fmt.Fprintf(tw, "etcd\t%d/%d ready\n", s.Etcd.Ready, s.Etcd.Desired)
	fmt.Fprintf(tw, "coordinators\t%d/%d ready\n", s.Coordinators.Ready, s.Coordinators.Desired)
	ws := fmt.Sprintf("%d/%d ready, %d active, %d succeeded, %d failed", s.Workers.Ready, s.Workers.Desired,
		s.Workers.Active, s.Workers.Succeeded, s.Workers.Failed)
	if s.Workers.Suspended {
		ws += " (suspended: waiting for admission)"
	}
	fmt.Fprintf(tw, "workers\t%s\n", ws)
	if s.Checkpoint.Name != "" {
		fmt.Fprintf(tw, "checkpoints\t%s %s %s\n", s.Checkpoint.Name, s.Checkpoint.Phase, s.Checkpoint.Capacity)
	}
	if len(s.Pods) > 0 {
		fmt.Fprintf(tw, "\nPOD\tCOMPONENT\tPHASE\tREADY\tRESTARTS\tNODE\tREASON\n")
		for _, p := range s.Pods {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%d\t%s\t%s\n", p.Name, p.Component, p.Phase, p.Ready, p.Restarts,
				dash(p.Node), dash(strings.TrimSuffix(p.Reason, ": ")))
		}
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

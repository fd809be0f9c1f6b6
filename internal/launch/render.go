package launch

import (
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	k8sfs "github.com/bmojo/bmojo/k8s"
)

// Labels every launched object carries; Delete and Status select on them.
const (
	LabelInstance  = "app.kubernetes.io/instance"
	LabelName      = "app.kubernetes.io/name"
	LabelComponent = "app.kubernetes.io/component"
	LabelManagedBy = "app.kubernetes.io/managed-by"
	LabelQueue     = "kueue.x-k8s.io/queue-name"
	LabelPodGroup  = "scheduling.x-k8s.io/pod-group"
)

// Manifests is a rendered job: the objects in apply order and the same as
// one YAML stream. The job's Secrets render as placeholders without data;
// FillSecrets (or Fill) puts the credentials into Objects only, so YAML,
// which --dry-run prints, never holds key material.
type Manifests struct {
	Objects []*unstructured.Unstructured
	YAML    []byte
}

// root is where the embedded tree lands in the in-memory file system; the
// kustomizations refer to each other by relative paths, which survive.
const root = "/k8s"

// RenderOverlay builds an overlay exactly as `kubectl kustomize
// k8s/overlays/NAME` would, with no launch spec applied.
func RenderOverlay(overlay string) (*Manifests, error) {
	if !knownOverlay(overlay) {
		return nil, fmt.Errorf("launch: overlay %q is not one of %s", overlay, strings.Join(k8sfs.Overlays, ", "))
	}
	mem, err := memTree()
	if err != nil {
		return nil, err
	}
	return build(mem, path.Join(root, "overlays", overlay))
}

// Render validates the spec and builds its manifests: the spec's overlay with
// the job's name prefix, instance label, namespace, image, sizes and job file
// written into it, the way `kustomize edit` would.
func Render(s Spec) (*Manifests, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if s.Namespace == "" {
		s.Namespace = DefaultNamespace
	}
	mem, err := memTree()
	if err != nil {
		return nil, err
	}
	job, err := s.JobFile()
	if err != nil {
		return nil, err
	}
	// The base's configMapGenerator reads base/job.yaml: replace the file
	// rather than adding a second generator, so there is one job ConfigMap.
	if err := mem.WriteFile(path.Join(root, "base", "job.yaml"), job); err != nil {
		return nil, fmt.Errorf("launch: write job file: %w", err)
	}
	dir := path.Join(root, "overlays", s.Overlay)
	kpath := path.Join(dir, "kustomization.yaml")
	b, err := mem.ReadFile(kpath)
	if err != nil {
		return nil, fmt.Errorf("launch: read overlay: %w", err)
	}
	var k types.Kustomization
	if err := yaml.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("launch: overlay %s: %w", s.Overlay, err)
	}
	if err := customize(&k, s); err != nil {
		return nil, err
	}
	out, err := yaml.Marshal(&k)
	if err != nil {
		return nil, fmt.Errorf("launch: overlay %s: %w", s.Overlay, err)
	}
	if err := mem.WriteFile(kpath, out); err != nil {
		return nil, fmt.Errorf("launch: overlay %s: %w", s.Overlay, err)
	}
	return build(mem, dir)
}

// customize edits an overlay's kustomization for one job.
func customize(k *types.Kustomization, s Spec) error {
	k.NamePrefix = s.Name + "-"
	k.Namespace = s.Namespace
	found := false
	for i := range k.Labels {
		if _, ok := k.Labels[i].Pairs[LabelInstance]; ok {
			k.Labels[i].Pairs[LabelInstance] = s.Name
			found = true
		}
	}
	if !found {
		return fmt.Errorf("launch: overlay %s sets no %s label; the manifests rely on it", s.Overlay, LabelInstance)
	}
	// Labels on every object but not in selectors: selectors of existing
	// Deployments and StatefulSets are immutable, so only add what never
	// changes there.
	k.Labels = append(k.Labels, types.Label{Pairs: map[string]string{LabelManagedBy: "bmojo"}})

	k.Images = []types.Image{kustomizeImage("bmojo", s.Image)}
	if s.EtcdImage != "" {
		name, _, _ := strings.Cut(DefaultEtcdImage, ":")
		k.Images = append(k.Images, kustomizeImage(name, s.EtcdImage))
	}

	patches, err := specPatches(s)
	if err != nil {
		return err
	}
	for _, p := range patches {
		k.Patches = append(k.Patches, types.Patch{Patch: p})
	}
	return nil
}

// kustomizeImage replaces the image name in the manifests with img, a
// reference checkImage accepted (a tag or a digest).
func kustomizeImage(name, img string) types.Image {
	out := types.Image{Name: name}
	if n, digest, ok := strings.Cut(img, "@"); ok {
		out.NewName, out.Digest = n, digest
	} else {
		i := strings.LastIndex(img, ":")
		out.NewName, out.NewTag = img[:i], img[i+1:]
	}
	return out
}

// specPatches are strategic-merge patches, applied after the overlay's own,
// for the parts of the spec kustomize has no field for.
func specPatches(s Spec) ([]string, error) {
	minW := s.EffectiveMinWorkers()
	group := s.Name + "-worker"

	container := map[string]any{"name": "worker"}
	res := map[string]any{}
	req := map[string]any{}
	if s.WorkerCPU != "" {
		req["cpu"] = s.WorkerCPU
	}
	lim := map[string]any{}
	if s.WorkerMemory != "" {
		// Limit = request: a worker over its memory is OOM-killed at the
		// size the user asked for, not at the overlay's (possibly smaller)
		// limit, and the API server rejects a request above a limit.
		req["memory"] = s.WorkerMemory
		lim["memory"] = s.WorkerMemory
	}
	if g := s.EffectiveGPUs(); g > 0 {
		// Extended resources are requested as limits; requests default to them.
		lim["nvidia.com/gpu"] = g
	}
	if len(req) > 0 {
		res["requests"] = req
	}
	if len(lim) > 0 {
		res["limits"] = lim
	}
	if len(res) > 0 {
		container["resources"] = res
	}
	podSpec := map[string]any{"containers": []any{container}}
	if s.Data.Claim != "" {
		container["volumeMounts"] = []any{map[string]any{"name": "data", "mountPath": "/data", "readOnly": true}}
		podSpec["volumes"] = []any{map[string]any{
			"name":                  "data",
			"persistentVolumeClaim": map[string]any{"claimName": s.Data.Claim, "readOnly": true},
		}}
	}
	// The gang size goes on the Job, not its pod template: a Job's template
	// is immutable, and min_workers may change on a relaunch.
	jobMeta := map[string]any{
		"name":        "worker",
		"annotations": map[string]any{"bmojo.dev/min-member": strconv.Itoa(minW)},
	}
	if s.Queue != "" {
		jobMeta["labels"] = map[string]any{LabelQueue: s.Queue}
	}
	job := map[string]any{
		"apiVersion": "batch/v1",
		"kind":       "Job",
		"metadata":   jobMeta,
		"spec": map[string]any{
			"completions": s.Workers,
			"parallelism": s.Workers,
			"template": map[string]any{
				"metadata": map[string]any{
					"labels":      map[string]any{LabelPodGroup: group},
					"annotations": map[string]any{"scheduling.k8s.io/group-name": group},
				},
				"spec": podSpec,
			},
		},
	}
	pdb := map[string]any{
		"apiVersion": "policy/v1",
		"kind":       "PodDisruptionBudget",
		"metadata":   map[string]any{"name": "worker"},
		"spec":       map[string]any{"minAvailable": minW},
	}
	// The coordinator creates the job in etcd and waits for this many
	// workers before the first ring (env merges by name).
	coordEnv := []any{
		map[string]any{"name": "WORKERS", "value": strconv.Itoa(s.Workers)},
		map[string]any{"name": "MIN_WORKERS", "value": strconv.Itoa(minW)},
	}
	if s.Monitor.HTTPS {
		// The coordinators' certificate names the coordinator Service.
		coordEnv = append(coordEnv,
			map[string]any{"name": "HTTP_CERT", "value": "/etc/bmojo-tls/tls.crt"},
			map[string]any{"name": "HTTP_KEY", "value": "/etc/bmojo-tls/tls.key"})
	}
	coord := map[string]any{
		"apiVersion": "apps/v1",
		"kind":       "Deployment",
		"metadata":   map[string]any{"name": "coordinator"},
		"spec": map[string]any{"template": map[string]any{"spec": map[string]any{
			"containers": []any{map[string]any{"name": "coordinator", "env": coordEnv}},
		}}},
	}
	out := []map[string]any{job, pdb, coord}
	if ns := s.Monitor.Namespace; ns != "" {
		// Replaces the base's rule (a list without a merge key): the
		// monitor port from that namespace's pods only.
		out = append(out, map[string]any{
			"apiVersion": "networking.k8s.io/v1",
			"kind":       "NetworkPolicy",
			"metadata":   map[string]any{"name": "coordinator"},
			"spec": map[string]any{"ingress": []any{map[string]any{
				"from": []any{map[string]any{"namespaceSelector": map[string]any{
					"matchLabels": map[string]any{"kubernetes.io/metadata.name": ns},
				}}},
				"ports": []any{map[string]any{"protocol": "TCP", "port": 8080}},
			}}},
		})
	}
	if s.Checkpoint.Size != "" || s.Checkpoint.StorageClass != "" {
		spec := map[string]any{}
		if s.Checkpoint.Size != "" {
			spec["resources"] = map[string]any{"requests": map[string]any{"storage": s.Checkpoint.Size}}
		}
		if s.Checkpoint.StorageClass != "" {
			spec["storageClassName"] = s.Checkpoint.StorageClass
		}
		out = append(out, map[string]any{
			"apiVersion": "v1",
			"kind":       "PersistentVolumeClaim",
			"metadata":   map[string]any{"name": "checkpoints"},
			"spec":       spec,
		})
	}
	var patches []string
	for _, p := range out {
		b, err := yaml.Marshal(p)
		if err != nil {
			return nil, fmt.Errorf("launch: patch: %w", err)
		}
		patches = append(patches, string(b))
	}
	return patches, nil
}

// memTree copies the embedded k8s/ tree into an in-memory file system, so
// Render can rewrite files without touching the embedded (read-only) copy.
func memTree() (filesys.FileSystem, error) {
	mem := filesys.MakeFsInMemory()
	err := fs.WalkDir(k8sfs.FS, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return mem.MkdirAll(path.Join(root, p))
		}
		b, err := fs.ReadFile(k8sfs.FS, p)
		if err != nil {
			return err
		}
		return mem.WriteFile(path.Join(root, p), b)
	})
	if err != nil {
		return nil, fmt.Errorf("launch: embedded manifests: %w", err)
	}
	return mem, nil
}

func build(mem filesys.FileSystem, dir string) (*Manifests, error) {
	opts := krusty.MakeDefaultOptions()
	rm, err := krusty.MakeKustomizer(opts).Run(mem, dir)
	if err != nil {
		return nil, fmt.Errorf("launch: kustomize %s: %w", strings.TrimPrefix(dir, root+"/"), err)
	}
	y, err := rm.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("launch: kustomize output: %w", err)
	}
	m := &Manifests{YAML: y}
	for _, r := range rm.Resources() {
		// Through JSON rather than r.Map(): unstructured objects must hold
		// JSON types (int64, not int) or DeepCopy panics.
		js, err := r.MarshalJSON()
		if err != nil {
			return nil, fmt.Errorf("launch: kustomize output %s: %w", r.CurId(), err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(js); err != nil {
			return nil, fmt.Errorf("launch: kustomize output %s: %w", r.CurId(), err)
		}
		m.Objects = append(m.Objects, u)
	}
	sort.SliceStable(m.Objects, func(i, j int) bool {
		return applyRank(m.Objects[i].GetKind()) < applyRank(m.Objects[j].GetKind())
	})
	return m, nil
}

// applyRank orders kinds so that what a pod refers to exists before the pod's
// controller does (accounts and config first, workloads last), as kubectl
// does for a directory.
func applyRank(kind string) int {
	order := []string{"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret",
		"PersistentVolumeClaim", "Service", "NetworkPolicy", "PodDisruptionBudget",
		"StatefulSet", "Deployment", "Job"}
	for i, k := range order {
		if k == kind {
			return i
		}
	}
	return len(order)
}

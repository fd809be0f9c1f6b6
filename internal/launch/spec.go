// Package launch renders and runs a bmojo training job on Kubernetes: a
// launch spec (launch.yaml) selects an overlay of the embedded k8s/ tree and
// sets the job's name, image, worker count, GPUs, model and volumes; Render
// builds the manifests with the kustomize library; Apply, Delete and Status
// talk to the cluster with client-go (server-side apply, field manager
// "bmojo"). FillSecrets gives the job its credentials: a job CA, a
// certificate per process identity (package pki) and the monitor's token,
// kept in Secrets and reused on every later launch. It owns nothing that
// runs inside the pods: those read the job file (package job) that Render
// puts into a ConfigMap, and the Secrets' files.
package launch

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"

	"go.yaml.in/yaml/v3"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/bmojo/bmojo/job"
	k8sfs "github.com/bmojo/bmojo/k8s"
)

// SpecVersion is the launch file format version this build reads.
const SpecVersion = 1

// MaxNameLen bounds Spec.Name: the longest derived name, the worker pods'
// hostnames "<name>-worker-<index>", and the StatefulSet revision label
// "<name>-etcd-<hash>" must stay within 63 characters.
const MaxNameLen = 40

// ErrSpec is wrapped by every launch spec validation error.
var ErrSpec = errors.New("invalid launch spec")

// Spec is one job to launch. Zero values mean "default" only where the field
// says so.
type Spec struct {
	Version   int    `yaml:"version"`   // launch file format, must be 1
	Name      string `yaml:"name"`      // job name: DNS-1035 label, at most MaxNameLen; prefixes every object
	Namespace string `yaml:"namespace"` // target namespace (must exist); "" = the kubeconfig context's, else "default"
	Overlay   string `yaml:"overlay"`   // k8s/overlays directory: "cpu-demo" or "gpu"
	Image     string `yaml:"image"`     // bmojo image with an explicit tag or digest, e.g. registry/bmojo:0.1.0-cuda

	Workers       int `yaml:"workers"`         // worker pods (ring size); >= 1
	MinWorkers    int `yaml:"min_workers"`     // fewest workers the job trains with (gang size, PDB); 0 = workers
	GPUsPerWorker int `yaml:"gpus_per_worker"` // nvidia.com/gpu per worker; gpu overlay only; 0 = 1 there

	// WorkerCPU and WorkerMemory override the overlay's worker requests
	// (Kubernetes quantities, e.g. "8", "32Gi"); "" keeps the overlay's.
	WorkerCPU    string `yaml:"worker_cpu"`
	WorkerMemory string `yaml:"worker_memory"`

	Preset string `yaml:"preset"` // model preset (model.Preset names); "" = the job file default
	Data   Data   `yaml:"data"`

	Checkpoint Volume `yaml:"checkpoint"`

	// EtcdImage overrides the overlay's etcd image (quay.io/coreos/etcd
	// with a tag); "" keeps it. Production launches pin it by digest, as
	// Image: registry/etcd:v3.6.13@sha256:<64 hex>.
	EtcdImage string `yaml:"etcd_image"`

	Monitor Monitor `yaml:"monitor"`

	// Queue is a Kueue LocalQueue name; set, the worker Job carries
	// kueue.x-k8s.io/queue-name and Kueue admits all workers at once.
	Queue string `yaml:"queue"`

	// Train holds further job file keys (steps, batch_size, lr, model, ...;
	// see package job). name, preset, data and checkpoint_dir come from
	// this spec and may not be repeated here.
	Train map[string]any `yaml:"train"`
}

// Data says where the prepared token shards are inside the pods.
type Data struct {
	// Claim is an existing PersistentVolumeClaim holding shards from
	// `bmojo data prepare`, mounted read-only at /data; "" = bundled corpus.
	Claim string `yaml:"claim"`
	// Path is the dataset directory inside the claim; "" = its root.
	Path string `yaml:"path"`
}

// Monitor is the coordinators' HTTP port 8080 (dashboard, /metrics,
// /api/v1/status). Its bearer token is always on: launch keeps it in the
// Secret <name>-monitor-token.
type Monitor struct {
	// Namespace is the namespace whose pods may connect to port 8080 (a
	// Prometheus namespace, say); "" = the job's own namespace.
	Namespace string `yaml:"namespace"`
	// HTTPS serves port 8080 over TLS with the coordinators' certificate
	// (from the job CA, naming the coordinator Service); clients then need
	// the job CA's certificate (Secret <name>-ca, key ca.crt).
	HTTPS bool `yaml:"https"`
}

// Volume is the checkpoint PersistentVolumeClaim.
type Volume struct {
	Size         string `yaml:"size"`          // e.g. 100Gi; "" = the overlay's
	StorageClass string `yaml:"storage_class"` // "" = the cluster default
}

// DefaultNamespace is used when neither the spec, the flag nor the
// kubeconfig context names one.
const DefaultNamespace = "default"

// LoadSpec reads a launch file. Unknown keys are errors, so a typo does not
// launch a different job than the one written.
func LoadSpec(path string) (Spec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Spec{}, fmt.Errorf("launch file: %w", err)
	}
	return ParseSpec(path, b)
}

// ParseSpec is LoadSpec on bytes; name is used in errors. It does not
// validate: callers apply flag overrides first, then Validate.
func ParseSpec(name string, b []byte) (Spec, error) {
	var s Spec
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&s); err != nil {
		return Spec{}, fmt.Errorf("%w: %s: %v", ErrSpec, name, err)
	}
	return s, nil
}

func bad(field, format string, a ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrSpec, field, fmt.Sprintf(format, a...))
}

// Validate checks the spec without side effects; every error names the
// field. It also builds the job file, so a bad train key fails here.
func (s Spec) Validate() error {
	if s.Version != SpecVersion {
		return bad("version", "is %d; this build reads version %d launch files (add `version: %d`)", s.Version, SpecVersion, SpecVersion)
	}
	if s.Name == "" {
		return bad("name", "must be set")
	}
	if len(s.Name) > MaxNameLen {
		return bad("name", "%q is %d characters; at most %d (pod hostnames derived from it must fit 63)", s.Name, len(s.Name), MaxNameLen)
	}
	if errs := validation.IsDNS1035Label(s.Name); len(errs) > 0 {
		return bad("name", "%q: %s", s.Name, strings.Join(errs, "; "))
	}
	if s.Namespace != "" {
		if errs := validation.IsDNS1123Label(s.Namespace); len(errs) > 0 {
			return bad("namespace", "%q: %s", s.Namespace, strings.Join(errs, "; "))
		}
	}
	if !knownOverlay(s.Overlay) {
		return bad("overlay", "%q is not one of %s", s.Overlay, strings.Join(k8sfs.Overlays, ", "))
	}
	if err := checkImage(s.Image); err != nil {
		return bad("image", "%v", err)
	}
	if s.EtcdImage != "" {
		if err := checkImage(s.EtcdImage); err != nil {
			return bad("etcd_image", "%v", err)
		}
	}
	if n := s.Monitor.Namespace; n != "" {
		if errs := validation.IsDNS1123Label(n); len(errs) > 0 {
			return bad("monitor.namespace", "%q: %s", n, strings.Join(errs, "; "))
		}
	}
	if s.Workers < 1 {
		return bad("workers", "must be at least 1, got %d", s.Workers)
	}
	if s.MinWorkers < 0 {
		return bad("min_workers", "must be >= 0 (0 = workers), got %d", s.MinWorkers)
	}
	if s.Workers < s.MinWorkers {
		return bad("workers", "%d is below the job's minimum (min_workers: %d)", s.Workers, s.MinWorkers)
	}
	switch {
	case s.GPUsPerWorker < 0:
		return bad("gpus_per_worker", "must be >= 0, got %d", s.GPUsPerWorker)
	case s.GPUsPerWorker > 0 && s.Overlay != "gpu":
		return bad("gpus_per_worker", "is %d but overlay %q has no GPUs; use overlay: gpu", s.GPUsPerWorker, s.Overlay)
	}
	for _, q := range []struct{ field, v string }{
		{"worker_cpu", s.WorkerCPU}, {"worker_memory", s.WorkerMemory}, {"checkpoint.size", s.Checkpoint.Size},
	} {
		if q.v == "" {
			continue
		}
		if _, err := resource.ParseQuantity(q.v); err != nil {
			return bad(q.field, "%q is not a Kubernetes quantity (like 8, 500m, 32Gi)", q.v)
		}
	}
	if c := s.Checkpoint.StorageClass; c != "" {
		if errs := validation.IsDNS1123Subdomain(c); len(errs) > 0 {
			return bad("checkpoint.storage_class", "%q: %s", c, strings.Join(errs, "; "))
		}
	}
	if c := s.Data.Claim; c != "" {
		if errs := validation.IsDNS1123Subdomain(c); len(errs) > 0 {
			return bad("data.claim", "%q: %s", c, strings.Join(errs, "; "))
		}
	}
	if s.Data.Path != "" && s.Data.Claim == "" {
		return bad("data.path", "is set but data.claim is empty; the path is inside that claim")
	}
	if strings.HasPrefix(s.Data.Path, "/") || strings.Contains(s.Data.Path, "..") {
		return bad("data.path", "%q must be relative to the claim and stay inside it", s.Data.Path)
	}
	if q := s.Queue; q != "" {
		if errs := validation.IsDNS1123Subdomain(q); len(errs) > 0 {
			return bad("queue", "%q: %s", q, strings.Join(errs, "; "))
		}
	}
	if _, err := s.JobFile(); err != nil {
		return err
	}
	return nil
}

// DefaultEtcdImage is the base's etcd image (k8s/base/etcd.yaml).
const DefaultEtcdImage = "quay.io/coreos/etcd:v3.6.13"

// productionOverlays are the overlays meant for real clusters, where an
// image must be pinned by digest (cpu-demo runs images loaded into a
// laptop cluster, which have no registry digest).
var productionOverlays = map[string]bool{"gpu": true}

// Warnings are things Validate accepts but a production launch should not
// do: today, images named by tag alone in a production overlay. A tag can be
// moved to another build in the registry; a digest cannot, so every node
// runs the bytes that were tested. (Workers of one ring also compare a code
// hash, so a moved tag fails loudly rather than mixing builds; etcd has no
// such check.) bmojo launch prints them; k8s/README.md says how to find a
// digest.
func (s Spec) Warnings() []string {
	if !productionOverlays[s.Overlay] {
		return nil
	}
	var out []string
	for _, im := range []struct{ field, img string }{{"image", s.Image}, {"etcd_image", s.EtcdImage}} {
		img := im.img
		if img == "" {
			img = DefaultEtcdImage
		}
		if !strings.Contains(img, "@sha256:") {
			out = append(out, fmt.Sprintf("%s %s is pinned by tag only in production overlay %q: pin it by digest (%s@sha256:...; k8s/README.md, \"Images\")", im.field, img, s.Overlay, img))
		}
	}
	return out
}

// EffectiveMinWorkers is MinWorkers with its default applied.
func (s Spec) EffectiveMinWorkers() int {
	if s.MinWorkers == 0 {
		return s.Workers
	}
	return s.MinWorkers
}

// EffectiveGPUs is GPUsPerWorker with its default applied.
func (s Spec) EffectiveGPUs() int {
	if s.Overlay == "gpu" && s.GPUsPerWorker == 0 {
		return 1
	}
	return s.GPUsPerWorker
}

func knownOverlay(o string) bool {
	for _, k := range k8sfs.Overlays {
		if o == k {
			return true
		}
	}
	return false
}

// checkImage insists on a tag or digest: an untagged image means "latest",
// which differs between nodes pulling at different times, and workers of one
// ring must run the same build.
func checkImage(img string) error {
	if img == "" {
		return errors.New("must be set (an image with a tag, e.g. registry.example/bmojo:0.1.0)")
	}
	if strings.ContainsAny(img, " \t\n") {
		return fmt.Errorf("%q contains white space", img)
	}
	name, digest, hasDigest := strings.Cut(img, "@")
	if hasDigest {
		if !strings.HasPrefix(digest, "sha256:") || len(digest) != len("sha256:")+64 {
			return fmt.Errorf("%q: digest must be sha256:<64 hex digits>", img)
		}
		return nil
	}
	last := name[strings.LastIndex(name, "/")+1:]
	repo, tag, ok := strings.Cut(last, ":")
	if !ok || tag == "" || repo == "" {
		return fmt.Errorf("%q has no tag; give one (e.g. %s:0.1.0) so every worker runs the same build", img, img)
	}
	if tag == "latest" {
		return fmt.Errorf("%q: tag latest can differ between nodes; pin a version or digest", img)
	}
	return nil
}

// reservedTrainKeys are job file keys the spec itself sets.
var reservedTrainKeys = map[string]string{
	"version":        "version",
	"name":           "name",
	"preset":         "preset",
	"data":           "data",
	"checkpoint_dir": "checkpoint.* (the claim is mounted at /ckpt)",
}

// JobFile renders the job file the pods read (/etc/bmojo/job.yaml) and
// checks it with package job, so a bad key or value fails at launch, not
// in a crash-looping pod.
func (s Spec) JobFile() ([]byte, error) {
	j := map[string]any{}
	for k, v := range s.Train {
		if by, ok := reservedTrainKeys[k]; ok {
			return nil, bad("train."+k, "is set by the launch spec's %s; remove it here", by)
		}
		j[k] = v
	}
	j["version"] = job.FileVersion
	j["name"] = s.Name
	if s.Preset != "" {
		j["preset"] = s.Preset
	}
	j["checkpoint_dir"] = "/ckpt"
	if s.Data.Claim != "" {
		j["data"] = strings.TrimSuffix("/data/"+s.Data.Path, "/")
	}
	b, err := yaml.Marshal(j)
	if err != nil {
		return nil, fmt.Errorf("launch: job file: %w", err)
	}
	if _, err := job.Parse("train", b); err != nil {
		// train's errors name the job file key; say where it came from.
		return nil, fmt.Errorf("%w: %w", ErrSpec, err)
	}
	return b, nil
}

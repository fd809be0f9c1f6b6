package coordinator

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.yaml.in/yaml/v3"

	"github.com/bmojo/bmojo/internal/cluster"
	"github.com/bmojo/bmojo/internal/train"
)

// PutSpec creates job j in etcd (the spec every coordinator and worker
// reads), or checks that the existing one is the same job: then the job
// resumes (resumed is true). workers is the ring size to wait for at the
// start, minRing the smallest ring that may train, code the build identity
// (cluster.FileHash) of the binary the workers run.
func PutSpec(ctx context.Context, cli *clientv3.Client, j train.Job, workers, minRing int, code string) (spec cluster.JobSpec, resumed bool, err error) {
	prefix := cluster.Prefix(j.Name)
	y, err := yaml.Marshal(j)
	if err != nil {
		return cluster.JobSpec{}, false, fmt.Errorf("coordinator: encode job: %w", err)
	}
	spec = cluster.JobSpec{Protocol: cluster.ProtocolVersion, YAML: string(y), Hash: cluster.SpecHash(string(y)),
		Workers: workers, MinRing: minRing, CkptDir: j.CheckpointDir, Created: time.Now().UTC().Format(time.RFC3339),
		CodeHash: code}
	k := prefix + cluster.KeySpec
	resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, cluster.Encode(spec))).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return spec, false, fmt.Errorf("coordinator: write job spec: %w", err)
	}
	if resp.Succeeded {
		return spec, false, nil
	}
	var old cluster.JobSpec
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return spec, false, fmt.Errorf("coordinator: job spec vanished")
	}
	if err := cluster.Decode(k, kvs[0].Value, &old); err != nil {
		return spec, false, err
	}
	if old.Hash != spec.Hash {
		// Name what differs, as a single-process resume does.
		if oj, err := train.ParseJob("job spec in etcd", []byte(old.YAML)); err == nil {
			if err := j.ResumeError(oj, j.CheckpointDir); err != nil {
				return spec, false, fmt.Errorf("coordinator: %w", err)
			}
		}
		return spec, false, fmt.Errorf("coordinator: %s holds job %q with another configuration; rerun with the same job to resume it, or choose another --checkpoint-dir",
			j.CheckpointDir, j.Name)
	}
	// Same job; a rebuilt binary or another worker count is fine to resume with.
	old.CodeHash, old.Workers, old.MinRing = spec.CodeHash, workers, minRing
	if _, err := cli.Put(ctx, k, cluster.Encode(old)); err != nil {
		return spec, true, fmt.Errorf("coordinator: update job spec: %w", err)
	}
	return old, true, nil
}

// Package spec creates a job in etcd: the record every coordinator and
// worker of the job reads first (job.Spec), or, for a job that is already
// there, checks that it is the same job.
package spec

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.yaml.in/yaml/v3"

	"github.com/bmojo/bmojo/job"
)

// Put creates job j in etcd (the spec every coordinator and worker
// reads), or checks that the existing one is the same job: then the job
// resumes (resumed is true). workers is the ring size to wait for at the
// start, minRing the smallest ring that may train, code the build identity
// (FileHash) of the binary the workers run.
func Put(ctx context.Context, cli *clientv3.Client, j job.Job, workers, minRing int, code string) (spec job.Spec, resumed bool, err error) {
	prefix := job.Prefix(j.Name)
	y, err := yaml.Marshal(j)
	if err != nil {
		return job.Spec{}, false, fmt.Errorf("job spec: encode job: %w", err)
	}
	spec = job.Spec{Protocol: job.ProtocolVersion, YAML: string(y), Hash: job.SpecHash(string(y)),
		Workers: workers, MinRing: minRing, CkptDir: j.CheckpointDir, Created: time.Now().UTC().Format(time.RFC3339),
		CodeHash: code}
	k := prefix + job.KeySpec
	resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, job.Encode(spec))).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return spec, false, fmt.Errorf("job spec: write: %w", err)
	}
	if resp.Succeeded {
		return spec, false, nil
	}
	var old job.Spec
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) == 0 {
		return spec, false, fmt.Errorf("job spec: vanished while read")
	}
	if err := job.Decode(k, kvs[0].Value, &old); err != nil {
		return spec, false, err
	}
	if old.Hash != spec.Hash {
		// Name what differs, as a single-process resume does.
		if oj, err := job.Parse("job spec in etcd", []byte(old.YAML)); err == nil {
			if err := j.ResumeError(oj, j.CheckpointDir); err != nil {
				return spec, false, fmt.Errorf("job spec: %w", err)
			}
		}
		return spec, false, fmt.Errorf("job spec: %s holds job %q with another configuration; rerun with the same job to resume it, or choose another --checkpoint-dir",
			j.CheckpointDir, j.Name)
	}
	// Same job; a rebuilt binary or another worker count is fine to resume with.
	old.CodeHash, old.Workers, old.MinRing = spec.CodeHash, workers, minRing
	if _, err := cli.Put(ctx, k, job.Encode(old)); err != nil {
		return spec, true, fmt.Errorf("job spec: update: %w", err)
	}
	return old, true, nil
}

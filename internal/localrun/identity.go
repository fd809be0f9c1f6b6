package localrun

import (
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"github.com/bmojo/bmojo/internal/pki"
)

// Identities are a local run's job CA and the certificates it issued: one
// per process, in a directory only this user can read, removed when the run
// ends. The CA's key never touches the disk: once the run is over nothing
// can issue another certificate of it.
type Identities struct {
	// Client is the runner's own certificate (etcd client, monitor).
	Client       pki.Files
	ca           *pki.CA
	dir          string
	issued       atomic.Int64 // certificates written: each gets files of its own
	etcd         pki.Files
	coordinators []pki.Files
	workers      []pki.Files
}

// Issue makes another certificate of the run's CA, for a process the
// caller starts itself (a worker joining later: role pki.RoleWorker).
func (ids *Identities) Issue(role, id string) (pki.Files, error) {
	leaf, err := ids.ca.Issue(role, id, []string{"127.0.0.1", "::1", "localhost"}, validity)
	if err != nil {
		return pki.Files{}, err
	}
	return pki.Write(ids.dir, fmt.Sprintf("%d-%s-%s", ids.issued.Add(1), role, id), ids.ca.PEM, leaf)
}

// TLSFlags are the command-line flags that hand f to a bmojo process.
func TLSFlags(f pki.Files) []string {
	return []string{"--tls-ca", f.CA, "--tls-cert", f.Cert, "--tls-key", f.Key}
}

// validity covers any local run; the certificates die with the run anyway.
const validity = 30 * 24 * time.Hour

// newIdentities issues certificates for etcd (127.0.0.1), this process (the
// runner and its monitor), coordinators coordinator-0.. and workers
// worker-0.. (the ids Run gives them).
func newIdentities(jobName string, workers, coordinators int) (*Identities, error) {
	ca, err := pki.NewCA("bmojo job "+jobName, validity)
	if err != nil {
		return nil, fmt.Errorf("localrun: job CA: %w", err)
	}
	dir, err := os.MkdirTemp("", "bmojo-pki-")
	if err != nil {
		return nil, fmt.Errorf("localrun: job CA: %w", err)
	}
	ids := &Identities{ca: ca, dir: dir}
	issue := ids.Issue
	if ids.etcd, err = issue(pki.RoleEtcd, "etcd"); err == nil {
		ids.Client, err = issue(pki.RoleClient, "train")
	}
	for i := 0; err == nil && i < coordinators; i++ {
		var f pki.Files
		f, err = issue(pki.RoleCoordinator, fmt.Sprintf("coordinator-%d", i))
		ids.coordinators = append(ids.coordinators, f)
	}
	for i := 0; err == nil && i < workers; i++ {
		var f pki.Files
		f, err = issue(pki.RoleWorker, fmt.Sprintf("worker-%d", i))
		ids.workers = append(ids.workers, f)
	}
	if err != nil {
		ids.remove()
		return nil, fmt.Errorf("localrun: job certificates: %w", err)
	}
	return ids, nil
}

func (ids *Identities) remove() { _ = os.RemoveAll(ids.dir) }

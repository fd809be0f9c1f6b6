package coordinator

import "errors"

// Errors of this package; match them with errors.Is.
var (
	// ErrBadConfig: a Config field is invalid (the error names it).
	ErrBadConfig = errors.New("coordinator: invalid config")
	// ErrBadSpec: the job spec in etcd cannot be run.
	ErrBadSpec = errors.New("coordinator: invalid job spec")
	// ErrNotLeader: a write was refused because this replica lost leadership.
	ErrNotLeader = errors.New("coordinator: not the leader")
)

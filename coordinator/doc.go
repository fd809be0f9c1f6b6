// Package coordinator is the control plane's leader: it owns the membership
// and epoch decisions of one job (which workers form the ring, when an epoch
// starts and at which step) and writes them to etcd under the keys of
// internal/job. It never touches tensors, shard data or checkpoints, and
// it writes only ring, start/<epoch>, member keys it removes and reports it
// consumed.
//
// state.go is the decision logic as a pure state machine; coordinator.go is
// the thin etcd layer around it (election, watches, guarded writes).
package coordinator

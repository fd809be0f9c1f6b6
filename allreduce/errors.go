package allreduce

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors; every error returned by this package wraps one of them.
var (
	// ErrConfig: a Config field or argument is invalid.
	ErrConfig = errors.New("invalid configuration")
	// ErrClosed: the Ring was closed.
	ErrClosed = errors.New("ring closed")
	// ErrEpoch: a peer spoke with another ring epoch.
	ErrEpoch = errors.New("wrong epoch")
	// ErrProtocol: a peer sent a frame that breaks the protocol (wrong
	// length, chunk out of range, duplicate chunk, wrong rank or op).
	ErrProtocol = errors.New("protocol violation")
	// ErrFrame: bytes on the stream do not decode as a frame.
	ErrFrame = errors.New("malformed frame")
	// ErrHopTimeout: a neighbour did not deliver a chunk within the hop deadline.
	ErrHopTimeout = errors.New("hop deadline exceeded")
	// ErrPeerFailed: a neighbour's stream broke, or another rank reported
	// a failure around the ring.
	ErrPeerFailed = errors.New("peer failed")
	// ErrIdentity: a peer's certificate does not name the rank it connects
	// as (Config.VerifyPeer refused it).
	ErrIdentity = errors.New("peer identity refused")
)

// PeerError names the rank a collective failed on and, where known, the
// step and chunk that did not arrive. Use errors.As to read it.
type PeerError struct {
	Rank  int // the rank blamed for the failure
	Via   int // the rank that reported it (== Rank when noticed first-hand, -1 if unknown)
	Op    uint64
	Step  int // -1 when not tied to a step
	Chunk int // -1 when not tied to a chunk
	Err   error
}

func (e *PeerError) Error() string {
	s := fmt.Sprintf("allreduce: rank %d", e.Rank)
	if e.Via >= 0 && e.Via != e.Rank {
		s += fmt.Sprintf(" (reported by rank %d)", e.Via)
	}
	if e.Op > 0 {
		s += fmt.Sprintf(", op %d", e.Op)
	}
	if e.Step >= 0 {
		s += fmt.Sprintf(", step %d", e.Step)
	}
	if e.Chunk >= 0 {
		s += fmt.Sprintf(", chunk %d", e.Chunk)
	}
	return s + ": " + e.Err.Error()
}

func (e *PeerError) Unwrap() error { return e.Err }

// toStatus maps this package's errors to a gRPC status; the one place that
// does so.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	var code codes.Code
	switch {
	case errors.Is(err, ErrEpoch):
		code = codes.FailedPrecondition
	case errors.Is(err, ErrProtocol), errors.Is(err, ErrFrame):
		code = codes.InvalidArgument
	case errors.Is(err, ErrClosed):
		code = codes.Unavailable
	case errors.Is(err, ErrHopTimeout):
		code = codes.DeadlineExceeded
	case errors.Is(err, ErrIdentity):
		code = codes.PermissionDenied
	default:
		code = codes.Aborted
	}
	return status.Error(code, err.Error())
}

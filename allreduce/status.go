package allreduce

import (
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// isDecodeErr reports whether a gRPC receive error came from our codec
// rejecting the bytes (gRPC wraps codec errors in an Internal status).
func isDecodeErr(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.Internal && strings.Contains(st.Message(), ErrFrame.Error())
}

// fromStatus turns a gRPC status from a peer back into this package's
// vocabulary, so callers can test it with errors.Is; the peer's message is kept.
func fromStatus(err error) error {
	if err == nil {
		return fmt.Errorf("stream ended without a status: %w", ErrPeerFailed)
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%v: %w", err, ErrPeerFailed)
	}
	var sentinel error
	switch st.Code() {
	case codes.FailedPrecondition:
		sentinel = ErrEpoch
	case codes.InvalidArgument:
		sentinel = ErrProtocol
	case codes.DeadlineExceeded:
		sentinel = ErrHopTimeout
	case codes.PermissionDenied:
		sentinel = ErrIdentity
	default:
		sentinel = ErrPeerFailed
	}
	return fmt.Errorf("%s: %w", st.Message(), sentinel)
}

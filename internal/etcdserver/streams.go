package etcdserver

import (
	"context"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// streamSet tracks the server's open gRPC streams (watches, lease
// keep-alives) so Close can end them: embed's Close otherwise waits its
// request timeout (over 5 s) for clients to hang up before forcing the
// listeners shut.
type streamSet struct {
	mu     sync.Mutex
	closed bool
	next   int
	cancel map[int]context.CancelFunc
}

func newStreamSet() *streamSet { return &streamSet{cancel: map[int]context.CancelFunc{}} }

func (s *streamSet) interceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return status.Error(codes.Unavailable, "etcdserver: shutting down")
	}
	id := s.next
	s.next++
	s.cancel[id] = cancel
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.cancel, id)
		s.mu.Unlock()
	}()
	return handler(srv, &ctxStream{ServerStream: ss, ctx: ctx})
}

// closeAll ends every open stream and refuses new ones.
func (s *streamSet) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, cancel := range s.cancel {
		cancel()
	}
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (c *ctxStream) Context() context.Context { return c.ctx }

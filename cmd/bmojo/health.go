package main

import (
	"fmt"
	"net"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// serveHealth runs the standard gRPC health service on addr (for
// Kubernetes grpc probes) and reports SERVING; the returned stop ends it.
// An empty addr serves nothing.
func serveHealth(addr string, log hclog.Logger) (stop func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("health: listen on %s: %w", addr, err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go func() {
		if err := srv.Serve(lis); err != nil {
			log.Warn("health server stopped", "error", err)
		}
	}()
	log.Debug("grpc health service", "addr", lis.Addr().String())
	return func() { hs.Shutdown(); srv.Stop() }, nil
}

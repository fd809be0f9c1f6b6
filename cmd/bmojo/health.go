package main

import (
	"fmt"
	"net"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// The services the health server answers for: "" (readiness) and
// "liveness", which Kubernetes probes name (k8s/base).
const livenessService = "liveness"

// serveHealth runs the standard gRPC health service on addr (for
// Kubernetes grpc probes), both services SERVING until set changes them;
// the returned stop ends it. An empty addr serves nothing (set still works).
func serveHealth(addr string, log hclog.Logger) (stop func(), set func(ready, live bool), err error) {
	hs := health.NewServer()
	status := func(ok bool) healthpb.HealthCheckResponse_ServingStatus {
		if ok {
			return healthpb.HealthCheckResponse_SERVING
		}
		return healthpb.HealthCheckResponse_NOT_SERVING
	}
	set = func(ready, live bool) {
		hs.SetServingStatus("", status(ready))
		hs.SetServingStatus(livenessService, status(live))
	}
	set(true, true)
	if addr == "" {
		return func() {}, set, nil
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("health: listen on %s: %w", addr, err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	go func() {
		if err := srv.Serve(lis); err != nil {
			log.Warn("health server stopped", "error", err)
		}
	}()
	log.Debug("grpc health service", "addr", lis.Addr().String())
	return func() { hs.Shutdown(); srv.Stop() }, set, nil
}

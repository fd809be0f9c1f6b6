package main

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/kernels/cuda"
)

// TestBenchAllreduceCUDAIPCFlags: `bench allreduce --transport cuda-ipc`
// says what is wrong before starting any rank: a build without CUDA, or
// flags the GPU path does not take. (The path itself runs in
// kernels/cuda's TestIPCRingTwoProcesses.)
func TestBenchAllreduceCUDAIPCFlags(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want string
		skip bool
	}{
		{"no cuda", []string{"--ranks", "2"}, "built without CUDA", cuda.Built},
		{"bf16", []string{"--ranks", "2", "--bf16"}, "no --bf16", false},
		{"gpus", []string{"--ranks", "2", "--gpus", "0"}, "--gpus 0", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.skip {
				t.Skip("this test binary has the CUDA backend")
			}
			var f benchAllreduceFlags
			c := &cobra.Command{}
			f.register(c)
			if err := c.ParseFlags(append([]string{"--transport", "cuda-ipc", "--size", "1MiB"}, tc.args...)); err != nil {
				t.Fatal(err)
			}
			err := runBenchAllreduce(context.Background(), &f, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
		})
	}
}

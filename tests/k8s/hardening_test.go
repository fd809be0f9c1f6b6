package k8s

import (
	"strings"
	"testing"
)

// The /proc checks TestLaunchOnKubelet makes of every container, on a
// process as the manifests ask for it and on ones that miss each point.
func TestHardeningViolations(t *testing.T) {
	const hardened = "Name:\tbmojo\nUid:\t65532\t65532\t65532\t65532\nGid:\t65532\t65532\t65532\t65532\n" +
		"CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n" +
		"CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
	const roRoot = "1201 1100 0:95 / / ro,relatime master:1 - overlay overlay rw,lowerdir=/l\n" +
		"1202 1201 0:96 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw\n"
	const rwRoot = "1201 1100 0:95 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/l\n"
	if v := hardeningViolations(hardened, roRoot); len(v) != 0 {
		t.Errorf("a hardened process: %v, want none", v)
	}
	for _, c := range []struct {
		name, status, mountinfo, want string
	}{
		{"root user", strings.Replace(hardened, "Uid:\t65532\t65532\t65532\t65532", "Uid:\t0\t0\t0\t0", 1), roRoot, "Uid"},
		{"a capability kept", strings.Replace(hardened, "CapBnd:\t0000000000000000", "CapBnd:\t0000000000000400", 1), roRoot, "CapBnd"},
		{"privilege escalation allowed", strings.Replace(hardened, "NoNewPrivs:\t1", "NoNewPrivs:\t0", 1), roRoot, "NoNewPrivs"},
		{"no seccomp", strings.Replace(hardened, "Seccomp:\t2", "Seccomp:\t0", 1), roRoot, "Seccomp"},
		{"writable root", hardened, rwRoot, "root file system"},
	} {
		v := hardeningViolations(c.status, c.mountinfo)
		if len(v) != 1 || !strings.Contains(v[0], c.want) {
			t.Errorf("%s: %v, want one violation naming %s", c.name, v, c.want)
		}
	}
}

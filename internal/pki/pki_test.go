package pki

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestIssueAndCheck: an issued certificate names its role and id (URI
// SAN), chains to its CA only, and Check tells every other identity apart.
func TestIssueAndCheck(t *testing.T) {
	ca, err := NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue(RoleWorker, "worker-3", []string{"127.0.0.1", "w3.example"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Write(t.TempDir(), "w3", ca.PEM, leaf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	if role, id := c.Identity(); role != RoleWorker || id != "worker-3" {
		t.Fatalf("identity %s/%s", role, id)
	}
	if got := c.Leaf.URIs[0].String(); got != "bmojo://worker/worker-3" {
		t.Fatalf("URI SAN %s", got)
	}
	if err := Check(c.Leaf, RoleWorker, "worker-3"); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][2]string{{RoleWorker, "worker-4"}, {RoleCoordinator, "worker-3"}, {RoleWorker, "worker-30"}, {RoleWorker, ""}} {
		if err := Check(c.Leaf, bad[0], bad[1]); !errors.Is(err, ErrIdentity) {
			t.Errorf("Check %s/%s: %v, want ErrIdentity", bad[0], bad[1], err)
		}
	}
	other, err := NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherPool := x509.NewCertPool()
	otherPool.AddCert(other.Cert)
	if err := VerifyChain(otherPool, []*x509.Certificate{c.Leaf}, x509.ExtKeyUsageServerAuth); !errors.Is(err, ErrIdentity) {
		t.Fatalf("a certificate verified against another CA with the same name: %v", err)
	}
	if err := VerifyChain(c.Pool, []*x509.Certificate{c.Leaf}, x509.ExtKeyUsageClientAuth); err != nil {
		t.Fatal(err)
	}
	if err := VerifyChain(c.Pool, nil, x509.ExtKeyUsageClientAuth); !errors.Is(err, ErrIdentity) {
		t.Fatalf("no certificate: %v", err)
	}
}

// TestCommonNameFallback: a certificate with no bmojo:// URI (one from
// cert-manager or an operator's CA) is identified by its Common Name, for
// any role; one with a bmojo:// URI is not identified by its CN.
func TestCommonNameFallback(t *testing.T) {
	ca, err := NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cn := &x509.Certificate{Subject: pkix.Name{CommonName: "worker-1"}}
	if err := Check(cn, RoleWorker, "worker-1"); err != nil {
		t.Fatal(err)
	}
	if err := Check(cn, RoleWorker, "worker-2"); !errors.Is(err, ErrIdentity) || !strings.Contains(err.Error(), "CN=worker-1") {
		t.Fatalf("CN mismatch: %v", err)
	}
	leaf, err := ca.Issue(RoleCoordinator, "c0", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Write(t.TempDir(), "c0", ca.PEM, leaf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	c.Leaf.Subject.CommonName = "worker-1" // a URI SAN outranks the CN
	if err := Check(c.Leaf, RoleWorker, "worker-1"); !errors.Is(err, ErrIdentity) {
		t.Fatalf("a coordinator certificate passed as worker-1: %v", err)
	}
}

// TestLoadErrors: missing, mismatched or foreign files are refused naming
// the files.
func TestLoadErrors(t *testing.T) {
	ca, _ := NewCA("job", time.Hour)
	other, _ := NewCA("other", time.Hour)
	leaf, _ := ca.Issue(RoleWorker, "w", nil, time.Hour)
	foreign, _ := other.Issue(RoleWorker, "w", nil, time.Hour)
	dir := t.TempDir()
	good, err := Write(dir, "w", ca.PEM, leaf)
	if err != nil {
		t.Fatal(err)
	}
	bad, err := Write(filepath.Join(dir, "x"), "f", ca.PEM, foreign)
	if err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]Files{
		"only a CA":            {CA: good.CA},
		"missing key file":     {CA: good.CA, Cert: good.Cert, Key: filepath.Join(dir, "nope.pem")},
		"key of another cert":  {CA: good.CA, Cert: good.Cert, Key: bad.Key},
		"not signed by the CA": {CA: good.CA, Cert: bad.Cert, Key: bad.Key},
		"CA file not PEM":      {CA: good.Key + "x", Cert: good.Cert, Key: good.Key},
	} {
		if _, err := f.Load(); !errors.Is(err, ErrFiles) {
			t.Errorf("%s: %v, want ErrFiles", name, err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := ca.Issue(RoleWorker, "a/b", nil, time.Hour); err == nil {
		t.Error("an id with a slash was issued")
	}
}

// TestWriteWhileRead: every Write into a directory rewrites its ca.pem; a
// process loading its files meanwhile (a coordinator starting while the
// workers' certificates are issued) never sees a truncated one, and keys
// stay private.
func TestWriteWhileRead(t *testing.T) {
	ca, err := NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	leaf, err := ca.Issue(RoleCoordinator, "coordinator-0", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	f, err := Write(dir, "coordinator-0", ca.PEM, leaf)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(f.Key); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, %v", st, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 200 {
			l, err := ca.Issue(RoleWorker, fmt.Sprintf("worker-%d", i), nil, time.Hour)
			if err == nil {
				_, err = Write(dir, fmt.Sprintf("worker-%d", i), ca.PEM, l)
			}
			if err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for reads := 0; ; reads++ {
		select {
		case <-done:
			t.Logf("%d loads while 200 certificates were written", reads)
			return
		default:
		}
		if _, err := f.Load(); err != nil {
			t.Fatalf("load %d while certificates were written: %v", reads, err)
		}
	}
}

package pki

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"testing"
	"time"
)

// ParseCA reads back what NewCA and KeyPEM wrote, and issues certificates
// that chain to the original; a key of another CA or a leaf is refused.
func TestParseCA(t *testing.T) {
	ca, err := NewCA("job", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ca.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseCA(ca.PEM, key)
	if err != nil {
		t.Fatal(err)
	}
	l, err := back.Issue(RoleWorker, "w-0", nil, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(l.CertPEM)
	leaf, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	if err := VerifyChain(pool, []*x509.Certificate{leaf}, x509.ExtKeyUsageClientAuth); err != nil {
		t.Errorf("a certificate issued by the parsed CA does not chain to the original: %v", err)
	}

	other, err := NewCA("other", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, _ := other.KeyPEM()
	for name, c := range map[string][2][]byte{
		"another CA's key": {ca.PEM, otherKey},
		"a leaf as CA":     {l.CertPEM, l.KeyPEM},
		"no PEM":           {[]byte("x"), key},
		"no key PEM":       {ca.PEM, []byte("x")},
	} {
		if _, err := ParseCA(c[0], c[1]); !errors.Is(err, ErrFiles) {
			t.Errorf("%s: %v, want ErrFiles", name, err)
		}
	}
}

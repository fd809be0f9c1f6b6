// Package pki is a job's identity: a job CA, certificates it issues to each
// process of the job (naming the process's role and id), and the TLS
// configurations that require them on both ends.
//
// An identity is a URI SAN bmojo://<role>/<id> — worker ids as the ring
// record names them, "coordinator", "etcd", "monitor", "client". A
// certificate issued elsewhere (cert-manager, an operator's CA) may carry
// the id as its Common Name instead; see Identify.
//
// Peers of the job authenticate each other by the CA and the identity, not
// by host names: pod IPs change, a worker's advertised address is whatever
// it listens on, and what matters is which worker holds the slot.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Roles of a job's processes.
const (
	RoleWorker      = "worker"
	RoleCoordinator = "coordinator"
	RoleEtcd        = "etcd"
	RoleMonitor     = "monitor"
	RoleClient      = "client" // the launcher, operators' tools
)

// Scheme is the URI scheme of identities.
const Scheme = "bmojo"

// ErrIdentity: a certificate does not carry the identity required of it.
var ErrIdentity = errors.New("certificate identity")

// ErrFiles: certificate or key files are missing, unreadable or do not
// match.
var ErrFiles = errors.New("TLS files")

// CA is a job's certificate authority.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	PEM  []byte // Cert, PEM-encoded
}

// NewCA makes a self-signed CA named name, valid for validity from an hour
// ago (clock skew between nodes).
func NewCA(name string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(validity),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("pki: CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("pki: CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// Leaf is an issued certificate and its key, PEM-encoded.
type Leaf struct {
	CertPEM, KeyPEM []byte
}

// Issue makes a certificate for role/id, usable as both server and client
// certificate. hosts (IP addresses or DNS names) are added as SANs for
// clients that verify host names (etcd's); the ring does not need them.
func (ca *CA) Issue(role, id string, hosts []string, validity time.Duration) (Leaf, error) {
	if err := checkName("role", role); err != nil {
		return Leaf{}, err
	}
	if err := checkName("id", id); err != nil {
		return Leaf{}, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Leaf{}, fmt.Errorf("pki: key for %s/%s: %w", role, id, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: id},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{URI(role, id)},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return Leaf{}, fmt.Errorf("pki: certificate for %s/%s: %w", role, id, err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return Leaf{}, fmt.Errorf("pki: key for %s/%s: %w", role, id, err)
	}
	return Leaf{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}),
	}, nil
}

// KeyPEM is the CA's key, PEM-encoded (for bmojo launch, which keeps it in
// a Secret only long enough to issue; see there).
func (ca *CA) KeyPEM() ([]byte, error) {
	kb, err := x509.MarshalECPrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("pki: CA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), nil
}

// ParseCA reads a CA back from its PEM certificate and key (as KeyPEM
// wrote it), checking that they belong together and that the certificate
// is a CA: bmojo launch keeps a job's CA in a Secret and issues further
// certificates (a larger ring) from it on a later launch.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%w: CA certificate: no PEM CERTIFICATE block", ErrFiles)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: CA certificate: %w", ErrFiles, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: CA certificate %q is not a CA", ErrFiles, cert.Subject.CommonName)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil || kb.Type != "EC PRIVATE KEY" {
		return nil, fmt.Errorf("%w: CA key: no PEM EC PRIVATE KEY block", ErrFiles)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: CA key: %w", ErrFiles, err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: the CA key does not match the CA certificate %q", ErrFiles, cert.Subject.CommonName)
	}
	return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cb.Bytes})}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil { // crypto/rand does not fail on supported platforms
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}

// checkName refuses what cannot round-trip through a URI path segment.
func checkName(what, s string) error {
	if s == "" || len(s) > 253 || strings.ContainsAny(s, "/?#%\\ \t\r\n") {
		return fmt.Errorf("pki: %s %q: want 1-253 characters without / ? # %% \\ or spaces", what, s)
	}
	return nil
}

// URI is the identity URI of role/id: bmojo://role/id.
func URI(role, id string) *url.URL {
	return &url.URL{Scheme: Scheme, Host: role, Path: "/" + id}
}

// Identify reads a certificate's identity: the role and id of its first
// bmojo:// URI SAN, or, when it has none, role "" and its Common Name.
func Identify(c *x509.Certificate) (role, id string) {
	for _, u := range c.URIs {
		if u.Scheme == Scheme {
			return u.Host, strings.TrimPrefix(u.Path, "/")
		}
	}
	return "", c.Subject.CommonName
}

// Check reports whether c names role/id: a bmojo:// URI SAN with both, or,
// in a certificate with no bmojo:// URI, a Common Name equal to id.
func Check(c *x509.Certificate, role, id string) error {
	r, got := Identify(c)
	if got == id && (r == role || r == "") {
		return nil
	}
	have := URI(r, got).String()
	if r == "" {
		have = "CN=" + got
	}
	return fmt.Errorf("%w: the certificate names %s, want %s", ErrIdentity, have, URI(role, id))
}

// Files are the PEM files a process's TLS is configured from.
type Files struct {
	CA, Cert, Key string
}

// Set reports whether any of the files is named.
func (f Files) Set() bool { return f.CA != "" || f.Cert != "" || f.Key != "" }

// Write stores the CA certificate and leaf in dir as ca.pem, <name>.pem and
// <name>-key.pem, readable by the owner only, and returns their paths.
func Write(dir, name string, caPEM []byte, l Leaf) (Files, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Files{}, fmt.Errorf("pki: %w", err)
	}
	f := Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem")}
	for _, w := range []struct {
		path string
		data []byte
	}{{f.CA, caPEM}, {f.Cert, l.CertPEM}, {f.Key, l.KeyPEM}} {
		if err := writeAtomic(w.path, w.data); err != nil {
			return Files{}, fmt.Errorf("pki: %w", err)
		}
	}
	return f, nil
}

// writeAtomic replaces path with data, mode 0600, by a rename: every Write
// into one dir rewrites its ca.pem, and a process reading it meanwhile must
// see the old file or the new one, never a truncated one.
func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*") // mode 0600
	if err != nil {
		return err
	}
	_, err = tmp.Write(data)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// Creds are a loaded CA pool and certificate.
type Creds struct {
	Pool *x509.CertPool
	Cert tls.Certificate
	Leaf *x509.Certificate
}

// Load reads f; all three files are required.
func (f Files) Load() (*Creds, error) {
	if f.CA == "" || f.Cert == "" || f.Key == "" {
		return nil, fmt.Errorf("%w: --tls-ca, --tls-cert and --tls-key go together (have ca=%q cert=%q key=%q)", ErrFiles, f.CA, f.Cert, f.Key)
	}
	caPEM, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrFiles, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%w: %s holds no PEM certificate", ErrFiles, f.CA)
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: %s and %s: %w", ErrFiles, f.Cert, f.Key, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrFiles, f.Cert, err)
	}
	// Our own certificate must chain to the CA we require of others, or
	// every peer would refuse us: say so now, naming the files.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("%w: %s is not signed by the CA in %s: %w", ErrFiles, f.Cert, f.CA, err)
	}
	cert.Leaf = leaf
	return &Creds{Pool: pool, Cert: cert, Leaf: leaf}, nil
}

// Identity is the identity this process's own certificate carries.
func (c *Creds) Identity() (role, id string) { return Identify(c.Leaf) }

// Server is a TLS 1.3 server configuration that requires a client
// certificate signed by the CA. What identity a client must have is the
// server's business after the handshake (the ring checks the slot).
func (c *Creds) Server() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.Cert},
		ClientCAs:    c.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}
}

// Client is a TLS 1.3 client configuration presenting our certificate and
// requiring a server certificate signed by the CA. It does not compare the
// server's host name: the job's peers are authenticated by identity (the
// caller adds the check it needs through VerifyConnection; the ring checks
// that its successor holds the successor's slot).
func (c *Creds) Client() *tls.Config {
	pool := c.Pool
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.Cert},
		RootCAs:      pool,
		// The chain is verified below, against the job CA only; skipping
		// Go's own check only drops the host-name comparison.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return VerifyChain(pool, cs.PeerCertificates, x509.ExtKeyUsageServerAuth)
		},
	}
}

// VerifyChain verifies a peer's presented chain against pool for usage.
func VerifyChain(pool *x509.CertPool, chain []*x509.Certificate, usage x509.ExtKeyUsage) error {
	if len(chain) == 0 {
		return fmt.Errorf("%w: the peer presented no certificate", ErrIdentity)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return fmt.Errorf("%w: %w", ErrIdentity, err)
	}
	return nil
}

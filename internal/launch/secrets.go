package launch

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"strconv"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/bmojo/bmojo/internal/pki"
)

// The job's credentials live in five Secrets (k8s/base/secrets.yaml holds
// them as placeholders without data, so that kustomize gives them and the
// pods' references the job's prefix). FillSecrets fills them.
const (
	SecretCA          = "ca"              // ca.crt, ca.key: the job CA; mounted by no pod
	SecretEtcd        = "etcd-tls"        // ca.crt, tls.crt, tls.key: etcd server and peer
	SecretCoordinator = "coordinator-tls" // ca.crt, tls.crt, tls.key: coordinators (etcd client, HTTPS)
	SecretWorker      = "worker-tls"      // ca.crt, worker-<i>.crt, worker-<i>.key: one pair per index
	SecretToken       = "monitor-token"   // token: the monitor's bearer token

	// AnnotationFilledBy marks a placeholder Secret that FillSecrets fills.
	AnnotationFilledBy = "bmojo.dev/filled-by"
)

// Keys inside the Secrets.
const (
	KeyCACert = "ca.crt"
	KeyCAKey  = "ca.key"
	KeyCert   = "tls.crt"
	KeyKey    = "tls.key"
	KeyToken  = "token"
)

// WorkerCertKey and WorkerKeyKey are the Secret keys of worker index i's
// certificate and key (k8s/base/worker.yaml picks them by the pod's
// completion index).
func WorkerCertKey(i int) string { return "worker-" + strconv.Itoa(i) + ".crt" }
func WorkerKeyKey(i int) string  { return "worker-" + strconv.Itoa(i) + ".key" }

// WorkerID is the worker id of index i of job name: the pod's hostname, and
// what its certificate names.
func WorkerID(name string, i int) string { return name + "-worker-" + strconv.Itoa(i) }

// EtcdID is the identity (CN) of the job's etcd members' certificate; the
// members accept peers only with that CN (ETCD_PEER_CERT_ALLOWED_CN).
func EtcdID(name string) string { return name + "-etcd" }

// CoordinatorID is the coordinators' identity (one for all replicas).
const CoordinatorID = "coordinator"

// Validity of what FillSecrets issues. A certificate expiring within
// renewBefore is issued again from the same CA on the next launch; running
// processes keep theirs (read at start) and the new one chains to the same
// CA, so nothing breaks in between.
const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 2 * 365 * 24 * time.Hour
	renewBefore  = 30 * 24 * time.Hour
)

// ErrCredentials: the job's Secrets in the cluster cannot be reused.
var ErrCredentials = errors.New("job credentials")

// Existing is the data of a job's Secrets as the cluster holds them,
// keyed by Secret name; a Secret not in the cluster is absent.
type Existing map[string]map[string][]byte

// secretName is the Secret of job name with base name base.
func secretName(name, base string) string { return name + "-" + base }

// SecretNames are the job's Secrets, for messages.
func SecretNames(name string) []string {
	var out []string
	for _, b := range []string{SecretCA, SecretEtcd, SecretCoordinator, SecretWorker, SecretToken} {
		out = append(out, secretName(name, b))
	}
	return out
}

// Fill fills m's placeholder Secrets for s: what existing holds is reused
// byte for byte where it is still good (a relaunch changes nothing and
// rotates nothing under running pods), and only what is missing, expiring
// or wrong is made, from the job CA. It returns one line per change, for
// the user. m.YAML is not touched: it never holds key material.
func Fill(s Spec, m *Manifests, existing Existing, now time.Time) ([]string, error) {
	if s.Namespace == "" {
		s.Namespace = DefaultNamespace
	}
	data, notes, err := credentials(s, existing, now)
	if err != nil {
		return nil, err
	}
	filled := map[string]bool{}
	for _, o := range m.Objects {
		if o.GetKind() != "Secret" || o.GetAnnotations()[AnnotationFilledBy] == "" {
			continue
		}
		d, ok := data[o.GetName()]
		if !ok {
			return nil, fmt.Errorf("launch: %w: the manifests hold Secret %s, which this build does not know how to fill", ErrCredentials, o.GetName())
		}
		enc := map[string]any{}
		for k, v := range d {
			enc[k] = base64.StdEncoding.EncodeToString(v)
		}
		o.Object["data"] = enc
		filled[o.GetName()] = true
	}
	for n := range data {
		if !filled[n] {
			return nil, fmt.Errorf("launch: %w: the manifests hold no Secret %s to fill (is the overlay's secrets.yaml missing?)", ErrCredentials, n)
		}
	}
	return notes, nil
}

// credentials computes every Secret's data.
func credentials(s Spec, existing Existing, now time.Time) (map[string]map[string][]byte, []string, error) {
	name, ns := s.Name, s.Namespace
	var notes []string
	caName := secretName(name, SecretCA)
	ca, err := jobCA(s, existing, now)
	if err != nil {
		return nil, nil, err
	}
	if existing[caName] == nil {
		notes = append(notes, fmt.Sprintf("secret/%s: made the job CA %q", caName, ca.Cert.Subject.CommonName))
	}
	caKey, err := ca.KeyPEM()
	if err != nil {
		return nil, nil, err
	}
	out := map[string]map[string][]byte{
		caName: {KeyCACert: ca.PEM, KeyCAKey: caKey},
	}

	type leaf struct {
		secret, certKey, keyKey, role, id string
		hosts                             []string
	}
	etcdSvc := name + "-etcd"
	etcdHosts := []string{etcdSvc + "." + ns + ".svc", "localhost", "127.0.0.1"}
	for i := 0; i < 3; i++ { // the StatefulSet's fixed three members
		h := fmt.Sprintf("%s-%d.%s.%s.svc", etcdSvc, i, etcdSvc, ns)
		etcdHosts = append(etcdHosts, h, h+".cluster.local")
	}
	coordSvc := name + "-coordinator"
	leaves := []leaf{
		{secretName(name, SecretEtcd), KeyCert, KeyKey, pki.RoleEtcd, EtcdID(name), etcdHosts},
		{secretName(name, SecretCoordinator), KeyCert, KeyKey, pki.RoleCoordinator, CoordinatorID, []string{
			coordSvc, coordSvc + "." + ns, coordSvc + "." + ns + ".svc", coordSvc + "." + ns + ".svc.cluster.local",
			"localhost", "127.0.0.1"}},
	}
	for i := 0; i < s.Workers; i++ {
		leaves = append(leaves, leaf{secretName(name, SecretWorker), WorkerCertKey(i), WorkerKeyKey(i), pki.RoleWorker, WorkerID(name, i), nil})
	}
	for _, l := range leaves {
		d := out[l.secret]
		if d == nil {
			d = map[string][]byte{}
			// Keep what else the Secret holds (worker pairs of indices a
			// shrunk ring no longer has), so shrinking changes nothing.
			for k, v := range existing[l.secret] {
				d[k] = v
			}
			d[KeyCACert] = ca.PEM
			out[l.secret] = d
		}
		why := reusable(ca, existing[l.secret][l.certKey], existing[l.secret][l.keyKey], l.role, l.id, l.hosts, now)
		if why == "" {
			continue
		}
		issued, err := ca.Issue(l.role, l.id, l.hosts, leafValidity)
		if err != nil {
			return nil, nil, fmt.Errorf("launch: %w: %s: %w", ErrCredentials, l.secret, err)
		}
		d[l.certKey], d[l.keyKey] = issued.CertPEM, issued.KeyPEM
		if existing[l.secret][l.certKey] != nil {
			why = "again: " + why
		} else {
			why = "new"
		}
		notes = append(notes, fmt.Sprintf("secret/%s: issued %s (%s)", l.secret, pki.URI(l.role, l.id), why))
	}

	tokName := secretName(name, SecretToken)
	if tok := existing[tokName][KeyToken]; len(tok) >= 16 {
		out[tokName] = map[string][]byte{KeyToken: tok}
	} else {
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			return nil, nil, fmt.Errorf("launch: %w: token: %w", ErrCredentials, err)
		}
		out[tokName] = map[string][]byte{KeyToken: []byte(base64.RawURLEncoding.EncodeToString(b))}
		notes = append(notes, fmt.Sprintf("secret/%s: made the monitor's bearer token", tokName))
	}
	sort.Strings(notes)
	return out, notes, nil
}

// jobCA is the job's CA from existing, or a new one when the job has no
// credentials at all. Certificates without their CA cannot be extended
// (a larger ring) or checked, and a new CA would split running pods from
// restarted ones, so that case is refused with what to do.
func jobCA(s Spec, existing Existing, now time.Time) (*pki.CA, error) {
	caName := secretName(s.Name, SecretCA)
	if d := existing[caName]; d != nil {
		ca, err := pki.ParseCA(d[KeyCACert], d[KeyCAKey])
		if err != nil {
			return nil, fmt.Errorf("launch: %w: Secret %s: %w; run `bmojo delete %s` (checkpoints are kept) and launch again for a new CA", ErrCredentials, caName, err, s.Name)
		}
		if ca.Cert.NotAfter.Before(now.Add(renewBefore)) {
			return nil, fmt.Errorf("launch: %w: the job CA in Secret %s expires %s; run `bmojo delete %s` (checkpoints are kept) and launch again for a new CA", ErrCredentials, caName, ca.Cert.NotAfter.Format(time.DateOnly), s.Name)
		}
		return ca, nil
	}
	for _, b := range []string{SecretEtcd, SecretCoordinator, SecretWorker} {
		if n := secretName(s.Name, b); len(existing[n]) > 0 {
			return nil, fmt.Errorf("launch: %w: Secret %s exists but the job CA (Secret %s) is gone, so no certificate can be issued or checked; restore it, or run `bmojo delete %s` (checkpoints are kept) and launch again", ErrCredentials, n, caName, s.Name)
		}
	}
	ca, err := pki.NewCA(fmt.Sprintf("bmojo job %s/%s", s.Namespace, s.Name), caValidity)
	if err != nil {
		return nil, fmt.Errorf("launch: %w: %w", ErrCredentials, err)
	}
	return ca, nil
}

// reusable says why an existing certificate and key cannot be kept ("" if
// they can): they must parse and match, chain to ca, name role/id, carry
// every host and stay valid beyond renewBefore.
func reusable(ca *pki.CA, certPEM, keyPEM []byte, role, id string, hosts []string, now time.Time) string {
	if certPEM == nil || keyPEM == nil {
		return "missing"
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return "unreadable: " + err.Error()
	}
	cert := pair.Leaf // X509KeyPair parses it (Go 1.23 on)
	if cert == nil {
		return "unreadable"
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return "not from the job CA"
	}
	if err := pki.Check(cert, role, id); err != nil {
		return "wrong identity"
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if !slices.ContainsFunc(cert.IPAddresses, ip.Equal) {
				return "does not name " + h
			}
		} else if !slices.Contains(cert.DNSNames, h) {
			return "does not name " + h
		}
	}
	if cert.NotAfter.Before(now.Add(renewBefore)) {
		return "expires " + cert.NotAfter.Format(time.DateOnly)
	}
	return ""
}

// FillSecrets reads the job's Secrets from namespace ns and fills m's
// placeholders with Fill (now: the clock). Only launch reads them; it needs
// get on secrets.
func (c *Client) FillSecrets(ctx context.Context, ns string, s Spec, m *Manifests, now time.Time) ([]string, error) {
	s.Namespace = ns
	ri, err := c.resource(schema.GroupVersionKind{Version: "v1", Kind: "Secret"}, ns)
	if err != nil {
		return nil, fmt.Errorf("launch: secrets: %w", err)
	}
	existing := Existing{}
	for _, n := range SecretNames(s.Name) {
		u, err := ri.Get(ctx, n, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("launch: read secret/%s in namespace %s: %w", n, ns, explain(c.host, err))
		}
		existing[n], err = secretData(u)
		if err != nil {
			return nil, fmt.Errorf("launch: secret/%s in namespace %s: %w", n, ns, err)
		}
	}
	return Fill(s, m, existing, now)
}

// secretData decodes a Secret's data (base64 in JSON); an empty Secret (a
// placeholder applied by `kubectl apply -k`) is an empty, non-nil map only
// if it has keys, else nil: the same as no Secret.
func secretData(u *unstructured.Unstructured) (map[string][]byte, error) {
	raw, _, err := unstructured.NestedStringMap(u.Object, "data")
	if err != nil {
		return nil, err
	}
	if len(raw) == 0 {
		return nil, nil
	}
	out := make(map[string][]byte, len(raw))
	for k, v := range raw {
		b, err := base64.StdEncoding.DecodeString(v)
		if err != nil {
			return nil, fmt.Errorf("key %s: %w", k, err)
		}
		out[k] = b
	}
	return out, nil
}

// Placeholders reports the Secrets in m that FillSecrets has not filled,
// by name; Apply refuses them, since pods would start without credentials.
func (m *Manifests) Placeholders() []string {
	var out []string
	for _, o := range m.Objects {
		if o.GetKind() != "Secret" || o.GetAnnotations()[AnnotationFilledBy] == "" {
			continue
		}
		if d, _, _ := unstructured.NestedMap(o.Object, "data"); len(d) == 0 {
			out = append(out, o.GetName())
		}
	}
	return out
}

// OnlySecrets is m with its Secrets alone (bmojo launch --secrets-only:
// the credentials for an overlay deployed with kubectl apply -k).
func (m *Manifests) OnlySecrets() *Manifests {
	out := &Manifests{}
	for _, o := range m.Objects {
		if o.GetKind() == "Secret" {
			out.Objects = append(out.Objects, o)
		}
	}
	return out
}

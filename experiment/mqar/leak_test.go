package mqar

import (
	"testing"

	"github.com/bmojo/bmojo/internal/testleak"
)

// TestMain fails the package's tests if they leave goroutines running.
func TestMain(m *testing.M) { testleak.Main(m) }

// Checks Grafana dashboard JSON files against Grafana's own schema, as generated into the
// Grafana Foundation SDK (Apache-2.0): a strict decode (every field of the dashboard, its
// panels' options and custom field config per panel type, and each Prometheus query must be
// one the schema knows, with the right type), then the schema's Validate. Run by
// tests/ops/test_dashboard.py (make dashboard-schema builds it); nothing here is imported by
// the product.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
)

// failed: the SDK returns its error list typed as error even when it is empty.
func failed(err error) bool {
	var list cog.BuildErrors
	if errors.As(err, &list) {
		return len(list) > 0
	}
	return err != nil
}

func check(path string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var board dashboard.Dashboard
	if err := board.UnmarshalJSONStrict(raw); failed(err) {
		return fmt.Errorf("does not decode strictly: %w", err)
	}
	if err := board.Validate(); failed(err) {
		return fmt.Errorf("is not valid: %w", err)
	}
	return nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: dashboard-schema FILE.json...")
		os.Exit(2)
	}
	plugins.RegisterDefaultPlugins()
	bad := false
	for _, path := range os.Args[1:] {
		if err := check(path); err != nil {
			fmt.Printf("%s: %v\n", path, err)
			bad = true
			continue
		}
		fmt.Printf("%s: ok\n", path)
	}
	if bad {
		os.Exit(1)
	}
}

// Grafana's dashboard schema (Grafana Foundation SDK) as a checker for k8s/monitoring's
// dashboard (make dashboard-schema); nothing here is imported by the product.
module spiffe-oauth-sidecar/tests/ops/dashboard_schema

go 1.26.0

require github.com/grafana/grafana-foundation-sdk/go v0.0.22

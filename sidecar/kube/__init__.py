"""Kubernetes: put the sidecar into pod specs (``sidecar inject``, ``sidecar webhook``)."""

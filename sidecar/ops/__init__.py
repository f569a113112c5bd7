"""What operators see and steer: admin port, metrics, audit, logs, reload, check/explain."""

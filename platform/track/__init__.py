"""MLflow tracking: the connection and retries, the run log, the offline journal, a run's artifacts,
and a sweep's records read back."""

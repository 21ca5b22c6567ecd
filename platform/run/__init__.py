"""Running: a sweep on Ray Tune (trials, shared burn-in, live monitor, cluster config) and a single tracked run."""

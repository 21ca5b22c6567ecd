"""specreg: spectral regularization up to the feature space, and black-box robustness evaluation."""

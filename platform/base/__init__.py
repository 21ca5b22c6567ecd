"""What every layer of the platform may use: its error class, its statistics and its figures (no
MLflow, Ray or Optuna)."""

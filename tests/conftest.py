"""Settings for the whole test session."""
import os

# MLflow's telemetry thread races `requests` over os.environ (see platform/tracking.py); test modules
# import MLflow before the platform can switch it off, so switch it off here, before any of them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

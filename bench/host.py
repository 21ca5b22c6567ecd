"""The CPU model the benchmark scripts name in their machine descriptions."""
import platform
import subprocess


def cpu_model() -> str:
    """lscpu's "Model name" (platform.processor() where lscpu gives none)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except FileNotFoundError:
        lscpu = []
    return next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")),
                platform.processor())

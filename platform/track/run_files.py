"""The artifacts of a finished run, as named byte strings: its config, final model weights, attack
distances, spectrum and per-trial figures."""
import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml

import specreg


def config_yaml(config: dict) -> bytes:
    return yaml.safe_dump(config, sort_keys=False).encode()


def result_files(resolved: dict, result: dict, checkpoint_dir) -> dict[str, bytes]:
    """The artifacts of a finished run: its config, final model weights, attack distances, spectrum."""
    files = {"config.yaml": config_yaml(resolved)}
    if (Path(checkpoint_dir) / "state.pt").is_file():
        buffer = io.BytesIO()
        torch.save(specreg.load_checkpoint(checkpoint_dir)["model"], buffer)
        files["model.pt"] = buffer.getvalue()
    if result.get("distances") is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(result["distances"]))
        files["distances.npy"] = buffer.getvalue()
    if result.get("spectrum") is not None:
        files["spectrum.json"] = json.dumps(list(result["spectrum"])).encode()
    from ..base.figures import trial_figures  # matplotlib, loaded only where a run finishes

    files.update(trial_figures(result, (resolved.get("attack") or {}).get("eps", [])))
    return files

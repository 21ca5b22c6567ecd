"""Saving state that must survive a crash: the training checkpoint and an attack's progress share it."""
import os
from pathlib import Path

import torch


def save_atomic(state: dict, path: Path) -> Path:
    """Write with torch.save to a side file, then rename it over `path`: a crash mid-write leaves the
    previous state intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_state(path: Path) -> dict:
    """Read a state written by `save_atomic` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)

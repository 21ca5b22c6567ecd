"""The shared burn-in: one unregularized prefix for every trial that differs only in regularizer settings.

The prefix (the burn-in's epochs with no regularizer) depends on the rest of the config, the seed, its
length and the library code, so that is what its key hashes; the run's total epochs only where the
schedule depends on them (cosine), so that runs of 370 and 400 epochs at a constant rate share one prefix. It is trained once, under a file
lock in the sweep's storage (visible to every node), and trials resume from it; on CPU the result is
bit-identical to training from scratch, because the regularizer is inactive during burn-in and uses its
own random generators.
"""
import copy
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import specreg

HISTORY = "history.json"


def prefix_config(resolved: dict) -> dict:
    """The config that trains the prefix: the same run with no regularizer and no attack."""
    config = copy.deepcopy(resolved)
    config["regularizer"] = {"kind": "none"}
    config["attack"] = None
    return config


@functools.lru_cache(maxsize=1)
def library_digest() -> str:
    """A hash of the library's source, so a code change never reuses an old prefix."""
    digest = hashlib.sha256()
    for path in sorted(Path(specreg.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def cache_key(resolved: dict) -> str:
    config = prefix_config(resolved)
    if config["train"]["schedule"] != "cosine":
        del config["train"]["epochs"]
    payload = {"config": config, "epochs": specreg.penalty_start(resolved), "library": library_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def ensure(cache_root, resolved: dict) -> tuple[Path, bool]:
    """The prefix checkpoint's directory for this config, trained here if no trial has yet.

    Returns (directory, trained_here). Concurrent callers wait on the key's lock and then reuse it.
    """
    root = Path(cache_root)
    key = cache_key(resolved)
    final = root / key
    if (final / HISTORY).is_file():
        return final, False
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / HISTORY).is_file():
                return final, False
            partial = _resumable_partial(root, key)
            started, epochs = time.perf_counter(), specreg.penalty_start(resolved)
            specreg.run_experiment(prefix_config(resolved), checkpoint_dir=partial, stop_after_epochs=epochs,
                                   resume_from=partial if (partial / specreg.CHECKPOINT_FILE).is_file() else None)
            (partial / "meta.json").write_text(json.dumps(
                {"key": key, "epochs": epochs, "seconds": time.perf_counter() - started}))
            (partial / HISTORY).write_text(json.dumps(specreg.load_checkpoint(partial)["history"]))
            os.replace(partial, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final, True


def _resumable_partial(root: Path, key: str) -> Path:
    """Where to train the prefix: the checkpointed folder of a trial that died holding the lock (its latest,
    so a 360-epoch prefix killed at epoch 300 goes on from there), else a new one; other leftovers go."""
    partials = sorted(root.glob(f"{key}.partial-*"), key=lambda p: (p / specreg.CHECKPOINT_FILE).is_file()
                      and (p / specreg.CHECKPOINT_FILE).stat().st_mtime)
    keep = partials.pop() if partials and (partials[-1] / specreg.CHECKPOINT_FILE).is_file() else None
    for stale in partials:
        shutil.rmtree(stale, ignore_errors=True)
    return keep or root / f"{key}.partial-{uuid.uuid4().hex[:8]}"


def history(directory) -> list[dict]:
    """The prefix's per-epoch metrics, for the curves of the trials that start from it."""
    return json.loads((Path(directory) / HISTORY).read_text())

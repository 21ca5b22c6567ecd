"""The shared burn-in: one unregularized prefix for every trial that differs only in regularizer settings.

The prefix (round(burnin * epochs) epochs with no regularizer) depends on the rest of the config, the
seed, its length and the library code, so that is what its key hashes. It is trained once, under a file
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

HISTORY = "history.json"


def burnin_epochs(resolved: dict) -> int:
    return round(resolved["regularizer"]["burnin"] * resolved["train"]["epochs"])


def prefix_config(resolved: dict) -> dict:
    """The config that trains the prefix: the same run with no regularizer and no attack."""
    config = copy.deepcopy(resolved)
    config["regularizer"] = {"kind": "none"}
    config["attack"] = None
    return config


@functools.lru_cache(maxsize=1)
def library_digest() -> str:
    """A hash of the library's source, so a code change never reuses an old prefix."""
    import specreg

    digest = hashlib.sha256()
    for path in sorted(Path(specreg.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def cache_key(resolved: dict) -> str:
    payload = {"config": prefix_config(resolved), "epochs": burnin_epochs(resolved), "library": library_digest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def ensure(cache_root, resolved: dict) -> tuple[Path, bool]:
    """The prefix checkpoint's directory for this config, trained here if no trial has yet.

    Returns (directory, trained_here). Concurrent callers wait on the key's lock and then reuse it.
    """
    import specreg

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
            for stale in root.glob(f"{key}.partial-*"):  # left by a trial that died holding the lock
                shutil.rmtree(stale, ignore_errors=True)
            partial = root / f"{key}.partial-{uuid.uuid4().hex[:8]}"
            history, started = [], time.perf_counter()
            specreg.run_experiment(prefix_config(resolved), on_epoch=history.append, checkpoint_dir=partial,
                                   stop_after_epochs=burnin_epochs(resolved))
            (partial / "meta.json").write_text(json.dumps(
                {"key": key, "epochs": burnin_epochs(resolved), "seconds": time.perf_counter() - started}))
            (partial / HISTORY).write_text(json.dumps(history))
            os.replace(partial, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final, True


def history(directory) -> list[dict]:
    """The prefix's per-epoch metrics, for the curves of the trials that start from it."""
    return json.loads((Path(directory) / HISTORY).read_text())

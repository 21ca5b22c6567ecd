"""Faults the reliability tests inject, installed in the test process and in every Ray worker.

`install()` wraps the `mlp` builder of `specreg.models.MODELS`: extra model options, which only the tests
use, make the built network fail at a chosen epoch. The product itself has no fault switch:

- `fail_at_epoch: K` raises `InjectedFault` at the first training step of epoch K. With
  `fail_log: DIR` and `fail_times: N` it raises only the first N times across attempts (each failure
  appends a line to `DIR/fail_times=N`), so a retry of the trial can succeed.
- `nan_at_epoch: K` makes the network's output NaN from epoch K on (the loss diverges).
- `fail_at_query: K` raises `InjectedFault` at the K-th forward pass in eval mode after training (the
  attack's queries), with `fail_log` / `fail_times` as above.

Epochs are counted by the network itself: each training step after an evaluation starts a new epoch
(the training loop evaluates in eval mode at the end of every epoch). A resumed network counts from the
epoch it resumes at only if the test says so; the failure log keeps a retried trial from failing again once it has failed `fail_times` times.

It also makes trials checkpoint at every epoch (their epochs are far shorter than the product's
10-second checkpoint interval), so that a retried trial has a checkpoint to resume from, and attacks keep
their progress after every iteration (instead of every minute).
"""
import inspect
import math
from pathlib import Path

FAULT_KEYS = ("fail_at_epoch", "fail_times", "fail_log", "nan_at_epoch", "fail_at_query")


class InjectedFault(RuntimeError):
    pass


def failures(log_dir, times) -> Path | None:
    """The file counting a trial's injected failures (None without `fail_log`)."""
    if log_dir is None:
        return None
    path = Path(log_dir) / f"fail_times={times}"
    path.touch()
    return path


def _faulty(builder):
    def build(input_shape, num_classes, **options):
        fault = {k: options.pop(k) for k in FAULT_KEYS if k in options}
        model = builder(input_shape, num_classes, **options)
        if fault:
            state = {"epoch": 1, "trained": False, "evaluated": False}

            def fail_once(where: str) -> None:
                log = failures(fault.get("fail_log"), fault.get("fail_times"))
                if log is None or len(log.read_text().splitlines()) < fault["fail_times"]:
                    state["failed"] = True
                    if log is not None:
                        with log.open("a") as f:
                            f.write(f"{where}\n")
                    raise InjectedFault(f"injected fault at {where}")

            def hook(module, inputs, output):
                if not module.training:
                    state["evaluated"] = state["trained"]  # an evaluation before training starts none
                    if fault.get("fail_at_query") is not None and state["trained"] and not state.get("failed"):
                        state["queries"] = state.get("queries", 0) + 1
                        if state["queries"] == fault["fail_at_query"]:
                            fail_once(f"query {state['queries']}")
                    return output
                if state["evaluated"]:
                    state["epoch"] += 1
                    state["evaluated"] = False
                state["trained"] = True
                epoch = state["epoch"]
                if fault.get("fail_at_epoch") == epoch and not state.get("failed"):
                    fail_once(f"epoch {epoch}")
                if fault.get("nan_at_epoch") is not None and epoch >= fault["nan_at_epoch"]:
                    return output * math.nan
                return output

            model.register_forward_hook(hook)
        return model
    build.specreg_faults = True
    # the sweep's validation reads a model's options from its builder's signature: the builder's and ours
    signature = inspect.signature(builder)
    build.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *(
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in FAULT_KEYS)])
    return build


def install() -> None:
    """Ray's worker_process_setup_hook (and called once in the test process)."""
    import specreg.attacks
    import specreg.models
    from specreg_platform.run import trainable

    if not getattr(specreg.models.MODELS["mlp"], "specreg_faults", False):
        specreg.models.MODELS["mlp"] = _faulty(specreg.models.MODELS["mlp"])
    trainable.CHECKPOINT_SECONDS = 0.0
    specreg.attacks.STATE_SECONDS = 0.0

"""Batched hard-label (decision-based) L2 attacks: Tangent Attack, HopSkipJump and a binary-search baseline.

The attacks only see the predicted label (argmax), never logits or gradients, and every sample advances
together: each query round is one batched pass over a (samples × probes) set of rows on the model's
device (fed in chunks of `batch_size` rows, cache-sized on a CPU), with the queries counted per sample
against its budget. They are written here rather than taken from foolbox or ART because those attack
one sample at a time on the host, which is what made robustness sweeps slow.

- `tangent`: Ma et al., "Finding optimal tangent points for reducing distortions of hard-label attacks"
  (NeurIPS 2021): HopSkipJump's boundary-normal estimate, then a step to the optimal tangent point of the
  hemisphere of radius dist/sqrt(t) centred at the boundary point (shrunk until the point is adversarial,
  then bisected toward the largest radius that is), then a binary search back.
- `hsja`: Chen, Jordan & Wainwright, "HopSkipJumpAttack" (2020), L2 untargeted, geometric step size.
- `boundary-search`: the starting point, binary-searched toward the input; a cheap baseline.

Starting points (shared): uniform noise and, where it fails, blends of the input toward it (queried);
then the nearest differently-predicted example of the attacked batch and of an optional `start_pool`
(free: their labels are already known). The closest noise/blend candidate and the closest data
candidate are both binary-searched to the boundary, and the closer boundary point is the start (a far
noise image often crosses the boundary nearer than a close example of another class, notably in small
batches). The pool's predictions are a shared one-off cost, reported as `pool_queries` rather than
charged to any sample. A sample that none of these reach (e.g. a batch of one predicted class whose
noise all lands in that class) keeps drawing rounds of wider candidates (uniform noise, Gaussian noise
about the input at scales from 1e-3 to 1, random box corners, blends toward them) until one is
adversarial or its budget is spent (`START_QUERIES` without a budget); only then is it a start failure.
"""
import hashlib
import math
import numbers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .files import load_state, save_atomic

# The options every attack reads (an entry of the registry, ATTACKS at the end of this file, may add its own).
DEFAULTS = {
    "start_pool": None,       # (M, *input_shape) candidate starting points, e.g. test images
    "noise_starts": 4,        # uniform-noise images tried per sample
    "blends": (0.25, 0.5, 0.75),  # x + t·(noise − x), tried where no noise image is adversarial
    "init_evals": 100,        # probes of the first normal estimate; grows as sqrt(iteration)
    "max_evals": 10_000,
    "gamma": 1.0,             # binary-search tolerance theta = gamma / d^1.5 (HopSkipJump)
    "tolerance": None,        # binary-search tolerance on the blend factor instead (Yang et al.: 1e-5)
    "iterations": None,       # stop after this many iterations (Yang et al.: 40), besides the query budget
    "trace": (),              # iterations after which to keep the distances so far (AttackResult.trace)
    "max_shrinks": 10,        # step-size reductions before an iteration gives up on its step
    "batch_size": None,       # rows per forward pass; None: CPU_BATCH on a CPU, 8192 on an accelerator
    "progress": None,         # tqdm bar; None: only for long runs on a terminal
}
START_KINDS = ("none", "noise", "blend", "nearest", "pool", "misclassified", "gaussian", "corner")
# Where the first draw and the data give a sample no start, further rounds draw START_ROUND candidates per
# sample, interleaving these families (so a round cut short by the budget still tries each): uniform noise,
# the input plus Gaussian noise of a log-uniform scale in [1e-3, 1] per pixel, a box corner (each pixel 1
# with a probability drawn per corner: dark to bright images) and a blend of the input toward noise or a
# corner by a uniform factor. Rounds go on until the sample has a start or its budget is spent. Stopping at
# a fraction of the budget would not leave the attack more room: a sample without a start cannot use its
# queries, and a sample found before such a cut is attacked the same either way, so a cut would only turn
# the later finds into inf. A late start gets the room that is left (at worst its candidate, unsearched:
# still a valid upper bound on the distance).
START_FAMILIES = ("noise", "gaussian", "corner", "blend")
START_ROUND = 16
# Without a budget (max_queries None: the iterations mode) the rounds stop once a sample has spent this many
# queries: foolbox's HopSkipJump tries up to 1,000 noise images, ART's 100; next to the attack it enables
# (the authors' 40 iterations ask about 17,800 per sample) it is cheap.
START_QUERIES = 1000
MIN_EVALS = 10  # a normal estimate from fewer probes is not worth its queries
UNLIMITED = 2 ** 62  # the per-sample budget when max_queries is None
MIN_STEPS = 10  # binary-search rounds at least (theta alone gives only 2 for 2-D inputs)
# Bisections of the tangent radius between the accepted and the last failed one (once the tangent point is
# adversarial its distance to the input is sqrt(dist² − r²), so the largest radius that works is the best
# step). Measured: docs/benchmarks_attacks.md, "TANGENT_REFINE".
TANGENT_REFINE = 3
# With a `state_file`, the attack's progress is written there at most this often (at the end of an iteration):
# a 1,000-point attack of the paper's SLP takes about an hour, and an interrupted one continues from it.
STATE_SECONDS = 60.0
# Rows per forward pass on a CPU, where chunks whose activations stay in cache run fastest. Measured:
# docs/benchmarks_attacks.md, "CPU_BATCH".
CPU_BATCH = 512


@dataclass
class AttackResult:
    distances: torch.Tensor    # (N,) float64 L2 distances: 0 if misclassified, inf if nothing found
    adversarial: torch.Tensor  # (N, *input_shape) adversarial examples (the input where none found)
    queries: torch.Tensor      # (N,) int64 model queries charged to each sample
    start: list                # per sample, one of START_KINDS
    pool_queries: int = 0      # one-off predictions of the start pool, shared by all samples
    trace: dict = field(default_factory=dict)  # iteration -> (distances, queries) after it, per `trace`
    resumed_at: int = 0        # iterations an interrupted run had done (continued from its state_file)
    iterations: int = 0        # iterations done (0 for an attack without steps)


@dataclass(frozen=True)
class Attack:
    """A registry entry. The attacks share HopSkipJump's loop (start, normal estimate, step, binary search);
    an entry says how its step proposes a point and which step sizes it tries."""
    description: str
    # step(cur, u, origin) -> propose(rows, size): the candidates at step `size` from the boundary points
    # `cur` (normals u) of the inputs `origin`; None: no iterations (the start, binary-searched, is the result)
    step: Optional[Callable] = None
    scales: Callable[[dict], list] = lambda opts: [0.5 ** k for k in range(int(opts["max_shrinks"]) + 1)]
    refine: int = 0  # bisections between the accepted step size and the failed one before it
    options: dict = field(default_factory=dict)  # options this attack reads besides DEFAULTS, with defaults


def attack_options(name: str) -> tuple:
    """The options attack `name` reads beyond the budget."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    return (*DEFAULTS, *ATTACKS[name].options)


def validate(name, max_queries, options) -> dict:
    """Check an attack request before any query is spent; returns the options with defaults filled in.
    max_queries None means no budget, which needs `iterations`."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    if max_queries is None:
        if options.get("iterations") is None:
            raise ValueError("max_queries None (no budget) needs the iterations option")
    elif isinstance(max_queries, bool) or not isinstance(max_queries, numbers.Real) \
            or not float(max_queries).is_integer() or max_queries < 1:
        raise ValueError(f"max_queries must be a positive integer (queries per sample), got {max_queries!r}")
    valid = attack_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown attack options {unknown}; valid options: {', '.join(valid)}")
    opts = {**DEFAULTS, **ATTACKS[name].options, **options}
    for key in ("init_evals", "max_evals", "batch_size", "iterations"):
        if opts[key] is not None and int(opts[key]) < 1:
            raise ValueError(f"attack option {key} must be >= 1, got {opts[key]!r}")
    if not all(isinstance(t, numbers.Integral) and t >= 1 for t in opts["trace"]):
        raise ValueError(f"attack option trace must list iterations >= 1, got {opts['trace']!r}")
    if opts["tolerance"] is not None and not 0 < opts["tolerance"] < 1:
        raise ValueError(f"attack option tolerance must lie in (0, 1), got {opts['tolerance']!r}")
    for key in ("noise_starts", "max_shrinks"):
        if int(opts[key]) < 0:
            raise ValueError(f"attack option {key} must be >= 0, got {opts[key]!r}")
    if not all(0 < t < 1 for t in opts["blends"]):
        raise ValueError(f"attack option blends must lie in (0, 1), got {opts['blends']!r}")
    if opts["gamma"] <= 0:
        raise ValueError(f"attack option gamma must be > 0, got {opts['gamma']!r}")
    return opts


def model_device(model) -> torch.device:
    """Where the model's parameters (or buffers) live; the attack runs there."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def predict(model, x, batch_size=8192) -> torch.Tensor:
    """Predicted labels, `batch_size` rows per forward pass; checks the output is (N, classes) logits."""
    labels = []
    for chunk in x.split(batch_size):
        out = model(chunk)
        if out.dim() != 2 or out.shape[0] != len(chunk) or out.shape[1] < 2:
            raise ValueError(f"model output must be logits of shape (N, classes) with classes >= 2; "
                             f"got {tuple(out.shape)} for N={len(chunk)}")
        labels.append(out.argmax(1))
    return torch.cat(labels)


class _Oracle:
    """Hard-label access to the model; every row it is fed is charged to the sample that asked."""

    def __init__(self, model, input_shape, y, max_queries, batch_size):
        self.model, self.shape, self.y = model, input_shape, y
        self.max_queries, self.batch_size = max_queries, batch_size
        self.queries = torch.zeros(len(y), dtype=torch.long, device=y.device)

    def room(self, idx):
        return self.max_queries - self.queries[idx]

    def predict(self, rows):
        """Labels of flat rows, uncharged (callers charge them)."""
        return predict(self.model, rows.reshape(-1, *self.shape), self.batch_size)

    def labels(self, rows, idx):
        """Labels of flat rows (n, d), each charged one query to its sample idx (n,; may repeat)."""
        self.queries.index_add_(0, idx, torch.ones_like(idx))
        return self.predict(rows)

    def ask(self, points, idx, limit=None):
        """Which of points (k, m, d) are adversarial for samples idx (k,). Row j of sample i is only fed
        when j < limit[i] and the budget allows; returns (adversarial, asked), both (k, m) bools."""
        k, m = points.shape[:2]
        room = self.room(idx) if limit is None else torch.minimum(limit, self.room(idx))
        asked = torch.arange(m, device=points.device)[None] < room[:, None]
        adv = torch.zeros(k, m, dtype=torch.bool, device=points.device)
        if asked.all() and k * m:  # the common case, without copying the points
            adv = self.predict(points.reshape(k * m, -1)).view(k, m) != self.y[idx][:, None]
        elif asked.any():
            adv[asked] = self.predict(points[asked]) != self.y[idx][:, None].expand(k, m)[asked]
        self.queries.index_add_(0, idx, asked.sum(1))
        return adv, asked


def run(model, x, y, name, max_queries, seed=0, state_file=None, **options) -> AttackResult:
    """Attack each row of x (true labels y) with `name`, at most `max_queries` model queries per sample
    (None: no budget; the `iterations` option then ends the attack).

    state_file: where the attack keeps its progress (every STATE_SECONDS, removed when it finishes). A run
    that finds progress of the same attack there (same model weights, inputs, options and seed) continues
    from it, with the result an uninterrupted run gives; progress of anything else is ignored.

    Options (see DEFAULTS) tune the starting points and the attacks; reproducible for a seed (the
    attack's own generator; the global RNG is untouched)."""
    opts = validate(name, max_queries, options)
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch (N, *input_shape), got shape {tuple(x.shape)}")
    if tuple(y.shape) != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},), got {tuple(y.shape)}")
    pool = opts["start_pool"]
    if pool is not None and tuple(pool.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"start_pool must hold inputs of shape {tuple(x.shape[1:])}, got {tuple(pool.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            budget = UNLIMITED if max_queries is None else int(max_queries)
            return _attack(model, x, y, name, budget, seed, opts, state_file and Path(state_file))
    finally:
        model.train(was_training)


def _fingerprint(model, name, max_queries, seed, opts, x0, y, pool) -> str:
    """What an attack's result depends on: the model's weights, the inputs, the pool, the options."""
    digest = hashlib.sha256(repr((name, max_queries, seed, sorted(
        (k, v) for k, v in opts.items() if k not in ("start_pool", "progress")))).encode())
    for tensor in [*model.state_dict().values(), x0, y, *([] if pool is None else [pool])]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_state(path: Optional[Path], fingerprint: str) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    state = load_state(path)
    return state if state.get("fingerprint") == fingerprint else None


def _attack(model, x, y, name, max_queries, seed, opts, state_file=None):
    device = model_device(model)
    n, shape = len(x), tuple(x.shape[1:])
    d = math.prod(shape)
    x0 = x.detach().to(device, torch.float32).reshape(n, d)
    y = y.to(device, torch.long)
    gen = torch.Generator(device).manual_seed(seed)
    batch_size = opts["batch_size"] or (CPU_BATCH if device.type == "cpu" else 8192)
    oracle = _Oracle(model, shape, y, max_queries, int(batch_size))
    theta = opts["tolerance"] or opts["gamma"] / d ** 1.5
    steps = max(MIN_STEPS, math.ceil(math.log2(1 / theta)))  # binary-search rounds to reach theta

    pool = opts["start_pool"]
    pool = pool.detach().to(device, torch.float32).reshape(len(pool), d) if pool is not None and len(pool) else None
    fingerprint = _fingerprint(model, name, max_queries, seed, opts, x0, y, pool) if state_file else None
    state = _load_state(state_file, fingerprint)
    if state is None:
        everyone = torch.arange(n, device=device)
        pred = oracle.labels(x0, everyone)
        pool_pred = None if pool is None else oracle.predict(pool)
        kind = torch.full((n,), START_KINDS.index("misclassified"), device=device)
        todo = everyone[pred == y]
        kind[todo] = START_KINDS.index("none")
        idx, cur, post, kind[idx] = _start(oracle, x0, y, pred, todo, pool, pool_pred, gen, opts, steps)
        adv = x0.clone()
        best = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        best[pred != y] = 0.0
        dist = _record(adv, best, idx, cur, x0)
        done, trace = 0, {}
    else:  # the loop's variables after iteration `done`, as an uninterrupted run had them
        idx, cur, post, dist, adv, best, kind, oracle.queries = (
            state[key].to(device) for key in ("idx", "cur", "post", "dist", "adv", "best", "kind", "queries"))
        gen.set_state(state["generator"])
        done, trace = state["done"], {t: tuple(pair) for t, pair in state["trace"].items()}
    saved = time.monotonic()

    bar = _progress_bar(opts["progress"], n, min(max_queries, 20_000))
    entry = ATTACKS[name]
    scales = entry.scales(opts)
    if entry.step is not None:
        for t in range(done + 1, (opts["iterations"] or sys.maxsize - 1) + 1):
            evals = min(int(opts["init_evals"] * math.sqrt(t)), int(opts["max_evals"]))
            evals = (oracle.room(idx) - steps - 1).clamp(max=evals)  # leave room for the step and search
            keep = evals >= MIN_EVALS
            idx, cur, dist, post, evals = idx[keep], cur[keep], dist[keep], post[keep], evals[keep]
            bar.update(n - len(idx) - bar.n)
            bar.set_postfix(queries=int(oracle.queries.sum()))
            if len(idx) == 0:
                break
            delta = torch.full_like(dist, 0.1) if t == 1 else (post * opts["gamma"] / d).clamp(min=1e-10)
            u = _estimate_normal(oracle, cur, idx, delta, evals, gen)
            origin = x0[idx]
            propose = entry.step(cur, u, origin)
            cand, ok = _geometric_search(oracle, idx, propose, dist / math.sqrt(t), scales, entry.refine)
            post[ok] = (cand[ok] - origin[ok]).norm(dim=1)
            cur[ok] = _binary_search(oracle, origin[ok], cand[ok, None], idx[ok], steps)[:, 0]
            dist = _record(adv, best, idx, cur, x0)
            done = t
            if t in opts["trace"]:
                trace[t] = (best.to("cpu", copy=True), oracle.queries.to("cpu", copy=True))
            if state_file and time.monotonic() - saved >= STATE_SECONDS:
                save_atomic({
                    "fingerprint": fingerprint, "done": t, "generator": gen.get_state(), "trace": trace,
                    **{key: value.cpu() for key, value in dict(idx=idx, cur=cur, post=post, dist=dist, adv=adv,
                                                               best=best, kind=kind, queries=oracle.queries).items()}},
                    state_file)
                saved = time.monotonic()
    if state_file:
        state_file.unlink(missing_ok=True)
    bar.update(n - bar.n)
    bar.set_postfix(queries=int(oracle.queries.sum()))
    bar.close()

    return AttackResult(
        distances=best.cpu(),
        adversarial=adv.reshape(n, *shape).to(x.device),
        queries=oracle.queries.cpu(),
        start=[START_KINDS[i] for i in kind.tolist()],
        pool_queries=0 if pool is None else len(pool),
        trace=trace,
        resumed_at=0 if state is None else state["done"],
        iterations=done,
    )


def _record(adv, best, idx, cur, x0):
    """Keep each sample's closest adversarial point so far; returns the distances of `cur`."""
    dist = (cur.double() - x0[idx].double()).norm(dim=1)
    better = dist < best[idx]
    adv[idx[better]] = cur[better]
    best[idx[better]] = dist[better]
    return dist.float()


def _progress_bar(progress, n, max_queries):
    if progress is None:
        progress = sys.stderr.isatty() and n * max_queries >= 200_000
    return tqdm(total=n, unit="sample", desc="attack", disable=not progress, leave=False)


def _start(oracle, x0, y, pred, todo, pool, pool_pred, gen, opts, steps):
    """Binary-search each sample's candidates to the boundary and start from the closest boundary point.
    Returns the samples that have one, their start, its distance before the search, and its kind."""
    starts, kinds, count = _starting_points(oracle, x0, y, pred, todo, pool, pool_pred, gen, opts)
    has = count > 0
    idx, starts, kinds, count = todo[has], starts[has], kinds[has], count[has]
    found = _binary_search(oracle, x0[idx], starts, idx, steps, count)
    gap = (found - x0[idx, None]).norm(dim=2)
    gap[torch.arange(2, device=gap.device) >= count[:, None]] = math.inf
    pick = (torch.arange(len(idx), device=gap.device), gap.argmin(1))
    return idx, found[pick], (starts[pick] - x0[idx]).norm(dim=1), kinds[pick]


def _starting_points(oracle, x0, y, pred, todo, pool, pool_pred, gen, opts):
    """Per sample of `todo`, up to two adversarial candidates (k, 2, d) with their START_KINDS codes and
    count: the closest noise or blend image (queried), then the closest differently-predicted example of
    the batch or the pool (free); for samples with neither, the closest hit of further rounds of wider
    draws (_draw_starts), until one is found or the budget is spent. Slots are packed: a sample with one
    candidate has it first."""
    k, d = len(todo), x0.shape[1]
    xt, yt = x0[todo], y[todo]
    best = torch.full((k, 2), math.inf, device=x0.device)
    starts = xt[:, None].repeat(1, 2, 1)
    kind = torch.zeros(k, 2, dtype=torch.long, device=x0.device)

    def offer(slot, rows, points, dist, name):
        better = dist < best[rows, slot]
        rows = rows[better]
        best[rows, slot], starts[rows, slot] = dist[better], points[better]
        kind[rows, slot] = START_KINDS.index(name)

    rows = torch.arange(k, device=x0.device)
    if opts["noise_starts"] and k:
        noise = torch.rand(k, int(opts["noise_starts"]), d, generator=gen, device=x0.device)
        hit, _ = oracle.ask(noise, todo)
        offer(0, rows, *_closest(xt, noise, hit), "noise")
        miss = rows[~hit.any(1)]
        if len(miss) and len(opts["blends"]):
            t = torch.tensor(opts["blends"], device=x0.device)[None, None, :, None]
            blends = torch.lerp(xt[miss, None, None], noise[miss, :, None], t).flatten(1, 2)
            hit, _ = oracle.ask(blends, todo[miss])
            offer(0, miss, *_closest(xt[miss], blends, hit), "blend")
    for points, labels, name in ((x0, pred, "nearest"), (pool, pool_pred, "pool")):
        if labels is not None and k:
            j, dist = _nearest(xt, yt, points, labels, oracle.batch_size)
            offer(1, rows, points[j], dist, name)

    # A stream of its own, seeded from the attack's: the attack's own draws are not moved by these rounds,
    # so a run that needs none, or whose rounds find nothing, is what it was without them.
    spare = torch.Generator(x0.device).manual_seed(gen.initial_seed() + 1)
    stop = START_QUERIES if oracle.max_queries == UNLIMITED else oracle.max_queries
    family = torch.arange(START_ROUND, device=x0.device) % len(START_FAMILIES)
    rest = rows[(kind == 0).all(1)]
    while True:
        room = stop - oracle.queries[todo[rest]]
        rest, room = rest[room > 0], room[room > 0]
        if len(rest) == 0:
            break
        cand = _draw_starts(xt[rest], spare)
        hit, _ = oracle.ask(cand, todo[rest], room)
        for f, name in enumerate(START_FAMILIES):
            offer(0, rest, *_closest(xt[rest], cand, hit & (family == f)), name)
        rest = rest[~hit.any(1)]

    swap = (kind[:, 0] == 0) & (kind[:, 1] != 0)
    starts[swap], kind[swap] = starts[swap].flip(1), kind[swap].flip(1)
    return starts, kind, (kind != 0).sum(1)


def _draw_starts(x, gen):
    """START_ROUND candidate starts (k, START_ROUND, d) per row of x, the START_FAMILIES interleaved."""
    k, d = x.shape
    each = START_ROUND // len(START_FAMILIES)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=x.device, dtype=x.dtype)

    noise = rand(k, each, d)
    scale = 10 ** (3 * rand(k, each, 1) - 3)
    gaussian = torch.randn(k, each, d, generator=gen, device=x.device, dtype=x.dtype)
    gaussian = torch.addcmul(x[:, None], scale, gaussian).clamp_(0, 1)
    corner = (rand(k, each, d) < rand(k, each, 1)).to(x.dtype)
    blend = torch.lerp(x[:, None], torch.where(rand(k, each, 1) < 0.5, noise, corner), rand(k, each, 1))
    return torch.stack([noise, gaussian, corner, blend], 2).flatten(1, 2)


def _closest(x, points, ok):
    """Per row of x, the closest of points (k, m, d) where ok (k, m); distance inf where none."""
    dist = (points - x[:, None]).norm(dim=2).masked_fill(~ok, math.inf)
    dist, j = dist.min(1)
    return points[torch.arange(len(x), device=x.device), j], dist


def _nearest(x, y, points, labels, batch_size):
    """Index and distance of the nearest of `points` whose label differs from y, per row of x."""
    index, dists = [], []
    chunk = max(1, batch_size * 64 // len(points))  # bounds the distance matrix to batch_size·64 entries
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        dist = torch.cdist(xs, points).masked_fill(labels[None] == ys[:, None], math.inf)
        dist, j = dist.min(1)
        index.append(j)
        dists.append(dist)
    return torch.cat(index), torch.cat(dists)


def _binary_search(oracle, x0, xa, idx, steps, count=None):
    """Walk from each adversarial candidate xa (k, c, d) toward x0 (k, d) until within 2^-steps (blend
    factor) of the boundary; only the first count[i] candidates of sample i are searched. Every
    returned point was queried and found adversarial (or is its candidate)."""
    k, c = xa.shape[:2]
    lo = torch.zeros(k, c, device=x0.device)
    hi = torch.ones(k, c, device=x0.device)
    out = xa.clone()
    for _ in range(steps):
        mid = (lo + hi) / 2
        points = torch.lerp(x0[:, None], xa, mid[..., None]).clamp_(0, 1)
        adv, asked = oracle.ask(points, idx, count)
        if not asked.any():
            break
        out[adv] = points[adv]
        hi = torch.where(adv, mid, hi)
        lo = torch.where(asked & ~adv, mid, lo)
    return out


def _estimate_normal(oracle, xb, idx, delta, evals, gen):
    """HopSkipJump's Monte-Carlo estimate of the boundary normal at xb (unit, toward the adversarial
    side): mean of random unit directions weighted by the baseline-subtracted sign of the decision.

    The m directions are drawn once per round and flipped by a random sign per sample and coordinate:
    each sample still gets m iid uniform directions (HopSkipJump's estimator), uncorrelated across
    samples, while the generator draws m·d normals instead of k·m·d. The probes are built by
    broadcasting (no row gathers), queried and summed a few samples at a time, about `batch_size` rows,
    so they stay in cache; sample i asks only its first evals[i] probes. With s = ±1 the decision and
    S = the sum of the (clipped) steps, the estimate sum((s − mean s)·step) is sum(s·step) − mean(s)·S.
    The sums are one batched matmul per chunk: no atomic adds, so they are deterministic on GPUs too."""
    k, d = xb.shape
    m = int(evals.max())
    shared = torch.randn(m, d, generator=gen, device=xb.device)
    shared /= shared.norm(dim=1, keepdim=True)
    flips = torch.randint(0, 2, (k, d), generator=gen, device=xb.device, dtype=xb.dtype)
    flips.mul_(2).sub_(1).mul_(delta[:, None])  # ±delta: the probe radius
    samples = max(1, round(oracle.batch_size / m))  # per chunk
    probes = math.ceil(m / max(1, round(m / oracle.batch_size)))  # per chunk: m split into even parts
    steps, adv_steps = torch.zeros_like(xb), torch.zeros_like(xb)
    hits = torch.zeros(k, device=xb.device)
    for a in range(0, k, samples):
        b = min(a + samples, k)
        for p in range(0, m, probes):
            points = torch.addcmul(xb[a:b, None], flips[a:b, None], shared[None, p:p + probes]).clamp_(0, 1)
            adv, asked = oracle.ask(points, idx[a:b], evals[a:b] - p)
            points -= xb[a:b, None]  # the step actually taken once clipped
            sums = torch.stack([asked, adv], 1).to(xb.dtype) @ points  # (samples, 2, d)
            steps[a:b] += sums[:, 0]
            adv_steps[a:b] += sums[:, 1]
            hits[a:b] += adv.sum(1)
    mean = 2 * hits / evals - 1
    grad = 2 * adv_steps - steps  # sum(s·step)
    grad -= torch.where(mean.abs() == 1, 0, mean)[:, None] * steps  # baseline unless unanimous
    return grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _geometric_search(oracle, idx, propose, size, scales, refine=0):
    """Try each sample's step size times each of `scales` in turn until propose(rows, size) is
    adversarial, then bisect `refine` times between the accepted scale and the failed one before it
    (samples whose first try succeeded keep it); returns (points, found)."""
    out = None

    def attempt(rows, scale):
        """Query propose(rows, scale · size) and keep the adversarial points; returns (adv, asked)."""
        nonlocal out
        cand = propose(rows, scale * size[rows]).clamp_(0, 1)
        if out is None:
            out = torch.empty(len(idx), cand.shape[1], device=cand.device)
        adv, asked = oracle.ask(cand[:, None], idx[rows])
        adv, asked = adv[:, 0], asked[:, 0]
        out[rows[adv]] = cand[adv]
        return adv, asked

    rows = torch.arange(len(idx), device=size.device)
    found = torch.zeros(len(idx), dtype=torch.bool, device=size.device)
    accepted, failed = torch.zeros_like(size), torch.zeros_like(size)
    for k, scale in enumerate(scales):
        adv, asked = attempt(rows, scale)
        found[rows[adv]] = True
        accepted[rows[adv]] = scale
        failed[rows[adv]] = scales[k - 1] if k else 0.0
        rows = rows[asked & ~adv]
        if len(rows) == 0:
            break
    rows = (failed > 0).nonzero().squeeze(1)
    for _ in range(refine):
        if len(rows) == 0:
            break
        mid = (accepted[rows] + failed[rows]) / 2
        adv, asked = attempt(rows, mid)
        accepted[rows[adv]] = mid[adv]
        failed[rows[asked & ~adv]] = mid[asked & ~adv]
        rows = rows[asked]
    return out, found


def _tangent_frame(x0, xb, u):
    """What the tangent point from x0 to the hemisphere at boundary point xb (normal u) needs that does not
    depend on the radius, computed once per iteration: the unit direction in the tangent plane toward
    x0, the distance to x0, and the sine and cosine of x0's elevation below that plane."""
    ox = x0 - xb
    norm = ox.norm(dim=1).clamp(min=1e-12)
    along = (ox * u).sum(1)
    sin_a = (-along / norm).clamp(-1, 1)
    cos_a = (1 - sin_a ** 2).clamp(min=0).sqrt()
    flat = ox - along[:, None] * u
    flat /= flat.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return flat, norm, sin_a, cos_a


def _tangent_point(xb, u, frame, radius):
    """Tangent point, seen from x0, of the hemisphere of `radius` centred at boundary point xb on the
    side of normal u (Ma et al. 2021, Thm. 1): the point of the ball whose line to x0 is tangent to it,
    in the plane spanned by x0 − xb and u, as far along u as possible. `frame` is _tangent_frame's."""
    flat, norm, sin_a, cos_a = frame
    cos_b = (radius / norm).clamp(max=1)  # half the angle the ball subtends from x0
    sin_b = (1 - cos_b ** 2).clamp(min=0).sqrt()
    sin_g = sin_b * cos_a - cos_b * sin_a
    cos_g = cos_b * cos_a + sin_b * sin_a
    return torch.addcmul(xb, (radius * cos_g)[:, None], flat).addcmul_((radius * sin_g)[:, None], u)


def _hsja_step(cur, u, origin):
    """HopSkipJump: along the estimated normal from the boundary point."""
    return lambda rows, size: cur[rows] + size[:, None] * u[rows]


def _tangent_step(cur, u, origin):
    """Tangent Attack: the tangent point, seen from the input, of the hemisphere of radius `size`."""
    frame = _tangent_frame(origin, cur, u)
    return lambda rows, size: _tangent_point(cur[rows], u[rows], [part[rows] for part in frame], size)


def _tangent_scales(opts):
    """The tangent point exists only for radii below dist (at dist it is the input itself) and fails above
    a threshold set by how well the normal is known, so halving would waste most of the useful range: shrink
    by 0.9, squaring the factor after each failure (1, .9, .73, .48, .21, .04, ...). Measured against
    halving: docs/benchmarks_attacks.md, "Why tangent only ties hsja"."""
    return [0.9 ** (2 ** k - 1) for k in range(int(opts["max_shrinks"]) + 1)]


# The attack registry (config.ATTACK_NAMES is read from here). HopSkipJump halves its step (the default scales).
ATTACKS = {
    "tangent": Attack("Tangent Attack (Ma et al., NeurIPS 2021): a step to the optimal tangent point of a "
                      "hemisphere", step=_tangent_step, scales=_tangent_scales, refine=TANGENT_REFINE),
    "hsja": Attack("HopSkipJumpAttack (Chen, Jordan & Wainwright 2020), L2 untargeted, geometric step size",
                   step=_hsja_step),
    "boundary-search": Attack("the starting point, binary-searched toward the input (a cheap baseline)"),
}

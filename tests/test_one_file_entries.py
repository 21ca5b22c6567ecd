"""The worked examples of docs/architecture.md ("Adding an entry"): each block, appended to the one file it
names in a copy of the library, makes a registry entry that validates, runs and reaches the platform's
search-space checks. So the page's promise (one file's change) is tested, and the page cannot drift."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = dict(re.findall(r"```python (specreg/\w+\.py)\n(.*?)```", (ROOT / "docs/architecture.md").read_text(), re.S))

# Run in a fresh interpreter whose `specreg` is the copy (the working directory comes first on sys.path).
PRELUDE = '''
import os, tempfile
import specreg
from specreg_platform.space import space
assert specreg.__file__.startswith(os.getcwd()), specreg.__file__

BASE = {"data": {"name": "synthetic-xor", "n_train": 512, "n_test": 256}, "model": {"name": "mlp", "widths": [32]},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.1, "device": "cpu", "schedule": "constant"}}


def config(**blocks):
    return {**BASE, **blocks}


def refused(cfg, *words):
    try:
        specreg.validate_config(cfg)
    except specreg.ConfigError as error:
        assert all(w in str(error) for w in words), str(error)
        return
    raise AssertionError(f"accepted {cfg}")


def train(cfg):
    """Metrics and final weights of a run."""
    directory = tempfile.mkdtemp()
    metrics = specreg.run_experiment(specreg.validate_config(cfg), checkpoint_dir=directory)
    return metrics, specreg.load_checkpoint(directory)["model"]


def space_accepts(search, base=None):
    """The platform's search-space loader takes a space that searches the new entry."""
    import yaml
    doc = {"name": "new-entry", "base": base or config(), "search": search,
           "objectives": [{"metric": "clean_acc", "mode": "max"}], "sampler": {"name": "grid"}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(doc, f)
    spec, resolved = space.load_space(f.name)
    return spec, resolved
'''

CHECKS = {
    "specreg/regularizers.py": '''
import torch
assert "frobenius" in specreg.REGULARIZERS and "frobenius_power" in specreg.regularizer_options("frobenius")
refused(config(regularizer={"kind": "frobenius", "frobenius_powr": 1}), "frobenius_powr", "did you mean 'frobenius_power'")
refused(config(regularizer={"kind": "frobenius", "frobenius_power": -1}), "regularizer.frobenius_power")
norms = {}
for strength in (0.0, 0.05):
    metrics, weights = train(config(regularizer={"kind": "frobenius", "strength": strength, "frobenius_power": 2}))
    norms[strength] = weights["features.2.weight"].norm().item()
# The penalty acts: the placed layer's Frobenius norm is smaller with it than without.
assert norms[0.05] < 0.8 * norms[0.0], norms
space_accepts({"regularizer.kind": {"grid": ["none", "frobenius"]},
               "regularizer.frobenius_power": {"grid": [1.0, 2.0], "when": {"regularizer.kind": ["frobenius"]}}})
''',
    "specreg/models.py": '''
assert specreg.model_options("bottleneck") == ("width", "rank", "activation", "normalize")
refused(config(model={"name": "bottleneck", "rnk": 4}), "rnk", "did you mean 'rank'")
metrics, weights = train(config(model={"name": "bottleneck", "width": 32, "rank": 3},
                                regularizer={"kind": "rep-spectral", "strength": 1e-3}))
# The representation is the bottleneck: the head reads 3 units; rep-spectral logs σ of both feature layers.
assert tuple(weights["head.weight"].shape) == (2, 3)
assert {"sigma_1", "sigma_2"} <= set(metrics) and "sigma_3" not in metrics, sorted(metrics)
space_accepts({"model.rank": {"grid": [2, 4]}}, config(model={"name": "bottleneck"}))
''',
    "specreg/data.py": '''
assert specreg.dataset_options("blobs") >= {"n_train", "n_test", "spread"}
refused(config(data={"name": "blobs", "sprad": 0.1}), "sprad", "did you mean 'spread'")
metrics, _ = train(config(data={"name": "blobs", "spread": 0.05}))
# Blobs 0.57 apart with spread 0.05 are separable: the MLP must find it.
assert metrics["clean_acc"] > 0.95, metrics["clean_acc"]
space_accepts({"data.spread": {"grid": [0.05, 0.1]}}, config(data={"name": "blobs"}))
''',
    "specreg/attacks.py": '''
import torch
assert specreg.attack_options("hsja-shrink")[-1] == "shrink"
attack = {"name": "hsja-shrink", "samples": 64, "max_queries": 2000}
refused(config(attack={**attack, "shrnk": 0.5}), "shrnk", "did you mean 'shrink'")
specreg.validate_config(config(attack={**attack, "shrink": 0.6}))
# A hyperplane through inputs clear of the box (as tests/test_attacks.py's): the exact L2 distance to the
# boundary is |w·x + b| / ‖w‖.
from specreg import attacks
gen = torch.Generator().manual_seed(0)
w = torch.randn(64, generator=gen, dtype=torch.float64)
x = 0.35 + 0.3 * torch.rand(100, 64, generator=gen)
b = -(x.double() @ w).mean()

class Hyperplane(torch.nn.Module):
    def forward(self, x):
        z = x.reshape(len(x), -1).double() @ w + b
        return torch.stack([torch.zeros_like(z), z], 1).float()


model = Hyperplane()
exact = (x.double() @ w + b).abs() / w.norm()
y = (x.double() @ w + b > 0).long()
out = attacks.run(model, x, y, "hsja-shrink", 2000, shrink=0.6, progress=False)
ratio = out.distances / exact
assert (out.distances >= exact - 1e-6).all() and ratio.quantile(0.9) <= 1.1, ratio.quantile(0.9)
# The attack is fixed within a sweep: its option is checked in the space's base.
space_accepts({"train.lr": {"grid": [0.05, 0.1]}}, config(attack={**attack, "shrink": 0.6}))
try:
    space_accepts({"train.lr": {"grid": [0.05, 0.1]}}, config(attack={**attack, "shrnk": 0.6}))
    raise AssertionError("the space accepted attack.shrnk")
except space.BadInput as error:
    assert "did you mean 'shrink'" in str(error), error
''',
}


def test_every_registry_has_a_worked_example():
    assert set(BLOCKS) == set(CHECKS)


@pytest.mark.parametrize("path", sorted(CHECKS))
def test_a_worked_example_is_one_files_change(path, tmp_path):
    shutil.copytree(ROOT / "specreg", tmp_path / "specreg", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / path, "a") as f:
        f.write("\n\n" + BLOCKS[path])
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PRELUDE + CHECKS[path]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_examples_are_not_in_the_library():
    """They are examples: registering them for real would be a change to the library, with its own tests."""
    import specreg

    assert {"frobenius", "bottleneck", "blobs", "hsja-shrink"}.isdisjoint(
        {*specreg.REGULARIZERS, *specreg.MODELS, *specreg.DATASETS, *specreg.ATTACKS})

"""The platform package never shadows the standard library's `platform`; the library stays torch-only."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_stdlib_platform_not_shadowed_from_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in {"Linux", "Darwin", "Windows"}
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_platform_package_imports_under_its_own_name():
    out = subprocess.run([sys.executable, "-c", "import specreg_platform, platform; "
                          "print(specreg_platform.__path__[0]); print(platform.python_version())"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    package_dir, version = out.stdout.split()
    assert pathlib.Path(package_dir).resolve() == ROOT / "platform"
    assert version == ".".join(map(str, sys.version_info[:3]))


def test_library_imports_no_orchestration_packages():
    pattern = re.compile(r"^\s*(import|from)\s+(ray|mlflow|optuna)\b", re.M)
    offenders = [p.name for p in (ROOT / "specreg").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_every_platform_subpackage_is_in_the_wheel():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"specreg_platform." + p.parent.name for p in (ROOT / "platform").glob("*/__init__.py")}
    assert folders and folders <= listed, f"subpackages missing from pyproject's packages: {sorted(folders - listed)}"
    strays = [p.name for p in (ROOT / "platform").iterdir()
              if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").exists()]
    assert not strays, f"folders of platform/ without an __init__.py: {strays}"

"""Packaging: the wheel holds every subpackage, the shipped models and the console scripts, and the
shipped models resolve through ``manifold_tf.pretrained`` from any working directory."""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from manifold_tf import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "manifold_tf")
SCRIPTS = {
    "manifold-tf-evaluate": "manifold_tf.cli.evaluate:run",
    "manifold-tf-train": "manifold_tf.cli.train:run",
}


def test_pretrained_path_finds_a_loadable_model(monkeypatch, tmp_path):
    import keras

    monkeypatch.chdir(tmp_path)  # found inside the package, not relative to the working directory
    path = pretrained.path("synthetic_narrow")
    assert os.path.isabs(path) and os.path.isfile(path)
    assert pretrained.path("synthetic_narrow.keras") == path
    model = keras.saving.load_model(path)
    logits = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert tuple(logits.shape) == (2, 10)


def test_pretrained_unknown_name_lists_the_available_ones():
    names = pretrained.available()
    assert {"narrow_adv", "narrow_natural", "synthetic_narrow"} <= set(names)
    with pytest.raises(FileNotFoundError, match="no_such_model") as info:
        pretrained.path("no_such_model")
    for name in names:
        assert name in str(info.value)


def _build_backend_problem() -> str | None:
    """Why ``pip wheel --no-build-isolation`` cannot build offline here, or ``None``."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed"
    version = tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    if version < (64, 0):
        return f"setuptools {version} < 64 (no PEP 660 support)"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "setuptools < 70.1 needs the 'wheel' package to build wheels"
    return None


def _source_files() -> tuple[list[str], list[str]]:
    """Every module and every shipped model of the checkout, as paths relative to ROOT."""
    modules, models = [], []
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, ROOT).replace(os.sep, "/")
        modules += [f"{rel}/{f}" for f in files if f.endswith(".py")]
        models += [f"{rel}/{f}" for f in files if f.endswith(".keras")]
    return sorted(modules), sorted(models)


def test_wheel_contains_subpackages_weights_and_console_scripts(tmp_path):
    problem = _build_backend_problem()
    if problem:
        pytest.skip(f"cannot build a wheel offline: {problem}")
    # Build from a copy, so the checkout gets no build/ or *.egg-info folders.
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "manifold_tf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    out = tmp_path / "dist"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = out.glob("manifold_tf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()

    modules, models = _source_files()
    assert models, "no .keras files under manifold_tf/weights"
    # A folder of modules without __init__.py is silently left out of the wheel.
    assert not sorted(set(modules) - names), "modules missing from the wheel"
    assert not sorted(set(models + ["manifold_tf/weights/README.md"]) - names)
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or "__pycache__" in n]

    parser = configparser.ConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == SCRIPTS
    for target in SCRIPTS.values():
        module_file = target.split(":")[0].replace(".", "/") + ".py"
        assert module_file in names, f"console script target {target} is not in the wheel"

    # Runtime needs as ranges (exact pins live in requirements.txt); pytest only in an extra.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if "extra ==" not in r]
    runtime_names = {re.match(r"Requires-Dist: ([\w.-]+)", r).group(1).lower() for r in runtime}
    assert {"tensorflow", "keras", "numpy", "scipy", "absl-py", "matplotlib"} <= runtime_names
    assert "pytest" not in runtime_names and not [r for r in runtime if "==" in r]
    assert any("pytest" in r and 'extra == "test"' in r for r in requires)

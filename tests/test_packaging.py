"""The wheel holds nf4compile only (ops/ and passes/ inside it, through the symlinks) and imports."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_symlinks_are_relative():
    for name in ("ops", "passes"):
        link = ROOT / "nf4compile" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}"


def test_wheel_contains_only_nf4compile_and_imports_from_it(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("nf4compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"nf4compile", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "nf4compile/ops/nf4_ops.py" in names and "nf4compile/passes/__init__.py" in names
    assert "nf4compile/ops/tuned_configs_h100.json" in names  # package data: the shipped kernel plans

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = "import nf4compile, nf4compile.ops, nf4compile.passes, torch; print(nf4compile.ops.__file__); torch.ops.nf4compile.linear"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(target))


def test_imports_from_the_repo_root_without_installing():
    code = "import nf4compile.ops, nf4compile.passes; print(nf4compile.ops.__file__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(ROOT / "nf4compile" / "ops" / "__init__.py")

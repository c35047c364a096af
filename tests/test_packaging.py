"""Packaging (issue 11, item 10): the sdist of the `amid-kd` distribution builds and carries what a
build from it needs (the C++/CUDA sources and headers), under the import name `amid`."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

import amid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sdist_builds_with_sources(tmp_path):
    pytest.importorskip("build")
    src = tmp_path / "src"
    # a copy, so that the build's egg-info does not land in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "dist", "runs", ".git", "*.so",
                                                              "__pycache__", "*.egg-info", ".pytest_cache"))
    env = dict(os.environ, AMID_DISABLE_CUDA="1")
    out = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    name = f"amid_kd-{amid.__version__}"
    path = tmp_path / "dist" / f"{name}.tar.gz"
    assert path.exists(), os.listdir(tmp_path / "dist")
    with tarfile.open(path) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"{name}/PKG-INFO").read().decode()
    tracked = subprocess.run(["git", "ls-files", "csrc", "amid"], cwd=ROOT, capture_output=True, text=True)
    wanted = {p for p in tracked.stdout.split() if p.endswith((".h", ".cuh", ".cpp", ".cu", ".py", ".jsonl"))}
    if tracked.returncode != 0 or not wanted:  # not a git checkout: the files on disk
        wanted = {os.path.relpath(os.path.join(d, f), ROOT) for top in ("csrc", "amid") for d, _, fs in
                  os.walk(os.path.join(ROOT, top)) for f in fs if f.endswith((".h", ".cuh", ".cpp", ".cu", ".py"))}
    missing = sorted(p for p in wanted if os.path.exists(os.path.join(ROOT, p)) and p not in names)
    assert not missing, missing
    assert {"setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "amid/py.typed"} <= names
    assert not any(n.endswith(".so") for n in names)
    assert "Name: amid-kd" in pkg_info and f"Version: {amid.__version__}" in pkg_info

"""The installed package, as a user gets it: a non-editable wheel (pure Python: ``CCTK_NO_EXT=1``,
so it builds in seconds), installed into a fresh virtual environment and run from a directory
outside the checkout, imports its own files (not the checkout's, not an editable install's),
finds its Triton kernels (``cctk.kernels``) and runs the demo.

torch and the other dependencies come from the environment running the tests (a ``.pth`` line
in the fresh venv adds that environment's site-packages *after* the venv's own, and a path
added that way is not scanned for ``.pth`` files, so an editable cctk there stays inactive).
"""
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_source(dst: Path) -> Path:
    """The checkout's build inputs, copied: building writes cctk/_build_info.py and build/ into
    the source tree, which must not touch the checkout the tests run from."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build", "dist", ".*")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("cctk", "csrc"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def test_wheel_installs_imports_its_kernels_and_runs_the_demo(tmp_path):
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    (tmp_path / "src").mkdir()
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                            "--no-index", "-w", str(dist), str(src)], capture_output=True, text=True,
                           env=_clean_env(CCTK_NO_EXT="1"), cwd=tmp_path, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheels = list(dist.glob("cctk-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    kernels = sorted(n for n in names if n.startswith("cctk/kernels/") and n.endswith(".py"))
    assert kernels == sorted(f"cctk/kernels/{p.name}" for p in (ROOT / "cctk" / "kernels").glob("*.py"))
    assert "cctk/commands/export.py" in names and not any(n.endswith(".so") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())
    parent = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + site.getsitepackages()
    (purelib / "zz_parent_env.pth").write_text("\n".join(dict.fromkeys(parent)) + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           str(wheels[0])], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = ("import cctk, cctk.kernels, cctk.kernels.bsr_linear as k, cctk.commands.export; "
             "print(cctk.__file__); print(k.__file__); print(cctk._ext.available())")
    res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=work,
                         env=_clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    cctk_file, kernel_file, ext = res.stdout.split()[-3:]
    assert Path(cctk_file).resolve().is_relative_to(purelib.resolve()), cctk_file
    assert Path(kernel_file).resolve().is_relative_to(purelib.resolve()), kernel_file
    assert ext == "False"  # a pure Python wheel: every op on its PyTorch path

    cctk_bin = venv / "bin" / "cctk"
    demo = subprocess.run([str(cctk_bin), "demo", "--out", "demo", "--epochs", "1", "--train-subset", "96",
                           "--test-subset", "48", "--null-draws", "0", "--finetune-epochs", "0", "--sweep", "0.5",
                           "--device", "cpu"], capture_output=True, text=True, cwd=work, env=_clean_env(),
                          timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert (work / "demo" / "summary.json").is_file() and (work / "demo" / "report.html").is_file()
    assert "What happened" in demo.stdout

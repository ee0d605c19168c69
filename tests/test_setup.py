"""scripts/setup.sh's NVIDIA driver check: on a GPU machine it must stop (exit 1, one error line naming the driver
found and the >= 580 needed) before a venv is made or anything is installed. Runs the script on a copy of it in a
tmp dir (it works in `$(dirname "$0")/..`), driver faked with RLVR_NVIDIA_DRIVER or a fake nvidia-smi; no network.

Every case also sets PYTHON=/nonexistent-python: the script's first step after the driver check (and the stamp
check, which passes through since the tmp dir has no .venv) is its Python version check, which then fails with
127 before `python -m venv` or any pip call. So a passing driver check stops there, and a broken one can never
start an install.
"""
import os
import shutil
import subprocess

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_PYTHON = "/nonexistent-python"


def _run(tmp_path: Path, extra_path: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = os.environ.get("PATH", "/usr/bin:/bin")
    if extra_path is not None:
        path = f"{extra_path}{os.pathsep}{path}"
    return subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env={"PATH": path, "PYTHON": NO_PYTHON, **env}, timeout=60)


def _driver_error(r: subprocess.CompletedProcess) -> bool:
    return "[setup] error:" in r.stdout + r.stderr


def _assert_stopped(r: subprocess.CompletedProcess, tmp_path: Path, found: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("[setup] error:")]
    assert len(errors) == 1, r.stderr
    assert found in errors[0] and ">= 580" in errors[0] and "580.65.06" in errors[0], errors[0]
    assert "upgrade the NVIDIA driver" in errors[0], errors[0]
    assert NO_PYTHON not in r.stderr  # stopped before the Python check, so before venv and pip
    assert not (tmp_path / ".venv").exists()


def test_old_driver_stops_before_venv(tmp_path):
    r = _run(tmp_path, RLVR_NVIDIA_DRIVER="535.104.05")
    _assert_stopped(r, tmp_path, "535.104.05")
    assert "too old" in r.stderr


@pytest.mark.parametrize("version", ["580.40.07", "575.57.08", "580.65"])
def test_a_580_driver_below_cuda_13s_minimum_stops_too(tmp_path, version):
    """Versions compare in full (580.40 < 580.65.06 < 580.82 < 610), not by the major number alone."""
    _assert_stopped(_run(tmp_path, RLVR_NVIDIA_DRIVER=version), tmp_path, version)


@pytest.mark.parametrize("version", ["580.82.07", "610"])
def test_newer_drivers_pass(tmp_path, version):
    assert f"NVIDIA driver {version}: ok" in _run(tmp_path, RLVR_NVIDIA_DRIVER=version).stdout


def test_unparsable_driver_stops_before_venv(tmp_path):
    r = _run(tmp_path, RLVR_NVIDIA_DRIVER="not-a-version")
    _assert_stopped(r, tmp_path, "'not-a-version'")


def test_driver_580_passes_the_check(tmp_path):
    r = _run(tmp_path, RLVR_NVIDIA_DRIVER="580.65.06")
    out = r.stdout + r.stderr
    assert not _driver_error(r), out
    assert "[setup] NVIDIA driver 580.65.06: ok (>= 580.65.06)" in r.stdout
    # Past the check, the script stops at its Python check (PYTHON does not exist), not for the driver.
    assert r.returncode not in (0, 1), (r.returncode, out)
    assert NO_PYTHON in r.stderr
    assert not (tmp_path / ".venv").exists()


def test_nvidia_smi_driver_is_read(tmp_path):
    # Without RLVR_NVIDIA_DRIVER, the version comes from nvidia-smi's first line (one line per GPU).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "$1" = -L ]; then echo "GPU 0: Fake GPU"; echo "GPU 1: Fake GPU"; exit 0; fi\n'
                    'printf "575.51.03\\n575.51.03\\n"\n')
    fake.chmod(0o755)
    work = tmp_path / "repo"
    work.mkdir()
    r = _run(work, extra_path=bin_dir)
    _assert_stopped(r, work, "575.51.03")

"""The DVC pipeline as a user drives it: `dvc repro` in a fresh clone, then a no-op second run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
def test_repro_base_preprocess_then_noop(repo_copy):
    dvc(repo_copy, "repro", "base", "preprocess")
    assert (repo_copy / "models/base/model.safetensors").exists()
    metrics = json.loads((repo_copy / "metrics/data.json").read_text())
    assert metrics["rows_kept"] >= 300 and metrics["rejected"]["invalid"] == 0
    for split in ("train", "val", "test"):
        assert (repo_copy / f"data/processed/{split}.jsonl").stat().st_size > 0
    assert "Data and pipelines are up to date" in dvc(repo_copy, "status", "base", "preprocess").stdout
    again = dvc(repo_copy, "repro", "base", "preprocess").stdout
    assert "didn't change, skipping" in again and "Running stage" not in again
    dag = dvc(repo_copy, "dag").stdout
    assert "base" in dag and "preprocess" in dag

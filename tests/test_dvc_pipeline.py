"""The DVC pipeline as a user drives it: `dvc repro` in a fresh clone, then a no-op second run."""

from __future__ import annotations

import json
import os
import re
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


def test_dag_has_exactly_the_declared_edges():
    """Which stage feeds which, as DVC derives it from the declared deps and outs: a missing dep (a stage that
    would not rerun when its input changes) or an extra one (a needless retrain) changes this set."""
    root = Path(__file__).resolve().parents[1]
    dot = dvc(root, "dag", "--dot").stdout
    edges = set(re.findall(r'"(\w+)" -> "(\w+)"', dot))
    assert edges == {
        ("base", "preprocess"), ("base", "synthetic"), ("base", "train"), ("base", "merge"), ("base", "evaluate"),
        ("base", "package"), ("preprocess", "synthetic"), ("preprocess", "train"), ("preprocess", "merge"),
        ("preprocess", "evaluate"), ("docs_snapshot", "synthetic"), ("synthetic", "train"), ("train", "merge"),
        ("train", "package"), ("merge", "evaluate"), ("merge", "package"), ("base", "evaluate_base"),
        ("preprocess", "evaluate_base"), ("evaluate_base", "evaluate"), ("synthetic", "evaluate"),
        ("machine", "evaluate_base"), ("machine", "evaluate"),
    }  # fmt: skip

"""Training runs under `paths.checkpoint_dir` (a persisted DVC out): one folder per run key, a hash of everything
that decides the adapter. A killed run resumes from its last complete checkpoint; a finished one left `final/`
(adapter, metrics, curve), which is exported again instead of retrained. The `KEEP` most recently used runs stay,
so switching a param and back costs a copy, not a training; older ones go, after a run succeeds, never before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from llmops import io, log

KEEP = 3  # runs kept (each: two resumable checkpoints + the finished adapter); ~3 x 180 MB on the CPU default
FINAL = "final"


def run_key(train: dict, seed: int, max_seq_len: int, base_dir: Path, data_files: list[Path], world: int) -> str:
    """Checkpoints are resumable only by a run with the same params, base model, data and process count."""
    prov = base_dir / "provenance.json"
    blob = {"train": train, "seed": seed, "max_seq_len": max_seq_len, "world": world,
            "base": prov.read_text() if prov.exists() else str(base_dir)}  # fmt: skip
    h = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode())
    for f in data_files:
        h.update(io.sha256_file(f).encode())
    return h.hexdigest()[:16]


def open_run(root: Path, key: str) -> Path:
    """`<root>/<key>/`, created if new and marked as just used (its mtime orders the runs for `prune`)."""
    run_dir = root / key
    run_dir.mkdir(parents=True, exist_ok=True)
    os.utime(run_dir)
    return run_dir


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N that was fully written (the Trainer saves trainer_state.json last); partial ones
    (killed mid-save) are removed first so transformers never picks one."""
    from transformers.trainer_utils import get_last_checkpoint

    for c in run_dir.glob("checkpoint-*"):
        if not (c / "trainer_state.json").exists():
            shutil.rmtree(c, ignore_errors=True)
    last = get_last_checkpoint(str(run_dir))
    return Path(last) if last else None


def prune(root: Path, keep: int = KEEP) -> list[Path]:
    """Delete all but the `keep` most recently used runs; returns what went."""
    runs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=os.path.getmtime)
    gone = runs[: max(0, len(runs) - keep)]
    for d in gone:
        log.get("train").info("prune_run", path=str(d))
        shutil.rmtree(d, ignore_errors=True)
    return gone

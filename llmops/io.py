"""Atomic writes: an output is either the previous complete version or the new complete one.

Everything is written to a temporary sibling first and renamed into place, so a killed stage or a
full disk never leaves a half-written file or folder where DVC (or a serving box) would pick it up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmops.stage import StageError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Stable JSON (sorted keys, UTF-8 kept readable) so DVC hashes only change with content."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


class DataFileError(StageError):
    """A data file that cannot be read; the message names the file, the line and the fix."""


def read_jsonl(
    path: str | Path, fix: str = "the file is truncated or corrupt; rerun the stage that writes it (dvc repro)"
) -> list[dict]:
    """One dict per non-blank line; a line that is not a JSON object raises DataFileError naming it and `fix`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}: line {n} is not valid JSON ({e.msg}); {fix}") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path}: line {n} is not a JSON object; {fix}")
            rows.append(row)
    return rows


def read_json(path: str | Path) -> Any:
    """A JSON file, or DataFileError naming it (truncated, corrupt) and the fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFileError(
            f"{path}: not valid JSON ({e.msg}, line {e.lineno}); rerun the stage that writes it (dvc repro)"
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: Path) -> None:
    """Delete `.name.tmp-PID` / `.name.old-PID` left by a killed run (PID no longer alive): a merged
    8B model is 16 GB, and a kill -9 per run must not pile them up. Live writers are left alone."""
    for f in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = f.name[len(path.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces `path`, on error it is removed.

    The previous `path` survives until the new one is complete (then it is swapped out), so a
    kill or an exception at any point leaves either the old artifact or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = _tmp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

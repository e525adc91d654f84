"""What every stage shares: its one error type and its command-line entry point.

A stage's `main(params_file)` raises `StageError` (or a subclass: bad params, a bad data file, a damaged model
folder) with a message that names the file/row/key and the fix. `run(name, main)` turns that into one line on
stderr and exit status 1. What a failed stage leaves behind is the same for all of them, so the line says it:
every out in dvc.yaml is `persist: true` (DVC does not delete it before the command) and every write is atomic
(llmops.io), so the outputs still hold the last good run.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from typing import Any

KEPT = "outputs not replaced: they still hold the last good run"


class StageError(RuntimeError):
    """A stage cannot finish; the message names what is wrong and how to fix it."""


def run(name: str, main: Callable[[str], Any], doc: str | None = None) -> None:
    """`python -m stages.<name> [--params FILE]`: run `main`, and on a known failure print one line and exit 1."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=(doc or "").strip().split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    args = ap.parse_args()
    try:
        main(args.params)
    except StageError as e:
        sys.exit(f"{name}: error: {e}; {KEPT}")
    except FileNotFoundError as e:  # an input the stage's own checks did not name
        sys.exit(f"{name}: error: {e.filename}: missing; `dvc repro` makes the inputs of this stage; {KEPT}")
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        sys.exit(f"{name}: error: disk full{where} ({e.strerror}); free space and rerun; {KEPT}")

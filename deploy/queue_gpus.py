"""Start one `dvc queue` worker per GPU, each seeing only its own GPU (CUDA_VISIBLE_DEVICES).

    python -m deploy.queue_gpus --gpus 0,1,2,3 [--timeout 120]

Queue the experiments first (`dvc exp run --queue -S train.lr=...`): workers exit once the queue is empty.
DVC has no per-worker settings, but a worker inherits the environment of the `dvc queue start` that spawned it
(and passes it on to the experiments it runs), and `dvc queue start -j N` spawns only those of workers 1..N that
are not up yet. So worker 1 comes from `CUDA_VISIBLE_DEVICES=0 dvc queue start -j 1`, and once it has registered
worker 2 from `CUDA_VISIBLE_DEVICES=1 dvc queue start -j 2`, and so on: waiting for each one keeps the next start
from spawning a second worker 1. At most one worker per queued experiment is started.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from llmops import log

DVC = (sys.executable, "-m", "dvc")
WORKERS = re.compile(r"Worker status: (\d+) active, (\d+) idle")


class QueueError(RuntimeError):
    """One line: what failed and what to do."""


def _dvc(*args: str, env: Mapping[str, str] | None = None) -> str:
    # Output goes to files, not pipes: `dvc queue start` leaves a daemon holding its stdout/stderr, and reading a
    # pipe to its end would wait for that worker to exit.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run([*DVC, *args], stdout=out, stderr=err, text=True, env=env, timeout=300).returncode
        out.seek(0)
        err.seek(0)
        if code:
            last = (err.read().strip().splitlines() or ["(no output)"])[-1]
            raise QueueError(f"`dvc {' '.join(args)}` failed: {last}")
        return out.read()


def status() -> tuple[int, int]:
    """(workers up, experiments queued) from `dvc queue status`."""
    out = _dvc("queue", "status")
    m = WORKERS.search(out)
    if not m:
        raise QueueError(f"`dvc queue status` printed no worker status line: {out.strip()[-200:]!r}")
    queued = sum(1 for line in out.splitlines() if line.split()[-1:] == ["Queued"])
    return int(m[1]) + int(m[2]), queued


def start(gpus: list[str], timeout_s: float = 120.0, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Start workers 1..n with CUDA_VISIBLE_DEVICES = gpus[0..n-1], n = min(GPUs, queued experiments);
    returns the GPUs that got a worker."""
    logger = log.get("queue_gpus")
    up, queued = status()
    if up:
        raise QueueError(f"{up} queue worker(s) already running with GPUs we can't know; `dvc queue stop` first")
    if not queued:
        raise QueueError("no queued experiments: queue them first (`dvc exp run --queue -S train.lr=...`)")
    used = gpus[:queued]
    # DVC spawns workers as `dvc` and dvc.yaml says `python`: this venv's, first on PATH
    path = os.pathsep.join([os.path.dirname(sys.executable), environ.get("PATH", "")])
    for n, gpu in enumerate(used, 1):
        _dvc("queue", "start", "-j", str(n), env={**environ, "PATH": path, "CUDA_VISIBLE_DEVICES": gpu})
        deadline = time.monotonic() + timeout_s
        while status()[0] < n:
            if time.monotonic() > deadline:
                raise QueueError(
                    f"worker {n} (GPU {gpu}) did not register within {timeout_s:.0f} s; "
                    f"see .dvc/tmp/exps/celery/dvc-exp-worker-{n}.out, then `dvc queue stop`"
                )
            time.sleep(1)
        logger.info("worker_started", worker=n, cuda_visible_devices=gpu)
    return used


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m deploy.queue_gpus", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", required=True, help="comma-separated GPU ids (or UUIDs), one worker each: 0,1,2,3")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each worker to register")
    args = ap.parse_args(argv)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    try:
        if len(set(gpus)) != len(gpus) or not gpus:
            raise QueueError(f"--gpus {args.gpus!r}: give distinct GPU ids, e.g. --gpus 0,1")
        start(gpus, args.timeout)
    except QueueError as e:
        sys.exit(f"queue_gpus: error: {e}")


if __name__ == "__main__":
    main()

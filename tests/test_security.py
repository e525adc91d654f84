"""Security: secrets come only from the environment and land nowhere (DVC files, logs, metrics, MLflow, the package);
model code is never trusted unless params say so; only safetensors are loaded and packaged, never pickles.

The served endpoint refusing requests without the key when auth is on (401) is checked by
tests/test_serve.py::test_publish_pull_and_serve_end_to_end (one vLLM cold start for the suite), and the launcher
keeping the key out of argv by tests/test_serve.py::test_auth_key_only_in_the_child_env.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import typing
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from llmops import config, modeling
from llmops.stage import StageError
from tests.conftest import ROOT, free_port, write_params, write_processed

# Planted values: distinctive, so a hit anywhere is a leak and never a coincidence.
SECRETS = {
    "HUGGINGFACE_TOKEN": "hf_PLANTEDhuggingfaceTOKENq7731",
    "API_KEY": "sk-PLANTED-serve-api-key-5512",
    "TEACHER_API_KEY": "sk-PLANTED-teacher-key-9034",
    "MLFLOW_TRACKING_PASSWORD": "PLANTED-mlflow-password-2208",
}
MLFLOW_PASSWORD = "PLANTED-mlflow-uri-password-6604"  # only ever inside MLFLOW_TRACKING_URI
SHELL_VARS = ("MLFLOW_TRACKING_URI", "LOG_DIR", "ENABLE_AUTH", "VLLM_ENDPOINT", "DVC_EXP_NAME", *SECRETS)


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHELL_VARS}
    # INFO: the scans must see the stages' real log lines, whatever LOG_LEVEL the developer's shell has.
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "OMP_NUM_THREADS": "1",
            "LOG_LEVEL": "INFO", **extra}  # fmt: skip


def leaks(values: dict[str, str], *roots: Path, text: str = "", skip: tuple[str, ...] = (".git",)) -> list[str]:
    """Every (secret name, place) where a planted value occurs: file bytes under `roots`, and `text` (console)."""
    hits = [f"{name} on the console" for name, v in values.items() if v in text]
    for root in roots:
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
        for f in files:
            if root.is_dir() and set(f.relative_to(root).parts) & set(skip):
                continue
            data = f.read_bytes()
            hits += [f"{name} in {f}" for name, v in values.items() if v.encode() in data]
    return hits


# ---------------------------------------------------------------------------------------------- secrets


def _secret_like(name: str) -> bool:
    return bool(set(name.lower().split("_")) & {"key", "token", "password", "passwd", "secret", "credential"})


def test_params_schema_has_no_field_that_could_hold_a_secret():
    """A secret-looking param may only name an environment variable (`*_env`), never hold the value."""
    seen, bad, todo = set(), [], list(config.SECTIONS.values())
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        for name, f in cls.model_fields.items():
            if _secret_like(name) and not name.endswith("_env"):
                bad.append(f"{cls.__name__}.{name}")
            for tp in (f.annotation, *typing.get_args(f.annotation)):
                for t in (tp, *typing.get_args(tp)):
                    if isinstance(t, type) and issubclass(t, config.Section):
                        todo.append(t)
    assert len(seen) > len(config.SECTIONS)  # nested sections (teacher, docs, sources) were walked too
    assert bad == []


def _set(p: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        p = p[k]
    p[last] = value


@pytest.mark.slow
def test_pipeline_writes_no_secret_anywhere(repo_copy, tiny_model_dir):
    """`dvc repro package` on the tiny model with every secret planted: not in dvc.lock, logs, metrics, the MLflow
    store, the package, any other output or the DVC cache, nor on the console."""
    repo = repo_copy
    p = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in {
        "base.model": str(tiny_model_dir), "base.sha256": "", "base.gguf_file": "",
        "synthetic.max_rows": 40,
        "train.method": "lora", "train.max_steps": 2, "train.eval_every": 2, "train.save_every": 2,
        "train.tokens_per_batch": 1024,
        "merge.parity_samples": 2,
        "package.max_model_len": 512,
    }.items():  # fmt: skip
        _set(p, dotted, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))
    env = env_with(**SECRETS, MLFLOW_TRACKING_USERNAME="alice", ENABLE_AUTH="1", LOG_DIR=str(repo / "logs"))
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "package"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # the places the scan must cover really hold what the run produced (else the scan proves nothing)
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"base", "preprocess", "synthetic", "train", "merge", "package"} <= stages.keys()
    for stage in ("base", "preprocess", "synthetic", "train", "merge", "package"):
        assert (repo / f"logs/{stage}.jsonl").stat().st_size > 0, stage
    assert (repo / "mlflow.db").stat().st_size > 0 and (repo / "models/package/manifest.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and runs[0].data.params["max_steps"] == "2"

    assert leaks(SECRETS, repo, text=proc.stdout + proc.stderr) == []


class _KeyRecordingTeacher:
    """FakeTeacher from test_synthetic, also recording the Authorization header of every request."""

    @staticmethod
    def make():
        from tests.test_synthetic import FakeTeacher

        class Recording(FakeTeacher):
            auth: list[str | None] = []

            def do_GET(self):
                type(self).auth.append(self.headers.get("Authorization"))
                super().do_GET()

            def do_POST(self):
                type(self).auth.append(self.headers.get("Authorization"))
                super().do_POST()

        return Recording


def test_teacher_key_is_sent_but_never_written(tmp_path, tiny_model_dir):
    handler = _KeyRecordingTeacher.make()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        over = {
            "paths.docs_snapshot": str(ROOT / "data/docs_snapshot.json"),
            "synthetic.generator": "teacher",
            "synthetic.teacher.base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
            "synthetic.teacher.model": "fake-teacher",
            "synthetic.teacher.n_prompts": 4,
        }
        params = write_params(tmp_path, over, base_dir=tiny_model_dir)
        write_processed(tmp_path / "data/processed")
        env = env_with(**SECRETS, LOG_DIR=str(tmp_path / "logs"))
        proc = subprocess.run([sys.executable, "-m", "stages.synthetic", "--params", str(params)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert handler.auth and set(handler.auth) == {f"Bearer {SECRETS['TEACHER_API_KEY']}"}  # used, from the env
    assert (tmp_path / "data/synthetic/teacher_cache.jsonl").stat().st_size > 0
    assert (tmp_path / "logs/synthetic.jsonl").stat().st_size > 0
    assert leaks(SECRETS, tmp_path, text=proc.stdout + proc.stderr) == []


def test_hub_token_is_not_echoed_when_the_download_fails(tmp_path):
    params = write_params(tmp_path, {"base.model": "hf:some-org/gated-model", "base.sha256": "", "base.gguf_file": ""})
    env = env_with(**SECRETS, HF_HUB_OFFLINE="1", LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run([sys.executable, "-m", "stages.base", "--params", str(params)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("base: error: hf:some-org/gated-model@main: download failed")
    assert leaks(SECRETS, tmp_path, text=proc.stdout + proc.stderr) == []
    assert not (tmp_path / "models/base").exists()


def _train_setup(tmp: Path, tiny: Path) -> Path:
    over = {"train.method": "lora", "train.max_steps": 2, "train.eval_every": 2, "train.save_every": 2,
            "train.tokens_per_batch": 1024}  # fmt: skip
    tmp.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp, over, base_dir=tiny)
    write_processed(tmp / "data/processed")
    (tmp / "data/synthetic").mkdir(parents=True)
    (tmp / "data/synthetic/train.jsonl").write_text("")
    return params


def test_mlflow_uri_password_is_masked_when_the_server_is_down(tmp_path, tiny_model_dir):
    port = free_port()
    uri = f"http://alice:{MLFLOW_PASSWORD}@127.0.0.1:{port}"
    env = env_with(MLFLOW_TRACKING_URI=uri, LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(_train_setup(tmp_path, tiny_model_dir))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: MLFLOW_TRACKING_URI=") and f"127.0.0.1:{port}" in last, last
    assert leaks({"uri password": MLFLOW_PASSWORD}, tmp_path, text=proc.stdout + proc.stderr) == []


@pytest.mark.slow
def test_mlflow_uri_with_credentials_tracks_the_run_and_stores_no_password(tmp_path, tiny_model_dir, mlflow_server):
    """A basic-auth tracking URI (a password in it) works, and the password lands nowhere: not in the server's store,
    its artifacts, our logs/outputs, nor the console (MLflow prints run URLs on its own)."""
    run_dir = tmp_path / "run"
    params = _train_setup(run_dir, tiny_model_dir)
    with_password = mlflow_server.replace("http://", f"http://alice:{MLFLOW_PASSWORD}@")
    env = env_with(MLFLOW_TRACKING_URI=with_password, LOG_DIR=str(run_dir / "logs"))
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(params)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:].replace(MLFLOW_PASSWORD, "***")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("llmops-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == "2"
    assert leaks({"uri password": MLFLOW_PASSWORD}, tmp_path, text=proc.stdout + proc.stderr) == []


# ---------------------------------------------------------------------------------------------- remote code


class Calls(list):
    """(stage, loader, kwargs) per call; `stage` names the stage running now."""

    stage = "?"


@pytest.fixture
def loader_calls(monkeypatch) -> Calls:
    """Records every AutoModelForCausalLM / AutoTokenizer.from_pretrained call; the calls go through."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = Calls()
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def record(*a, _real=real, _name=cls.__name__, **k):
            calls.append((calls.stage, _name, dict(k)))
            return _real(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", staticmethod(record))
    return calls


def _run_in_process(calls, name: str, params: Path) -> None:
    import importlib

    calls.stage = name
    importlib.import_module(f"stages.{name}").main(str(params))


@pytest.mark.slow
def test_remote_code_is_never_trusted_by_default(tmp_path, tiny_model_dir, loader_calls):
    """Every stage that loads a model or tokenizer, on default params: trust_remote_code is never True."""
    params = write_params(tmp_path, {
        "base.model": str(tiny_model_dir), "base.sha256": "", "base.gguf_file": "",
        "preprocess.sources": [{"path": str(ROOT / "data/raw/seed_en.jsonl"), "format": "auto"}],
        "paths.docs_snapshot": str(ROOT / "data/docs_snapshot.json"), "synthetic.max_rows": 10,
        "train.method": "lora", "train.max_steps": 1, "train.eval_every": 1, "train.save_every": 1,
        "train.tokens_per_batch": 1024, "merge.parity_samples": 1,
        "evaluate.engine": "hf", "evaluate.max_samples": 2, "evaluate.max_new_tokens": 2,
        "package.max_model_len": 512,
    })  # fmt: skip
    assert yaml.safe_load(params.read_text())["base"]["trust_remote_code"] is False
    stages = ("base", "preprocess", "synthetic", "train", "merge", "evaluate", "package")
    for name in stages:
        _run_in_process(loader_calls, name, params)
    assert {s for s, _, _ in loader_calls} == set(stages)  # each stage really loaded something
    trusted = [(s, loader) for s, loader, k in loader_calls if k.get("trust_remote_code", False) is not False]
    assert trusted == []


def test_trust_remote_code_reaches_the_loaders_only_when_params_say_so(tmp_path, tiny_model_dir, loader_calls):
    from tests.test_package import build_package

    over = {"base.model": str(tiny_model_dir), "base.sha256": "", "base.gguf_file": "", "base.trust_remote_code": True}
    _run_in_process(loader_calls, "base", write_params(tmp_path, over))
    loader_calls.stage = "package"
    build_package(tmp_path / "pkg", tiny_model_dir, {"base.trust_remote_code": True})
    got = {(s, loader): k.get("trust_remote_code") for s, loader, k in loader_calls}
    assert got == {
        ("base", "AutoModelForCausalLM"): True,
        ("base", "AutoTokenizer"): True,
        ("package", "AutoTokenizer"): True,
    }


# ---------------------------------------------------------------------------------------------- pickles


def test_base_refuses_a_pickle_only_model_folder(tmp_path):
    src = tmp_path / "pickles"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: never loaded
    params = write_params(tmp_path, {"base.model": str(src), "base.sha256": "", "base.gguf_file": ""})
    proc = subprocess.run([sys.executable, "-m", "stages.base", "--params", str(params)], cwd=ROOT, env=env_with(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"base: error: {src}: no *.safetensors weights") and "never pickles" in last
    assert not (tmp_path / "models/base").exists()


class _Boom:
    """Unpickling this runs a command: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_beside_safetensors_is_never_unpickled_or_copied(tmp_path, tiny_model_dir):
    from stages import base

    src, marker = tmp_path / "src", tmp_path / "UNPICKLED"
    shutil.copytree(tiny_model_dir, src)
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    out = base.main(str(write_params(tmp_path, {"base.model": str(src), "base.sha256": "", "base.gguf_file": ""})))
    assert not marker.exists(), "the base stage unpickled pytorch_model.bin"
    assert not [f.name for f in out.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert set(json.loads((out / "provenance.json").read_text())["sha256"]) == {"model.safetensors"}


def test_model_loader_refuses_a_folder_with_only_pytorch_weights(tmp_path, tiny_model_dir):
    """What train/merge/evaluate load through: a valid torch checkpoint (loadable if allowed) is refused."""
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "torch-only"
    d.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, d / name)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), d / "pytorch_model.bin")
    with pytest.raises(modeling.ModelLoadError, match=r"torch-only: no \*\.safetensors weights \(only safetensors"):
        modeling.load_model(d, quantize_4bit=False, dtype="float32", device_map="cpu")
    (d / "model.safetensors").write_bytes(b"")  # a placeholder next to the pickle does not get it loaded either
    with pytest.raises(modeling.ModelLoadError, match="corrupt safetensors"):
        modeling.load_model(d, quantize_4bit=False, dtype="float32", device_map="cpu")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "optimizer.pt", "rng_state.pth", "scaler.pkl",
                                  "last.ckpt", "extra.pickle", "model.joblib"])  # fmt: skip
def test_package_refuses_pickled_files(tmp_path, tiny_model_dir, name):
    from tests.test_package import build_package

    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(StageError, match=f"pickled weights \\['{name}'\\] are never packaged"):
        build_package(tmp_path, merged)
    assert not (tmp_path / "models/package").exists()


def test_package_cli_refuses_a_pickle_in_one_line(tmp_path, tiny_model_dir):
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    (merged / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    params = write_params(tmp_path, {"paths.merged_dir": str(merged), "package.max_model_len": 512}, merged)
    proc = subprocess.run([sys.executable, "-m", "stages.package", "--params", str(params)], cwd=ROOT, env=env_with(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"package: error: {merged}: pickled weights ['pytorch_model.bin'] are never packaged (save with safetensors);"
    )
    assert not (tmp_path / "models/package").exists()

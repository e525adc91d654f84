"""llmops.doctor: secrets never leak, the params verdict is right here, and GPU rules hold on a described GPU box."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest
import torch

from llmops import config, doctor
from tests.conftest import ROOT, write_params

SECTIONS = [s for s in config.SECTIONS if s != "paths"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The developer's shell must not change the verdict, and tests never reach for the Hub."""
    for k in ("MLFLOW_TRACKING_URI", "HUGGINGFACE_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _doctor(capsys, params, *args) -> tuple[int, str, str]:
    rc = doctor.main(["--params", str(params), *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _problems(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("problem:")]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_token_value_never_appears(tmp_path, capsys, monkeypatch):
    token = "hf_PlantedDoctorSecret0123456789xyz"
    monkeypatch.setenv("HUGGINGFACE_TOKEN", token)
    # The token also rides in a tracking URI's password: error messages must not echo it either.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{token}@127.0.0.1:{_closed_port()}")
    params = write_params(tmp_path, {"base.model": "hf:meta-llama/Meta-Llama-3-8B-Instruct"})

    _, text, err = _doctor(capsys, params)
    _, js, err_js = _doctor(capsys, params, "--json")

    assert "HUGGINGFACE_TOKEN  present" in text
    assert json.loads(js)["secrets"] == {"HUGGINGFACE_TOKEN": True}
    for out in (text, err, js, err_js):
        for part in (token, token[3:15], token[-12:]):
            assert part not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU-only verdict")
@pytest.mark.parametrize("key, value", [("train.device_map", "cuda:0"), ("serve.device", "cuda")])
def test_cuda_params_on_this_cpu_box_fail_naming_the_key(tmp_path, capsys, key, value):
    rc, out, _ = _doctor(capsys, write_params(tmp_path, {key: value}))
    assert rc == 1
    problems = _problems(out)
    assert len(problems) == 1 and problems[0].startswith(f"problem: {key}="), out


def test_invalid_params_fail_with_one_line_per_key(tmp_path, capsys):
    rc, out, _ = _doctor(capsys, write_params(tmp_path, {"train.lr": -1, "serve.port": 0}))
    assert rc == 1
    problems = _problems(out)
    assert len(problems) == 2 and any("train.lr" in p for p in problems) and any("serve.port" in p for p in problems)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default params are the CPU embedded default")
def test_default_params_pass_here(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out, _ = _doctor(capsys, "params.yaml")
    assert rc == 0, out
    assert "params: OK for this machine" in out and not _problems(out)


def test_json_report_parses_with_expected_keys(tmp_path, capsys):
    rc, out, _ = _doctor(capsys, write_params(tmp_path), "--json")
    report = json.loads(out)
    assert {"params_file", "system", "bitsandbytes", "vllm", "dvc", "mlflow", "secrets", "params"} <= report.keys()
    assert report["system"]["torch"] == torch.__version__
    assert report["system"]["cuda_available"] == torch.cuda.is_available()
    assert len(report["system"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["bitsandbytes"]["nf4_forward"] is True  # the pinned bitsandbytes runs nf4 on CPU
    assert report["vllm"]["flavour"] in ("cpu", "cuda")
    assert report["mlflow"]["uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}" and report["mlflow"]["reachable"] is True
    assert report["params"]["ok"] is (rc == 0) and isinstance(report["params"]["warnings"], list)


def test_unreachable_http_mlflow_is_reported_quickly(tmp_path, capsys, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    rc, out, _ = _doctor(capsys, write_params(tmp_path), "--json")
    # A bound, not a benchmark: MLflow's own client would retry for minutes; doctor gives up after 2 s.
    assert time.monotonic() - t0 < 30
    report = json.loads(out)
    assert rc == 1 and report["mlflow"]["reachable"] is False
    mlflow_problems = [p for p in report["params"]["problems"] if p.startswith("mlflow:")]
    assert len(mlflow_problems) == 1 and f"127.0.0.1:{port} unreachable" in mlflow_problems[0]


def test_reachable_http_mlflow_health():
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert doctor.reach(url, "/health") == (True, "GET /health: HTTP 200")
        assert doctor.reach(url, "/nope")[0] is False
    finally:
        server.shutdown()
        server.server_close()


def _fake_box(gpus: list[dict], ram_gib: float = 100.0) -> dict:
    """What run() would report on a CUDA box with CUDA vLLM, everything else healthy."""
    return {
        "system": {"torch": "2.x+cu", "gpus": gpus, "cpu_bf16_native": True, "ram_available_gib": ram_gib},
        "bitsandbytes": {"nf4_forward": True},
        "vllm": {"flavour": "cuda", "dist": "vllm", "version": "0.x", "matches_device": True},
        "dvc": {"remote": "store", "reachable": True, "detail": "ok"},
        "mlflow": {"uri": "sqlite:///mlflow.db", "reachable": True, "detail": "ok"},
        "secrets": {"HUGGINGFACE_TOKEN": True},
        "hf_reachable": True,
    }


def _gpu(i: int, name: str, total: float, free: float, bf16: bool) -> dict:
    return {"index": i, "name": name, "total_gib": total, "free_gib": free, "bf16": bf16}


def test_gpu_rules_on_a_t4(tmp_path):
    overrides = {"serve.tensor_parallel_size": 2, "train.compute_dtype": "bfloat16"}
    p = config.load(write_params(tmp_path, overrides), *SECTIONS)
    problems, _ = doctor.check(p, _fake_box([_gpu(0, "Tesla T4", 15.6, 15.2, bf16=False)]))
    assert len(problems) == 2
    assert problems[0].startswith("train.compute_dtype=bfloat16 but GPU 0 (Tesla T4) lacks bf16")
    assert problems[1] == "serve.tensor_parallel_size=2 but this box has 1 GPU(s)"


@pytest.mark.parametrize("method, expect", [("qlora", ["serve"]), ("lora", ["train.method=lora", "serve"])])
def test_model_too_big_for_the_gpu(tmp_path, method, expect):
    base = tmp_path / "base8b"
    base.mkdir()
    (base / "provenance.json").write_text(json.dumps({"parameters": 8_030_261_248}))  # LLaMA-3-8B
    p = config.load(write_params(tmp_path, {"train.method": method}, base_dir=base), *SECTIONS)
    # 16 GiB card with 12 GiB free: nf4 weights (~4.2 GiB) fit, bf16 (~15 GiB) do not, nor 0.9 x 16 GiB for vLLM.
    problems, _ = doctor.check(p, _fake_box([_gpu(0, "RTX 4080", 16.0, 12.0, bf16=True)]))
    assert [x.split(":")[0] for x in problems] == expect, problems


def test_merge_needs_room_for_one_fp32_copy(tmp_path):
    base = tmp_path / "base8b"
    base.mkdir()
    (base / "provenance.json").write_text(json.dumps({"parameters": 8_030_261_248}))
    p = config.load(write_params(tmp_path, {"train.method": "qlora"}, base_dir=base), *SECTIONS)
    # 8B params in fp32 are ~29.9 GiB: 12 GiB free VRAM + 16 GiB RAM are not enough, + 20 GiB RAM are.
    gpu = [_gpu(0, "RTX 4080", 16.0, 12.0, bf16=True)]
    small = [x for x in doctor.check(p, _fake_box(gpu, ram_gib=16.0))[0] if x.startswith("merge")]
    assert small == ["merge: works in fp32: 8.0B params need ~29.9 GiB of free VRAM + RAM; merge on a bigger box "
                     "(dvc repro merge there) or use a smaller base"]  # fmt: skip
    assert not [x for x in doctor.check(p, _fake_box(gpu, ram_gib=20.0))[0] if x.startswith("merge")]

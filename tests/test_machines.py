"""Both compute paths on any machine. AVX2-only CPUs compute in fp32, GPUs and AVX512-BF16/AMX CPUs in bf16
(`auto`); LLMOPS_NATIVE_BF16 makes this machine take either kind's decisions. bf16 is emulated on AVX2 CPUs
(slow), so everything here runs on the tiny model."""

from __future__ import annotations

import pytest
import torch

from llmops import hardware, io, modeling
from llmops.stage import StageError
from stages import evaluate, merge, train
from tests.test_train import _rows, setup_run


@pytest.fixture(params=["float32", "bfloat16"])
def kind(request, monkeypatch) -> str:
    """The dtype `auto` resolves to, as on an AVX2 box (float32) or a GPU / AVX512-BF16 box (bfloat16)."""
    monkeypatch.setenv(hardware.OVERRIDE, "1" if request.param == "bfloat16" else "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert modeling.resolve_dtype("auto") == request.param or torch.cuda.is_available()
    return request.param


def test_auto_decisions_follow_the_machine_kind(kind):
    assert hardware.cpu_has_native_bf16() == (kind == "bfloat16")
    forced = bool(hardware.cpu_flags() & set(hardware.BF16_FLAGS)) != (kind == "bfloat16")
    assert (hardware.OVERRIDE in hardware.cpu_kind()) == forced  # metrics say when the kind was overridden


def test_machine_stage_records_what_the_dtypes_follow(kind, tmp_path, monkeypatch):
    """The file evaluate_base/evaluate depend on changes when `auto` would resolve differently (here: the CPU
    kind, GPUs hidden) and not otherwise: a rerun on the same kind writes the same bytes, so DVC reruns nothing."""
    from stages import machine
    from tests.conftest import write_params

    params = write_params(tmp_path, {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU seen: the CPU kind decides
    out = machine.main(str(params))
    assert out == {"gpus": [], "cpu_native_bf16": kind == "bfloat16"}
    path = tmp_path / "metrics" / "machine.json"
    first = path.read_bytes()
    assert io.read_json(path) == out
    machine.main(str(params))
    assert path.read_bytes() == first
    monkeypatch.setenv(hardware.OVERRIDE, "0" if kind == "bfloat16" else "1")
    assert machine.main(str(params))["cpu_native_bf16"] != out["cpu_native_bf16"]


def test_train_merge_evaluate_pass_their_gates_and_a_botched_merge_fails(kind, tmp_path, tiny_model_dir, monkeypatch):
    over = {"train.max_steps": 4, "merge.parity_samples": 3, "evaluate.engine": "hf", "evaluate.max_samples": 4,
            "evaluate.max_new_tokens": 4}  # fmt: skip
    params = setup_run(tmp_path, tiny_model_dir, over)
    io.write_jsonl(tmp_path / "data/processed/test.jsonl", _rows("seed_ko.jsonl", 60, 4, "seed"))

    trained = train.main(str(params))
    assert trained["compute_dtype"] == kind and trained["machine"].startswith(hardware.cpu_kind())
    assert trained["eval_loss"] < trained["base_eval_loss"]
    merged = merge.main(str(params))
    assert merged["passed"] and merged["train_compute_dtype"] == kind and merged["parity_dtype"] == "float32"
    assert merged["vs_unmerged"]["mean_kl"] < 1e-4 and merged["vs_unmerged"]["top1_agreement"] > 0.99
    result = evaluate.main(str(params))
    assert result["compute"]["loss_dtype"] == kind and result["tuned"]["n"] == 4

    real = merge.merge_adapter

    def botched(base, adapter_dir):  # the negative control, on the same dtype: a sign bug in one layer
        model = real(base, adapter_dir)
        with torch.no_grad():
            model.model.layers[1].self_attn.o_proj.weight.mul_(-1.0)
        return model

    monkeypatch.setattr(merge, "merge_adapter", botched)
    with pytest.raises(StageError, match=r"merged vs unmerged: mean KL .* > merge\.max_kl"):
        merge.main(str(params))

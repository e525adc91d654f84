"""merge: the merged folder follows the contract, matches the unmerged adapter, and a bad merge never ships."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmops import config, io
from llmops.stage import StageError
from stages import merge
from tests.conftest import ROOT, make_adapter, write_params, write_processed


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", method="qlora")


def _params(tmp_path, tiny_model_dir, adapter_dir, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = {"merge.parity_samples": 3, "paths.adapter_dir": str(adapter_dir), **overrides}
    params = write_params(tmp_path, overrides, base_dir=tiny_model_dir)
    write_processed(tmp_path / "data" / "processed")
    return params, config.load(params, "merge")


def test_merge_writes_contract_and_matches_unmerged(tmp_path, tiny_model_dir, qlora_adapter):
    params, p = _params(tmp_path, tiny_model_dir, qlora_adapter)
    m = merge.main(str(params))
    out = tmp_path / "models" / "merged"
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "merge_provenance.json",
    } <= {f.name for f in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert 2 in gen["eos_token_id"]  # <|im_end|>: the served model stops at end of turn
    g = p.merge.generation  # the served sampling defaults (vLLM takes them for fields a request leaves out)
    assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["repetition_penalty"], gen["max_new_tokens"]) == (
        g.temperature > 0, g.temperature, g.top_p, g.repetition_penalty, g.max_new_tokens)  # fmt: skip
    prov = json.loads((out / "merge_provenance.json").read_text())
    assert prov["method"] == "qlora" and prov["base_weights"] == "original"
    # 16-bit, and the adapter really was folded in
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
    # figures: merged vs unmerged is rounding only; vs the nf4 model that trained also carries nf4 error
    assert set(m) == {"vs_unmerged", "vs_trained", "quantization_gap", "loss", "positions", "n_samples",
                      "n_positions", "passed", "parity_dtype", "train_compute_dtype", "machine"}  # fmt: skip
    assert m["passed"] and m["n_samples"] == 3 and m["positions"] == "assistant" and m["parity_dtype"] == "float32"
    assert m["vs_unmerged"]["max_logit_abs_diff"] < 0.05 and m["vs_unmerged"]["mean_kl"] < 1e-4
    assert m["vs_trained"]["mean_kl"] > m["vs_unmerged"]["mean_kl"]
    assert m["quantization_gap"]["mean_kl"] > 0  # the base's own nf4 error: part of vs_trained no merge removes
    loss = m["loss"]
    assert set(loss) == {"merged", "unmerged", "trained", "base_4bit", "base_16bit"}
    assert m["vs_unmerged"]["loss_diff"] == pytest.approx(loss["merged"] - loss["unmerged"])
    assert m["vs_trained"]["loss_diff"] == pytest.approx(loss["merged"] - loss["trained"])
    assert json.loads((tmp_path / "metrics" / "merge.json").read_text()) == json.loads(json.dumps(m))


def test_greedy_serving_default_saves_a_valid_greedy_config(tmp_path, tiny_model_dir, qlora_adapter):
    from transformers import GenerationConfig

    params, _ = _params(tmp_path, tiny_model_dir, qlora_adapter, **{"merge.generation.temperature": 0})
    merge.main(str(params))
    out = tmp_path / "models" / "merged"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False and "temperature" not in gen and "top_p" not in gen
    assert GenerationConfig.from_pretrained(out).repetition_penalty == gen["repetition_penalty"]


def test_corrupted_merge_fails_and_keeps_previous_merged_dir(tmp_path, tiny_model_dir, qlora_adapter, monkeypatch):
    params, p = _params(tmp_path, tiny_model_dir, qlora_adapter)
    out = tmp_path / "models" / "merged"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_text("previous good model")
    real_merge = merge.merge_adapter

    def corrupt(base, adapter_dir):
        model = real_merge(base, adapter_dir)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(-3.0)  # a sign/scale bug in one weight
        return model

    monkeypatch.setattr(merge, "merge_adapter", corrupt)
    with pytest.raises(StageError, match=r"parity check failed: merged vs unmerged: mean KL .* > merge\.max_kl 0\.01"):
        merge.main(str(params))
    assert [f.name for f in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "previous good model"
    assert not list(out.parent.glob(".merged.tmp-*"))  # no half-written staging dir left behind
    assert json.loads((tmp_path / "metrics" / "merge.json").read_text())["passed"] is False


def test_dequantized_base_matches_what_was_trained(tmp_path, tiny_model_dir, qlora_adapter):
    """Merging into dequantized nf4 weights reproduces the 4-bit+adapter model far better than W16 does."""
    params, _ = _params(tmp_path / "o", tiny_model_dir, qlora_adapter)
    original = merge.main(str(params))
    params, _ = _params(tmp_path / "d", tiny_model_dir, qlora_adapter, **{"merge.base_weights": "dequantized"})
    dequantized = merge.main(str(params))
    assert dequantized["vs_trained"]["mean_kl"] < original["vs_trained"]["mean_kl"] / 10
    assert dequantized["vs_unmerged"]["mean_kl"] < 1e-4


def test_wrong_adapter_is_refused_before_any_work(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "lora", method="lora")
    params, _ = _params(tmp_path, tiny_model_dir, adapter, **{"merge.base_weights": "dequantized"})
    with pytest.raises(StageError, match="dequantized needs a qlora adapter"):
        merge.main(str(params))
    prov = json.loads((adapter / "train_provenance.json").read_text())
    prov["base_provenance"]["sha256"] = "something else"
    io.write_json(adapter / "train_provenance.json", prov)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.merge", "--params", str(params)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("merge: error: ")
    assert "trained on another base" in proc.stderr
    assert not (tmp_path / "models" / "merged").exists()


def test_parity_figures_by_hand_and_nan_fails():
    # one position, vocab 2: p = softmax(0, 0) = (1/2, 1/2), q = softmax(0, ln 3) = (1/4, 3/4)
    # KL(p‖q) = 1/2·ln(2) + 1/2·ln(2/3) = 1/2·ln(4/3); |Δlogit| = (0, ln 3); argmax 0 vs 1;
    # target token 1: NLL ln 2 under p, ln(4/3) under q
    target = torch.tensor([1])
    got = merge.compare([(torch.tensor([[0.0, 0.0]]), target)], [(torch.tensor([[0.0, math.log(3)]]), target)])
    assert got == pytest.approx(
        {
            "max_logit_abs_diff": math.log(3),
            "mean_logit_abs_diff": math.log(3) / 2,
            "mean_kl": math.log(4 / 3) / 2,
            "top1_agreement": 0.0,
            "loss_diff": math.log(4 / 3) - math.log(2),
        }
    )
    zeros = (torch.zeros(2, 3), torch.tensor([0, 1]))
    nan = merge.compare([zeros], [(torch.tensor([[0.0, 0.0, 0.0], [0.0, float("nan"), 0.0]]), zeros[1])])
    assert math.isnan(nan["max_logit_abs_diff"]) and math.isnan(nan["mean_kl"])
    assert "mean KL nan > merge.max_kl" in merge.gate(nan, 0.01)  # NaN never passes the gate
    assert merge.gate({**got, "mean_kl": 0.009}, 0.01) is None


@pytest.mark.slow
def test_parity_figures_do_not_depend_on_the_machine_kind(tmp_path, base_model_dir, monkeypatch):
    """The gate compares in fp32 on every machine. Compared in the machine's bf16, a correct merge of the real model
    shows bf16's own rounding (max |Δlogit| > 1: the old absolute bound of 1.0 failed every AVX512-BF16 CPU and
    GPU); in fp32 only the final rounding of W + BA remains, the same on both kinds."""
    from llmops import hardware

    adapter = make_adapter(base_model_dir, tmp_path / "adapter", method="lora", b_std=0.002)
    figures = {}
    for kind in ("0", "1"):  # as an AVX2 box, then as an AVX512-BF16 box / GPU
        monkeypatch.setenv(hardware.OVERRIDE, kind)
        params, _ = _params(tmp_path / kind, base_model_dir, adapter, **{"merge.parity_samples": 4})
        m = merge.main(str(params))
        assert m["passed"], m
        figures[kind] = m["vs_unmerged"]
    assert figures["1"] == pytest.approx(figures["0"], rel=1e-3, abs=1e-6)
    assert figures["1"]["max_logit_abs_diff"] < 1.0 and figures["1"]["mean_kl"] < 1e-3

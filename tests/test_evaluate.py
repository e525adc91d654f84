"""evaluate: exact output shape, zero adapter → zero deltas, served stop tokens, vLLM fallback."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from llmops import chat, config, hardware, io, metrics, modeling
from stages import evaluate, merge
from tests.conftest import make_adapter, write_params, write_processed

SCOPE_KEYS = {"loss", "perplexity", "chrf", "rouge_l", "keyword_recall", "n"}


def _pipeline(tmp_path, tiny_model_dir, method: str, b_std: float, **overrides):
    """processed rows + a made adapter + the merge stage, then a params file for evaluate."""
    params = write_params(
        tmp_path,
        {
            "merge.parity_samples": 2,
            "evaluate.max_samples": 4,
            "evaluate.max_new_tokens": 8,
            "evaluate.batch_size": 3,
            "evaluate.engine": "hf",
            **overrides,
        },
        base_dir=tiny_model_dir,
    )
    p = config.load(params, "evaluate")
    write_processed(tmp_path / "data" / "processed", n_per_split=4)
    make_adapter(tiny_model_dir, tmp_path / "models" / "adapter", method=method, b_std=b_std)
    merge.main(str(params))
    return params, p


def test_outputs_have_exact_keys_and_auto_falls_back_to_hf(tmp_path, tiny_model_dir, monkeypatch):
    params, p = _pipeline(tmp_path, tiny_model_dir, "qlora", 0.05, **{"evaluate.engine": "auto"})

    def broken_vllm(*args, **kwargs):
        raise RuntimeError("no CPU kernels for this model")

    monkeypatch.setattr(evaluate, "vllm_usable", lambda: True)
    monkeypatch.setattr(evaluate, "generate_vllm", broken_vllm)
    res = evaluate.main(str(params))
    assert set(res) == {"base", "tuned", "delta", "compute", "timing_s"}
    for model in ("base", "tuned"):
        assert set(res[model]) == SCOPE_KEYS | {"en", "ko"}  # overall figures, then per language
        assert set(res[model]["en"]) == set(res[model]["ko"]) == SCOPE_KEYS
        assert res[model]["n"] == 4 and res[model]["en"]["n"] == res[model]["ko"]["n"] == 2
    assert set(res["delta"]) == SCOPE_KEYS - {"n"} | {"en", "ko"}
    assert set(res["delta"]["en"]) == set(res["delta"]["ko"]) == SCOPE_KEYS - {"n"}
    dtype = modeling.resolve_dtype("auto")  # what a reviewer needs to compare two machines' figures
    assert res["compute"] == {"machine": hardware.machine(), "loss_dtype": dtype, "generate_dtype": dtype,
                              "engine": "hf"}  # fmt: skip  # vLLM failed to start, auto fell back
    assert set(res["timing_s"]) == {"base", "tuned", "total"}
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text()) == res

    samples = io.read_jsonl(tmp_path / "metrics" / "samples.jsonl")
    assert len(samples) == 4 and [s["id"] for s in samples] == sorted(s["id"] for s in samples)
    assert set(samples[0]) == {"id", "lang", "prompt", "reference", "base", "tuned", "recall_base", "recall_tuned"}
    with open(tmp_path / "metrics" / "eval_plot.csv", encoding="utf-8") as f:
        plot = list(csv.DictReader(f))
    assert set(plot[0]) == {"metric", "model", "value"}
    assert len(plot) == 3 * 3 * 2  # (chrF, ROUGE-L, recall) x (all, en, ko) x (base, tuned)
    assert {r["model"] for r in plot} == {"base", "tuned"}


def test_zero_adapter_gives_zero_deltas(tmp_path, tiny_model_dir):
    params, p = _pipeline(tmp_path, tiny_model_dir, "lora", 0.0)
    res = evaluate.main(str(params))
    d = res["delta"]
    leaves = [v for k, v in d.items() if k not in ("en", "ko")] + [*d["en"].values(), *d["ko"].values()]
    assert len(leaves) == 15 and all(v == 0.0 for v in leaves if v is not None)
    assert d["loss"] == 0.0 and d["chrf"] == 0.0
    samples = io.read_jsonl(tmp_path / "metrics" / "samples.jsonl")
    assert all(s["base"] == s["tuned"] for s in samples)


def test_generation_stops_at_every_served_eos_id(tiny_model_dir):
    tok = modeling.load_tokenizer(tiny_model_dir)
    model = modeling.load_model(tiny_model_dir, quantize_4bit=False, dtype="bfloat16", device_map="cpu").eval()
    prompts = [chat.prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("What is DVC?", "LoRA가 뭐예요?")]
    eos, pad = evaluate.eos_ids(tiny_model_dir)
    assert eos == [2]
    with torch.inference_mode():
        first = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert all(t not in eos for t in first), "the random tiny model should not stop at once"
    free = evaluate.generate_hf(model, prompts, eos, pad, max_new=6, bs=2)  # left-padded batch of 2
    assert [a[0] for a in free] == first and all(len(a) <= 6 for a in free)
    # Declare each prompt's greedy first token a stop id as well: every answer now ends before it starts.
    assert evaluate.generate_hf(model, prompts, [*eos, *first], pad, max_new=6, bs=2) == [[], []]


@pytest.mark.slow
def test_vllm_engine_answers_like_hf_generate(base_model_dir):
    """The vllm engine (what serving runs) and HF generate agree on greedy answers of the real model."""
    pytest.importorskip("vllm")
    tok = modeling.load_tokenizer(base_model_dir)
    questions = ("How do I push DVC-tracked data to a remote?", "LoRA의 rank는 무엇을 조절하나요?")
    prompts = [chat.prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    eos, pad = evaluate.eos_ids(base_model_dir)
    served = evaluate.generate_vllm(base_model_dir, prompts, eos, max_new=12, dtype="bfloat16", seed=0)
    model = modeling.load_model(base_model_dir, quantize_4bit=False, dtype="bfloat16", device_map="cpu").eval()
    local = evaluate.generate_hf(model, prompts, eos, pad, max_new=12, bs=2)
    assert all(len(s) == 12 for s in served)  # no premature stop, max_new_tokens honoured
    # bf16 kernels differ (vLLM's CPU linear vs torch), so a near-tie may flip a token ("LoRa" vs "LoR"):
    # same first token, and near-identical text
    assert [s[0] for s in served] == [h[0] for h in local]
    texts = [[tok.decode(a) for a in answers] for answers in (served, local)]
    assert metrics.chrf(*texts) >= 70, texts

"""train: token-budget packing without cross-example attention, exact outputs per the adapter contract,
determinism, kill -9 + resume, MLflow tracking (sqlite and a real server), DDP under accelerate, clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmops import chat, checkpoints, config, io, modeling, packing, text, tracking
from llmops.stage import StageError
from stages import train
from tests.conftest import ROOT, free_port, write_params

FAST = {
    "train.method": "qlora",
    "train.max_steps": 4,
    "train.eval_every": 2,
    "train.save_every": 2,
    "train.tokens_per_batch": 1024,
    "train.lr": 5.0e-3,  # a random 2-layer model: big steps so the loss visibly moves in a few steps
    "train.warmup_ratio": 0.25,
    "train.compute_dtype": "auto",
    "train.device_map": "auto",
    "train.early_stopping_patience": 0,
}
ONE_EPOCH = {"train.max_steps": -1, "train.epochs": 1}


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count in every run (bitwise-comparable adapters); also far faster on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)


def _rows(name: str, start: int, n: int, source: str) -> list[dict]:
    out = []
    for r in io.read_jsonl(ROOT / "data/raw" / name)[start : start + n]:
        m = r["messages"]
        out.append(
            {"id": text.row_id(m), "messages": m, "lang": text.conversation_lang(m), "source": source, "n_tokens": 0}
        )
    return out


def setup_run(tmp: Path, base_dir: Path, overrides: dict | None = None) -> Path:
    """Seed rows in the data contract (train: 16 en + 8 ko + 8 synthetic; val: 6) and a params file."""
    tmp.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp, {**FAST, **(overrides or {})}, base_dir=base_dir)
    p = config.load(params, "train")
    processed, synthetic = Path(p.paths.processed_dir), Path(p.paths.synthetic_train)
    io.write_jsonl(
        processed / "train.jsonl", _rows("seed_en.jsonl", 0, 16, "seed") + _rows("seed_ko.jsonl", 0, 8, "seed")
    )
    io.write_jsonl(processed / "val.jsonl", _rows("seed_en.jsonl", 100, 6, "seed"))
    io.write_jsonl(synthetic, _rows("seed_en.jsonl", 50, 8, "synthetic:docs"))
    return params


def _paths(params: Path) -> config.Paths:
    return config.load(params, "train").paths


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One full epoch on the tiny model (so the token count is exact), shared by the output tests."""
    tmp = tmp_path_factory.mktemp("train")
    params = setup_run(tmp, tiny_model_dir, {**ONE_EPOCH, "train.compile": "layers"})  # the default's path
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("DVC_EXP_NAME", "exp-tiny")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        metrics = train.main(str(params))
        torch.set_num_threads(before)
    return params, metrics


# ---------------------------------------------------------------- batching and packing


def test_make_batches_respects_the_token_budget_exactly():
    ex = [{"input_ids": [7] * n, "labels": [7] * n} for n in (5, 4, 3, 6, 2)]
    packed = packing.make_batches(ex, 9, packing=True, seed=None)
    assert [[len(e["input_ids"]) for e in b["examples"]] for b in packed] == [[5, 4], [3, 6], [2]]
    # padded: sorted by length so a batch holds rows of about one length, rows x longest <= 9
    padded = packing.make_batches(ex, 9, packing=False, seed=None)
    assert [[len(e["input_ids"]) for e in b["examples"]] for b in padded] == [[2, 3], [4], [5], [6]]
    assert [[len(e["input_ids"]) for e in b["examples"]] for b in packing.make_batches(ex, 12, False, None)] == [
        [2, 3, 4], [5, 6]]  # fmt: skip
    for mode in (True, False):
        shuffled = packing.make_batches(ex, 9, packing=mode, seed=1)
        assert sorted(len(e["input_ids"]) for b in shuffled for e in b["examples"]) == [2, 3, 4, 5, 6]
        assert shuffled == packing.make_batches(ex, 9, packing=mode, seed=1)  # the seed fixes the order
    orders = {
        tuple(len(b["examples"][0]["input_ids"]) for b in packing.make_batches(ex, 9, False, s)) for s in range(8)
    }
    assert len(orders) > 1  # padded batches are shuffled too: not always shortest first
    with pytest.raises(StageError, match="10 tokens > train.tokens_per_batch=9"):
        packing.make_batches([{"input_ids": [1] * 10, "labels": [1] * 10}], 9, True, None)


def test_mix_batches_repeat_the_synthetic_rows_never_inside_one_micro_batch():
    seed = [{"input_ids": [1] * n, "labels": [1] * n} for n in (3, 4, 5, 6)]
    synth = [{"input_ids": [2 + i] * 4, "labels": [2 + i] * 4} for i in range(3)]  # tokens tell the rows apart
    one = packing.mix_batches(seed, synth, 1, 12, False, 7)
    assert one == packing.make_batches(seed + synth, 12, False, 7)  # one pass: exactly the plain batching
    for repeats in (2, 3):
        batches = packing.mix_batches(seed, synth, repeats, 12, False, 7)
        seen = [e["input_ids"][0] for b in batches for e in b["examples"]]
        assert sorted(seen) == sorted([1] * 4 + [2, 3, 4] * repeats)  # seed rows once, synthetic rows `repeats` x
        for b in batches:  # a copy never shares a micro-batch (and so a gradient step) with itself
            ids = [e["input_ids"][0] for e in b["examples"] if e["input_ids"][0] != 1]
            assert len(ids) == len(set(ids))
        assert batches == packing.mix_batches(seed, synth, repeats, 12, False, 7)  # seeded
    assert packing.mix_batches(seed, synth, 0, 12, False, 7) == packing.make_batches(seed, 12, False, 7)


def test_collators_flatten_with_restarting_positions_or_pad_with_a_mask():
    a = {"input_ids": [1, 10, 11], "labels": [-100, 11, 2]}
    b = {"input_ids": [1, 20], "labels": [-100, 2]}
    packed = packing.Collator(True, pad_id=2)([{"examples": [a, b]}])
    assert packed["input_ids"].tolist() == [[1, 10, 11, 1, 20]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 11, 2, -100, 2]]
    assert "attention_mask" not in packed  # with a mask transformers would not split the sequences
    assert packed["logits_to_keep"].tolist() == [0, 1, 3]  # the positions that predict a label
    padded = packing.Collator(False, pad_id=2)([{"examples": [a, b]}])
    assert padded["input_ids"].tolist() == [[1, 10, 11], [1, 20, 2]]
    assert padded["labels"].tolist() == [[-100, 11, 2], [-100, 2, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["logits_to_keep"].tolist() == [0, 1]  # any row's: position 1 predicts row a's end of turn


@pytest.mark.parametrize("packed", [False, True])
def test_trimmed_logits_give_the_full_forward_loss_and_gradients(tmp_path, tiny_model_dir, packed):
    """The collator's `logits_to_keep` spares the vocabulary head the positions that predict nothing; the step must
    not change: same loss, same LoRA gradients as a forward that projects every position."""
    params = setup_run(tmp_path, tiny_model_dir, {"train.method": "lora"})
    tok = modeling.load_tokenizer(tiny_model_dir)
    rows = _rows("seed_en.jsonl", 0, 2, "seed") + _rows("seed_ko.jsonl", 0, 2, "seed")  # prompts of unequal length
    batch = packing.Collator(packed, tok.pad_token_id)([{"examples": packing.encode_rows(rows, tok, 2, 768)}])
    labels, keep = batch.pop("labels"), batch.pop("logits_to_keep")
    assert 0 < len(keep) < labels.shape[1] - 1  # prompt positions were dropped
    model = train.build_model(tiny_model_dir, config.load(params, "train").train, "float32", {"": "cpu"}, seed=0)
    with torch.no_grad():  # LoRA B is zero at init, so its gradient is the one that shows a difference
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    loss_fn, n = packing.token_weighted_loss([]), (labels[:, 1:] != -100).sum()
    results = []
    for kwargs in ({}, {"logits_to_keep": keep}, {"logits_to_keep": keep - 1}):  # the last: a misaligned control
        model.zero_grad()
        out = model(**batch, **kwargs)
        loss = loss_fn(out, labels, num_items_in_batch=n)
        loss.backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.requires_grad}
        results.append((out.logits.shape[1], loss.item(), grads))
    (full_len, full, full_g), (kept_len, trimmed, trim_g), (_, shifted, _) = results
    assert (full_len, kept_len) == (labels.shape[1], len(keep))
    assert trimmed == pytest.approx(full, rel=1e-6)
    for k, g in full_g.items():
        torch.testing.assert_close(trim_g[k], g, rtol=1e-4, atol=1e-6)
    assert abs(shifted - full) > 1000 * max(abs(trimmed - full), 1e-6)  # scoring the wrong positions shows


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token CE (0 where unlabeled), aligned so entry i is the loss for labels[i]."""
    lg, lb = logits[0, :-1].float(), labels[0, 1:]
    ce = torch.nn.functional.cross_entropy(lg, lb.clamp(min=0), reduction="none") * (lb != -100)
    return torch.cat([torch.zeros(1), ce])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # AVX2 CPUs compute in fp32, GPUs/AVX512-BF16 in bf16
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_packed_batch_gives_each_example_its_unpacked_logits_and_loss(tmp_path, tiny_model_dir, method, dtype):
    params = setup_run(tmp_path, tiny_model_dir, {"train.method": method})
    t = config.load(params, "train").train
    tok = modeling.load_tokenizer(tiny_model_dir)
    eot = chat.end_of_turn_id(tok)
    rows = _rows("seed_en.jsonl", 0, 2, "seed") + _rows("seed_ko.jsonl", 0, 2, "seed")
    ex = packing.encode_rows(rows, tok, eot, 768)
    model = train.build_model(tiny_model_dir, t, dtype, {"": "cpu"}, seed=0).eval()
    with torch.no_grad():  # LoRA B is zero at init: make the adapter matter, so it is part of what is compared
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    assert model.config._attn_implementation == "sdpa"  # what transformers picks on CPU, so what training uses
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in ex]
        batch = packing.Collator(True, tok.pad_token_id)([{"examples": ex}])
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
        # Negative control: one long sequence (positions 0..N) lets later examples attend to earlier ones.
        leak = model(input_ids=batch["input_ids"], position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    bounds = [0]
    for e in ex:
        bounds.append(bounds[-1] + len(e["input_ids"]))
    spans = list(zip(bounds, bounds[1:], strict=False))
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: other matmul shapes round differently
    per_tok = _token_losses(out.logits, batch["labels"])
    packing_err = 0.0
    for (s, e), logits, x in zip(spans, alone, ex, strict=True):
        torch.testing.assert_close(out.logits[0, s:e], logits, rtol=tol, atol=tol)
        packing_err = max(packing_err, (out.logits[0, s:e] - logits).abs().max().item())
        assert per_tok[s:e].sum().item() == pytest.approx(
            _token_losses(logits[None], torch.tensor([x["labels"]])).sum().item(), rel=tol
        )
    n_labels = sum(x.n_trainable for x in [chat.encode(tok, r["messages"], eot) for r in rows])
    expect = sum(_token_losses(lg[None], torch.tensor([x["labels"]])).sum() for lg, x in zip(alone, ex, strict=True))
    assert out.loss.item() == pytest.approx(expect.item() / n_labels, rel=tol)  # the packed loss is the token mean
    # The check can fail: leakage moves the later examples' logits far beyond the dtype's own rounding noise.
    for (s, e), logits in list(zip(spans, alone, strict=True))[1:]:
        assert (leak.logits[0, s:e] - logits).abs().max().item() > 10 * max(packing_err, tol)


def test_nf4_layers_pass_gradients_after_an_eval_forward(tiny_model_dir):
    """bitsandbytes 0.50 repacks nf4 weights for a bf16 kernel without backward at the first eval-mode forward on
    AVX512-BF16 CPUs; the train stage evaluates the base before training, so every QLoRA step after it lost the
    gradient through the frozen layers. modeling.keep_nf4_trainable pins the dequantize + matmul path."""
    model = modeling.load_model(tiny_model_dir, quantize_4bit=True, dtype="float32", device_map="cpu")
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def input_grad():
        x.grad = None
        layer(x).sum().backward()
        assert x.grad is not None, "no gradient reached the nf4 layer's input"
        return x.grad.clone()

    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    model.train()
    torch.testing.assert_close(input_grad(), before)


# ---------------------------------------------------------------- outputs of a run


def test_adapter_follows_the_contract(trained, tiny_model_dir):
    params, _ = trained
    p = config.load(params, "train", "preprocess")
    adapter = Path(p.paths.adapter_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (
        p.train.lora_r,
        p.train.lora_alpha,
        p.train.lora_dropout,
    )
    assert set(cfg["target_modules"]) == set(p.train.target_modules)
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (adapter / "chat_template.jinja").read_text() == (tiny_model_dir / "chat_template.jinja").read_text()
    prov = json.loads((adapter / "train_provenance.json").read_text())
    assert prov == {
        "method": "qlora",
        "compute_dtype": modeling.resolve_dtype("auto"),
        "base_dir": str(tiny_model_dir),
        "base_provenance": json.loads((tiny_model_dir / "provenance.json").read_text()),
        "seed": p.seed,
        "train": json.loads(json.dumps(config.asdict(p.train))),
        "eot_id": 2,
    }
    from peft import PeftModel  # what merge/evaluate do with it

    base = modeling.load_model(tiny_model_dir, quantize_4bit=True, dtype=prov["compute_dtype"], device_map="cpu")
    tuned = PeftModel.from_pretrained(base, adapter)
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in tuned.named_parameters())  # it was trained


def test_metrics_and_curve_are_exact(trained, tiny_model_dir):
    params, metrics = trained
    p = config.load(params, "train", "preprocess")
    on_disk = json.loads(Path(p.paths.train_metrics).read_text())
    speed = json.loads(Path(p.paths.train_speed).read_text())
    assert set(speed) == {"tokens_per_s", "train_wall_s", "stage_wall_s"}  # the run-to-run part, on its own
    assert on_disk.pop("mix") == metrics["mix"]  # nested: approx compares flat dicts only
    assert {**on_disk, **speed} == pytest.approx({k: v for k, v in metrics.items() if k != "mix"})
    tok = modeling.load_tokenizer(tiny_model_dir)
    seed_ex, syn_ex = (packing.encode_rows(io.read_jsonl(f), tok, 2, 768)
                       for f in (f"{p.paths.processed_dir}/train.jsonl", p.paths.synthetic_train))  # fmt: skip
    reps = p.train.synthetic_repeats  # the default's (2): synthetic rows twice per epoch, seed rows once
    n = len(packing.mix_batches(seed_ex, syn_ex, reps, 1024, p.train.packing, p.seed))  # one step per batch
    assert metrics["steps"] == n and n >= 6 and metrics["epochs"] == 1.0 and metrics["resumed_from_step"] == 0
    assert (metrics["train_rows"], metrics["val_rows"]) == (32, 6)
    seed_tokens, syn_tokens = (sum(len(e["input_ids"]) for e in ex) for ex in (seed_ex, syn_ex))
    assert metrics["tokens_seen"] == seed_tokens + reps * syn_tokens  # every real token per pass, no padding
    assert metrics["mix"] == {  # what one epoch held per source
        "seed": {"rows": 24, "passes": 1, "tokens": seed_tokens,
                 "token_share": round(seed_tokens / metrics["tokens_seen"], 4)},
        "synthetic": {"rows": 8, "passes": reps, "tokens": reps * syn_tokens,
                      "token_share": round(reps * syn_tokens / metrics["tokens_seen"], 4)},
    }  # fmt: skip
    assert metrics["tokens_per_s"] > 0 and metrics["train_wall_s"] > 0
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    lines = Path(p.paths.train_curve).read_text().splitlines()
    assert lines[0] == "step,train_loss,eval_loss,lr"
    rows = [dict(zip(lines[0].split(","), ln.split(","), strict=True)) for ln in lines[1:]]
    assert [int(r["step"]) for r in rows] == list(range(n + 1))
    assert [i for i, r in enumerate(rows) if r["eval_loss"]] == sorted({*range(0, n + 1, 2), n})  # eval_every 2 + end
    assert float(rows[0]["eval_loss"]) == pytest.approx(metrics["base_eval_loss"], rel=1e-5)
    assert float(rows[-1]["eval_loss"]) == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert rows[0]["train_loss"] == "" and all(float(r["train_loss"]) > 0 for r in rows[1:])
    lrs, warm = [float(r["lr"]) for r in rows[1:]], math.ceil(n * 0.25)  # linear warmup, then cosine down
    assert lrs[:warm] == pytest.approx([5e-3 * k / warm for k in range(warm)], rel=1e-5)  # the CSV keeps 6 digits
    assert lrs[warm] == pytest.approx(5e-3) and all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False))


def test_trainer_loss_is_the_assistant_token_loss(trained, tiny_model_dir):
    """The Trainer's eval loss on the packed val batches equals the token-weighted assistant-token NLL the other
    stages compute row by row (modeling.assistant_positions): same labels, same shift, same mean."""
    import torch.nn.functional as F

    params, metrics = trained
    p = config.load(params, "train", "preprocess")
    tok = modeling.load_tokenizer(tiny_model_dir)
    enc = [chat.encode(tok, r["messages"], 2) for r in io.read_jsonl(Path(p.paths.processed_dir) / "val.jsonl")]
    model = modeling.load_model(tiny_model_dir, quantize_4bit=True, dtype=metrics["compute_dtype"], device_map="cpu")
    scored = list(modeling.assistant_positions(model.eval(), enc))
    nll = sum(F.cross_entropy(lg, tg, reduction="sum").item() for lg, tg in scored) / sum(len(t) for _, t in scored)
    assert metrics["base_eval_loss"] == pytest.approx(nll, rel=1e-5)


def test_mlflow_default_store_gets_run_params_metrics_and_tags(trained):
    from mlflow.tracking import MlflowClient

    params, metrics = trained
    p = config.load(params, "train")
    client = MlflowClient(p.paths.mlflow_uri)
    exp = client.get_experiment_by_name(p.train.mlflow_experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == str(p.train.lr) and run.data.params["method"] == "qlora"
    assert run.data.tags["dvc_exp_name"] == "exp-tiny"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_rev"] == head  # the revision the run came from, so MLflow and git agree
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, metrics["steps"] + 1))
    assert run.data.metrics["final_eval_loss"] == pytest.approx(metrics["eval_loss"])


def test_same_params_and_data_give_the_same_output_bytes_in_any_process(trained, tiny_model_dir, tmp_path):
    """Two trainings of the same inputs, the second in a process with another PYTHONHASHSEED (peft's set of target
    modules iterates in hash order): every output file DVC hashes is identical, so nothing downstream reruns."""
    params, first = trained
    again = setup_run(tmp_path, tiny_model_dir, {**ONE_EPOCH, "train.compile": "layers"})
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(again)], cwd=ROOT,
                          env={**_stage_env(), "PYTHONHASHSEED": "12345", "DVC_EXP_NAME": "exp-tiny"},
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _paths(params), _paths(again)
    for out in ("adapter_dir", "train_metrics", "train_curve"):
        assert _tree_hashes(Path(getattr(a, out))) == _tree_hashes(Path(getattr(b, out))), out
    assert json.loads(Path(b.train_speed).read_text())["tokens_per_s"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])  # AVX512-BF16 boxes and GPUs train in bf16, AVX2 in fp32
def test_compiled_layers_train_as_eager_does(tmp_path, tiny_model_dir, dtype):
    """train.compile: layers (the default) runs each decoder layer through torch.compile: the same adapter tensors,
    losses and evals as the eager run up to the fused kernels' rounding, in either compute dtype."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("none", "layers"):
        params = setup_run(tmp_path / mode, tiny_model_dir, {"train.compile": mode, "train.compute_dtype": dtype})
        metrics = train.main(str(params))
        curve = Path(_paths(params).train_curve).read_text().splitlines()[2:]  # per step: loss, eval loss, lr
        weights = load_file(Path(_paths(params).adapter_dir) / "adapter_model.safetensors")
        runs[mode] = metrics, [float(x) if x else 0.0 for ln in curve for x in ln.split(",")[1:]], weights
    (eager, eager_curve, eager_w), (comp, comp_curve, comp_w) = runs["none"], runs["layers"]
    tol = 2e-2 if dtype == "bfloat16" else 1e-4  # bf16 keeps 8 bits of mantissa: fused kernels round differently
    assert comp["steps"] == eager["steps"] == 4 and comp["tokens_seen"] == eager["tokens_seen"]
    assert (
        comp["eval_loss"] == pytest.approx(eager["eval_loss"], rel=tol) and comp["eval_loss"] < comp["base_eval_loss"]
    )
    assert comp_curve == pytest.approx(eager_curve, rel=tol, abs=1e-7)
    assert comp_w.keys() == eager_w.keys()  # in-place compile: no `_orig_mod.` in the saved names
    for k in eager_w:  # per tensor (Adam turns a near-zero gradient's rounding into a whole ±lr step on one element)
        a, b = eager_w[k].float(), comp_w[k].float()
        assert (b - a).norm() <= tol * a.norm(), k


def test_compile_layers_compiles_every_decoder_layer_and_only_them(tmp_path, tiny_model_dir):
    p = config.load(write_params(tmp_path, {"train.compile": "layers"}), "train")
    model = train.build_model(tiny_model_dir, p.train, "float32", {"": "cpu"}, p.seed)
    layers = model.get_base_model().model.layers
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert model.get_base_model()._compiled_call_impl is None  # the head and the loss stay eager
    eager = train.build_model(tiny_model_dir, p.train.model_copy(update={"compile": "none"}), "float32",
                              {"": "cpu"}, p.seed)  # fmt: skip
    assert all(layer._compiled_call_impl is None for layer in eager.get_base_model().model.layers)


def test_compile_layers_on_a_model_without_decoder_layers_names_the_fix():
    class NoLayers(torch.nn.Linear):  # a causal LM whose decoder keeps its blocks under another name
        def get_decoder(self):
            return self

    with pytest.raises(
        StageError, match=r"needs a decoder with a `layers` list \(NoLayers has none\); use train.compile: none"
    ):
        modeling.compile_layers(NoLayers(2, 2))


def test_compile_without_a_cpu_compiler_trains_eager_with_a_warning(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("Failed to find a working C++ compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    p = config.load(write_params(tmp_path, {"train.compile": "layers"}), "train")
    model = train.build_model(tiny_model_dir, p.train, "float32", {"": "cpu"}, p.seed)
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)
    assert "compile_skipped" in caplog.text and "train.compile: none" in caplog.text


def _tree_hashes(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f.relative_to(path) if path.is_dir() else f.name): io.sha256_file(f) for f in files if f.is_file()}


def test_rerun_after_success_reexports_the_same_outputs_without_training(tmp_path, tiny_model_dir, monkeypatch):
    params = setup_run(tmp_path, tiny_model_dir, {"train.max_steps": 2, "train.save_every": 1})
    first = train.main(str(params))
    paths = _paths(params)
    outs = [Path(paths.adapter_dir) / "adapter_model.safetensors", Path(paths.train_metrics), Path(paths.train_curve)]
    before = [f.read_bytes() for f in outs]
    for f in outs:
        f.unlink()  # e.g. `dvc repro -f`, which removes outputs before running the stage

    def no_training(*a, **k):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(train, "fit", no_training)
    assert train.main(str(params)) == first
    assert [f.read_bytes() for f in outs] == before  # byte-identical: DVC sees no change
    assert not (Path(paths.adapter_dir) / "training_args.bin").exists()  # no pickles in the adapter


def test_neftune_noise_reaches_training_steps_but_not_evals(tmp_path, tiny_model_dir):
    """train.neftune_alpha > 0 perturbs the embeddings of training steps only: the reported val loss is the clean
    loss of the exported adapter, recomputed here without the Trainer."""
    import torch.nn.functional as F
    from peft import PeftModel

    over = {"train.max_steps": 3, "train.eval_every": 3, "train.save_every": 3}
    plain = train.main(str(setup_run(tmp_path / "plain", tiny_model_dir, over)))
    params = setup_run(tmp_path / "noisy", tiny_model_dir, {**over, "train.neftune_alpha": 5.0})
    noisy = train.main(str(params))
    assert noisy["train_loss"] != plain["train_loss"]  # the noise reached the training forward passes
    p = config.load(params, "train", "preprocess")
    tok = modeling.load_tokenizer(tiny_model_dir)
    enc = [chat.encode(tok, r["messages"], 2) for r in io.read_jsonl(Path(p.paths.processed_dir) / "val.jsonl")]
    base = modeling.load_model(tiny_model_dir, quantize_4bit=True, dtype=noisy["compute_dtype"], device_map="cpu")
    scored = list(modeling.assistant_positions(PeftModel.from_pretrained(base, p.paths.adapter_dir).eval(), enc))
    nll = sum(F.cross_entropy(lg, tg, reduction="sum").item() for lg, tg in scored) / sum(len(t) for _, t in scored)
    assert noisy["eval_loss"] == pytest.approx(nll, rel=1e-4)  # evals ran on clean embeddings


def test_switching_a_param_and_back_reexports_and_only_the_last_runs_stay(tmp_path, tiny_model_dir, monkeypatch):
    def run(lr: float) -> dict:
        return train.main(str(setup_run(tmp_path, tiny_model_dir, {"train.max_steps": 1, "train.lr": lr})))

    root = Path(_paths(setup_run(tmp_path, tiny_model_dir)).checkpoint_dir)
    first, _ = run(1e-3), run(2e-3)
    adapter = Path(_paths(setup_run(tmp_path, tiny_model_dir)).adapter_dir) / "adapter_model.safetensors"
    fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("switching back must not train again"))
    assert run(1e-3) == first  # back to the first lr: exported from its finished run
    trained_first = adapter.read_bytes()
    monkeypatch.setattr(train, "fit", fit)
    for lr in (3e-3, 4e-3):
        run(lr)
    kept = {json.loads((d / "final" / "train_provenance.json").read_text())["train"]["lr"] for d in root.iterdir()}
    assert kept == {1e-3, 3e-3, 4e-3}  # the KEEP=3 most recently used; 2e-3 went, after the 4th run succeeded
    assert len(list(root.iterdir())) == checkpoints.KEEP
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("still kept: must not train again"))
    run(1e-3)
    assert adapter.read_bytes() == trained_first


def test_early_stopping_stops_and_restores_the_best_checkpoint(tmp_path, tiny_model_dir):
    # lr 5e-3: the val loss falls smoothly with shrinking gains (0.02 ... 0.001 per step, in bf16 and fp32 alike),
    # so the stop comes well inside the budget on any machine; where exactly is checked against the curve.
    over = {"train.max_steps": 24, "train.eval_every": 1, "train.save_every": 1, "train.lr": 5e-3,
            "train.warmup_ratio": 0.0, "train.early_stopping_patience": 1, "train.early_stopping_threshold": 0.002}  # fmt: skip
    params = setup_run(tmp_path, tiny_model_dir, over)
    metrics = train.main(str(params))
    lines = Path(_paths(params).train_curve).read_text().splitlines()[1:]
    evals = {int(ln.split(",")[0]): float(ln.split(",")[2]) for ln in lines if ln.split(",")[2]}
    assert 3 < metrics["steps"] < 24 and sorted(evals) == list(range(metrics["steps"] + 1))  # every step's own eval
    gains = [evals[s - 1] - evals[s] for s in range(2, metrics["steps"] + 1)]
    assert all(g > 0.002 for g in gains[:-1]) and gains[-1] <= 0.002  # stopped at the first gain under the threshold
    assert metrics["eval_loss"] == pytest.approx(min(v for s, v in evals.items() if s > 0), rel=1e-5)  # the best


def test_run_key_changes_with_params_and_data(tmp_path, tiny_model_dir):
    params = setup_run(tmp_path, tiny_model_dir)
    p = config.load(params, "train", "preprocess")
    files = [Path(p.paths.processed_dir) / "train.jsonl", Path(p.paths.processed_dir) / "val.jsonl"]

    def key(train_params=None, seed=p.seed, world=1):
        return checkpoints.run_key(train_params or config.asdict(p.train), seed, 768, tiny_model_dir, files, world)

    first = key()
    assert first == key()
    assert key({**config.asdict(p.train), "lr": 1e-4}) != first
    assert key(seed=p.seed + 1) != first and key(world=2) != first
    files[1].write_text(files[1].read_text().replace("a", "b", 1))
    assert key() != first


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.compute_dtype": "float16"}, "train.compute_dtype=float16 needs a CUDA GPU"),
        ({"train.device_map": "cuda:0"}, "torch sees no CUDA device"),
        ({"train.tokens_per_batch": 512}, "train.tokens_per_batch=512 < preprocess.max_seq_len=768"),
        # a missing comma in YAML's flow list: peft would adapt q_proj only and train without a word
        ({"train.target_modules": ["q_proj", "k_proj v_proj"]}, r"\['k_proj v_proj'\] match no module of .*o_proj"),
    ],
)
def test_unusable_settings_fail_before_any_work(tmp_path, tiny_model_dir, overrides, message):
    if torch.cuda.is_available() and "cuda" in message.lower():
        pytest.skip("this box has CUDA")
    params = setup_run(tmp_path, tiny_model_dir, overrides)
    with pytest.raises(StageError, match=message):
        train.main(str(params))
    assert not Path(_paths(params).checkpoint_dir).exists()


def test_no_seed_rows_and_the_synthetic_ones_weighted_out_is_named(tmp_path, tiny_model_dir):
    params = setup_run(tmp_path, tiny_model_dir, {"train.synthetic_repeats": 0})
    io.write_jsonl(Path(_paths(params).processed_dir) / "train.jsonl", [])
    with pytest.raises(StageError, match=r"nothing to train on: .*train.jsonl is empty"):
        train.main(str(params))
    assert not Path(_paths(params).checkpoint_dir).exists()


def test_missing_bitsandbytes_is_named_with_the_fix(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(StageError, match=r"train.method=qlora needs bitsandbytes.*train.method: lora"):
        train.main(str(setup_run(tmp_path, tiny_model_dir, {"train.max_steps": 1})))


def test_out_of_memory_gets_a_hint(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import Trainer

    def oom(self, *a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(Trainer, "train", oom)
    with pytest.raises(StageError, match=r"out of memory: lower train.tokens_per_batch \(1024\)"):
        train.main(str(setup_run(tmp_path, tiny_model_dir, {"train.method": "lora"})))


def test_relative_mlflow_store_lands_in_the_main_repo_even_from_a_queue_worker(tmp_path, monkeypatch):
    paths = config.load(write_params(tmp_path, {"paths.mlflow_uri": "sqlite:///mlflow.db"}), "train").paths
    repo = tmp_path / "repo"
    monkeypatch.setenv("DVC_ROOT", str(repo / ".dvc/tmp/exps/tmpab12cd"))  # what `dvc queue start` workers see
    assert tracking.resolve_uri(paths.mlflow_uri) == (f"sqlite:///{repo.resolve()}/mlflow.db", False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw@127.0.0.1:5000")
    uri, explicit = tracking.resolve_uri(paths.mlflow_uri)
    assert explicit and tracking.split_credentials(uri) == ("http://127.0.0.1:5000", "alice", "pw")


def test_explicit_unreachable_mlflow_fails_before_training_and_deletes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    earlier = train.main(str(setup_run(tmp_path, tiny_model_dir, {"train.max_steps": 1})))  # a finished run
    root = Path(_paths(setup_run(tmp_path, tiny_model_dir)).checkpoint_dir)
    before = {d.name: _tree_hashes(d) for d in root.iterdir()}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    params = setup_run(tmp_path, tiny_model_dir)  # another run key (4 steps)
    t0 = time.monotonic()
    with pytest.raises(StageError, match="MLFLOW_TRACKING_URI=http://127.0.0.1:.* is unreachable"):
        train.main(str(params))
    assert time.monotonic() - t0 < 60
    assert not [c for c in root.glob("*/checkpoint-*") if c.parent.name not in before]  # nothing trained
    assert {d.name: _tree_hashes(d) for d in root.iterdir() if d.name in before} == before  # the earlier run intact
    assert json.loads(Path(_paths(params).train_metrics).read_text())["steps"] == earlier["steps"]  # outputs kept


def test_broken_default_store_only_warns(tmp_path, tiny_model_dir, caplog):
    params = setup_run(tmp_path, tiny_model_dir, {"train.max_steps": 1, "paths.mlflow_uri": "bogus-scheme://x"})
    metrics = train.main(str(params))
    assert metrics["steps"] == 1 and (Path(_paths(params).adapter_dir) / "adapter_model.safetensors").exists()
    assert "mlflow_off" in caplog.text and "bogus-scheme" in caplog.text


# ---------------------------------------------------------------- slow: processes, servers


def _stage_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"}


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    over = {"train.max_steps": 12, "train.save_every": 3, "train.eval_every": 6}
    full = setup_run(tmp_path / "full", tiny_model_dir, over)
    train.main(str(full))
    killed = setup_run(tmp_path / "killed", tiny_model_dir, over)
    ckpts = Path(_paths(killed).checkpoint_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--params", str(killed)],
        cwd=ROOT,
        env=_stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 150
        while not list(ckpts.glob("*/checkpoint-3/trainer_state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 150 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert not Path(_paths(killed).adapter_dir).exists()
    metrics = train.main(str(killed))  # a new run: resumes (optimizer, scheduler, RNG, data position)
    assert metrics["resumed_from_step"] >= 3 and metrics["steps"] == 12
    a = load_file(Path(_paths(full).adapter_dir) / "adapter_model.safetensors")
    b = load_file(Path(_paths(killed).adapter_dir) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    curve = Path(_paths(killed).train_curve).read_text().splitlines()
    assert [int(ln.split(",")[0]) for ln in curve[1:]] == list(range(13))  # the pre-kill steps are kept


@pytest.mark.slow
def test_mlflow_server_receives_run_params_and_metrics(tmp_path, tiny_model_dir, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-server")
    metrics = train.main(str(setup_run(tmp_path, tiny_model_dir)))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("llmops-finetune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_name"] == "exp-server"
    assert run.data.params["max_steps"] == "4" and run.data.params["method"] == "qlora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in evals] == [0, 2, 4] and evals[-1].value == pytest.approx(metrics["eval_loss"])
    assert evals[0].value == pytest.approx(metrics["base_eval_loss"])  # step 0: the base model


@pytest.mark.slow
def test_ddp_two_cpu_processes_under_accelerate(tmp_path, tiny_model_dir):
    params = setup_run(tmp_path, tiny_model_dir, {"train.max_steps": 8, "train.eval_every": 4, "train.save_every": 4})
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate_ddp_cpu.yaml"), "-m", "stages.train", "--params", str(params)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths = _paths(params)
    assert (Path(paths.adapter_dir) / "adapter_model.safetensors").exists()
    metrics = json.loads(Path(paths.train_metrics).read_text())
    assert metrics["steps"] == 8
    assert len(list(Path(paths.checkpoint_dir).glob("*/checkpoint-8"))) == 1
    lines = Path(paths.train_curve).read_text().splitlines()[1:]
    losses = [float(ln.split(",")[1]) for ln in lines if ln.split(",")[1]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert metrics["eval_loss"] < metrics["base_eval_loss"]

"""Scoring one model for evaluation: answers from the engine that serves (vLLM; transformers as fallback), the
assistant-token loss pass, and the two evaluation sets. Shared by stages.evaluate_base and stages.evaluate, which
must score the base and the tuned model exactly alike."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmops import chat, config, hardware, io, log, metrics, modeling
from llmops.stage import StageError

LANGS = metrics.LANGS


def test_items(rows: list[dict], n: int) -> list[dict]:
    """First `n` rows by id; each split into the prompt (up to the last assistant turn) and its reference."""
    items = []
    for r in sorted(rows, key=lambda r: r["id"])[:n]:
        last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
        items.append({"id": r["id"], "lang": r["lang"], "messages": r["messages"], "prompt": r["messages"][:last],
                      "reference": r["messages"][last]["content"]})  # fmt: skip
    if not items:
        raise StageError("the test split is empty: nothing to evaluate")
    return items


def qa_items(rows: list[dict], path: str) -> list[dict]:
    """The held-out QA set as prompts (rows checked by metrics.qa_rows: a bad one is named with the fix)."""
    return [{"id": r["id"], "lang": r["lang"], "prompt": [{"role": "user", "content": r["question"]}],
             "keywords": r["keywords"]} for r in metrics.qa_rows(rows, path)]  # fmt: skip


def eval_sets(paths: config.Paths, e: config.Evaluate) -> tuple[list[dict], list[dict]]:
    """The test items and the held-out QA items, or one clear error naming what is missing."""
    test_file = Path(paths.processed_dir) / "test.jsonl"
    if not test_file.exists():
        raise StageError(f"{test_file} missing: run `dvc repro preprocess`")
    return test_items(io.read_jsonl(test_file), e.max_samples), qa_items(io.read_jsonl(paths.qa_set), paths.qa_set)


def sampling_defaults(gen_dir: Path) -> tuple[list[int], dict]:
    """Stop ids and the sampling defaults serving takes from generation_config.json (greedy here)."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(gen_dir)
    eos = modeling.stop_ids(gen.eos_token_id)
    if not eos:
        raise StageError(f"{gen_dir}/generation_config.json has no eos_token_id: generation would never stop")
    return eos, {"repetition_penalty": gen.repetition_penalty or 1.0}


def until_eos(ids: list[int], eos: list[int]) -> list[int]:
    return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]


@torch.inference_mode()
def generate_hf(model, prompts: list[list[int]], eos: list[int], defaults: dict, max_new: int, bs: int) -> list:
    """Greedy answer ids (up to the first eos) with left-padded batches, prompts sorted by length to pad little."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, list[int]] = {}
    for k in tqdm(range(0, len(order), bs), desc="generate hf", leave=False, disable=None):
        idx = order[k : k + bs]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[eos[0]] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0], **defaults)  # fmt: skip
        for i, row in zip(idx, out[:, width:].tolist(), strict=True):
            answers[i] = until_eos(row, eos)
    return [answers[i] for i in range(len(prompts))]


@contextlib.contextmanager
def _engine_scope():
    """Puts back what vLLM's in-process CPU engine changes for the whole process: its worker makes
    `torch.set_num_threads` a no-op (later loss passes and tests could not set threads), and its start scans every
    loaded module's globals, where an unbound flask/werkzeug proxy (mlflow's server CLI) raises: those step out."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    local = sys.modules.get("werkzeug.local")
    hidden = {}
    if local is not None:
        for name, mod in list(sys.modules.items()):
            if any(type(v) is local.LocalProxy for v in list(getattr(mod, "__dict__", {}).values())):
                hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)


def generate_vllm(model_dir: Path, prompts: list[list[int]], eos: list[int], defaults: dict, max_new: int,
                  dtype: str, seed: int) -> list[list[int]]:  # fmt: skip
    """Greedy answer ids from vLLM's offline engine, stopped by the served eos ids."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU backend needs a KV budget
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: a 5 s start, not 60
    from vllm import LLM, SamplingParams

    with _engine_scope():
        llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max(map(len, prompts)) + max_new,
                  enforce_eager=not torch.cuda.is_available())  # fmt: skip  # CPU: compile warm-up costs more than it saves
        try:
            params = SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=eos, **defaults)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
    return [until_eos(list(o.outputs[0].token_ids), eos) for o in outs]


def assistant_nll(model, encoded: list, desc: str) -> list[dict]:
    """Per encoded row: the summed NLL of its labelled tokens (assistant replies + end-of-turn) and their count."""
    return [{"nll": F.cross_entropy(lg, tg, reduction="sum").item(), "n": len(tg)}
            for lg, tg in modeling.assistant_positions(model, encoded, desc)]  # fmt: skip


def vllm_usable() -> bool:
    """Installed (llmops.hardware) and importable: a broken build may raise anything at import."""
    if hardware.vllm_build() is not None:
        with contextlib.suppress(Exception):
            import vllm  # noqa: F401

            return True
    return False


def decode(tok, ids: list[int]) -> str:
    """The answer text cut at the last whole character: a reply stopped mid-character must not end in U+FFFD."""
    return tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd").strip()


def resolve_engine(requested: str) -> str:
    """`evaluate.engine` as run: auto = vllm when it imports, else hf (a vLLM that fails to start falls back later)."""
    return requested if requested != "auto" or vllm_usable() else "hf"


def generate_dtype(base_dir: Path) -> str:
    """What vLLM computes in: what `make serve` runs here (fp32 where bf16 is emulated, else the saved 16-bit dtype)."""
    dtype = hardware.serving_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")
    return modeling.read_provenance(base_dir).get("dtype", "bfloat16") if dtype == "auto" else dtype


def served_sampling(base_dir: Path, gen: config.Generation) -> tuple[list[int], dict]:
    """The stop ids and repetition penalty the merged model will be served with, known before there is one: the
    base's eos (saved with end-of-turn, as merge saves them) and `merge.generation`."""
    eos, _ = sampling_defaults(base_dir)
    return eos, {"repetition_penalty": float(gen.repetition_penalty)}


def settings(base_dir: Path, items: list[dict], qa: list[dict], eos: list[int], defaults: dict, e: config.Evaluate,
             engine: str, dtype: str, seed: int) -> dict:  # fmt: skip
    """Everything the base model's stored scores depend on: evaluate reuses evaluate_base's rows only when these
    match (batch_size: transformers' left-padded greedy batches may differ in the last digits from one row alone).
    `max_new_tokens` is evaluate_base's budget (`base_max_new_tokens`): its answers are cut to evaluate's."""
    data = json.dumps([[it["messages"] for it in items], [[it["prompt"], it["keywords"]] for it in qa]], sort_keys=True)
    return {"model": modeling.read_provenance(base_dir).get("files", {}), "data_sha256": hashlib.sha256(
            data.encode()).hexdigest(), "eos": eos, **defaults, "max_new_tokens": e.base_max_new_tokens,
            "batch_size": e.batch_size, "engine": engine, "generate_dtype": dtype,
            "loss_dtype": modeling.resolve_dtype("auto"), "seed": seed}  # fmt: skip


def pack_ids(answers: list[list[int]]) -> list[str]:
    """Token ids as one space-separated string per answer: a line each in the git-tracked JSON, not one per id."""
    return [" ".join(map(str, ids)) for ids in answers]


def cut(model_dir: Path, stored: dict, max_new: int) -> dict:
    """Stored (evaluate_base) rows with each answer cut to its first `max_new` tokens and decoded as score_model
    decodes: greedy decoding is token by token, so this is the answer a `max_new` budget gives (checked in
    tests/test_evaluate.py; on the default, all 124 answers at 96 tokens equal the first 96 of 192)."""
    tok = modeling.load_tokenizer(model_dir)
    out = {"losses": stored["losses"], "engine": stored["engine"]}
    for key, ids_key in (("answers", "answer_ids"), ("qa_answers", "qa_answer_ids")):
        out[key] = [decode(tok, [int(t) for t in ids.split()][:max_new]) for ids in stored[ids_key]]
    return out


def score_model(model_dir: Path, items: list[dict], qa: list[dict], e: config.Evaluate, engine: str, dtype: str,
                eos: list[int], defaults: dict, seed: int, stage: str, max_new: int) -> dict:  # fmt: skip
    """{losses (per test row), answers (test), qa_answers, answer_ids, qa_answer_ids (pack_ids), engine used}; up
    to `max_new` tokens (each stage passes the budget it declares in dvc.yaml); `auto` falls back to hf if vLLM
    fails. vLLM runs `dtype` (what serving runs); transformers computes in modeling.resolve_dtype("auto")."""
    logger = log.get(stage)
    tok = modeling.load_tokenizer(model_dir)
    eot = chat.end_of_turn_id(tok)
    prompts = [chat.prompt_ids(tok, it["prompt"]) for it in items + qa]
    ids, t0 = None, time.perf_counter()
    if engine in ("vllm", "auto"):
        try:
            ids = generate_vllm(model_dir, prompts, eos, defaults, max_new, dtype, seed)
            engine = "vllm"
        except Exception as err:  # vLLM fails in many ways (no kernels for this CPU, OOM, ...)
            if engine == "vllm":
                raise StageError(f"vLLM generation failed on {model_dir}: {type(err).__name__}: {err}") from err
            logger.warning("vllm_failed_using_hf", error=f"{type(err).__name__}: {err}")
    t1 = time.perf_counter()
    model = modeling.load_model(model_dir, quantize_4bit=False, dtype=modeling.resolve_dtype("auto")).eval()
    losses = assistant_nll(model, [chat.encode(tok, it["messages"], eot) for it in items], f"loss {model_dir.name}")
    t2 = time.perf_counter()
    if ids is None:
        engine = "hf"
        ids = generate_hf(model, prompts, eos, defaults, max_new, e.batch_size)
    del model
    logger.info("scored", model=model_dir.name, engine=engine, answer_tokens=sum(map(len, ids)),
                generate_s=round(time.perf_counter() - t2 + t1 - t0, 1), loss_s=round(t2 - t1, 1))  # fmt: skip
    gc.collect()
    answers, packed, n = [decode(tok, a) for a in ids], pack_ids(ids), len(items)
    return {"losses": losses, "answers": answers[:n], "qa_answers": answers[n:], "answer_ids": packed[:n],
            "qa_answer_ids": packed[n:], "engine": engine}  # fmt: skip

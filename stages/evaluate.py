"""evaluate: base vs tuned (the merged model we serve) on the test split, per language (en/ko).

    python -m stages.evaluate [--params params.yaml]

On the first `evaluate.max_samples` test rows in id order (a hash order: stable when rows come or go):
  loss / perplexity  token-weighted mean NLL on assistant tokens + end-of-turn (llmops.chat.encode labels);
  chrf, rouge_l, keyword_recall  on greedy answers to the conversation up to its last assistant turn, made
      with the chat template and eos ids serving uses (`evaluate.engine`: vllm = vLLM's offline engine,
      hf = transformers generate with left-padded batches, auto = vllm when it imports and starts).
Whether the merge kept the trained model is the merge stage's gate (metrics/merge.json), not evaluated here.
Outputs: `paths.eval_metrics` {"base", "tuned", "delta", "compute", "timing_s"}, `paths.eval_samples`
(prompt, reference, both answers, per-row recall) and `paths.eval_plot` (metric, model, value). `compute` says
which machine, dtypes and engine produced the figures: bf16 and fp32 machines differ in the last digits.
"""

from __future__ import annotations

import csv
import gc
import io as stdio
import math
import os
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmops import chat, config, hardware, io, log, metrics, modeling, stage
from llmops.stage import StageError

LANGS = ("en", "ko")
PLOT_METRICS = {
    "chrf": ("chrF", 1.0),
    "rouge_l": ("ROUGE-L ×100", 100.0),
    "keyword_recall": ("keyword recall %", 100.0),
}


def load_items(rows: list[dict], n: int) -> list[dict]:
    """First `n` rows by id; each split into the prompt (up to the last assistant turn) and its reference."""
    items = []
    for r in sorted(rows, key=lambda r: r["id"])[:n]:
        last = max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")
        items.append({"id": r["id"], "lang": r["lang"], "messages": r["messages"], "prompt": r["messages"][:last],
                      "reference": r["messages"][last]["content"]})  # fmt: skip
    if not items:
        raise StageError("the test split is empty: nothing to evaluate")
    return items


def score_loss(model, encoded: list[chat.Encoded], batch_size: int, desc: str) -> list[dict]:
    """Per row: summed NLL and count over assistant tokens."""
    return [{"nll": F.cross_entropy(logits, targets, reduction="sum").item(), "n": len(targets)}
            for logits, targets in modeling.assistant_positions(model, encoded, batch_size, f"loss {desc}")]  # fmt: skip


def eos_ids(model_dir: Path) -> tuple[list[int], int]:
    """Stop ids and pad id from the model's generation_config.json, the file vLLM serving reads."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(model_dir)
    eos = modeling.stop_ids(gen.eos_token_id)
    if not eos:
        raise StageError(f"{model_dir}/generation_config.json has no eos_token_id: generation would never stop")
    return eos, gen.pad_token_id if gen.pad_token_id is not None else eos[0]


def until_eos(ids: list[int], eos: list[int]) -> list[int]:
    return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]


@torch.inference_mode()
def generate_hf(model, prompts: list[list[int]], eos: list[int], pad: int, max_new: int, bs: int) -> list[list[int]]:
    """Greedy answer ids (up to the first eos) with left-padded batches, prompts sorted by length to pad little."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, list[int]] = {}
    for k in tqdm(range(0, len(order), bs), desc="generate hf", leave=False):
        idx = order[k : k + bs]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)  # fmt: skip
        for i, row in zip(idx, out[:, width:].tolist(), strict=True):
            answers[i] = until_eos(row, eos)
    return [answers[i] for i in range(len(prompts))]


def generate_vllm(
    model_dir: Path, prompts: list[list[int]], eos: list[int], max_new: int, dtype: str, seed: int
) -> list[list[int]]:
    """Greedy answer ids from vLLM's offline engine (its own process), stopped by the served eos ids."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU backend needs a KV budget
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model_dir),
        dtype=dtype,
        seed=seed,
        max_model_len=max(map(len, prompts)) + max_new,
        enforce_eager=not torch.cuda.is_available(),
    )  # CPU: compile warm-up costs more than one eval saves
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=max_new, stop_token_ids=eos),
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
    return [until_eos(list(o.outputs[0].token_ids), eos) for o in outs]


def vllm_usable() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken build raising anything at import
        return False
    return True


def summarize(items: list[dict], losses: list[dict], answers: list[str]) -> dict:
    """{loss, perplexity, chrf, rouge_l, keyword_recall, n} over all rows, and the same under "en"/"ko"."""

    def scores(idx: list[int]) -> dict:
        refs, hyps = [items[i]["reference"] for i in idx], [answers[i] for i in idx]
        return {
            **metrics.perplexity([losses[i]["nll"] for i in idx], [losses[i]["n"] for i in idx]),
            **metrics.generation_scores(hyps, refs),
            "n": len(idx),
        }

    out = scores(list(range(len(items))))
    for lang in LANGS:
        if idx := [i for i, it in enumerate(items) if it["lang"] == lang]:
            out[lang] = scores(idx)
    return out


def delta(tuned: dict, base: dict) -> dict:
    return {k: delta(v, base[k]) if isinstance(v, dict) else v - base[k] for k, v in tuned.items() if k != "n"}


def plot_csv(base: dict, tuned: dict) -> str:
    """metric,model,value rows for the grouped bar plot; every metric on a 0-100 scale so they share an axis."""
    buf = stdio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "model", "value"])
    for key, (label, scale) in PLOT_METRICS.items():
        for scope in ("all", *(lang for lang in LANGS if lang in base)):
            for model, res in (("base", base), ("tuned", tuned)):
                w.writerow(
                    [f"{label} ({scope})", model, round((res if scope == "all" else res[scope])[key] * scale, 4)]
                )
    return buf.getvalue()


def _clean(x):
    """NaN (e.g. no reference with key terms) → None: valid JSON that DVC shows as a blank cell."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def score_model(model_dir: Path, items: list[dict], e: config.Evaluate, engine: str, dtype: str, seed: int):
    """(per-row losses, answers, engine used) for a plain HF model folder; `auto` falls back to hf if vLLM fails.
    vLLM runs the weights' `dtype` as serving does; transformers computes in modeling.resolve_dtype("auto")
    (fp32 where bf16 is emulated: on AVX2 CPUs a bf16 forward is ~3x slower, the fp32 one exact on bf16 weights)."""
    tok = modeling.load_tokenizer(model_dir)
    eot = chat.end_of_turn_id(tok)
    prompts = [chat.prompt_ids(tok, it["prompt"]) for it in items]
    eos, pad = eos_ids(model_dir)
    ids = None
    if engine in ("vllm", "auto"):
        try:
            ids = generate_vllm(model_dir, prompts, eos, e.max_new_tokens, dtype, seed)
            engine = "vllm"
        except Exception as err:  # vLLM fails in many ways (no kernels for this CPU, OOM, ...)
            if engine == "vllm":
                raise StageError(f"vLLM generation failed on {model_dir}: {type(err).__name__}: {err}") from err
            log.get("evaluate").warning("vllm_failed_using_hf", error=f"{type(err).__name__}: {err}")
    model = modeling.load_model(model_dir, quantize_4bit=False, dtype=modeling.resolve_dtype("auto")).eval()
    losses = score_loss(model, [chat.encode(tok, it["messages"], eot) for it in items], e.batch_size, model_dir.name)
    if ids is None:
        engine = "hf"
        ids = generate_hf(model, prompts, eos, pad, e.max_new_tokens, e.batch_size)
    del model
    gc.collect()
    return losses, [tok.decode(a, skip_special_tokens=True).strip() for a in ids], engine


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "evaluate")
    e, paths = p.evaluate, p.paths
    logger = log.get("evaluate")
    base_dir = Path(paths.base_dir)
    # Every input up front: a missing merged model must not surface after minutes of scoring the base.
    modeling.require_model_dir(base_dir)
    modeling.require_model_dir(paths.merged_dir, modeling.FIX_MERGE)
    dtype = modeling.read_provenance(base_dir).get("dtype", "bfloat16")
    test_file = Path(paths.processed_dir) / "test.jsonl"
    if not test_file.exists():
        raise StageError(f"{test_file} missing: run `dvc repro preprocess`")
    items = load_items(io.read_jsonl(test_file), e.max_samples)
    engine = e.engine if e.engine != "auto" or vllm_usable() else "hf"
    logger.info("start", samples=len(items), engine=engine, max_new_tokens=e.max_new_tokens)
    torch.manual_seed(p.seed)

    clock = [time.perf_counter()]
    base_losses, base_answers, engine = score_model(base_dir, items, e, engine, dtype, p.seed)
    clock.append(time.perf_counter())
    tuned_losses, tuned_answers, engine = score_model(Path(paths.merged_dir), items, e, engine, dtype, p.seed)
    clock.append(time.perf_counter())

    base, tuned = summarize(items, base_losses, base_answers), summarize(items, tuned_losses, tuned_answers)
    seconds = dict(zip(("base", "tuned"), (round(b - a, 1) for a, b in pairwise(clock)), strict=True))
    compute = {"machine": hardware.machine(), "loss_dtype": modeling.resolve_dtype("auto"), "engine": engine,
               "generate_dtype": dtype if engine == "vllm" else modeling.resolve_dtype("auto")}  # fmt: skip
    result = _clean({
        "base": base,
        "tuned": tuned,
        "delta": delta(tuned, base),
        "compute": compute,
        "timing_s": {**seconds, "total": round(clock[-1] - clock[0], 1)},
    })  # fmt: skip
    samples = [
        {"id": it["id"], "lang": it["lang"], "prompt": it["prompt"][-1]["content"], "reference": it["reference"],
         "base": b, "tuned": t, "recall_base": metrics.term_recall(b, it["reference"]),
         "recall_tuned": metrics.term_recall(t, it["reference"])}
        for it, b, t in zip(items, base_answers, tuned_answers, strict=True)
    ]  # fmt: skip
    io.write_json(paths.eval_metrics, result)
    io.write_jsonl(paths.eval_samples, samples)
    io.write_text(paths.eval_plot, plot_csv(base, tuned))
    logger.info("done", **{f"{m}.{k}": v for m in ("base", "tuned", "delta") for k, v in result[m].items() if k not in LANGS},
                seconds=result["timing_s"])  # fmt: skip
    return result


if __name__ == "__main__":
    stage.run("evaluate", main, __doc__)

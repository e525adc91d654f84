"""evaluate: base vs tuned (the merged model we serve), per language (en/ko), on two sets.

    python -m stages.evaluate [--params params.yaml]

  test split  the first `evaluate.max_samples` test rows in id order (a hash order: stable when rows come or go):
      loss / perplexity on assistant tokens + end-of-turn (llmops.chat.encode labels), and chrF, ROUGE-L and
      keyword recall of the answer to the conversation up to its last assistant turn;
  qa          `paths.qa_set`: questions written apart from the training data, each with the keywords a correct
      answer names (never words of the question: echoing it scores nothing); score = share of keywords named.
Answers: vLLM's offline engine in this process (`evaluate.engine`: vllm; hf = transformers generate; auto = vllm
when it imports; no engine subprocess: ~5 s to start, not ~60), greedy, up to `evaluate.max_new_tokens`, with the
chat template, stop ids and sampling defaults (repetition penalty) of the tuned model's generation_config.json for
both models: what `make serve` answers with. Decoded at whole characters. The merge's gate is not repeated here.
Outputs: `paths.eval_metrics` {"base", "tuned", "delta", "compute"} (`compute`: the machine, dtypes and engine:
bf16 and fp32 machines differ in the last digits), `paths.eval_samples` (per row: both answers and their scores,
`set` test | qa) and `paths.eval_plot` (metric, model, value).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io as stdio
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llmops import chat, config, hardware, io, log, metrics, modeling, stage
from llmops.stage import StageError

LANGS = ("en", "ko")
PLOT_METRICS = {  # key, label, scale: every bar on a 0-100 axis
    ("chrf",): ("chrF", 1.0),
    ("rouge_l",): ("ROUGE-L x100", 100.0),
    ("keyword_recall",): ("keyword recall %", 100.0),
    ("qa", "score"): ("held-out QA %", 100.0),
}


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
    """The held-out QA set; a malformed row (or a keyword its question already contains) is named with the fix."""
    items = []
    for n, r in enumerate(rows, 1):
        kw = r.get("keywords")
        if not isinstance(r.get("question"), str) or r.get("lang") not in LANGS or not kw or not isinstance(kw, list):
            raise StageError(f"{path}: row {n} needs question, lang (en|ko) and a non-empty keywords list")
        if echoed := [k for k in kw if metrics.normalize(k) in metrics.normalize(r["question"])]:
            raise StageError(f"{path}: row {n}: keyword(s) {echoed} appear in the question; echoing it would score")
        items.append({"id": r.get("id", f"qa-{n}"), "lang": r["lang"], "prompt": [{"role": "user", "content":
                      r["question"]}], "keywords": kw})  # fmt: skip
    return items


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


def score_model(model_dir: Path, items: list[dict], qa: list[dict], e: config.Evaluate, engine: str, dtype: str,
                gen_dir: Path, seed: int) -> tuple[list[dict], list[str], list[str], str]:  # fmt: skip
    """(per-row test losses, test answers, QA answers, engine used); `auto` falls back to hf if vLLM fails.
    vLLM runs `dtype` (what serving runs); transformers computes in modeling.resolve_dtype("auto")."""
    tok = modeling.load_tokenizer(model_dir)
    eot = chat.end_of_turn_id(tok)
    prompts = [chat.prompt_ids(tok, it["prompt"]) for it in items + qa]
    eos, defaults = sampling_defaults(gen_dir)
    ids, t0 = None, time.perf_counter()
    if engine in ("vllm", "auto"):
        try:
            ids = generate_vllm(model_dir, prompts, eos, defaults, e.max_new_tokens, dtype, seed)
            engine = "vllm"
        except Exception as err:  # vLLM fails in many ways (no kernels for this CPU, OOM, ...)
            if engine == "vllm":
                raise StageError(f"vLLM generation failed on {model_dir}: {type(err).__name__}: {err}") from err
            log.get("evaluate").warning("vllm_failed_using_hf", error=f"{type(err).__name__}: {err}")
    t1 = time.perf_counter()
    model = modeling.load_model(model_dir, quantize_4bit=False, dtype=modeling.resolve_dtype("auto")).eval()
    losses = assistant_nll(model, [chat.encode(tok, it["messages"], eot) for it in items], f"loss {model_dir.name}")
    t2 = time.perf_counter()
    if ids is None:
        engine = "hf"
        ids = generate_hf(model, prompts, eos, defaults, e.max_new_tokens, e.batch_size)
    del model
    log.get("evaluate").info("scored", model=model_dir.name, engine=engine, answer_tokens=sum(map(len, ids)),
                             generate_s=round(time.perf_counter() - t2 + t1 - t0, 1), loss_s=round(t2 - t1, 1))  # fmt: skip
    gc.collect()
    answers = [decode(tok, a) for a in ids]
    return losses, answers[: len(items)], answers[len(items) :], engine


def summarize(items: list[dict], losses: list[dict], answers: list[str], qa: list[dict], qa_answers: list[str]) -> dict:
    """{loss, perplexity, chrf, rouge_l, keyword_recall, n, qa} over all rows, and the same under "en"/"ko"."""

    def scores(idx: list[int], qa_idx: list[int]) -> dict:
        refs, hyps = [items[i]["reference"] for i in idx], [answers[i] for i in idx]
        qa_scores = [metrics.keyword_score(qa_answers[i], qa[i]["keywords"]) for i in qa_idx]
        return {
            **metrics.perplexity([losses[i]["nll"] for i in idx], [losses[i]["n"] for i in idx]),
            **metrics.generation_scores(hyps, refs),
            "n": len(idx),
            "qa": {"score": sum(qa_scores) / len(qa_scores) if qa_scores else float("nan"), "n": len(qa_scores)},
        }

    out = scores(list(range(len(items))), list(range(len(qa))))
    for lang in LANGS:
        idx = [i for i, it in enumerate(items) if it["lang"] == lang]
        qa_idx = [i for i, it in enumerate(qa) if it["lang"] == lang]
        if idx or qa_idx:
            out[lang] = scores(idx, qa_idx)
    return out


def delta(tuned: dict, base: dict) -> dict:
    return {k: delta(v, base[k]) if isinstance(v, dict) else v - base[k] for k, v in tuned.items() if k != "n"}


def plot_csv(base: dict, tuned: dict) -> str:
    """metric,model,value rows for the grouped bar plot; every metric on a 0-100 scale so they share an axis."""
    buf = stdio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "model", "value"])
    for keys, (label, scale) in PLOT_METRICS.items():
        for scope in ("all", *(lang for lang in LANGS if lang in base)):
            for model, res in (("base", base), ("tuned", tuned)):
                node = res if scope == "all" else res[scope]
                for k in keys:
                    node = node[k]
                w.writerow([f"{label} ({scope})", model, round(node * scale, 4)])
    return buf.getvalue()


def _clean(x):
    """NaN (e.g. no reference with key terms) → None: valid JSON that DVC shows as a blank cell."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "evaluate")
    e, paths = p.evaluate, p.paths
    logger = log.get("evaluate")
    base_dir, merged_dir = Path(paths.base_dir), Path(paths.merged_dir)
    # Every input up front: a missing merged model must not surface after minutes of scoring the base.
    modeling.require_model_dir(base_dir)
    modeling.require_model_dir(merged_dir, modeling.FIX_MERGE)
    # vLLM computes in what `make serve` runs here: fp32 where bf16 is emulated, else the saved 16-bit dtype.
    dtype = hardware.serving_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")
    dtype = modeling.read_provenance(base_dir).get("dtype", "bfloat16") if dtype == "auto" else dtype
    test_file = Path(paths.processed_dir) / "test.jsonl"
    if not test_file.exists():
        raise StageError(f"{test_file} missing: run `dvc repro preprocess`")
    items = test_items(io.read_jsonl(test_file), e.max_samples)
    qa = qa_items(io.read_jsonl(paths.qa_set), paths.qa_set)
    engine = e.engine if e.engine != "auto" or vllm_usable() else "hf"
    logger.info("start", samples=len(items), qa=len(qa), engine=engine, max_new_tokens=e.max_new_tokens)
    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    results = {}
    for name, model_dir in (("base", base_dir), ("tuned", merged_dir)):
        losses, answers, qa_answers, engine = score_model(model_dir, items, qa, e, engine, dtype, merged_dir, p.seed)
        results[name] = (summarize(items, losses, answers, qa, qa_answers), answers, qa_answers)
    (base, b_ans, b_qa), (tuned, t_ans, t_qa) = results["base"], results["tuned"]
    compute = {"machine": hardware.machine(), "loss_dtype": modeling.resolve_dtype("auto"), "engine": engine,
               "generate_dtype": dtype if engine == "vllm" else modeling.resolve_dtype("auto")}  # fmt: skip
    result = _clean({"base": base, "tuned": tuned, "delta": delta(tuned, base), "compute": compute})
    samples = [{"set": "test", "id": it["id"], "lang": it["lang"], "prompt": it["prompt"][-1]["content"],
                "reference": it["reference"], "base": b, "tuned": t, "score_base": metrics.term_recall(b, it["reference"]),
                "score_tuned": metrics.term_recall(t, it["reference"])}
               for it, b, t in zip(items, b_ans, t_ans, strict=True)]  # fmt: skip
    samples += [{"set": "qa", "id": it["id"], "lang": it["lang"], "prompt": it["prompt"][-1]["content"],
                 "reference": " | ".join(it["keywords"]), "base": b, "tuned": t,
                 "score_base": metrics.keyword_score(b, it["keywords"]),
                 "score_tuned": metrics.keyword_score(t, it["keywords"])}
                for it, b, t in zip(qa, b_qa, t_qa, strict=True)]  # fmt: skip
    io.write_json(paths.eval_metrics, result)
    io.write_jsonl(paths.eval_samples, samples)
    io.write_text(paths.eval_plot, plot_csv(base, tuned))
    logger.info("done", seconds=round(time.perf_counter() - t0, 1),
                **{f"{m}.{k}": v for m in ("base", "tuned") for k, v in result[m].items() if k not in LANGS})  # fmt: skip
    return result


if __name__ == "__main__":
    stage.run("evaluate", main, __doc__)

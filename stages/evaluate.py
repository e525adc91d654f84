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
The base model's rows come from `paths.eval_base` (stage evaluate_base: a fine-tune experiment doesn't score the
base again) when they were scored with this run's settings (llmops.scoring.settings), answers cut to
`max_new_tokens` (scoring.cut: answered to `base_max_new_tokens`, so an evaluate-only change reruns this stage
alone), else the base is scored here.
`nearest_train` scores the same sets answered by lookup, not by a model: each question gets the training answer
whose question is closest in wording (`nearest_train`). It marks what the training data can teach: a tuned model
below it on QA recalls only part of what it saw; the base above it on a metric shows that metric rewarding
something else than the trained facts (English chrF: fluent length).
Outputs: `paths.eval_metrics` {"base", "tuned", "delta", "delta_ci95", "nearest_train", "compute"} (`delta_ci95`:
95% paired-bootstrap intervals of the answer metrics' deltas, `delta_ci`; `compute`: the machine, dtypes and
engine: bf16 and fp32 machines differ in the last digits), `paths.eval_samples` (per row: the answers
and scores, `set` test | qa) and `paths.eval_plot` (metric, model, value).
"""

from __future__ import annotations

import csv
import io as stdio
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from llmops import config, dedup, hardware, io, log, metrics, modeling, scoring, stage
from llmops.scoring import LANGS
from llmops.stage import StageError

BOOTSTRAP = 1000  # resamples for delta_ci95 (a method constant, not a knob: more moves the bounds' last digit)
PLOT_METRICS = {  # key, label, scale: every bar on a 0-100 axis
    ("chrf",): ("chrF", 1.0),
    ("rouge_l",): ("ROUGE-L x100", 100.0),
    ("keyword_recall",): ("keyword recall %", 100.0),
    ("qa", "score"): ("held-out QA %", 100.0),
}


def train_rows(paths: config.Paths, synthetic_repeats: int) -> list[dict]:
    """The conversations the tuned model was trained on: the seed train split, and the synthetic rows when
    `train.synthetic_repeats` mixed them in."""
    files = [Path(paths.processed_dir) / "train.jsonl"] + [Path(paths.synthetic_train)] * bool(synthetic_repeats)
    if missing := [str(f) for f in files if not f.exists()]:
        raise StageError(f"{', '.join(missing)} missing: run `dvc repro preprocess synthetic`")
    return [r for f in files for r in io.read_jsonl(f)]


def nearest_train(rows: list[dict], questions: list[str]) -> list[str]:
    """Per question, the reply to the most similar user turn of the training conversations (character 5-gram
    Jaccard, llmops.dedup; ties: the first in file order; "" when none shares a 5-gram): what a model recalling its
    training data perfectly, looked up by the question's wording, would answer. The nearest-neighbour baseline of
    test/train overlap studies (Lewis et al. 2021): a reference point for the metrics, not a model."""
    pairs = [(m["content"], r["messages"][i + 1]["content"]) for r in rows for i, m in enumerate(r["messages"][:-1])
             if m["role"] == "user" and r["messages"][i + 1]["role"] == "assistant"]  # fmt: skip
    if not pairs or not questions:
        return [""] * len(questions)
    sims = dedup.jaccard(dedup.shingles(questions), dedup.shingles([q for q, _ in pairs]))  # sparse: any data size
    best, top = np.asarray(sims.argmax(axis=1)).ravel(), sims.max(axis=1).toarray().ravel()
    return [pairs[j][1] if s > 0 else "" for j, s in zip(best, top, strict=True)]


def summarize(
    items: list[dict], losses: list[dict] | None, answers: list[str], qa: list[dict], qa_answers: list[str]
) -> dict:
    """{loss, perplexity, chrf, rouge_l, keyword_recall, n, qa} over all rows, and the same under "en"/"ko"
    (no loss/perplexity without `losses`: the nearest-train reference has none)."""

    def scores(idx: list[int], qa_idx: list[int]) -> dict:
        refs, hyps = [items[i]["reference"] for i in idx], [answers[i] for i in idx]
        qa_scores = [metrics.keyword_score(qa_answers[i], qa[i]["keywords"]) for i in qa_idx]
        return {
            **(metrics.perplexity([losses[i]["nll"] for i in idx], [losses[i]["n"] for i in idx]) if losses else {}),
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


def _draws(langs: list[str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """BOOTSTRAP x n row indices per language, drawn within it, and "all": the languages' draws side by side (so
    the en/ko mix of a resample is the set's)."""
    out = {}
    for lang in LANGS:
        if len(idx := np.flatnonzero(np.array(langs) == lang)):
            out[lang] = idx[rng.integers(0, len(idx), (BOOTSTRAP, len(idx)))]
    return {"all": np.concatenate(list(out.values()), axis=1), **out} if out else {}


def _interval(x: np.ndarray) -> dict:
    lo, hi = np.nanpercentile(x, [2.5, 97.5]) if not np.isnan(x).all() else (np.nan, np.nan)
    return {"lo": round(float(lo), 4), "hi": round(float(hi), 4)}


def delta_ci(items: list[dict], qa: list[dict], answers: dict[str, tuple[list[str], list[str]]], seed: int) -> dict:
    """95% paired-bootstrap intervals of tuned - base for the answer metrics (chrF, ROUGE-L, keyword recall, QA),
    overall and per language, shaped like `delta`: the same resampled rows for both models, percentile bounds to 4
    digits. With ~20 rows a language, a delta whose interval holds 0 is one another draw of questions could undo."""
    refs = [it["reference"] for it in items]
    rows = {}  # per model: per-row recall (nan: a reference without key terms), ROUGE-L, chrF counts, QA score
    for m, (ans, qa_ans) in answers.items():
        recall = [metrics.term_recall(a, r) for a, r in zip(ans, refs, strict=True)]
        qa_scores = [metrics.keyword_score(a, it["keywords"]) for a, it in zip(qa_ans, qa, strict=True)]
        rows[m] = {"keyword_recall": np.array([np.nan if x is None else x for x in recall]), "qa": np.array(qa_scores),
                   "rouge_l": np.array(metrics.rouge_l_scores(ans, refs)), "chrf": metrics.chrf_stats(ans, refs)}  # fmt: skip
    t, b = rows["tuned"], rows["base"]
    rng = np.random.default_rng(seed)
    test, qa_draws = _draws([it["lang"] for it in items], rng), _draws([it["lang"] for it in qa], rng)
    out: dict = {}
    for scope in ("all", *LANGS):
        node: dict = {}
        if (d := test.get(scope)) is not None:
            with warnings.catch_warnings(action="ignore"):  # a resample whose references have no key terms: nan
                node["keyword_recall"] = _interval(np.nanmean(t["keyword_recall"][d], 1)
                                                   - np.nanmean(b["keyword_recall"][d], 1))  # fmt: skip
            node["rouge_l"] = _interval(t["rouge_l"][d].mean(1) - b["rouge_l"][d].mean(1))
            chrf = {m: np.array([metrics.chrf_from_stats(s) for s in r["chrf"][d].sum(1)]) for m, r in rows.items()}
            node["chrf"] = _interval(chrf["tuned"] - chrf["base"])
        if (d := qa_draws.get(scope)) is not None:
            node["qa"] = {"score": _interval(t["qa"][d].mean(1) - b["qa"][d].mean(1))}
        if scope == "all":
            out.update(node)
        elif node:
            out[scope] = node
    return out


def plot_csv(models: dict[str, dict]) -> str:
    """metric,model,value rows for the grouped bar plot; every metric on a 0-100 scale so they share an axis."""
    buf = stdio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "model", "value"])
    for keys, (label, scale) in PLOT_METRICS.items():
        for scope in ("all", *(lang for lang in LANGS if lang in models["base"])):
            for model, res in models.items():
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


def base_scores(paths: config.Paths, expected: dict, max_new: int) -> dict | None:
    """evaluate_base's rows when they were scored with `expected` settings, at least `max_new` tokens long and with
    their token ids, else None (and the log says why)."""
    path, logger = Path(paths.eval_base), log.get("evaluate")
    if not path.exists():
        return None
    stored = io.read_json(path)
    have = stored.get("settings") if isinstance(stored, dict) else None
    if have != expected:
        have = have if isinstance(have, dict) else {}  # not evaluate_base's shape: a stale cache, scored again
        differ = sorted(k for k in expected.keys() | have.keys() if have.get(k) != expected.get(k))
        why = f"scored with other {', '.join(differ)}"
    elif max_new > have["max_new_tokens"]:
        why = f"evaluate.max_new_tokens {max_new} > the {have['max_new_tokens']} answered there"
        why += " (evaluate.base_max_new_tokens)"
    elif not {"answer_ids", "qa_answer_ids"} <= stored.keys():
        why = "it has no answer ids"
    else:
        return stored
    logger.info("base_rescored", reason=f"{path}: {why}")
    return None


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "evaluate", "train")
    e, paths = p.evaluate, p.paths
    logger = log.get("evaluate")
    base_dir, merged_dir = Path(paths.base_dir), Path(paths.merged_dir)
    # Every input up front: a missing merged model must not surface after minutes of scoring.
    modeling.require_model_dir(base_dir)
    modeling.require_model_dir(merged_dir, modeling.FIX_MERGE)
    dtype = scoring.generate_dtype(base_dir)
    items, qa = scoring.eval_sets(paths, e)
    trained_on = train_rows(paths, p.train.synthetic_repeats)
    engine = scoring.resolve_engine(e.engine)
    logger.info("start", samples=len(items), qa=len(qa), engine=engine, max_new_tokens=e.max_new_tokens)
    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    eos, defaults = scoring.sampling_defaults(merged_dir)  # what the tuned model is served with; the base gets the same

    def score(model_dir: Path, engine: str) -> dict:
        return scoring.score_model(model_dir, items, qa, e, engine, dtype, eos, defaults, p.seed, "evaluate",
                                   e.max_new_tokens)  # fmt: skip

    scored = {"tuned": score(merged_dir, engine)}
    engine = scored["tuned"]["engine"]  # the base is scored alike: no second vLLM try after a fallback
    want = scoring.settings(base_dir, items, qa, eos, defaults, e, engine, dtype, p.seed)
    stored = base_scores(paths, want, e.max_new_tokens)
    scored["base"] = scoring.cut(base_dir, stored, e.max_new_tokens) if stored else score(base_dir, engine)
    results = {m: (summarize(items, s["losses"], s["answers"], qa, s["qa_answers"]), s["answers"], s["qa_answers"])
               for m, s in scored.items()}  # fmt: skip
    (base, b_ans, b_qa), (tuned, t_ans, t_qa) = results["base"], results["tuned"]
    near = nearest_train(trained_on, [it["prompt"][-1]["content"] for it in items + qa])
    n_ans, n_qa = near[: len(items)], near[len(items) :]
    nearest = summarize(items, None, n_ans, qa, n_qa)
    compute = {"machine": hardware.machine(), "loss_dtype": modeling.resolve_dtype("auto"), "engine": engine,
               "generate_dtype": dtype if engine == "vllm" else modeling.resolve_dtype("auto")}  # fmt: skip
    ci = delta_ci(items, qa, {"base": (b_ans, b_qa), "tuned": (t_ans, t_qa)}, p.seed)
    result = _clean({"base": base, "tuned": tuned, "delta": delta(tuned, base), "delta_ci95": ci,
                     "nearest_train": nearest, "compute": compute})  # fmt: skip
    samples = [{"set": "test", "id": it["id"], "lang": it["lang"], "prompt": it["prompt"][-1]["content"],
                "reference": it["reference"], "base": b, "tuned": t, "nearest_train": n,
                "score_base": metrics.term_recall(b, it["reference"]),
                "score_tuned": metrics.term_recall(t, it["reference"])}
               for it, b, t, n in zip(items, b_ans, t_ans, n_ans, strict=True)]  # fmt: skip
    samples += [{"set": "qa", "id": it["id"], "lang": it["lang"], "prompt": it["prompt"][-1]["content"],
                 "reference": " | ".join(it["keywords"]), "base": b, "tuned": t, "nearest_train": n,
                 "score_base": metrics.keyword_score(b, it["keywords"]),
                 "score_tuned": metrics.keyword_score(t, it["keywords"])}
                for it, b, t, n in zip(qa, b_qa, t_qa, n_qa, strict=True)]  # fmt: skip
    io.write_json(paths.eval_metrics, result)
    io.write_jsonl(paths.eval_samples, samples)
    io.write_text(paths.eval_plot, plot_csv({"base": base, "tuned": tuned, "nearest_train": nearest}))
    logger.info("done", seconds=round(time.perf_counter() - t0, 1),
                **{f"{m}.{k}": v for m in ("base", "tuned") for k, v in result[m].items() if k not in LANGS})  # fmt: skip
    return result


if __name__ == "__main__":
    stage.run("evaluate", main, __doc__)

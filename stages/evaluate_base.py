"""evaluate_base: the base model's answers and losses on evaluate's two sets, scored once for every fine-tune.

    python -m stages.evaluate_base [--params params.yaml]

The base model does not change when a fine-tune does. As a stage of its own, DVC skips it on
`dvc exp run -S train.lr=…` and evaluate scores only the tuned model (half of evaluate's time). Scored exactly as
evaluate scores the tuned model (llmops.scoring): same sets, engine and dtype, greedy decoding with the stop ids
and repetition penalty the merged model will be served with (the base's eos + end-of-turn, as merge saves them,
and `merge.generation.repetition_penalty`).
Answers run to `evaluate.base_max_new_tokens`, not `max_new_tokens`: evaluate cuts them to its budget (greedy
decoding gives the same first tokens), so `dvc exp run -S evaluate.max_new_tokens=…` up to that reruns evaluate alone.
Output: `paths.eval_base` {"settings", "engine", "losses", "answers", "qa_answers", "answer_ids", "qa_answer_ids"}
(ids space-separated, one string per answer): evaluate uses the rows only when its own settings match (on another
machine kind, after vLLM fell back to transformers, or for a budget above this one, it scores the base itself and
logs why).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from llmops import config, io, log, modeling, scoring, stage


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "evaluate", "merge")
    e, paths = p.evaluate, p.paths
    base_dir = Path(paths.base_dir)
    modeling.require_model_dir(base_dir)
    items, qa = scoring.eval_sets(paths, e)
    eos, defaults = scoring.served_sampling(base_dir, p.merge.generation)
    dtype, engine = scoring.generate_dtype(base_dir), scoring.resolve_engine(e.engine)
    logger = log.get("evaluate_base")
    logger.info(
        "start", samples=len(items), qa=len(qa), engine=engine, dtype=dtype, max_new_tokens=e.base_max_new_tokens
    )
    torch.manual_seed(p.seed)
    t0 = time.perf_counter()
    scored = scoring.score_model(
        base_dir, items, qa, e, engine, dtype, eos, defaults, p.seed, "evaluate_base", e.base_max_new_tokens
    )
    settings = scoring.settings(base_dir, items, qa, eos, defaults, e, scored["engine"], dtype, p.seed)
    out = {"settings": settings, **scored}
    io.write_json(paths.eval_base, out)
    logger.info("done", seconds=round(time.perf_counter() - t0, 1), engine=scored["engine"])
    return out


if __name__ == "__main__":
    stage.run("evaluate_base", main, __doc__)

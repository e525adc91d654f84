"""synthetic: train-only Q&A grounded in the docs snapshot (offline) or from a teacher LLM.

    python -m stages.synthetic [--params params.yaml]

Generators (`synthetic.generator`):
  docs     (default; offline, deterministic; llmops.docs_qa) questions shaped like the ones people ask ("How do I upload tracked
           files or directories to remote storage?", "Which flag of `dvc push` ...?") answered by the command,
           option or field that does it. First the hand-written en/ko facts of `paths.synthetic_facts` (what
           people ask most, in their words), then facts mined from `paths.docs_snapshot`, answered in the words of
           the documentation (or, in Korean, its hand translation in `paths.synthetic_templates`; commands without
           one get no Korean rows). Phrasings come from the templates file, several per kind and language, picked
           per fact by the seed; curated facts first (each answer then states the next
           `synthetic.docs.curated_related` facts of its tool), then commands, options, API fields.
  teacher  self-instruct through any OpenAI-compatible endpoint (llmops.teacher), cached in `paths.teacher_cache`.
Filters, counted in `paths.synthetic_metrics`: empty, refusal, answer length, language, flags a docs-seeded
teacher answer invents, exact and near duplicates (llmops.dedup) against every processed split, the held-out QA
questions (`paths.qa_set`: nothing leaks into evaluation) and within the synthetic set, and the token budget
`preprocess.max_seq_len`. At most `synthetic.max_rows` rows; output `paths.synthetic_train` in the processed-row
contract (source `synthetic:<generator>`); synthetic rows only ever feed training.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import numpy as np
from scipy import sparse

from llmops import chat, config, dedup, docs_qa, io, log, modeling, stage, teacher, text
from llmops.stage import StageError

REASONS = ("empty", "unparseable", "refusal", "too_short", "too_long", "wrong_lang", "ungrounded_flag",
           "seed_exact_dup", "seed_near_dup", "heldout_near_dup", "exact_dup", "near_dup", "too_long_tokens")  # fmt: skip
REFUSAL = re.compile(r"\b(I'?m sorry|I am sorry|I can(?:no|')t|I am unable|I'm unable|As an AI)\b|죄송|할 수 없습니다|"
                     r"답변(?:할|을 드릴) 수 없", re.IGNORECASE)  # fmt: skip
FLAG = re.compile(r"(?<![\w./=-])--?[A-Za-z][\w-]*")  # a command-line flag mentioned in prose
BATCH = 256
# A question this similar (character 5-gram Jaccard) to a held-out QA question is dropped, whatever
# near_dup_threshold says: the QA set must stay phrased apart from training (the bound its test checks).
HELDOUT_SIMILARITY = 0.5


# ---------------------------------------------------------------- filters


def row_reason(c: docs_qa.Candidate, s: config.Synthetic) -> str | None:
    """The first cheap (per-row) filter a candidate fails, or None."""
    if c.kind == "teacher:unparseable":
        return "unparseable"
    if not c.question.strip() or not c.answer.strip():
        return "empty"
    if REFUSAL.search(c.answer):
        return "refusal"
    if len(c.answer) < s.min_answer_chars:
        return "too_short"
    if len(c.answer) > s.max_answer_chars:
        return "too_long"
    if any(text.detect_lang(x) != c.lang for x in (c.question, c.answer)):  # code spans are left out there
        return "wrong_lang"
    if c.kind == "teacher:docs" and any(f not in c.grounding for f in FLAG.findall(c.answer)):
        return "ungrounded_flag"  # a docs-seeded teacher answer may only name flags its documentation shows
    return None


def select(candidates, seed_rows: list[dict], heldout: list[str], s: config.Synthetic, tokenizer, max_len: int,
           source: str) -> tuple[list[dict], Counter, int]:  # fmt: skip
    """Greedy in candidate order: keep a row unless it fails a filter; stop at max_rows.

    Near duplicates: against seed data (every processed split) when the question or the whole conversation is
    >= threshold similar, against the held-out QA questions by the question (>= HELDOUT_SIMILARITY); within the synthetic set when
    question and answer both are (several phrasings of one fact, which may share an answer, are kept on purpose).
    """
    t, eot = s.near_dup_threshold, chat.end_of_turn_id(tokenizer)
    seed_ids = {r["id"] for r in seed_rows}
    seed_q = dedup.shingles([m["content"] for r in seed_rows for m in r["messages"] if m["role"] == "user"] or [""])
    seed_full = dedup.shingles(["\n".join(m["content"] for m in r["messages"] if m["role"] != "system")
                                for r in seed_rows] or [""])  # fmt: skip
    held = dedup.shingles(heldout or [""])
    kept: list[dict] = []
    kept_q, kept_a = dedup.shingles([]), dedup.shingles([])
    counts = Counter({r: 0 for r in REASONS})
    examined, it = 0, iter(candidates)
    while len(kept) < s.max_rows and (batch := list(itertools.islice(it, BATCH))):
        qm, am = dedup.shingles([c.question for c in batch]), dedup.shingles([c.answer for c in batch])
        near_seed = dedup.near_any(qm, seed_q, t) | dedup.near_any(
            dedup.shingles([f"{c.question}\n{c.answer}" for c in batch]), seed_full, t)  # fmt: skip
        near_held = dedup.near_any(qm, held, min(t, HELDOUT_SIMILARITY))
        near_kept = (dedup.jaccard(qm, kept_q) >= t).multiply(dedup.jaccard(am, kept_a) >= t).getnnz(axis=1) > 0
        near_batch = (dedup.jaccard(qm, qm) >= t).multiply(dedup.jaccard(am, am) >= t).toarray()
        taken, kept_ids = [], {r["id"] for r in kept}
        for i, c in enumerate(batch):
            if len(kept) >= s.max_rows:
                break
            examined += 1
            messages = [{"role": "user", "content": c.question}, {"role": "assistant", "content": c.answer}]
            rid = text.row_id(messages)
            reason = row_reason(c, s) or next((r for r, hit in (
                ("seed_exact_dup", rid in seed_ids), ("seed_near_dup", near_seed[i]), ("heldout_near_dup", near_held[i]),
                ("exact_dup", rid in kept_ids), ("near_dup", near_kept[i] or any(near_batch[i, j] for j in taken)),
            ) if hit), None)  # fmt: skip
            if reason is None:
                try:
                    n_tokens = len(chat.encode(tokenizer, messages, eot, max_len).input_ids)
                except chat.ChatFormatError:
                    reason = "too_long_tokens"
            if reason is not None:
                counts[reason] += 1
                continue
            taken.append(i)
            kept_ids.add(rid)
            kept.append({"id": rid, "messages": messages, "lang": c.lang, "source": source, "n_tokens": n_tokens,
                         "_kind": c.kind})  # fmt: skip
        kept_q = sparse.vstack([kept_q, qm[taken]], format="csr")
        kept_a = sparse.vstack([kept_a, am[taken]], format="csr")
    return kept, counts, examined


# ---------------------------------------------------------------- main


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "synthetic", "preprocess")
    s, paths = p.synthetic, p.paths
    logger = log.get("synthetic")
    splits = {}
    for name in ("train", "val", "test"):
        f = Path(paths.processed_dir) / f"{name}.jsonl"
        if not f.exists():
            raise StageError(f"{f} missing: run `dvc repro preprocess` (or python -m stages.preprocess) first")
        splits[name] = io.read_jsonl(f)
    for f, fix in ((paths.docs_snapshot, "dvc repro docs_snapshot"), (paths.synthetic_templates, "git checkout it"),
                   (paths.synthetic_facts, "git checkout it"), (paths.qa_set, "git checkout it")):  # fmt: skip
        if not Path(f).exists():
            raise StageError(f"{f} missing: {fix}")
    snap = io.read_json(paths.docs_snapshot)
    templates = docs_qa.read_yaml(paths.synthetic_templates)
    heldout = [r["question"] for r in io.read_jsonl(paths.qa_set)]
    curated = docs_qa.with_related(docs_qa.curated_facts(docs_qa.read_yaml(paths.synthetic_facts),
                                                         paths.synthetic_facts), s.docs.curated_related)  # fmt: skip
    facts = curated + docs_qa.facts(snap, templates.get("skip") or [], templates.get("ko") or {})
    stats = teacher.TeacherStats()
    if s.generator == "docs":
        candidates = docs_qa.candidates(facts, templates, s.docs.phrasings, p.seed, s.docs.curated_phrasings)
    else:
        cache = {e["key"]: e for e in io.read_jsonl(paths.teacher_cache)} if Path(paths.teacher_cache).exists() else {}
        seeds = [{"lang": c.lang, "question": c.question, "context": c.grounding}
                 for c in docs_qa.candidates(facts, templates, 1, p.seed)]  # fmt: skip
        prompts = teacher.make_prompts(s.teacher, splits["train"], seeds, p.seed)
        try:
            stats = teacher.ask(s.teacher, prompts, cache, logger)
        finally:  # keep what was fetched even when a later request fails
            io.write_jsonl(paths.teacher_cache, [cache[k] for k in sorted(cache)])
        candidates = (docs_qa.Candidate(*a) for a in teacher.answers(prompts, cache, s.teacher))
    if not Path(paths.teacher_cache).exists():
        io.write_jsonl(paths.teacher_cache, [])  # a declared (persisted) DVC out even when the teacher is not used
    tokenizer = modeling.load_tokenizer(paths.base_dir)
    seed_rows = [r for rows in splits.values() for r in rows]
    rows, counts, examined = select(candidates, seed_rows, heldout, s, tokenizer, p.preprocess.max_seq_len,
                                    f"synthetic:{s.generator}")  # fmt: skip
    kinds = Counter(r.pop("_kind") for r in rows)
    rows.sort(key=lambda r: r["id"])
    io.write_jsonl(paths.synthetic_train, rows)
    lengths = np.array([r["n_tokens"] for r in rows] or [0])
    metrics = {
        "generator": s.generator,
        "candidates": examined,
        "rows": len(rows),
        "filtered": dict(counts),
        "rows_by_lang": dict(sorted(Counter(r["lang"] for r in rows).items())),
        "rows_by_kind": dict(sorted(kinds.items())),
        "tokens": {"total": int(lengths.sum()), "p50": int(np.percentile(lengths, 50)), "max": int(lengths.max())},
        "snapshot_versions": snap["versions"],
    }
    io.write_json(paths.synthetic_metrics, metrics)
    logger.info("summary", rows=len(rows), candidates=examined, filtered={k: v for k, v in counts.items() if v},
                teacher_requests=stats.requests, teacher_cache_hits=stats.cache_hits)  # fmt: skip
    return {**metrics, "run": {"teacher_requests": stats.requests, "teacher_cache_hits": stats.cache_hits}}


if __name__ == "__main__":
    stage.run("synthetic", main, __doc__)

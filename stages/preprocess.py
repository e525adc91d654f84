"""preprocess: raw chat data in any common format → validated, deduplicated, split conversations.

    python -m stages.preprocess [--params params.yaml]

Reads every `preprocess.sources` entry (JSON, JSONL, Parquet, CSV, a `datasets.save_to_disk` folder, or
`hf:ORG/NAME` when online), detects or is told the format (OpenAI `messages`, ShareGPT
`conversations/from/value`, Alpaca `instruction/input/output`), normalises to messages and validates each
row with the base model's own chat template (roles, alternation, empty content, token length, end-of-turn).
Bad rows (control characters included) go to `paths.rejected` with a reason each; exact duplicates are dropped
(and listed there too). Text files are read as UTF-8 (a BOM is dropped); an undecodable line, or a source that
yields no usable rows, fails the stage naming the file.
Splits are hash-based on the content id, so a row keeps its split when other rows come or go.
Reading and format normalisation live in `llmops/sources.py`.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from llmops import chat, config, io, log, sources, stage, text
from llmops.stage import StageError

SPLITS = ("train", "val", "test")

# C0/C1 control characters and DEL: invisible when a row is reviewed, they reach the tokenizer and the served
# model as garbage and usually mean a binary or mis-decoded export. Tab, newline and carriage return are text.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def check_control_chars(messages: list[dict]) -> list[dict]:
    """Return the messages, or raise ChatFormatError("control_chars") naming the message and the character."""
    for i, m in enumerate(messages):
        if hit := CONTROL_CHARS.search(m["content"]):
            raise chat.ChatFormatError(
                "control_chars",
                f"message {i} ({m['role']}) has control character U+{ord(hit.group()):04X} at character "
                f"{hit.start() + 1}; strip it from the source",
            )
    return messages


def assign_split(row_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    """Deterministic split from the content hash: independent of row order and of the other rows."""
    u = int(hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()[:15], 16) / 16**15
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def process(records: Iterator[tuple[str, int, Any, str]], tokenizer, pp: config.Preprocess, seed: int):
    """Validate, encode, dedup and split; return (splits, rejected rows, duplicate count)."""
    eot = chat.end_of_turn_id(tokenizer)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    rejected: list[dict] = []
    seen: dict[str, str] = {}
    for source, n, record, fmt in records:
        where = {"source": source, "row": n}
        try:
            messages = check_control_chars(chat.validate_messages(sources.to_messages(record, fmt)))
            enc = chat.encode(tokenizer, messages, eot, pp.max_seq_len)
        except chat.ChatFormatError as e:
            rejected.append({**where, "reason": e.reason, "detail": str(e)})
            continue
        rid = text.row_id(messages)
        if rid in seen:
            rejected.append({**where, "reason": "duplicate", "detail": f"same content as {seen[rid]}"})
            continue
        seen[rid] = f"{source}:{n}"
        row = {
            "id": rid,
            "messages": messages,
            "lang": text.conversation_lang(messages),
            "source": source,
            "n_tokens": len(enc.input_ids),
        }
        splits[assign_split(rid, seed, pp.val_frac, pp.test_frac)].append(row)
    for rows in splits.values():
        rows.sort(key=lambda r: r["id"])
    return splits, rejected


def unusable_sources(records: list[tuple[str, int, Any, str]], rejected: list[dict]) -> list[str]:
    """Describe each source whose rows were all rejected as invalid: under max_rejected_frac it would add nothing
    and say nothing. Duplicates count as usable (their content is kept, from another row)."""
    invalid: dict[str, list[dict]] = {}
    for r in rejected:
        if r["reason"] != "duplicate":
            invalid.setdefault(r["source"], []).append(r)
    out = []
    for source, n in Counter(rec[0] for rec in records).items():
        bad = invalid.get(source, [])
        if len(bad) == n:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(Counter(r["reason"] for r in bad).items()))
            first = f"first: row {bad[0]['row']}: {bad[0]['detail']}"
            out.append(f"{source}: no usable rows ({n} rows, all rejected: {reasons}; {first})")
    return out


def summarize(splits: dict[str, list[dict]], rejected: list[dict], rows_in: int) -> dict:
    lengths = np.array([r["n_tokens"] for rows in splits.values() for r in rows] or [0])
    by_reason = Counter(r["reason"] for r in rejected)
    return {
        "rows_in": rows_in,
        "rows_kept": sum(len(v) for v in splits.values()),
        "splits": {s: len(v) for s, v in splits.items()},
        "lang": {s: dict(sorted(Counter(r["lang"] for r in v).items())) for s, v in splits.items()},
        "rejected": {
            "total": len(rejected),
            "invalid": len(rejected) - by_reason.get("duplicate", 0),
            "by_reason": dict(sorted(by_reason.items())),
        },
        "tokens": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
    }


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "preprocess")
    pp, paths = p.preprocess, p.paths
    logger = log.get("preprocess")
    from llmops.modeling import load_tokenizer

    tokenizer = load_tokenizer(paths.base_dir)

    def records():
        for src in pp.sources:
            for n, rec in sources.read_source(src):
                yield src.path, n, rec, src.format

    all_records = list(tqdm(records(), desc="read", unit="row", disable=None))
    splits, rejected = process(
        tqdm(all_records, desc="validate+encode", unit="row", disable=None), tokenizer, pp, p.seed
    )
    metrics = summarize(splits, rejected, len(all_records))
    logger.info("summary", **{k: metrics[k] for k in ("rows_in", "rows_kept", "splits")}, rejected=metrics["rejected"])
    invalid_share = metrics["rejected"]["invalid"] / max(1, len(all_records))
    # Quarantine is written even when the stage then fails, so the user can read what went wrong.
    io.write_jsonl(paths.rejected, rejected)
    if invalid_share > pp.max_rejected_frac:
        top = ", ".join(f"{k}={v}" for k, v in metrics["rejected"]["by_reason"].items())
        first = next(r for r in rejected if r["reason"] != "duplicate")
        raise StageError(
            f"{metrics['rejected']['invalid']}/{len(all_records)} rows rejected ({invalid_share:.1%} > "
            f"preprocess.max_rejected_frac={pp.max_rejected_frac}): {top}; first: {first['source']} row "
            f"{first['row']}: {first['reason']}; fix the rows or the source's format, see {paths.rejected}"
        )
    if dead := unusable_sources(all_records, rejected):
        raise StageError(
            f"{'; '.join(dead)}; fix the rows or the source's format (messages, sharegpt or alpaca) in "
            f"preprocess.sources, or remove the source; see {paths.rejected}"
        )
    if not splits["train"]:
        raise StageError("no training rows left after validation; check preprocess.sources")
    with io.atomic_dir(paths.processed_dir) as tmp:
        for name, rows in splits.items():
            io.write_jsonl(tmp / f"{name}.jsonl", rows)
    io.write_json(paths.data_metrics, metrics)
    return metrics


if __name__ == "__main__":
    stage.run("preprocess", main, __doc__)

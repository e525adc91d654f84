"""preprocess: raw chat data in any common format → validated, deduplicated, split conversations.

    python -m stages.preprocess [--params params.yaml]

Reads every `preprocess.sources` entry (JSON, JSONL, Parquet, CSV, a `datasets.save_to_disk` folder, or
`hf:ORG/NAME` when online), detects or is told the format (OpenAI `messages`, ShareGPT
`conversations/from/value`, Alpaca `instruction/input/output`), normalises to messages and validates each
row with the base model's own chat template (roles, alternation, empty content, token length, end-of-turn).
Bad rows go to `paths.rejected` with a reason each; exact duplicates are dropped (and listed there too).
Splits are hash-based on the content id, so a row keeps its split when other rows come or go.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmops import chat, config, io, log, stage, text

SPLITS = ("train", "val", "test")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


class PreprocessError(stage.StageError):
    pass


# ---------------------------------------------------------------- reading


def read_source(src: config.Source) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw record). JSONL is parsed line by line so one broken line is quarantined
    instead of failing the whole file (Arrow's JSON reader rejects the file on the first bad line)."""
    spec = src.path
    if spec.startswith("hf:"):
        import datasets

        yield from enumerate(datasets.load_dataset(spec[3:], split=src.split), start=1)
        return
    path = Path(spec)
    if not path.exists():
        raise PreprocessError(f"preprocess.sources: {spec} does not exist (fix the path in params.yaml)")
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[src.split]
        yield from enumerate(ds, start=1)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, _Invalid(f"invalid_json: {e.msg} at column {e.colno}")
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise PreprocessError(f"{spec}: a .json source must hold a list of records (or {{'data': [...]}})")
        yield from enumerate(data, start=1)
    elif suffix in (".parquet", ".csv"):
        import datasets

        builder = "parquet" if suffix == ".parquet" else "csv"
        yield from enumerate(datasets.load_dataset(builder, data_files=str(path), split="train"), start=1)
    else:
        raise PreprocessError(
            f"{spec}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .csv or a folder)"
        )


class _Invalid:
    def __init__(self, reason: str):
        self.reason = reason


# ---------------------------------------------------------------- normalising


def detect_format(record: dict) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise chat.ChatFormatError("unknown_format", f"keys {sorted(record)} match none of messages/sharegpt/alpaca")


def _maybe_json(value: Any) -> Any:
    # CSV and some Parquet exports store the message list as a JSON string.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def to_messages(record: Any, fmt: str) -> list[dict]:
    """Normalise one record to OpenAI messages (unvalidated) or raise ChatFormatError(reason)."""
    if isinstance(record, _Invalid):
        raise chat.ChatFormatError(*record.reason.split(": ", 1))
    if not isinstance(record, dict):
        raise chat.ChatFormatError("not_an_object", f"got {type(record).__name__}")
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "messages":
        if "messages" not in record:
            raise chat.ChatFormatError("missing_field", "no 'messages' key")
        return _maybe_json(record["messages"])
    if fmt == "sharegpt":
        turns = _maybe_json(record.get("conversations"))
        if not isinstance(turns, list):
            raise chat.ChatFormatError("missing_field", "no 'conversations' list")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or "from" not in t or "value" not in t:
                raise chat.ChatFormatError("bad_message", f"turn {i} lacks from/value")
            if t["from"] not in SHAREGPT_ROLES:
                raise chat.ChatFormatError("bad_role", f"turn {i} has from={t['from']!r}")
            out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        if isinstance(record.get("system"), str) and record["system"].strip():
            out.insert(0, {"role": "system", "content": record["system"]})
        return out
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise chat.ChatFormatError("missing_field", f"no string {key!r}")
        user = record["instruction"].strip()
        if isinstance(record.get("input"), str) and record["input"].strip():
            user = f"{user}\n\n{record['input'].strip()}"
        out = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            out.insert(0, {"role": "system", "content": record["system"]})
        return out
    raise chat.ChatFormatError("unknown_format", fmt)


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
            messages = chat.validate_messages(to_messages(record, fmt))
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
            for n, rec in read_source(src):
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
        raise PreprocessError(
            f"{metrics['rejected']['invalid']}/{len(all_records)} rows rejected ({invalid_share:.1%} > "
            f"preprocess.max_rejected_frac={pp.max_rejected_frac}): {top}; first: {first['source']} row "
            f"{first['row']}: {first['reason']}; fix the rows or the source's format, see {paths.rejected}"
        )
    if not splits["train"]:
        raise PreprocessError("no training rows left after validation; check preprocess.sources")
    with io.atomic_dir(paths.processed_dir) as tmp:
        for name, rows in splits.items():
            io.write_jsonl(tmp / f"{name}.jsonl", rows)
    io.write_json(paths.data_metrics, metrics)
    return metrics


if __name__ == "__main__":
    stage.run("preprocess", main, __doc__)

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
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from llmops import chat, config, io, log, stage, text
from llmops.stage import StageError

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


# ---------------------------------------------------------------- reading


def read_source(src: config.Source) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw record); a source that yields nothing is an error, never a silent 0 rows."""
    empty = True
    for item in _read_rows(src):
        empty = False
        yield item
    if empty:
        raise StageError(
            f"{src.path}: no rows (an empty file or dataset); fill it or remove it from preprocess.sources"
        )


def _read_rows(src: config.Source) -> Iterator[tuple[int, Any]]:
    """JSONL is parsed line by line so one broken line is quarantined instead of failing the whole file
    (Arrow's JSON reader rejects the file on the first bad line). Text files are decoded by `_text_lines`."""
    spec = src.path
    if spec.startswith("hf:"):
        import datasets

        yield from enumerate(datasets.load_dataset(spec[3:], split=src.split), start=1)
        return
    path = Path(spec)
    if not path.exists():
        raise StageError(f"preprocess.sources: {spec} does not exist (fix the path in params.yaml)")
    if path.is_dir():
        yield from enumerate(_load_dataset_folder(path, src.split), start=1)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, line in _text_lines(path):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, _Invalid(f"invalid_json: {e.msg} at column {e.colno}")
    elif suffix == ".json":
        try:
            data = json.loads("".join(line for _, line in _text_lines(path)))
        except json.JSONDecodeError as e:
            raise StageError(
                f"{spec}: line {e.lineno} column {e.colno} is not valid JSON ({e.msg}); fix the file, or save it as "
                ".jsonl (one record per line) so a bad record is quarantined instead of failing the stage"
            ) from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise StageError(f"{spec}: a .json source must hold a list of records (or {{'data': [...]}})")
        yield from enumerate(data, start=1)
    elif suffix == ".csv":
        yield from enumerate(_read_csv(path), start=1)
    elif suffix == ".parquet":
        import datasets
        import pyarrow as pa
        from datasets.exceptions import DatasetGenerationError

        try:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except (pa.ArrowException, DatasetGenerationError) as e:
            cause = e.__cause__ or e
            raise StageError(
                f"{spec}: not a readable Parquet file ({type(cause).__name__}: {_one_line(cause)}); the file is "
                "truncated or not Parquet: export it again (or save the rows as .jsonl)"
            ) from None
        yield from enumerate(ds, start=1)
    else:
        raise StageError(f"{spec}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet, .csv or a folder)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) of a UTF-8 text file. A leading BOM is dropped (left in, it makes the first
    row invalid JSON or renames the first CSV column); a byte that is not UTF-8 is one error naming the line,
    not a UnicodeDecodeError naming neither file nor line. Decoded per line: UTF-8 never has 0x0A in a
    multi-byte character, so splitting the bytes on newlines is safe."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                col = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
                raise StageError(
                    f"{path}: line {n} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}: {e.reason}); "
                    "re-save the file as UTF-8, e.g. iconv -f CP949 -t UTF-8 (name the encoding it was written in)"
                ) from None


def _read_csv(path: Path) -> Iterator[Any]:
    """CSV rows as dicts of strings (stdlib csv: "42" or "NA" stays text, an empty cell is ""), through the same
    UTF-8 reading as JSON/JSONL. A row whose field count is not the header's (an unquoted comma) is quarantined;
    pandas, read here before, took an extra field in the first row for an index and shifted every row."""
    # The default 128 KiB cell limit would fail the whole file on one huge conversation; too_long rejects that row.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(line for _, line in _text_lines(path))
    header = None
    try:
        for row in reader:
            if not row:
                continue
            if header is None:
                header = row
            elif len(row) != len(header):
                yield _Invalid(
                    f"bad_csv_row: line {reader.line_num} has {len(row)} fields, the header {len(header)} "
                    "(quote cells that hold commas)"
                )
            else:
                yield dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise StageError(
            f"{path}: line {reader.line_num} is not valid CSV ({e}); fix the quoting, or save the rows as .jsonl"
        ) from None


def _load_dataset_folder(path: Path, split: str):
    """A `datasets.save_to_disk` folder (a Dataset, or a DatasetDict and the source's split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        files = sorted(f.name for f in path.iterdir() if f.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"))
        listed = f" ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" if files else ""
        raise StageError(
            f"{path}: not a datasets.save_to_disk folder (no dataset_info.json + state.json or dataset_dict.json); "
            f"list its data files{listed} in preprocess.sources instead (.jsonl, .json, .parquet or .csv)"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise StageError(
                f"{path}: no split {split!r} in this DatasetDict (it has {', '.join(ds)}); set `split:` on this "
                "source in preprocess.sources"
            )
        ds = ds[split]
    return ds


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
            messages = check_control_chars(chat.validate_messages(to_messages(record, fmt)))
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

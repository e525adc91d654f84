"""Reading chat data sources (JSON, JSONL, Parquet, CSV, `datasets` folders, hf:ID) and normalising a record of
any common format (OpenAI messages, ShareGPT, Alpaca) to OpenAI messages. Used by the preprocess stage."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmops import chat, config
from llmops.stage import StageError

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

"""preprocess: formats, quarantine reasons, dedup, deterministic splits, tokenization invariants."""

from __future__ import annotations

import json

import pytest

from llmops import chat, config, io
from llmops.modeling import load_tokenizer
from llmops.stage import StageError
from stages import preprocess
from tests.conftest import write_params

EN = {
    "messages": [
        {"role": "user", "content": "What does dvc push do?"},
        {"role": "assistant", "content": "It uploads cached outputs to the default remote."},
    ]
}
KO_SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "간결하게 답하세요."},
        {"from": "human", "value": "LoRA가 뭐예요?"},
        {"from": "gpt", "value": "저랭크 어댑터만 학습하는 미세조정 기법입니다."},
    ]
}
ALPACA = {
    "instruction": "Name the vLLM flag that caps context length.",
    "input": "",
    "output": "Use --max-model-len, e.g. --max-model-len 4096.",
}


def _run(tmp_path, base_model_dir, rows_by_file: dict[str, list], **overrides):
    sources = []
    for name, rows in rows_by_file.items():
        f = tmp_path / name
        if name.endswith(".jsonl"):
            f.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
        elif name.endswith(".json"):
            f.write_text(json.dumps(rows, ensure_ascii=False))
        else:
            import pandas as pd

            df = pd.DataFrame(rows)
            df.to_parquet(f) if name.endswith(".parquet") else df.to_csv(f, index=False)
        sources.append({"path": str(f), "format": overrides.pop(f"format_{name}", "auto")})
    # Tiny inputs: everything in train, so "no training rows" never depends on where a hash lands.
    defaults = {"preprocess.max_rejected_frac": 1.0, "preprocess.val_frac": 0.0, "preprocess.test_frac": 0.0}
    params = write_params(tmp_path, {"preprocess.sources": sources, **defaults, **overrides}, base_dir=base_model_dir)
    p = config.load(params, "preprocess")
    return p, preprocess.main(str(params))


def _split_rows(p) -> dict[str, list[dict]]:
    return {s: io.read_jsonl(f"{p.paths.processed_dir}/{s}.jsonl") for s in preprocess.SPLITS}


def test_three_formats_normalise_to_messages(tmp_path, base_model_dir):
    p, m = _run(tmp_path, base_model_dir, {"a.jsonl": [EN, KO_SHAREGPT, ALPACA]})
    rows = [r for rows in _split_rows(p).values() for r in rows]
    assert m["rows_kept"] == 3 and m["rejected"]["total"] == 0
    by_lang = {r["lang"] for r in rows}
    assert by_lang == {"en", "ko"}
    ko = next(r for r in rows if r["lang"] == "ko")
    assert [x["role"] for x in ko["messages"]] == ["system", "user", "assistant"]
    alp = next(r for r in rows if "vLLM" in r["messages"][0]["content"])
    assert alp["messages"] == [
        {"role": "user", "content": ALPACA["instruction"]},
        {"role": "assistant", "content": ALPACA["output"]},
    ]


@pytest.mark.parametrize("fmt_file", ["d.json", "d.parquet", "d.csv"])
def test_file_types(tmp_path, base_model_dir, fmt_file):
    rows = [ALPACA, {"instruction": "What is MLflow?", "input": "in one line", "output": "An ML lifecycle platform."}]
    p, m = _run(tmp_path, base_model_dir, {fmt_file: rows})
    assert m["rows_kept"] == 2
    kept = [r for rs in _split_rows(p).values() for r in rs]
    assert any(r["messages"][0]["content"] == "What is MLflow?\n\nin one line" for r in kept)


def test_datasets_folder_source(tmp_path, base_model_dir):
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([EN]).save_to_disk(str(folder))
    params = write_params(
        tmp_path,
        {
            "preprocess.sources": [{"path": str(folder), "format": "messages"}],
            "preprocess.val_frac": 0.0,
            "preprocess.test_frac": 0.0,
        },
        base_dir=base_model_dir,
    )
    assert preprocess.main(str(params))["rows_kept"] == 1


BAD_ROWS = {
    "invalid_json": '{"messages": [',
    "not_an_object": "[1, 2]",
    "unknown_format": {"prompt": "x", "completion": "y"},
    "missing_field": {"instruction": "x"},
    "bad_role": {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
    "empty_content": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
    "bad_alternation": {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "user", "content": "b"},
            {"role": "assistant", "content": "c"},
        ]
    },
    "no_assistant_turn": {"messages": [{"role": "user", "content": "anyone?"}]},
    "bad_message": {"conversations": [{"from": "human"}]},
    "too_long": {"messages": [{"role": "user", "content": "word " * 2000}, {"role": "assistant", "content": "ok"}]},
}


def test_each_malformed_row_is_quarantined_with_its_reason(tmp_path, base_model_dir):
    rows = [EN] + [json.dumps(v) if not isinstance(v, str) else v for v in BAD_ROWS.values()] + [EN]
    p, m = _run(tmp_path, base_model_dir, {"bad.jsonl": rows})
    rejected = io.read_jsonl(p.paths.rejected)
    got = {r["row"]: r["reason"] for r in rejected}
    want = {i + 2: reason for i, reason in enumerate(BAD_ROWS)} | {len(rows): "duplicate"}
    assert got == want
    assert all(r["source"].endswith("bad.jsonl") and r["detail"] for r in rejected)
    assert m["rejected"]["invalid"] == len(BAD_ROWS) and m["rows_kept"] == 1


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_malformed_row_in_each_declared_format(tmp_path, base_model_dir, fmt):
    good = {"messages": EN, "sharegpt": KO_SHAREGPT, "alpaca": ALPACA}[fmt]
    bad = {
        "messages": {"messages": "not a list"},
        "sharegpt": {"conversations": [{"from": "robot", "value": "x"}]},
        "alpaca": {"instruction": "x", "output": ""},
    }[fmt]
    p, m = _run(tmp_path, base_model_dir, {"f.jsonl": [good, bad]}, **{"format_f.jsonl": fmt})
    (rej,) = io.read_jsonl(p.paths.rejected)
    assert rej["row"] == 2 and rej["reason"] in {"no_messages", "bad_role", "empty_content"}
    assert m["rows_kept"] == 1


def test_too_many_rejections_fail_the_stage_but_keep_quarantine(tmp_path, base_model_dir):
    rows = [EN, json.dumps({"messages": []}), json.dumps({"x": 1})]
    with pytest.raises(StageError, match=r"2/3 rows rejected .*preprocess.max_rejected_frac=0.05"):
        _run(tmp_path, base_model_dir, {"f.jsonl": rows}, **{"preprocess.max_rejected_frac": 0.05})
    p = config.load(tmp_path / "params.yaml", "preprocess")
    assert len(io.read_jsonl(p.paths.rejected)) == 2
    assert not (tmp_path / "data" / "processed").exists()  # no half-written splits


def test_missing_source_is_one_clear_error(tmp_path, base_model_dir):
    params = write_params(
        tmp_path, {"preprocess.sources": [{"path": str(tmp_path / "nope.jsonl")}]}, base_dir=base_model_dir
    )
    with pytest.raises(StageError, match="nope.jsonl does not exist"):
        preprocess.main(str(params))


def test_splits_are_hash_based_and_stable():
    ids = [f"{i:016x}" for i in range(2000)]
    a = {i: preprocess.assign_split(i, 7, 0.1, 0.1) for i in ids}
    assert a == {i: preprocess.assign_split(i, 7, 0.1, 0.1) for i in reversed(ids)}
    share = {s: sum(v == s for v in a.values()) / len(ids) for s in ("train", "val", "test")}
    assert 0.07 < share["val"] < 0.13 and 0.07 < share["test"] < 0.13
    b = {i: preprocess.assign_split(i, 8, 0.1, 0.1) for i in ids}
    assert a != b  # the seed reshuffles


def test_seed_data_end_to_end(tmp_path, base_model_dir):
    """The shipped seed data: mostly valid, both languages in every split, encodings sound."""
    params = write_params(tmp_path, base_dir=base_model_dir)
    m = preprocess.main(str(params))
    p = config.load(params, "preprocess")
    assert m["rows_kept"] >= 300 and m["rejected"]["invalid"] == 0
    splits = _split_rows(p)
    for name, rows in splits.items():
        assert {r["lang"] for r in rows} == {"en", "ko"}, name
    assert sum(r["lang"] == "ko" for rs in splits.values() for r in rs) >= m["rows_kept"] / 3
    ids = [set(r["id"] for r in rows) for rows in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    tok = load_tokenizer(base_model_dir)
    eot = chat.end_of_turn_id(tok)
    for r in splits["train"][:50]:
        enc = chat.encode(tok, r["messages"], eot, p.preprocess.max_seq_len)
        assert enc.input_ids[:2] != [tok.bos_token_id] * 2  # no doubled BOS
        n_asst = sum(m_["role"] == "assistant" for m_ in r["messages"])
        # every assistant turn's labels end on a real end-of-turn token
        ends = [
            i
            for i in range(len(enc.labels))
            if enc.labels[i] != -100 and (i + 1 == len(enc.labels) or enc.labels[i + 1] == -100)
        ]
        assert len(ends) == n_asst and all(enc.input_ids[i] == eot for i in ends)
        assert len(enc.input_ids) == r["n_tokens"]
    # deterministic bytes
    first = (tmp_path / "data" / "processed" / "train.jsonl").read_bytes()
    preprocess.main(str(params))
    assert (tmp_path / "data" / "processed" / "train.jsonl").read_bytes() == first


def _params(tmp_path, base_model_dir, *files: str, **overrides):
    """params.yaml reading the given files of tmp_path (auto format), every row to train."""
    sources = [{"path": str(tmp_path / f), "format": "auto"} for f in files]
    over = {"preprocess.val_frac": 0.0, "preprocess.test_frac": 0.0, "preprocess.max_rejected_frac": 1.0}
    return str(write_params(tmp_path, {"preprocess.sources": sources, **over, **overrides}, base_dir=base_model_dir))


MLFLOW = {"instruction": "What is MLflow?", "input": "", "output": "An ML lifecycle platform."}
BOM_FILES = {
    "d.jsonl": "".join(json.dumps(r) + "\n" for r in (ALPACA, MLFLOW)),
    "d.json": json.dumps([ALPACA, MLFLOW]),
    "d.csv": f'instruction,input,output\n{ALPACA["instruction"]},,"{ALPACA["output"]}"\n'
    f"{MLFLOW['instruction']},,{MLFLOW['output']}\n",
}


@pytest.mark.parametrize("name", BOM_FILES)
def test_a_utf8_bom_costs_no_row(tmp_path, base_model_dir, name):
    """Windows tools start UTF-8 files with a BOM: the first row must still be read (JSONL lost it as invalid JSON)."""
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + BOM_FILES[name].encode())
    m = preprocess.main(_params(tmp_path, base_model_dir, name))
    p = config.load(tmp_path / "params.yaml", "preprocess")
    assert m["rows_kept"] == 2 and io.read_jsonl(p.paths.rejected) == []
    firsts = sorted(r["messages"][0]["content"] for r in _split_rows(p)["train"])
    assert firsts == sorted([ALPACA["instruction"], MLFLOW["instruction"]])


@pytest.mark.parametrize(
    "name, data, where",
    [
        ("bad.jsonl", "\n".join(json.dumps(r) for r in (EN, ALPACA)).encode() + b'\n{"instruction": "caf\xe9"}\n',
         r"bad\.jsonl: line 3 is not valid UTF-8 \(byte 0xe9 at column 21: invalid continuation byte\)"),
        ("bad.csv", b"instruction,input,output\nq,,a\n\xea\xb0\x80 q,,\xb0\xa1\n",
         r"bad\.csv: line 3 is not valid UTF-8 \(byte 0xb0 at column 6: invalid start byte\)"),
        ("bad.json", b'[{"instruction": "q",\n "output": "\xff"}]',
         r"bad\.json: line 2 is not valid UTF-8 \(byte 0xff at column 13: invalid start byte\)"),
    ],
    ids=["jsonl", "csv", "json"],
)  # fmt: skip
def test_invalid_utf8_names_the_file_and_line(tmp_path, base_model_dir, name, data, where):
    """A CP949/latin-1 export used to end in a UnicodeDecodeError naming neither file nor line."""
    (tmp_path / name).write_bytes(data)
    with pytest.raises(StageError, match=where + r"; re-save the file as UTF-8, e\.g\. iconv"):
        preprocess.main(_params(tmp_path, base_model_dir, name))
    assert not (tmp_path / "data").exists()  # nothing written: not even the quarantine


CONTROL_ROWS = [
    ({"messages": [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong\x07!"}]},
     "message 1 (assistant) has control character U+0007 at character 5"),
    ({"instruction": "nul\x00 here", "output": "x"}, "message 0 (user) has control character U+0000 at character 4"),
    ({"conversations": [{"from": "system", "value": "\x1b[31mred"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]},
     "message 0 (system) has control character U+001B at character 1"),
    ({"instruction": "mis-decoded \x85 ellipsis", "output": "x"},
     "message 0 (user) has control character U+0085 at character 13"),
]  # fmt: skip


def test_control_characters_are_quarantined(tmp_path, base_model_dir):
    """NUL/BEL/ESC (and C1 controls from mis-decoded text) never reach train.jsonl; tab, CR and newline are text."""
    text_ws = {"messages": [{"role": "user", "content": "a\tb\r\nc"}, {"role": "assistant", "content": "d\te\nf"}]}
    p, m = _run(tmp_path, base_model_dir, {"c.jsonl": [text_ws] + [row for row, _ in CONTROL_ROWS]})
    rejected = io.read_jsonl(p.paths.rejected)
    assert [(r["row"], r["reason"]) for r in rejected] == [(n, "control_chars") for n in (2, 3, 4, 5)]
    assert [r["detail"] for r in rejected] == [f"control_chars: {d}; strip it from the source" for _, d in CONTROL_ROWS]
    (kept,) = _split_rows(p)["train"]  # the only row in train.jsonl
    assert kept["messages"] == text_ws["messages"]


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]"), ("header.csv", "instruction,output\n"),
     ("empty.csv", "")],
)  # fmt: skip
def test_a_source_without_rows_is_an_error(tmp_path, base_model_dir, name, content):
    """An empty source next to good ones used to add 0 rows without a word."""
    (tmp_path / "good.jsonl").write_text(json.dumps(EN) + "\n")
    (tmp_path / name).write_text(content)
    params = _params(tmp_path, base_model_dir, "good.jsonl", name)
    want = rf"^{tmp_path}/{name}: no rows \(an empty file or dataset\); fill it or remove it from preprocess\.sources$"
    with pytest.raises(StageError, match=want):
        preprocess.main(params)
    assert not (tmp_path / "data").exists()


def test_a_source_whose_rows_all_fail_is_an_error(tmp_path, base_model_dir):
    """A CSV in a format nobody detects is 3 quarantined rows among many: under max_rejected_frac, so it was silent."""
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (EN, ALPACA, KO_SHAREGPT)))
    (tmp_path / "x.csv").write_text("prompt,completion\nq1,a1\nq2,a2\nq3,a3\n")
    (tmp_path / "copy.jsonl").write_text(json.dumps(EN) + "\n")  # only duplicates: adds nothing, but is valid
    params = _params(tmp_path, base_model_dir, "good.jsonl", "x.csv", "copy.jsonl")
    want = (
        f"{tmp_path}/x.csv: no usable rows (3 rows, all rejected: unknown_format=3; first: row 1: unknown_format: "
        "keys ['completion', 'prompt'] match none of messages/sharegpt/alpaca); fix the rows or the source's format "
        f"(messages, sharegpt or alpaca) in preprocess.sources, or remove the source; see {tmp_path}/data/rejected.jsonl"
    )
    with pytest.raises(StageError) as e:
        preprocess.main(params)
    assert str(e.value) == want
    p = config.load(params, "preprocess")
    assert [r["reason"] for r in io.read_jsonl(p.paths.rejected)] == ["unknown_format"] * 3 + ["duplicate"]
    assert not (tmp_path / "data" / "processed").exists()


def test_a_datasetdict_folder_without_the_split_names_the_splits(tmp_path, base_model_dir):
    import datasets

    datasets.DatasetDict({"validation": datasets.Dataset.from_list([EN])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        StageError,
        match=r"dd: no split 'train' in this DatasetDict \(it has validation\); set `split:`",
    ):
        preprocess.main(_params(tmp_path, base_model_dir, "dd"))


def test_a_csv_row_with_a_stray_comma_is_quarantined_not_shifted(tmp_path, base_model_dir):
    """An unquoted comma gives a row one field too many. In the first row, pandas' reader took it for an index
    column and shifted every row into the wrong columns; later, it failed the file with a traceback."""
    stray = "q,a, with a stray comma\n"
    csv_text = f'instruction,output\n{stray}What is DVC?,Data version control.\n{stray}"Multi\nline?",Yes.\n'
    (tmp_path / "c.csv").write_text(csv_text)
    m = preprocess.main(_params(tmp_path, base_model_dir, "c.csv"))
    p = config.load(tmp_path / "params.yaml", "preprocess")
    detail = "bad_csv_row: line {} has 3 fields, the header 2 (quote cells that hold commas)"
    assert io.read_jsonl(p.paths.rejected) == [
        {"source": str(tmp_path / "c.csv"), "row": row, "reason": "bad_csv_row", "detail": detail.format(line)}
        for row, line in ((1, 2), (3, 4))
    ]
    assert m["rows_kept"] == 2
    kept = sorted((r["messages"][0]["content"], r["messages"][1]["content"]) for r in _split_rows(p)["train"])
    assert kept == [("Multi\nline?", "Yes."), ("What is DVC?", "Data version control.")]

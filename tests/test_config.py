"""params.yaml validation and dvc.yaml consistency: the edge every stage goes through."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import yaml

from llmops import config
from tests.conftest import ROOT, repo_params

ALL = ("base", "preprocess", "synthetic", "train", "merge", "evaluate", "package", "serve")


def test_repo_params_are_valid():
    p = config.load(ROOT / "params.yaml", *ALL)
    assert p.seed == repo_params()["seed"]
    assert p.train.lr == pytest.approx(float(repo_params()["train"]["lr"]))
    assert p.preprocess.sources and all(
        s.format in ("auto", "messages", "sharegpt", "alpaca") for s in p.preprocess.sources
    )


def test_every_problem_reported_at_once_with_key_names():
    raw = repo_params()
    raw["train"]["lr"] = "fast"
    raw["train"]["epochs"] = -1
    raw["preprocess"]["val_frac"] = 0.7
    raw["preprocess"]["colour"] = "blue"
    del raw["base"]["model"]
    with pytest.raises(config.ParamsError) as e:
        config.validate(raw, ("base", "preprocess", "train"))
    msg = str(e.value)
    assert "5 problem(s)" in msg and "\n" not in msg
    for key in (
        "train.lr",
        "train.epochs",
        "preprocess.val_frac",
        "preprocess.colour: unknown key",
        "base.model: missing",
    ):
        assert key in msg


@pytest.mark.parametrize(
    "dotted, value, expect",
    [
        ("seed", -3, "seed: expected a non-negative integer"),
        ("seed", True, "seed: expected a non-negative integer"),
        ("train.lora_r", 8.5, "train.lora_r: expected an integer"),
        ("train.packing", "yes", "train.packing: expected true or false"),
        ("train.method", "full", "train.method: 'full' is not one of"),
        ("train.compile", "model", "train.compile: 'model' is not one of"),
        ("preprocess.sources", "data/raw", "preprocess.sources: expected a list"),
        ("preprocess.max_rejected_frac", 1.5, "preprocess.max_rejected_frac: 1.5 must be <= 1.0"),
        ("serve.port", 70000, "serve.port: 70000 must be <= 65535"),
        ("train.tokens_per_batch", 512, "train.tokens_per_batch=512 < preprocess.max_seq_len=768"),  # cross-section
        ("train.early_stopping_patience", 2, "must be a multiple of train.eval_every"),
        ("synthetic.min_answer_chars", 1000, "synthetic.min_answer_chars must not exceed synthetic.max_answer_chars"),
    ],
)
def test_bad_values_name_the_key(dotted, value, expect):
    raw = repo_params()
    node = raw
    *parents, leaf = dotted.split(".")
    for k in parents:
        node = node[k]
    node[leaf] = value
    with pytest.raises(config.ParamsError, match=re.escape(expect)):
        config.validate(raw, ALL)


def test_unknown_section_and_string_numbers():
    raw = repo_params()
    raw["trian"] = {"lr": 1}
    with pytest.raises(config.ParamsError, match="trian: unknown top-level section"):
        config.validate(raw, ("train",))
    del raw["trian"]
    raw["train"]["lr"] = "1e-4"  # what YAML makes of 1e-4 (and what `dvc exp run -S train.lr=1e-4` writes)
    assert config.validate(raw, ("train",)).train.lr == pytest.approx(1e-4)


def test_missing_and_broken_params_file(tmp_path):
    with pytest.raises(config.ParamsError, match="not found"):
        config.load(tmp_path / "nope.yaml", "base")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(config.ParamsError, match="not valid YAML"):
        config.load(bad, "base")


def _imports(path) -> set[str]:
    """The llmops modules a file imports, directly or through other llmops modules."""
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "llmops":
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmops."):
            mods.add(node.module.split(".")[1])
    for mod in list(mods):
        if (dep := ROOT / "llmops" / f"{mod}.py") != path:
            mods |= _imports(dep)
    return mods


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]


@pytest.mark.parametrize("name", list(DVC))
def test_dvc_stage_declares_exactly_the_code_it_runs(name):
    """Its own script and each llmops module it imports (directly or through another), and no other: a change to
    metrics code must not retrain, a change to the chat template code must."""
    stage, script = DVC[name], ROOT / "stages" / f"{name}.py"
    assert stage["cmd"].startswith(f"python -m stages.{name}"), name
    deps = _deps(stage)
    assert f"stages/{name}.py" in deps, f"{name}: its own script is not a dep"
    # llmops.log is exempt: logging never changes an output, so it must not invalidate the cache.
    want = {f"llmops/{mod}.py" for mod in _imports(script) - {"log"}}
    assert {d for d in deps if d.startswith("llmops/")} == want
    for kind in ("outs", "metrics", "plots"):
        for out in stage.get(kind, []):
            key, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            assert key.startswith("${paths."), f"{name}: {key} is not declared in params.yaml paths"
            assert opts.get("persist") is True, f"{name}: {key} is not persist: a failed run would delete it"


def _loaded_sections(script: Path) -> set[str]:
    """The sections `config.load(params_file, ...)` asks for in a stage."""
    tree = ast.parse(script.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "config.load"]
    consts = {a.value for c in calls for a in c.args[1:] if isinstance(a, ast.Constant)}
    starred = {a.value.id for c in calls for a in c.args[1:] if isinstance(a, ast.Starred)}
    for node in ast.walk(tree):  # `config.load(params_file, *SECTIONS)` with a module-level tuple
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in starred for t in node.targets):
            consts |= {e.value for e in node.value.elts}
    return consts


@pytest.mark.parametrize("name", list(DVC))
def test_dvc_stage_declares_exactly_the_params_it_reads(name):
    """The sections a stage validates are the ones dvc.yaml lists (whole, or key by key); a key-by-key section may
    only be read at the listed keys."""
    script = ROOT / "stages" / f"{name}.py"
    declared = [str(k) for k in DVC[name].get("params", [])]
    sections = {d.split(".")[0] for d in declared} - {"seed"}
    assert _loaded_sections(script) == sections, f"{name}: loads {_loaded_sections(script)}, declares {sections}"
    read = {n.attr for n in ast.walk(ast.parse(script.read_text())) if isinstance(n, ast.Attribute)}
    for section in sections - set(declared):  # declared key by key
        listed = {d.split(".")[1] for d in declared if d.startswith(f"{section}.")}
        fields = set(config.SECTIONS[section].model_fields)
        other = set().union(*(config.SECTIONS[s].model_fields for s in sections if s != section))
        assert (read & fields) - other <= listed, f"{name}: reads {section}.{(read & fields) - other - listed}"


@pytest.mark.parametrize("override", ["train.lr=0.0003", "evaluate.max_new_tokens=32", "serve.port=9000", "seed=7"])
def test_dvc_set_param_rewrites_only_that_value(tmp_path, override):
    """`dvc exp run -S` rewrites params.yaml through ruamel (every list as a block list, long lines wrapped): the
    file is kept in that form, so an experiment's diff is the one value it changed."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` does to params.yaml

    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    apply_overrides(str(copy), [override])
    before, after = (ROOT / "params.yaml").read_text().splitlines(), copy.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=False) if a != b]
    key, value = override.rsplit("=", 1)
    assert len(before) == len(after) and len(changed) == 1, changed
    assert changed[0][1].split("#")[0].strip() == f"{key.split('.')[-1]}: {value}"

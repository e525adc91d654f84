"""docs_snapshot + synthetic: in-process mining, grounded docs Q&A, determinism, filters, no val/test leakage,
and the teacher generator against a fake and a real (vLLM) OpenAI-compatible endpoint and an unreachable one."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from llmops import config, dedup, docs_qa, hardware, io, text
from llmops.stage import StageError
from stages import docs_snapshot, synthetic
from tests.conftest import ROOT, JSONHandler, free_port, local_server, repo_params, write_params

SNAPSHOT = json.loads((ROOT / "data" / "docs_snapshot.json").read_text(encoding="utf-8"))
SNAPSHOT_TEXT = json.dumps(SNAPSHOT, ensure_ascii=False)
FLAG = re.compile(r"(?<![\w./=-])--?[A-Za-z][\w-]*")


def _row(messages: list[dict], source: str = "test") -> dict:
    return {
        "id": text.row_id(messages),
        "messages": messages,
        "lang": text.conversation_lang(messages),
        "source": source,
        "n_tokens": 0,
    }


def _qa(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _setup(tmp: Path, base_dir: Path, overrides: dict | None = None, val_test: list[dict] | None = None) -> Path:
    """A params file under `tmp`, the tracked docs snapshot, and a small processed folder in the data contract."""
    params = write_params(
        tmp, {"paths.docs_snapshot": str(ROOT / "data" / "docs_snapshot.json"), **(overrides or {})}, base_dir=base_dir
    )
    p = config.load(params, "synthetic")
    train = [
        _row(_qa("How do I resume a killed DVC pipeline?", "Run `dvc repro` again; finished stages are skipped.")),
        _row(_qa("LoRA 랭크는 어떻게 고르나요?", "작은 모델은 8~16으로 시작하고 검증 손실을 보며 조정하세요.")),
    ]
    val_test = val_test or [
        _row(_qa("What is QLoRA?", "LoRA adapters trained on a 4-bit quantized frozen base model."))
    ]
    d = Path(p.paths.processed_dir)
    io.write_jsonl(d / "train.jsonl", train)
    io.write_jsonl(d / "val.jsonl", val_test[:1])
    io.write_jsonl(d / "test.jsonl", val_test[1:])
    return params


TEMPLATES = yaml.safe_load((ROOT / "data" / "docs_qa.yaml").read_text(encoding="utf-8"))
FACTS = docs_qa.facts(SNAPSHOT, TEMPLATES["skip"], TEMPLATES["ko"])
CURATED = docs_qa.curated_facts(docs_qa.read_yaml(ROOT / repo_params()["paths"]["synthetic_facts"]), "facts.yaml")


def _fact(kind: str, key: str) -> dict:
    return next(f for f in FACTS if f["kind"] == kind and f["key"] == key)


def _candidates(phrasings: int = 2, seed: int = 0):
    return docs_qa.candidates(FACTS, TEMPLATES, phrasings, seed)


# ---------------------------------------------------------------- docs snapshot


def test_snapshot_mines_cli_trees_and_api_docs_in_process():
    """The tracked snapshot is exactly what the installed versions produce (so it is current and reproducible)."""
    logger = docs_snapshot.log.get("docs_snapshot")
    fresh = docs_snapshot.snapshot(("dvc",), ("peft.LoraConfig",), logger)
    cmds = {c["command"]: c for c in fresh["commands"]}
    assert cmds["dvc push"]["summary"] == "Upload tracked files or directories to remote storage."
    assert cmds["dvc push"]["doc_url"] == "https://man.dvc.org/push"  # ANSI colour codes stripped
    run = cmds["dvc experiments run"]
    assert cmds["dvc experiments"]["aliases"] == ["exp"]
    assert any(o["flags"] == ["-S", "--set-param"] for o in run["options"])
    assert run["usage"].startswith("dvc experiments run [-h]") and "\n" not in run["usage"]
    assert not any(o["flags"][-1] == "--help" for c in fresh["commands"] for o in c["options"])
    lora = {f["name"]: f for f in fresh["apis"][0]["fields"]}
    assert lora["lora_alpha"]["default"] == "8" and lora["lora_alpha"]["type"] == "int"
    assert lora["lora_alpha"]["help"] == "The alpha parameter for Lora scaling."  # the docstring line
    assert fresh["versions"]["dvc"] == SNAPSHOT["versions"]["dvc"]
    tracked = {c["command"]: c for c in SNAPSHOT["commands"] if c["tool"] == "dvc"}
    assert tracked == cmds, "data/docs_snapshot.json is stale: run python -m stages.docs_snapshot"
    assert next(a for a in SNAPSHOT["apis"] if a["api"] == "peft.LoraConfig") == fresh["apis"][0]


def test_snapshot_stage_writes_stable_file_and_names_bad_tools(tmp_path):
    params = write_params(
        tmp_path, {"synthetic.docs.tools": ["mlflow"], "synthetic.docs.modules": ["datasets.Dataset.train_test_split"]}
    )
    snap = docs_snapshot.main(str(params))
    out = Path(config.load(params, "synthetic").paths.docs_snapshot)
    first = out.read_bytes()
    assert set(snap["versions"]) == {"mlflow", "datasets"}
    mlflow_run = next(c for c in snap["commands"] if c["command"] == "mlflow run")
    assert any("--entry-point" in o["flags"] for o in mlflow_run["options"])
    args = {f["name"]: f for f in snap["apis"][0]["fields"]}
    assert args["shuffle"]["default"] == "True" and args["test_size"]["type"] == "Union[float, int, None]"
    docs_snapshot.main(str(params))
    assert out.read_bytes() == first
    bad = write_params(tmp_path, {"synthetic.docs.tools": ["no-such-cli"]})
    with pytest.raises(StageError, match="synthetic.docs.tools: 'no-such-cli'"):
        docs_snapshot.main(str(bad))


def test_docstring_args_parser():
    doc = """Summary line.

    Args:
        alpha (`int`, *optional*, defaults to `8`):
            Scaling
            factor.
        beta (`str`): Name.

    Returns:
        Nothing.
    """
    assert docs_snapshot.doc_args(doc) == {
        "alpha": {"type": "int", "default": "8", "help": "Scaling factor."},
        "beta": {"type": "str", "default": None, "help": "Name."},
    }


# ---------------------------------------------------------------- docs generator


def test_docs_questions_are_asked_like_people_ask_and_answers_quote_the_snapshot():
    push = _fact("command", "dvc push")
    assert push["vars"]["intent"] == "upload tracked files or directories to remote storage"
    rows = docs_qa.render(push, "en", TEMPLATES, 6, 0)
    assert {c.question for c in rows} >= {"How do I upload tracked files or directories to remote storage?",
                                          "Which DVC command do I use to upload tracked files or directories to remote storage?"}  # fmt: skip
    assert all(c.answer.startswith(("Use `dvc push`", "Run `dvc push`", "`dvc push`")) for c in rows)
    assert all("Upload tracked files or directories to remote storage." in c.answer for c in rows)
    ko = docs_qa.render(
        push, "ko", TEMPLATES, 5, 0
    )  # the hand translation of the documented summary, never English prose
    assert {c.question for c in ko} >= {"추적 중인 데이터를 원격 저장소에 올리려면 어떤 명령을 써야 하나요?"}
    assert all(TEMPLATES["ko"]["dvc push"]["desc"] in c.answer and "Upload" not in c.answer for c in ko)
    assert all(text.detect_lang(c.answer) == "ko" for c in ko)
    run = _fact("command", "dvc exp run")  # users type the alias, not `dvc experiments run`
    assert run["vars"]["name"] == "dvc exp run" and run["vars"]["cmd"] == "dvc experiments run"
    queue = docs_qa.render(_fact("option", "dvc exp run --queue"), "en", TEMPLATES, 4, 0)
    assert any(
        c.question == "How do I stage this experiment in the run queue for future execution with `dvc exp run`?"
        for c in queue
    )
    assert all("`--queue`" in c.answer or "`dvc exp run --queue`" in c.answer for c in queue)
    assert not docs_qa.render(_fact("command", "dvc cache"), "ko", TEMPLATES, 2, 0)  # no translation: no Korean rows
    assert not [f for f in FACTS if f["key"].startswith("mlflow traces")]  # left out by the templates' skip list
    lora = docs_qa.render(_fact("field", "peft.LoraConfig.lora_alpha"), "en", TEMPLATES, 2, 0)
    doc = next(f for a in SNAPSHOT["apis"] for f in a["fields"] if f["name"] == "lora_alpha")
    assert all(docs_qa.first_sentence(doc["help"]) in c.answer and "(type `int`, default `8`)" in c.answer
               for c in lora)  # fmt: skip


PUSH_FACT = {
    "name": "dvc push", "what": "command", "tool": "DVC",
    "intents": ["upload my DVC-tracked data to remote storage", "share the data tracked by DVC through the remote"],
    "summary": "Uploads tracked files from the cache to the default remote; `-r NAME` picks another.",
    "goals": ["DVC로 추적 중인 데이터를 원격 저장소에 올리려면", "팀원들과 DVC 데이터를 공유하려면"],
    "desc": "캐시에 있는 추적 파일을 기본 원격 저장소로 업로드합니다. 다른 원격은 `-r 이름`으로 고릅니다.",
}  # fmt: skip


def test_curated_facts_are_asked_in_the_users_words_in_both_languages():
    [fact] = docs_qa.curated_facts([PUSH_FACT], "facts.yaml")
    en = docs_qa.render(fact, "en", TEMPLATES, 2, 0)
    ko = docs_qa.render(fact, "ko", TEMPLATES, 2, 0)
    assert len(en) == len(ko) == 2
    assert len({c.question for c in en}) == 2 and len({c.question for c in ko}) == 2
    intents = [i for c in en for i in PUSH_FACT["intents"] if i in c.question]
    assert len(intents) == len(set(intents))  # two phrasings never repeat one intent
    assert all("`dvc push`" in c.answer and PUSH_FACT["summary"] in c.answer for c in en)
    assert all("`dvc push` 명령을 " in c.answer and "원격 저장소로 업로드합니다." in c.answer
               and "`-r 이름`" not in c.answer for c in ko)  # desc's first sentence only: ~3 tokens a syllable  # fmt: skip
    # answers say the user's task back in the second person, in the same words as the question asked it
    said_back = [c for c in en if c.answer.startswith("To ")]
    assert all(c.answer.split(",")[0][3:].replace("your", "my") in c.question for c in said_back)
    assert all(text.detect_lang(c.question) == text.detect_lang(c.answer) == "ko" for c in ko)
    # curated facts come first, then the mined commands
    kinds = [c.kind for c in itertools.islice(docs_qa.candidates([*FACTS, fact], TEMPLATES, 2, 0, 3), 8)]
    assert kinds[:6] == ["curated"] * 6 and kinds[6] == "command"  # curated_phrasings=3: 3 en + 3 ko rows


def test_related_facts_follow_the_answer_in_its_language_and_stay_within_the_tool():
    pull = {**PUSH_FACT, "name": "dvc pull", "summary": "Downloads tracked files from the remote. Then checks out.",
            "desc": "원격 저장소에서 추적 파일을 내려받습니다. 그다음 체크아웃합니다."}  # fmt: skip
    serve = {**PUSH_FACT, "name": "vllm serve", "tool": "vLLM", "what": "command"}
    facts = docs_qa.with_related(docs_qa.curated_facts([PUSH_FACT, pull, serve], "facts.yaml"), 1)
    en = {f["key"]: docs_qa.render(f, "en", TEMPLATES, 2, 0) for f in facts}
    ko = {f["key"]: docs_qa.render(f, "ko", TEMPLATES, 2, 0) for f in facts}
    # the next fact of the same tool (wrapping), its first sentence only, after the fact's own answer
    assert all(c.answer.endswith("Related command: `dvc pull`. Downloads tracked files from the remote.")
               for c in en["dvc push"])  # fmt: skip
    assert all(c.answer.endswith("Related command: `dvc push`. Uploads tracked files from the cache to the default "
                                 "remote; `-r NAME` picks another.") for c in en["dvc pull"])  # fmt: skip
    assert all(c.answer.endswith("참고로 `dvc pull` 명령도 있습니다. 원격 저장소에서 추적 파일을 내려받습니다.")
               for c in ko["dvc push"])  # fmt: skip
    assert all(text.detect_lang(c.answer) == "en" for c in en["dvc push"])  # no Korean inside an English answer
    # a tool with one fact gets no related sentence; n = 0 renders the answers as before
    assert not any("Related" in c.answer or "참고로" in c.answer for c in en["vllm serve"] + ko["vllm serve"])
    plain = docs_qa.curated_facts([PUSH_FACT, pull], "facts.yaml")
    assert [docs_qa.render(f, "en", TEMPLATES, 2, 0) for f in docs_qa.with_related(plain, 0)] == [
        docs_qa.render(f, "en", TEMPLATES, 2, 0) for f in plain]  # fmt: skip


def test_repo_facts_are_valid_and_render_in_both_languages():
    assert len(CURATED) >= 100
    for f in CURATED:
        for lang in docs_qa.LANGS:
            rows = docs_qa.render(f, lang, TEMPLATES, 2, 0)
            assert len(rows) == 2 and all(f"`{f['key']}`" in c.answer for c in rows), (f["key"], lang)
            assert not any(re.search(r"\{(intent|task|goal|name|summary|desc|what|what_obj|tool_title)\}",
                                     c.question + c.answer) for c in rows), (f["key"], rows)  # fmt: skip


def test_bad_facts_file_names_every_problem_at_once():
    bad = [
        {**PUSH_FACT, "what": "cmd"},
        {k: v for k, v in PUSH_FACT.items() if k != "goals"} | {"name": "dvc pull"},
        {**PUSH_FACT, "intents": "one string", "name": "dvc fetch", "color": "red"},
        PUSH_FACT,
        "dvc gc",
        {**PUSH_FACT, "name": ["dvc", "gc"], "summary": 3},
    ]
    with pytest.raises(StageError) as e:
        docs_qa.curated_facts(bad, "data/facts.yaml")
    msg = str(e.value)
    assert "\n" not in msg  # one line, like every stage error
    for needed in ("8 problem(s) in data/facts.yaml", "entry 5: `name` must be a string",
                   "entry 5: `summary` must be a string", "entry 0 (dvc push): `what` is 'cmd'",
                   "entry 1 (dvc pull): missing or empty `goals`", "entry 2 (dvc fetch): `intents` must be a list",
                   "entry 2 (dvc fetch): unknown key `color`", "entry 3 (dvc push): duplicate `name`",
                   "entry 4: not a mapping"):  # fmt: skip
        assert needed in msg, (needed, msg)
    with pytest.raises(StageError, match="expected a YAML list"):
        docs_qa.curated_facts({"dvc push": PUSH_FACT}, "data/facts.yaml")


def test_broken_facts_yaml_stops_the_stage_naming_the_file_and_line(tmp_path, base_model_dir):
    params = _setup(tmp_path, base_model_dir)
    p = config.load(params, "synthetic")
    Path(p.paths.synthetic_facts).write_text("- name: dvc push\n  what: [command\n", encoding="utf-8")
    with pytest.raises(StageError, match=r"facts\.yaml: not valid YAML: .*line 3"):
        synthetic.main(str(params))
    assert not Path(p.paths.synthetic_train).exists()  # nothing written


def test_first_sentence_and_intent():
    assert docs_qa.first_sentence("Git revision (e.g. SHA, branch, tag)") == "Git revision (e.g. SHA, branch, tag)."
    assert docs_qa.first_sentence("Show status. Also compares caches.") == "Show status."
    assert docs_qa.intent("Hide failed experiments in the table.") == "hide failed experiments in the table"
    assert docs_qa.intent("Commands to run and compare experiments.") is None  # not a task: no "how do I"


def test_default_params_produce_grounded_deterministic_rows(tmp_path, base_model_dir):
    params = _setup(tmp_path, base_model_dir)
    m = synthetic.main(str(params))
    p = config.load(params, "synthetic", "preprocess")
    out = Path(p.paths.synthetic_train)
    rows, first = io.read_jsonl(out), out.read_bytes()
    assert m["rows"] == len(rows) == p.synthetic.max_rows
    assert m["rows_by_lang"]["en"] >= m["rows_by_lang"]["ko"] > 0.2 * m["rows"]
    # the hand-written facts first: the default budget holds them all, both languages, every phrasing of each
    facts = CURATED  # what write_params copied next to the temp params: the repo's file
    assert Path(p.paths.synthetic_facts).read_bytes() == (ROOT / "data" / "facts.yaml").read_bytes()
    per_fact = 2 * p.synthetic.docs.curated_phrasings
    curated = per_fact * len(facts) - m["filtered"]["heldout_near_dup"] - m["filtered"]["seed_near_dup"]
    assert m["rows_by_kind"] == {"curated": curated, "command": m["rows"] - curated} and curated > 0.95 * m["rows"]
    assert sum(m["filtered"].values()) + m["rows"] == m["candidates"]
    assert m["tokens"]["total"] == sum(r["n_tokens"] for r in rows)
    stated = {f["vars"]["summary"] for f in facts} | {f["ko"]["desc"] for f in facts}
    mined = {first for f in docs_qa.facts(SNAPSHOT, TEMPLATES["skip"], TEMPLATES["ko"]) if f["kind"] == "command"
             for first in (f["vars"]["summary"], (f["ko"] or {}).get("desc"))}  # fmt: skip
    for r in rows:
        assert set(r) == {"id", "messages", "lang", "source", "n_tokens"} and r["source"] == "synthetic:docs"
        assert r["id"] == text.row_id(r["messages"]) and 0 < r["n_tokens"] <= p.preprocess.max_seq_len
        assert r["lang"] == text.detect_lang(" ".join(m["content"] for m in r["messages"]))
        answer = r["messages"][-1]["content"]
        assert any(x in answer for x in stated | mined - {None}), answer  # states a written or mined fact

    synthetic.main(str(params))
    assert out.read_bytes() == first, "same snapshot + params + seed must give identical bytes"
    other = write_params(
        tmp_path,
        {"seed": 4321, "paths.docs_snapshot": str(ROOT / "data" / "docs_snapshot.json")},
        base_dir=base_model_dir,
    )
    synthetic.main(str(other))
    changed = {r["id"] for r in io.read_jsonl(out)}
    assert len(changed & {r["id"] for r in rows}) < 0.8 * len(rows), "another seed must pick another sample"


def test_grounding_of_every_candidate():
    """Every docs answer quotes its documented text's first sentence, or the hand translation of it."""
    for c in itertools.islice(_candidates(2, 0), 3000):
        assert c.grounding in SNAPSHOT_TEXT or json.dumps(c.grounding)[1:-1] in SNAPSHOT_TEXT
        quoted = docs_qa.first_sentence(c.grounding)
        assert quoted in c.answer or (c.lang == "ko" and any(t["desc"] in c.answer for t in TEMPLATES["ko"].values()))


def test_no_synthetic_row_equals_or_nearly_equals_val_test(tmp_path, base_model_dir):
    """Inject val/test rows that a docs candidate would reproduce exactly and almost exactly: both are dropped."""
    ok = _synthetic_params(max_answer_chars=900)
    related = docs_qa.with_related(CURATED, repo_params()["synthetic"]["docs"]["curated_related"])
    stage_order = docs_qa.candidates(related + FACTS, TEMPLATES, 2, 1234, 2)  # what the stage generates first
    cands = [c for c in itertools.islice(stage_order, 50) if not synthetic.row_reason(c, ok)]
    exact, near = cands[0], next(c for c in cands if c.answer != cands[0].answer)
    leak = [_row(_qa(exact.question, exact.answer)), _row(_qa(near.question + "?", near.answer))]
    params = _setup(tmp_path, base_model_dir, {"synthetic.max_rows": 200, "synthetic.docs.curated_phrasings": 2},
                    val_test=leak)  # fmt: skip
    m = synthetic.main(str(params))
    p = config.load(params, "synthetic")
    rows = io.read_jsonl(Path(p.paths.synthetic_train))
    assert m["filtered"]["seed_exact_dup"] == 1 and m["filtered"]["seed_near_dup"] >= 1
    held_out = [r for s in ("val", "test") for r in io.read_jsonl(Path(p.paths.processed_dir) / f"{s}.jsonl")]
    assert not {r["id"] for r in rows} & {r["id"] for r in held_out}

    def texts(r):
        return [m["content"] for m in r["messages"] if m["role"] == "user"][0], "\n".join(
            m["content"] for m in r["messages"] if m["role"] != "system"
        )

    syn_q = dedup.shingles([texts(r)[0] for r in rows])
    syn_f = dedup.shingles([texts(r)[1] for r in rows])
    ho_q = dedup.shingles([texts(r)[0] for r in held_out])
    ho_f = dedup.shingles([texts(r)[1] for r in held_out])
    assert dedup.jaccard(syn_q, ho_q).max() < 0.9 and dedup.jaccard(syn_f, ho_f).max() < 0.9


# ---------------------------------------------------------------- filters


def _synthetic_params(**kw) -> config.Synthetic:
    return config.Synthetic(
        **{
            "generator": "docs",
            "max_rows": 100,
            "min_answer_chars": 20,
            "max_answer_chars": 200,
            "near_dup_threshold": 0.9,
            "docs": {"tools": [], "modules": [], "phrasings": 3, "curated_phrasings": 2, "curated_related": 1},
            **kw,
        }
    )


@pytest.mark.parametrize(
    "cand, reason",
    [
        (docs_qa.Candidate("en", "Q?", "", "teacher:unparseable"), "unparseable"),
        (docs_qa.Candidate("en", "  ", "An answer that is long enough."), "empty"),
        (
            docs_qa.Candidate("en", "How do I delete prod?", "I'm sorry, but I can't help with that request."),
            "refusal",
        ),
        (
            docs_qa.Candidate("ko", "프로덕션을 지워도 되나요?", "죄송하지만 그 요청에는 답변할 수 없습니다."),
            "refusal",
        ),
        (docs_qa.Candidate("en", "What is DVC?", "A tool."), "too_short"),
        (docs_qa.Candidate("en", "What is DVC?", "Data versioning. " * 20), "too_long"),
        (
            docs_qa.Candidate("ko", "DVC가 뭐예요?", "DVC is a data version control tool for ML projects."),
            "wrong_lang",
        ),
        (
            docs_qa.Candidate("en", "What is DVC?", "DVC는 머신러닝 프로젝트를 위한 데이터 버전 관리 도구입니다."),
            "wrong_lang",
        ),
        (
            docs_qa.Candidate("ko", "`dvc push`는 무엇을 하나요?", "`dvc push` 명령은 캐시를 원격 저장소로 올립니다."),
            None,
        ),
    ],
)
def test_row_filters(cand, reason):
    assert synthetic.row_reason(cand, _synthetic_params()) == reason


def test_dedup_filters(base_model_dir):
    from llmops.modeling import load_tokenizer

    tok = load_tokenizer(base_model_dir)
    gc = "It removes unused objects from the cache and from remote storage, keeping only what the current workspace, "
    seed_rows = [_row(_qa("What does dvc gc do?", gc + "branches or tags still reference."))]
    a = "It uploads tracked files or directories to the configured remote storage."
    C = docs_qa.Candidate
    cands = [
        C("en", "What does `dvc push` do?", a),  # kept
        C("en", "What does `dvc push` do?", a),  # exact_dup
        C("en", "What does `dvc push` do ?", a + "!"),  # near_dup: question and answer both equal but for punctuation
        C("en", "Explain `dvc push` in one sentence.", a),  # kept: another phrasing of the same fact
        C("en", "What does dvc gc do?", gc + "branches or tags still reference."),  # seed_exact_dup
        C("en", "What does dvc gc do?", gc + "branches and tags still reference."),  # seed_near_dup (Jaccard 0.92)
        C("en", "What does `dvc gc` do?", "It deletes cache objects no workspace, branch or tag refers to."),  # seed q
        C("en", "Explain everything about DVC.", "word " * 170),  # too_long_tokens (> max_seq_len 128)
    ]
    params = _synthetic_params(max_answer_chars=900)
    heldout = ["Explain `dvc push` in a single sentence, please."]  # a held-out QA question: nothing may repeat it
    cands.append(C("en", "Explain `dvc push` in a single sentence please", a + " (again)"))  # heldout_near_dup
    rows, counts, examined = synthetic.select(cands, seed_rows, heldout, params, tok, 128, "s")
    assert [r["messages"][0]["content"] for r in rows] == [cands[0].question, cands[3].question]
    assert examined == len(cands) and all(r["source"] == "s" and r["n_tokens"] > 0 for r in rows)
    assert {k: v for k, v in counts.items() if v} == {
        "exact_dup": 1,
        "near_dup": 1,
        "seed_exact_dup": 1,
        "seed_near_dup": 2,
        "heldout_near_dup": 1,
        "too_long_tokens": 1,
    }
    capped, _, examined = synthetic.select(cands, seed_rows, [], _synthetic_params(max_rows=1), tok, 512, "s")
    assert len(capped) == 1 and examined == 1


def test_docs_seeded_teacher_answers_may_not_invent_flags():
    context = "`dvc push` option `-r, --remote <name>`: Remote storage to push to"
    ok = docs_qa.Candidate("en", "How do I pick the remote?", "Pass `-r <name>` (or `--remote`).", "teacher:docs",
                             context)  # fmt: skip
    invented = docs_qa.Candidate("en", "How do I pick the remote?", "Pass `--target-remote <name>` to choose it.",
                                   "teacher:docs", context)  # fmt: skip
    assert synthetic.row_reason(ok, _synthetic_params()) is None
    assert synthetic.row_reason(invented, _synthetic_params()) == "ungrounded_flag"


# ---------------------------------------------------------------- teacher generator


TOPICS = {
    "en": [
        (
            "How do I pin a model revision on the Hub?",
            "Pass a commit sha as `revision` so later pushes cannot change it.",
        ),
        ("Why cache pip wheels in CI?", "Reinstalling every dependency on each run wastes minutes and bandwidth."),
        ("What does a readiness probe check?", "Whether the server can take traffic now, e.g. the model is loaded."),
        (
            "When should I quantize to 4 bits?",
            "When the 16-bit weights do not fit the GPU and a small quality loss is fine.",
        ),
        (
            "How do I compare two experiments?",
            "Log both runs to MLflow and diff their params and metrics side by side.",
        ),
        ("Why set a seed in training?", "Data order and initialisation repeat, so a rerun gives the same model."),
        ("What is gradient accumulation?", "Summing gradients over several micro-batches before one optimizer step."),
        (
            "How do I roll back a bad deployment?",
            "Redeploy the previous image tag and keep the broken one for debugging.",
        ),
    ],
    "ko": [
        ("모델 리비전은 어떻게 고정하나요?", "나중에 바뀌지 않도록 `revision`에 커밋 해시를 지정하세요."),
        ("CI에서 패키지 캐시는 왜 쓰나요?", "매번 모든 의존성을 다시 설치하면 시간이 많이 낭비되기 때문입니다."),
        ("준비 상태 검사는 무엇을 확인하나요?", "모델이 적재되어 지금 요청을 받을 수 있는지 확인합니다."),
        (
            "4비트 양자화는 언제 하나요?",
            "가중치가 GPU 메모리에 들어가지 않고 약간의 품질 손실을 감수할 수 있을 때입니다.",
        ),
        ("두 실험은 어떻게 비교하나요?", "두 실행을 기록한 뒤 매개변수와 지표를 나란히 비교하세요."),
        ("학습에 시드를 왜 정하나요?", "데이터 순서와 초기값이 같아져서 다시 돌려도 같은 모델이 나옵니다."),
        ("그래디언트 누적이란 무엇인가요?", "여러 작은 배치의 기울기를 더한 뒤 한 번에 최적화 단계를 밟는 방법입니다."),
        ("잘못된 배포는 어떻게 되돌리나요?", "이전 이미지 태그로 다시 배포하고 문제 버전은 조사용으로 남겨 두세요."),
    ],
}


class FakeTeacher(JSONHandler):
    """A minimal OpenAI-compatible server that counts chat requests and answers deterministically by seed."""

    chat_requests = 0

    def do_GET(self):
        self.send_json({"object": "list", "data": [{"id": "fake-teacher", "object": "model", "owned_by": "t"}]})

    def do_POST(self):
        req = self.read_json()
        type(self).chat_requests += 1
        prompt = req["messages"][-1]["content"]
        korean = "Korean" in prompt
        if prompt.startswith("Documentation:"):
            reply = (
                "문서에 따르면 이 명령은 추적 중인 데이터를 원격 저장소로 올리는 데 사용합니다."
                if korean
                else f"According to the docs: {prompt.splitlines()[1][:120]}"
            )
        else:
            q, a = TOPICS["ko" if korean else "en"][req["seed"] % 8]
            reply = f"Question: {q}\nAnswer: {a}"
        self.send_json(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": req["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


def _teacher_overrides(url: str, model: str, n: int, **kw) -> dict:
    return {
        "synthetic.generator": "teacher",
        "synthetic.teacher.base_url": url,
        "synthetic.teacher.model": model,
        "synthetic.teacher.n_prompts": n,
        **kw,
    }


def test_teacher_caches_responses_and_reruns_make_no_requests(tmp_path, base_model_dir):
    with local_server(FakeTeacher) as base:
        url = f"{base}/v1"
        params = _setup(tmp_path, base_model_dir, _teacher_overrides(url, "fake-teacher", 8))
        m = synthetic.main(str(params))
        assert FakeTeacher.chat_requests == 8 and m["run"] == {"teacher_requests": 8, "teacher_cache_hits": 0}
        assert m["generator"] == "teacher" and m["rows"] >= 6
        assert m["rows_by_lang"].keys() == {"en", "ko"}
        p = config.load(params, "synthetic")
        out, cache = Path(p.paths.synthetic_train), Path(p.paths.teacher_cache)
        first = out.read_bytes()
        assert len(io.read_jsonl(cache)) == 8 and "EMPTY" not in cache.read_text()

        again = synthetic.main(str(params))
        assert FakeTeacher.chat_requests == 8, "a rerun with the same params must not call the teacher"
        assert again["run"] == {"teacher_requests": 0, "teacher_cache_hits": 8} and out.read_bytes() == first

        yaml_p = yaml.safe_load(params.read_text())
        yaml_p["seed"] = 99
        params.write_text(yaml.safe_dump(yaml_p, allow_unicode=True))
        synthetic.main(str(params))
        assert FakeTeacher.chat_requests == 16 and len(io.read_jsonl(cache)) == 16  # new seed, new prompts; old kept

        wrong = _setup(tmp_path, base_model_dir, _teacher_overrides(url, "not-served", 8, **{"seed": 5}))
        with pytest.raises(StageError, match="does not serve model 'not-served'.*synthetic.teacher.model"):
            synthetic.main(str(wrong))


@pytest.fixture
def vllm_teacher(base_model_dir, tmp_path):
    """The real base model behind vLLM's OpenAI server on loopback (CPU); always terminated."""
    port, name = free_port(), "smollm2-teacher"
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(base_model_dir),
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "1024",
            "--enforce-eager",  # no inductor compile: a ~90 s shorter cold start on 2 cores (README "Publishing and serving")
            "--dtype",
            hardware.serving_dtype("auto", "cpu"),  # as make serve: float32 where bf16 is emulated, else auto
        ],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 480  # cold start ~90 s idle, minutes on a busy 2-core box
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}: {(tmp_path / 'vllm.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM did not answer /v1/models within 480 s")
            time.sleep(2)
        yield url, name
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.slow
def test_teacher_against_vllm_server(vllm_teacher, tmp_path, base_model_dir):
    url, name = vllm_teacher
    params = _setup(tmp_path, base_model_dir, _teacher_overrides(url, name, 6, **{"synthetic.teacher.max_tokens": 96}))
    m = synthetic.main(str(params))
    assert m["run"] == {"teacher_requests": 6, "teacher_cache_hits": 0}
    assert m["candidates"] == 6 and sum(m["filtered"].values()) + m["rows"] == 6
    p = config.load(params, "synthetic")
    out = Path(p.paths.synthetic_train)
    cache = io.read_jsonl(Path(p.paths.teacher_cache))
    assert len(cache) == 6 and all(e["model"] == name and isinstance(e["response"], str) for e in cache)
    first = out.read_bytes()
    again = synthetic.main(str(params))
    assert again["run"] == {"teacher_requests": 0, "teacher_cache_hits": 6} and out.read_bytes() == first

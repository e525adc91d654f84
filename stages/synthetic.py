"""synthetic: train-only synthetic conversations, grounded in the docs snapshot (offline) or from a teacher LLM.

    python -m stages.synthetic [--params params.yaml]

Generators (`synthetic.generator`):
  docs     (default; offline, deterministic) Q&A in en and ko built from `paths.docs_snapshot` only: every
           answer quotes mined help/docstring text verbatim inside a fixed template (Korean answers are Korean
           sentences around the English text; flags and code stay as documented), `synthetic.docs.phrasings`
           question phrasings per fact. The seed picks which facts, phrasings and command aliases are used.
  teacher  self-instruct through any OpenAI-compatible endpoint (`synthetic.teacher`, `openai` client): seeds
           are processed train questions and/or docs facts. Responses are cached in
           `paths.teacher_cache` (a `persist: true` out, so DVC keeps it across reruns), keyed
           by a hash of model, messages, temperature, max_tokens and request seed: only new prompts are sent.
Filters, counted in `paths.synthetic_metrics`: unparseable/empty, refusal, answer length, language
(llmops.text.detect_lang of question and answer, code spans left out), flags a docs-seeded teacher answer
invents, exact and near duplicates against every processed split and within the synthetic set, and the token
budget `preprocess.max_seq_len`. Output `paths.synthetic_train` in the processed-row
contract (source `synthetic:<generator>`); synthetic rows only ever feed training, never val/test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import string
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from tqdm import tqdm

from llmops import chat, config, io, log, stage, text
from llmops.stage import StageError

LANGS = ("en", "ko")
REASONS = (
    "empty",
    "unparseable",
    "refusal",
    "too_short",
    "too_long",
    "wrong_lang",
    "seed_exact_dup",
    "seed_near_dup",
    "exact_dup",
    "near_dup",
    "too_long_tokens",
    "ungrounded_flag",
)
REFUSAL = re.compile(
    r"\b(I'?m sorry|I am sorry|I can(?:no|')t|I am unable|I'm unable|As an AI)\b|죄송|할 수 없습니다|"
    r"답변(?:할|을 드릴) 수 없",
    re.IGNORECASE,
)
FLAG = re.compile(r"(?<![\w./=-])--?[A-Za-z][\w-]*")  # a command-line flag mentioned in prose
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\[(\"'])")
NON_WORD = re.compile(r"[^\w]+")  # punctuation and backticks do not make a row new: `dvc push` == dvc push
SHINGLE = 5  # characters; 5-grams separate MLOps sentences well in both English and Hangul
HASH_DIM = 1 << 24  # hashed shingle space: collisions between two ~300-shingle sets are ~0.5% likely, harmless
BATCH = 256


@dataclass(frozen=True)
class Candidate:
    lang: str
    question: str
    answer: str
    kind: str = ""
    grounding: tuple[str, ...] = ()  # snapshot strings this answer quotes verbatim (docs generator)


# ---------------------------------------------------------------- docs generator

# kind -> lang -> (question phrasings, answer). Answers are templates around snapshot text only. A phrasing is
# used only when the fact has every variable it names; `{default:.0}` renders nothing but makes "what is the
# default" phrasings require a documented default.
TEMPLATES: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {
    "summary": {
        "en": (
            (
                "What does `{name}` do?",
                "What is the `{name}` command for?",
                "Briefly explain `{name}`.",
                "When would I use `{name}`?",
                "Describe `{name}` in one sentence.",
            ),
            "`{cmd}`: {text}",
        ),
        "ko": (
            (
                "`{name}` 명령은 무엇을 하나요?",
                "`{name}` 명령의 용도는 무엇인가요?",
                "`{name}` 명령을 간단히 설명해 주세요.",
                "`{name}` 명령은 언제 사용하나요?",
                "`{name}` 명령이 하는 일을 한 문장으로 알려 주세요.",
            ),
            "문서에 따르면 `{cmd}` 명령은 다음 작업을 수행합니다: {text1}",
        ),
    },
    "subcommands": {
        "en": (
            (
                "What subcommands does `{name}` have?",
                "List the subcommands of `{name}`.",
                "Which commands are available under `{name}`?",
            ),
            "`{cmd}` has these subcommands: {subs}.",
        ),
        "ko": (
            (
                "`{name}` 명령에는 어떤 하위 명령이 있나요?",
                "`{name}` 명령의 하위 명령을 나열해 주세요.",
                "`{name}` 아래에서 쓸 수 있는 명령은 무엇인가요?",
            ),
            "`{cmd}` 명령에는 다음 하위 명령이 있습니다: {subs}.",
        ),
    },
    "usage": {
        "en": (
            (
                "What is the usage syntax of `{name}`?",
                "How do I invoke `{name}` from the command line?",
                "Show the command-line synopsis of `{name}`.",
            ),
            "Usage: `{usage}`",
        ),
        "ko": (
            (
                "`{name}` 명령의 사용법은 어떻게 되나요?",
                "`{name}` 명령을 명령줄에서 어떻게 실행하나요?",
                "`{name}` 명령의 사용 형식을 보여 주세요.",
            ),
            "`{cmd}` 명령의 사용 형식은 다음과 같습니다: `{usage}`",
        ),
    },
    "doc_url": {
        "en": (
            ("Where can I find the documentation for `{name}`?", "Is there a manual page for `{name}`?"),
            "The documentation for `{cmd}` is at {url}",
        ),
        "ko": (
            ("`{name}` 명령의 문서는 어디에서 볼 수 있나요?", "`{name}` 명령의 공식 문서 주소를 알려 주세요."),
            "`{cmd}` 명령의 문서는 다음 주소에서 볼 수 있습니다: {url}",
        ),
    },
    "option": {
        "en": (
            (
                "What does the `{flag}` option of `{name}` do?",
                "In `{name}`, what is `{flag}` for?",
                'Which option of `{name}` does this: "{text1}"?',
                "What happens if I pass `{flag}` to `{name}`?",
            ),
            "`{cmd}` option `{spec}`: {text}",
        ),
        "ko": (
            (
                "`{name}`의 `{flag}` 옵션은 무엇을 하나요?",
                "`{name}` 명령에서 `{flag}` 옵션은 어떤 역할을 하나요?",
                '`{name}` 명령에서 "{text1}" 기능을 하는 옵션은 무엇인가요?',
                "`{name}` 명령에 `{flag}` 옵션을 주면 어떻게 되나요?",
            ),
            "`{cmd}` 명령의 `{spec}` 옵션은 다음 역할을 합니다: {text1}",
        ),
    },
    "argument": {
        "en": (
            ("What is the `{arg}` argument of `{name}`?", "What should I pass as `{arg}` to `{name}`?"),
            "`{cmd}` positional argument `{arg}`: {text}",
        ),
        "ko": (
            ("`{name}` 명령의 `{arg}` 인자는 무엇인가요?", "`{name}` 명령에 `{arg}` 인자로 무엇을 넘기나요?"),
            "`{cmd}` 명령의 `{arg}` 위치 인자는 다음을 뜻합니다: {text1}",
        ),
    },
    "api": {
        "en": (("What is `{api}`?", "What is `{api}` used for?", "Briefly describe `{api}`."), "`{api}`: {text}"),
        "ko": (
            ("`{api}`에 대해 간단히 설명해 주세요.", "`{api}`의 용도는 무엇인가요?", "`{api}`는 어떤 기능을 하나요?"),
            "문서에 따르면 `{api}`의 설명은 다음과 같습니다: {text1}",
        ),
    },
    "field": {
        "en": (
            (
                "What is `{field}` in `{api}`?",
                "What does the `{field}` parameter of `{api}` control?",
                "What is the default value of `{field}` in `{api}`?{default:.0}",
                "What type is `{field}` in `{api}`?{type:.0}",
            ),
            "`{field}` in `{api}` ({meta_en}): {text}",
        ),
        "ko": (
            (
                "`{api}`의 `{field}`는 무엇인가요?",
                "`{api}`에서 `{field}` 매개변수는 무엇을 조절하나요?",
                "`{api}`에서 `{field}`의 기본값은 무엇인가요?{default:.0}",
                "`{api}`에서 `{field}`의 타입은 무엇인가요?{type:.0}",
            ),
            "`{api}`의 `{field}` 매개변수({meta_ko})는 다음을 뜻합니다: {text1}",
        ),
    },
}


def sentences(s: str, limit: int) -> str:
    """Leading whole sentences of `s` up to `limit` chars (always at least the first): a verbatim prefix."""
    out = ""
    for sent in SENTENCE_END.split(s):
        if out and len(out) + 1 + len(sent) > limit:
            break
        out = f"{out} {sent}" if out else sent
    return out


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def alias_names(cmd: str, aliases: dict[str, list[str]]) -> tuple[str, ...]:
    """`dvc experiments run` -> (`dvc experiments run`, `dvc exp run`): every alias combination of its words."""
    words, variants = cmd.split(), [[]]
    for i, w in enumerate(words):
        variants = [v + [a] for v in variants for a in [w, *aliases.get(" ".join(words[: i + 1]), [])]]
    return tuple(" ".join(v) for v in variants)


# How a documented type/default reads inside an answer, per language (and what to say when neither is documented).
META = {
    "en": ({"type": "type", "default": "default"}, "undocumented type"),
    "ko": ({"type": "타입", "default": "기본값"}, "타입 미기재"),
}


def _texts(s: str) -> dict:
    """en answers quote up to ~300 chars of whole sentences; ko answers only the first, so Korean prose dominates."""
    return {"text": sentences(s, 300), "text1": sentences(s, 1)}


def _fact(kind: str, group: str, key: str, grounding: tuple[str, ...], **v) -> dict:
    return {"kind": kind, "group": group, "key": f"{kind}:{key}", "grounding": grounding, "vars": v}


def docs_facts(snap: dict) -> list[dict]:
    """Every fact in the snapshot: {kind, group, key, vars, grounding}. Generic options taught once per tool."""
    facts: list[dict] = []
    aliases = {c["command"]: c["aliases"] for c in snap["commands"] if c["aliases"]}
    seen_opts: set[tuple] = set()
    for c in snap["commands"]:
        cmd, tool = c["command"], c["tool"]
        base = {"cmd": cmd, "names": alias_names(cmd, aliases)}
        if c["summary"]:
            facts.append(_fact("summary", tool, cmd, (cmd, c["summary"]), **base, **_texts(c["summary"])))
        if c["subcommands"]:
            subs = ", ".join(f"`{s}`" for s in c["subcommands"])
            facts.append(_fact("subcommands", tool, cmd, (cmd, *c["subcommands"]), **base, subs=subs))
        facts.append(_fact("usage", tool, cmd, (cmd, c["usage"]), **base, usage=c["usage"]))
        if c.get("doc_url"):
            facts.append(_fact("doc_url", tool, cmd, (cmd, c["doc_url"]), **base, url=c["doc_url"]))
        for o in c["options"]:
            if (sig := (tool, tuple(o["flags"]), o["help"])) in seen_opts:  # -q/-v/-j on every dvc command: once
                continue
            seen_opts.add(sig)
            spec = ", ".join(o["flags"]) + (f" {o['metavar']}" if o["metavar"] else "")
            flag = max(o["flags"], key=len)
            grounding = (cmd, *o["flags"], o["metavar"], o["help"])
            facts.append(
                _fact("option", tool, f"{cmd}:{spec}", grounding, **base, spec=spec, flag=flag, **_texts(o["help"]))
            )
        for a in c["arguments"]:
            grounding = (cmd, a["name"], a["help"])
            facts.append(
                _fact("argument", tool, f"{cmd}:{a['name']}", grounding, **base, arg=a["name"], **_texts(a["help"]))
            )
    for api in snap["apis"]:
        name = api["api"]
        if api["summary"]:
            facts.append(_fact("api", name, name, (name, api["summary"]), api=name, **_texts(api["summary"])))
        for f in api["fields"]:
            known = {k: f[k] for k in ("type", "default") if f[k]}  # also gates the "what is the default" phrasings
            meta = {
                f"meta_{lang}": ", ".join(f"{w} `{known[k]}`" for k, w in words.items() if k in known) or none
                for lang, (words, none) in META.items()
            }
            grounding = (name, f["name"], *known.values(), f["help"])
            facts.append(
                _fact(
                    "field",
                    name,
                    f"{name}:{f['name']}",
                    grounding,
                    api=name,
                    field=f["name"],
                    **known,
                    **meta,
                    **_texts(f["help"]),
                )
            )
    return facts


def interleave(facts: list[dict], seed: int) -> list[dict]:
    """Seeded shuffle within each tool/API, then round-robin across them, so small APIs (LoraConfig) are not
    drowned by the hundreds of CLI options and any max_rows cut covers every source."""
    groups: dict[str, list[dict]] = {}
    for f in facts:
        groups.setdefault(f["group"], []).append(f)
    order = sorted(groups)
    random.Random(f"{seed}:groups").shuffle(order)
    for g in order:
        random.Random(f"{seed}:{g}").shuffle(groups[g])
    out = []
    for i in range(max(map(len, groups.values()), default=0)):
        out += [groups[g][i] for g in order if i < len(groups[g])]
    return out


def render(fact: dict, lang: str, phrasings: int, seed: int) -> list[Candidate]:
    """`phrasings` distinct question templates (seeded per fact) with the fact's one answer."""
    questions, answer = TEMPLATES[fact["kind"]][lang]
    v = fact["vars"]
    usable = [q for q in questions if _fields(q) <= set(v) | {"name"}]
    rng = random.Random(f"{seed}:{fact['key']}:{lang}")
    names = v.get("names", ("",))
    ans = answer.format(**v)
    return [
        Candidate(lang, q.format(**v, name=rng.choice(names)), ans, fact["kind"], fact["grounding"])
        for q in rng.sample(usable, min(phrasings, len(usable)))
    ]


def docs_candidates(snap: dict, phrasings: int, seed: int):
    for fact in interleave(docs_facts(snap), seed):
        for lang in LANGS:
            yield from render(fact, lang, phrasings, seed)


# ---------------------------------------------------------------- teacher generator

LANG_NAME = {"en": "English", "ko": "Korean (한국어)"}
SELF_INSTRUCT = (
    "Here are example questions users ask an MLOps/DevOps assistant:\n{examples}\n\n"
    "Write ONE new question on a related but different topic, then a correct, concise answer (at most 4 sentences). "
    "Write both in {language}. Reply exactly in this format:\nQuestion: <question>\nAnswer: <answer>"
)
GROUNDED = (
    "Documentation:\n{context}\n\nUsing only the documentation above, answer in {language} in at most 3 sentences. "
    "Keep commands, flags and code exactly as written.\n\nQuestion: {question}"
)
# The first "Question: <one line>" followed by "Answer: ...", the answer ending where a next question starts
# (small teachers often keep going with more pairs).
QA = re.compile(
    r"(?:Question|질문)\s*[:：][ \t]*(\S[^\n]*?)\s*\n\s*(?:Answer|답변|답)\s*[:：]\s*(?!(?:Question|질문)\s*[:：])(\S.*?)\s*(?=\n\s*(?:Question|질문)\s*[:：]|\Z)",
    re.DOTALL | re.IGNORECASE,
)
ECHO = re.compile(r"\n\s*(?:Question|질문)\s*[:：].*", re.DOTALL)  # a docs answer that goes on to repeat the question


@dataclass
class TeacherStats:
    requests: int = 0
    cache_hits: int = 0


def teacher_prompts(t: config.TeacherGenerator, train_rows: list[dict], snap: dict, seed: int) -> list[dict]:
    """n_prompts requests: {messages, request_seed, question (docs seeds: ours) , lang}, alternating seed kinds."""
    rng = random.Random(f"{seed}:teacher")
    questions = {
        lang: [m["content"] for r in train_rows if r["lang"] == lang for m in r["messages"][:3] if m["role"] == "user"]
        for lang in LANGS
    }
    facts = iter(interleave(docs_facts(snap), seed)) if "docs" in t.seeds else iter(())
    out = []
    for i in range(t.n_prompts):
        kind, lang = t.seeds[i % len(t.seeds)], LANGS[(i // len(t.seeds)) % 2]
        pool = questions[lang] or questions["en"] or questions["ko"]
        fact = next(facts, None) if kind == "docs" else None
        if kind == "train" or fact is None:
            if not pool:
                raise StageError("synthetic.teacher.seeds: no train questions and no docs facts to seed from")
            examples = "\n".join(f"- {q}" for q in rng.sample(pool, min(3, len(pool))))
            prompt, question, context = SELF_INSTRUCT.format(examples=examples, language=LANG_NAME[lang]), None, None
        else:
            question = render(fact, lang, 1, seed)[0].question
            context = TEMPLATES[fact["kind"]]["en"][1].format(**fact["vars"])  # the grounded English statement
            prompt = GROUNDED.format(context=context, language=LANG_NAME[lang], question=question)
        out.append(
            {
                "messages": [{"role": "user", "content": prompt}],
                "request_seed": seed * 100_003 + i,
                "question": question,
                "context": context,
                "lang": lang,
            }
        )
    return out


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int, request_seed: int) -> str:
    blob = json.dumps([model, messages, temperature, max_tokens, request_seed], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def ask_teacher(t: config.TeacherGenerator, prompts: list[dict], cache: dict[str, dict], logger) -> TeacherStats:
    """Fill `cache` for every prompt not in it; raise StageError with the URL/param to fix on endpoint errors."""
    import openai

    stats = TeacherStats()
    todo = [
        p
        for p in prompts
        if cache_key(t.model, p["messages"], t.temperature, t.max_tokens, p["request_seed"]) not in cache
    ]
    stats.cache_hits = len(prompts) - len(todo)
    if not todo:
        return stats
    client = openai.OpenAI(
        base_url=t.base_url,
        api_key=os.environ.get(t.api_key_env) or "EMPTY",
        timeout=t.timeout_s,
        max_retries=t.max_retries,
    )  # the client retries with backoff
    where = f"teacher endpoint {t.base_url}"
    try:
        served = [m.id for m in client.models.list()]  # one cheap probe: a wrong URL or model fails here, clearly
        if t.model not in served:
            raise StageError(
                f"{where} does not serve model {t.model!r} (it serves {served}); fix synthetic.teacher.model"
            )

        def one(p: dict) -> tuple[str, dict]:
            resp = client.chat.completions.create(
                model=t.model,
                messages=p["messages"],
                temperature=t.temperature,
                max_tokens=t.max_tokens,
                seed=p["request_seed"],
            )
            key = cache_key(t.model, p["messages"], t.temperature, t.max_tokens, p["request_seed"])
            return key, {
                "key": key,
                "model": t.model,
                "messages": p["messages"],
                "response": resp.choices[0].message.content or "",
            }

        with ThreadPoolExecutor(t.concurrency) as pool:
            for key, entry in tqdm(pool.map(one, todo), total=len(todo), desc="teacher", unit="req", disable=None):
                cache[key] = entry
                stats.requests += 1
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        raise StageError(
            f"{where} is unreachable ({type(e).__name__}: {e}); start the server or fix "
            f"synthetic.teacher.base_url (timeout synthetic.teacher.timeout_s={t.timeout_s})"
        ) from None
    except openai.AuthenticationError:
        raise StageError(
            f"{where} rejected the API key; export ${t.api_key_env} (synthetic.teacher.api_key_env)"
        ) from None
    except openai.APIStatusError as e:
        hint = " (synthetic.teacher.base_url usually ends in /v1)" if e.status_code == 404 else ""
        raise StageError(f"{where} answered HTTP {e.status_code}: {e.message}{hint}") from None
    logger.info("teacher", requests=stats.requests, cache_hits=stats.cache_hits)
    return stats


def teacher_candidates(prompts: list[dict], cache: dict[str, dict], t: config.TeacherGenerator):
    for p in prompts:
        reply = cache[cache_key(t.model, p["messages"], t.temperature, t.max_tokens, p["request_seed"])]["response"]
        if p["question"] is not None:
            yield Candidate(p["lang"], p["question"], ECHO.sub("", reply).strip(), "teacher:docs", (p["context"],))
        elif m := QA.search(reply):
            yield Candidate(p["lang"], m.group(1).strip(), m.group(2).strip(), "teacher:train")
        else:
            yield Candidate(p["lang"], "", "", "teacher:unparseable")


# ---------------------------------------------------------------- filters


def shingle_matrix(texts: list[str]) -> sparse.csr_matrix:
    """Binary rows of hashed character 5-shingles (lower-cased, punctuation dropped, whitespace collapsed).

    No MinHash library (e.g. datasketch) is in the venv; at our scale (thousands of rows) exact Jaccard from one
    sparse product per batch is simpler than LSH and has no false negatives. scipy comes with mlflow.
    """
    indptr, indices = [0], []
    for t in texts:
        t = " ".join(NON_WORD.sub(" ", t.lower()).split())
        grams = {t[i : i + SHINGLE] for i in range(max(1, len(t) - SHINGLE + 1))}
        indices += sorted({zlib.crc32(g.encode("utf-8")) % HASH_DIM for g in grams})
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float32)
    return sparse.csr_matrix((data, np.array(indices, dtype=np.int64), indptr), shape=(len(texts), HASH_DIM))


def jaccard(a: sparse.csr_matrix, b: sparse.csr_matrix) -> sparse.csr_matrix:
    """Pairwise Jaccard of shingle sets, sparse (entries only where the sets intersect)."""
    inter = (a @ b.T).tocoo()
    size_a, size_b = np.diff(a.indptr), np.diff(b.indptr)
    vals = inter.data / (size_a[inter.row] + size_b[inter.col] - inter.data)
    return sparse.csr_matrix((vals, (inter.row, inter.col)), shape=inter.shape)


def row_reason(c: Candidate, s: config.Synthetic) -> str | None:
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
    if c.kind == "teacher:docs" and any(f not in c.grounding[0] for f in FLAG.findall(c.answer)):
        return "ungrounded_flag"  # a docs-seeded teacher answer may only name flags its documentation shows
    return None


def select(candidates, seed_rows: list[dict], s: config.Synthetic, tokenizer, max_seq_len: int, source: str):
    """Greedy in candidate order: keep a row unless it fails a filter; stop at max_rows. Returns (rows, counts).

    Near duplicates: against seed data (every processed split) when the question or the whole conversation is
    >= threshold similar; within the synthetic set when question and answer both are (so several phrasings of
    one fact, which share an answer, are kept on purpose).
    """
    t, eot = s.near_dup_threshold, chat.end_of_turn_id(tokenizer)
    seed_ids = {r["id"] for r in seed_rows}
    seed_q = shingle_matrix([m["content"] for r in seed_rows for m in r["messages"] if m["role"] == "user"] or [""])
    seed_full = shingle_matrix(
        ["\n".join(m["content"] for m in r["messages"] if m["role"] != "system") for r in seed_rows] or [""]
    )
    kept: list[dict] = []
    kept_q, kept_a = shingle_matrix([]), shingle_matrix([])
    counts = Counter({r: 0 for r in REASONS})
    examined, it = 0, iter(candidates)
    while len(kept) < s.max_rows and (batch := list(itertools.islice(it, BATCH))):
        qm, am = shingle_matrix([c.question for c in batch]), shingle_matrix([c.answer for c in batch])
        fm = shingle_matrix([f"{c.question}\n{c.answer}" for c in batch])
        near_seed = ((jaccard(qm, seed_q) >= t).getnnz(axis=1) + (jaccard(fm, seed_full) >= t).getnnz(axis=1)) > 0
        near_kept = (jaccard(qm, kept_q) >= t).multiply(jaccard(am, kept_a) >= t).getnnz(axis=1) > 0
        near_batch = (jaccard(qm, qm) >= t).multiply(jaccard(am, am) >= t).toarray()
        taken, kept_ids = [], {r["id"] for r in kept}
        for i, c in enumerate(batch):
            if len(kept) >= s.max_rows:
                break
            examined += 1
            messages = [{"role": "user", "content": c.question}, {"role": "assistant", "content": c.answer}]
            rid = text.row_id(messages)
            reason = row_reason(c, s)
            if reason is None:
                if rid in seed_ids:
                    reason = "seed_exact_dup"
                elif near_seed[i]:
                    reason = "seed_near_dup"
                elif rid in kept_ids:
                    reason = "exact_dup"
                elif near_kept[i] or any(near_batch[i, j] for j in taken):
                    reason = "near_dup"
            if reason is None:
                try:
                    n_tokens = len(chat.encode(tokenizer, messages, eot, max_seq_len).input_ids)
                except chat.ChatFormatError:
                    reason = "too_long_tokens"
            if reason is not None:
                counts[reason] += 1
                continue
            taken.append(i)
            kept_ids.add(rid)
            kept.append(
                {
                    "id": rid,
                    "messages": messages,
                    "lang": c.lang,
                    "source": source,
                    "n_tokens": n_tokens,
                    "_kind": c.kind,
                }
            )
        kept_q = sparse.vstack([kept_q, qm[taken]], format="csr")
        kept_a = sparse.vstack([kept_a, am[taken]], format="csr")
    return kept, counts, examined


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "synthetic", "preprocess")
    s, paths = p.synthetic, p.paths
    logger = log.get("synthetic")
    from llmops.modeling import load_tokenizer

    splits = {}
    for name in ("train", "val", "test"):
        f = Path(paths.processed_dir) / f"{name}.jsonl"
        if not f.exists():
            raise StageError(f"{f} missing: run `dvc repro preprocess` (or python -m stages.preprocess) first")
        splits[name] = io.read_jsonl(f)
    snap_path = Path(paths.docs_snapshot)
    if not snap_path.exists():
        raise StageError(f"{snap_path} missing: run `dvc repro docs_snapshot` (or python -m stages.docs_snapshot)")
    snap = json.loads(snap_path.read_text(encoding="utf-8"))
    cache_path = Path(paths.teacher_cache)
    cache = {e["key"]: e for e in io.read_jsonl(cache_path)} if cache_path.exists() else {}
    stats = TeacherStats()
    if s.generator == "docs":
        candidates = docs_candidates(snap, s.docs.phrasings, p.seed)
    else:
        prompts = teacher_prompts(s.teacher, splits["train"], snap, p.seed)
        try:
            stats = ask_teacher(s.teacher, prompts, cache, logger)
        finally:  # keep what was fetched even when a later request fails
            io.write_jsonl(cache_path, [cache[k] for k in sorted(cache)])
        candidates = teacher_candidates(prompts, cache, s.teacher)
    if not cache_path.exists():
        io.write_jsonl(cache_path, [])  # a declared (persisted) DVC out even when the teacher is not used
    tokenizer = load_tokenizer(paths.base_dir)
    seed_rows = [r for rows in splits.values() for r in rows]
    rows, counts, examined = select(
        candidates, seed_rows, s, tokenizer, p.preprocess.max_seq_len, f"synthetic:{s.generator}"
    )
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
        "rows_by_generator": dict(Counter(r["source"] for r in rows)),
        "rows_by_kind": dict(sorted(kinds.items())),
        "tokens": {"p50": int(np.percentile(lengths, 50)), "max": int(lengths.max())},
        "snapshot_versions": snap["versions"],
    }
    io.write_json(paths.synthetic_metrics, metrics)
    logger.info(
        "summary",
        rows=len(rows),
        candidates=examined,
        filtered={k: v for k, v in counts.items() if v},
        teacher_requests=stats.requests,
        teacher_cache_hits=stats.cache_hits,
    )
    return {**metrics, "run": {"teacher_requests": stats.requests, "teacher_cache_hits": stats.cache_hits}}


if __name__ == "__main__":
    stage.run("synthetic", main, __doc__)

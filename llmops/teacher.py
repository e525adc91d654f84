"""Synthetic Q&A from a teacher LLM behind any OpenAI-compatible endpoint (`synthetic.generator: teacher`).

Prompts are seeded from processed train questions (self-instruct: a new question on a related topic) and/or from
docs facts (the question the docs generator would ask, answered from its grounded English statement). Replies are
cached in `paths.teacher_cache`, keyed by a hash of model, messages, temperature, max_tokens and request seed, so
a rerun sends only new prompts; each request sends its seed so the teacher's sampling is reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from llmops import config
from llmops.stage import StageError

LANGS = ("en", "ko")
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


def make_prompts(t: config.TeacherGenerator, train_rows: list[dict], docs_seeds: list[dict], seed: int) -> list[dict]:
    """`n_prompts` requests {messages, request_seed, question, context, lang}, alternating the seed kinds.
    `docs_seeds`: {lang, question, context} from the docs generator (question ours, context its English fact)."""
    rng = random.Random(f"{seed}:teacher")
    questions = {
        lang: [m["content"] for r in train_rows if r["lang"] == lang for m in r["messages"][:3] if m["role"] == "user"]
        for lang in LANGS
    }
    facts = {lang: iter([d for d in docs_seeds if d["lang"] == lang]) for lang in LANGS}
    out = []
    for i in range(t.n_prompts):
        kind, lang = t.seeds[i % len(t.seeds)], LANGS[(i // len(t.seeds)) % 2]
        fact = next(facts[lang], None) if kind == "docs" else None
        if fact is None:
            pool = questions[lang] or questions["en"] or questions["ko"]
            if not pool:
                raise StageError("synthetic.teacher.seeds: no train questions and no docs facts to seed from")
            examples = "\n".join(f"- {q}" for q in rng.sample(pool, min(3, len(pool))))
            prompt, question, context = SELF_INSTRUCT.format(examples=examples, language=LANG_NAME[lang]), None, None
        else:
            question, context = fact["question"], fact["context"]
            prompt = GROUNDED.format(context=context, language=LANG_NAME[lang], question=question)
        out.append({"messages": [{"role": "user", "content": prompt}], "request_seed": seed * 100_003 + i,
                    "question": question, "context": context, "lang": lang})  # fmt: skip
    return out


def cache_key(model: str, messages: list[dict], temperature: float, max_tokens: int, request_seed: int) -> str:
    blob = json.dumps([model, messages, temperature, max_tokens, request_seed], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def ask(t: config.TeacherGenerator, prompts: list[dict], cache: dict[str, dict], logger) -> TeacherStats:
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


def answers(prompt_list: list[dict], cache: dict[str, dict], t: config.TeacherGenerator):
    """(lang, question, answer, kind, context) per prompt from the cached replies; unparseable ones come back empty."""
    for p in prompt_list:
        reply = cache[cache_key(t.model, p["messages"], t.temperature, t.max_tokens, p["request_seed"])]["response"]
        if p["question"] is not None:
            yield p["lang"], p["question"], ECHO.sub("", reply).strip(), "teacher:docs", p["context"]
        elif m := QA.search(reply):
            yield p["lang"], m.group(1).strip(), m.group(2).strip(), "teacher:train", None
        else:
            yield p["lang"], "", "", "teacher:unparseable", None

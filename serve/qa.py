"""`python -m serve qa`: the held-out QA set asked of a live endpoint, scored as evaluate scores it.

evaluate answers greedily through vLLM's offline engine, cut at `evaluate.max_new_tokens`; this asks what a user of
the running server gets: its sampling defaults (the package's generation_config.json, i.e. params `merge.generation`;
the request leaves temperature and max_tokens out unless told), `samples` replies per question (one request with `n`
and a seed: reruns draw alike, though the server's batching may move a token). A reply scores the share of the
question's keywords it names (llmops.metrics.keyword_score); a question scores the mean over its replies; the set and
each language the mean over questions. Through the `openai` client, imported inside the functions (see smoke.py).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from serve.smoke import SmokeError, api_base

NOT_OPENAI = (AttributeError, KeyError, TypeError, ValueError)  # what parsing a reply that is no chat completion raises


def _ask(client, model: str, row: dict, samples: int, max_tokens: int | None, temperature: float | None, seed: int):
    extra = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": row["question"]}], n=samples, seed=seed, **extra
    )
    if len(r.choices) != samples:
        raise SmokeError(
            f"{str(client.base_url).rstrip('/')}: question {row['id']}: {len(r.choices)} replies for n={samples}"
        )
    return [(c.message.content or "", c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)], (
        r.usage.completion_tokens if r.usage else None
    )


def run(
    endpoint: str,
    rows: list[dict],
    *,
    api_key: str | None,
    model: str | None,
    prefer: str | None = None,
    samples: int = 3,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int = 0,
    concurrency: int = 8,
    timeout_s: float = 300.0,
) -> tuple[dict, list[dict]]:
    """Ask every QA row (llmops.metrics.qa_rows) `samples` times; return the summary and one record per question
    (replies, finish reasons, scores). Question i is sent with seed `seed + i`."""
    import openai
    from tqdm import tqdm

    from llmops import metrics  # ~2 s (rouge_score → nltk): only the qa command pays it

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
    base = api_base(endpoint)
    client = openai.OpenAI(base_url=base, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=1)
    try:
        served = [m.id for m in client.models.list().data]
        if not served:
            raise SmokeError(f"{base}: the endpoint serves no model")
        if model is None:  # with an adapter the base is listed first: prefer the package's own name
            model = prefer if prefer in served else served[0]
        elif model not in served:
            raise SmokeError(f"{base}: model {model!r} is not served (served: {served})")
        with ThreadPoolExecutor(concurrency) as pool:
            jobs = pool.map(lambda i: _ask(client, model, rows[i], samples, max_tokens, temperature, seed + i),
                            range(len(rows)))  # fmt: skip
            answers = list(tqdm(jobs, total=len(rows), desc=f"qa {model}", unit="question", disable=None))
    except openai.AuthenticationError:
        raise SmokeError(f"{base}: 401 with the configured key (check API_KEY)") from None
    except openai.APIConnectionError as e:
        raise SmokeError(f"{base}: {e} (is the server up? `make serve`, or pass --endpoint)") from None
    except openai.APIError as e:
        raise SmokeError(f"{base}: {type(e).__name__}: {e}") from None
    except NOT_OPENAI as e:
        raise SmokeError(f"{base}: the reply is not an OpenAI chat completion ({type(e).__name__}: {e})") from None
    records = []
    for row, (replies, tokens) in zip(rows, answers, strict=True):
        scores = [metrics.keyword_score(text, row["keywords"]) for text, _ in replies]
        records.append({"id": row["id"], "lang": row["lang"], "question": row["question"], "keywords": row["keywords"],
                        "replies": [t for t, _ in replies], "finish_reasons": [f for _, f in replies],
                        "scores": scores, "score": sum(scores) / len(scores), "completion_tokens": tokens})  # fmt: skip

    def mean_score(recs: list[dict]) -> dict:
        return {"score": sum(r["score"] for r in recs) / len(recs), "questions": len(recs)}

    replies = [f for r in records for f in r["finish_reasons"]]
    tokens = [r["completion_tokens"] for r in records if r["completion_tokens"] is not None]
    summary = {
        "endpoint": base,
        "model": model,
        "samples": samples,
        "sampling": {
            "temperature": "served default" if temperature is None else temperature,
            "max_tokens": "served default" if max_tokens is None else max_tokens,
            "seed": seed,
        },  # fmt: skip
        **mean_score(records),
        **{lang: mean_score(recs) for lang in metrics.LANGS if (recs := [r for r in records if r["lang"] == lang])},
        "replies_stopped": sum(f == "stop" for f in replies) / len(replies),
        "completion_tokens_per_reply": sum(tokens) / (len(tokens) * samples) if tokens else None,
    }
    return summary, records

"""Post-deploy smoke check of a live OpenAI-compatible endpoint, through the `openai` client.

One chat request must come back non-empty, finished by the end-of-turn token (`finish_reason == "stop"`), with
no raw chat-template markers in the text (a leak means the served template or stop ids differ from training).
With an API key configured, a wrong key must be refused (401), proving auth is really on.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

# Markers of the common chat templates (ChatML, Llama 3, Mistral, Gemma, Phi): never part of a reply's text.
TEMPLATE_MARKERS = tuple(
    "<|im_start|> <|im_end|> <|eot_id|> <|start_header_id|> <|end_header_id|> <|begin_of_text|> <|end_of_text|> "
    "<|endoftext|> [INST] [/INST] <start_of_turn> <end_of_turn> <|user|> <|assistant|> <|system|> <|end|>".split()
)


class SmokeError(RuntimeError):
    pass


def api_base(endpoint: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` → the `/v1` base the openai client wants."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1") else endpoint + "/v1"


def _why(e: BaseException, request_timeout_s: float) -> str:
    """What a failed /health poll says: connection refused, an HTTP status, a timeout, ..."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since 3.10
        return f"no answer within {request_timeout_s:g} s"
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


def wait_healthy(
    endpoint: str,
    timeout_s: float,
    alive=lambda: True,
    report=None,
    every_s: float = 10.0,
    request_timeout_s: float = 5.0,
) -> float:
    """Poll `/health` (never behind auth) until 200; return seconds waited. `alive()` false = server died.
    `report(url, reason, waited_s)` hears why it is still waiting: at the first failure, when the reason changes
    (refused → HTTP 503 while loading) and every `every_s` seconds."""
    url = api_base(endpoint)[: -len("/v1")] + "/health"
    start = time.monotonic()
    last, last_at = None, 0.0
    while (waited := time.monotonic() - start) < timeout_s:
        if not alive():
            raise SmokeError(f"{url}: the server exited before becoming healthy")
        try:
            with urllib.request.urlopen(url, timeout=request_timeout_s) as r:
                if r.status == 200:
                    return time.monotonic() - start
                why = f"HTTP {r.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            why = _why(e, request_timeout_s)
        if report and (why != last or waited - last_at >= every_s):
            report(url, why, waited)
            last, last_at = why, waited
        time.sleep(min(2.0, max(0.0, timeout_s - (time.monotonic() - start))))
    raise SmokeError(f"{url}: not healthy after {timeout_s:.0f} s")


def template_markers(package: Path | None) -> tuple[str, ...]:
    """The fixed markers plus the package's special tokens that its own chat template writes."""
    if package is None or not (package / "tokenizer.json").is_file() or not (package / "chat_template.jinja").is_file():
        return TEMPLATE_MARKERS
    template = (package / "chat_template.jinja").read_text(encoding="utf-8")
    added = json.loads((package / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    own = {t["content"] for t in added if t.get("special") and t["content"] in template}
    return tuple(dict.fromkeys((*TEMPLATE_MARKERS, *sorted(own))))


def check_reply(text: str | None, finish_reason: str, markers: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if not text or not text.strip():
        raise SmokeError(f"empty reply (finish_reason {finish_reason!r})")
    if leaked := [m for m in markers if m in text]:
        raise SmokeError(f"raw chat-template tokens {leaked} in the reply: template or stop ids differ from training")
    if finish_reason not in allowed:
        raise SmokeError(f"finish_reason {finish_reason!r}, expected {' or '.join(allowed)} (did it hit max_tokens?)")


def check_auth_refused(base_url: str) -> None:
    """A wrong key must get 401; anything else means the endpoint is open."""
    import openai  # here, not at the top: `python -m serve` (launch) must not pay its ~1 s import

    try:
        openai.OpenAI(base_url=base_url, api_key="wrong-key-smoke-check", max_retries=0).models.list()
    except openai.AuthenticationError:
        return
    raise SmokeError(f"{base_url}: a wrong API key was accepted; auth is off (ENABLE_AUTH / VLLM_API_KEY)")


def run(
    endpoint: str,
    *,
    api_key: str | None,
    model: str | None,
    prompt: str,
    prefer: str | None = None,
    max_tokens: int,
    markers: tuple[str, ...] = TEMPLATE_MARKERS,
    allowed: tuple[str, ...] = ("stop",),
    temperature: float = 0.0,
    timeout_s: float = 120.0,
) -> dict:
    """Send one chat request and check it; return a summary dict or raise SmokeError."""
    import openai

    base = api_base(endpoint)
    client = openai.OpenAI(base_url=base, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=1)
    try:
        served = [m.id for m in client.models.list().data]
        if model is None:  # with an adapter the base is listed first: prefer the package's own name
            model = prefer if prefer in served else served[0]
        elif model not in served:
            raise SmokeError(f"{base}: model {model!r} is not served (served: {served})")
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=temperature,
            seed=0,
        )
    except openai.AuthenticationError:
        raise SmokeError(f"{base}: 401 with the configured key (check API_KEY)") from None
    except openai.APIError as e:
        raise SmokeError(f"{base}: {type(e).__name__}: {e}") from None
    choice = r.choices[0]
    check_reply(choice.message.content, choice.finish_reason, markers, allowed)
    if api_key:
        check_auth_refused(base)
    return {
        "endpoint": base,
        "model": model,
        "finish_reason": choice.finish_reason,
        "completion_tokens": r.usage.completion_tokens if r.usage else None,
        "reply": choice.message.content[:200],
        "auth_checked": bool(api_key),
    }

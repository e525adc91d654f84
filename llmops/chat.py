"""Chat-template encoding shared by preprocess, train, evaluate and serving checks.

One function turns a conversation into `input_ids` + `labels` with the model's own chat template,
so what is trained is byte-for-byte what vLLM renders at serving time. It guards the known traps:
- doubled BOS: the template already emits BOS/<|im_start|>, so text is tokenized without special tokens;
- EOS masked because pad == eos: labels are built here, never derived from padding;
- the end-of-turn token (e.g. <|im_end|>, <|eot_id|>) is a label of every assistant turn, so the
  tuned model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation that cannot be encoded; the message says why (used as a rejection reason)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def validate_messages(messages: object) -> list[dict]:
    """Check roles, alternation and content; return the messages or raise ChatFormatError(reason)."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("no_messages", "expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError("bad_message", f"message {i} lacks role/content")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatFormatError("bad_role", f"message {i} has role {role!r}")
        if role == "system" and i != 0:
            raise ChatFormatError("bad_role", f"system message at position {i} (only first allowed)")
        if not isinstance(content, str) or not content.strip():
            raise ChatFormatError("empty_content", f"message {i} ({role}) is empty")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise ChatFormatError("no_assistant_turn", "only a system message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ChatFormatError("bad_alternation", f"turn {i} is {m['role']!r}, expected {want!r}")
    if turns[-1]["role"] != "assistant":
        raise ChatFormatError("no_assistant_turn", "conversation does not end with an assistant reply")
    return out


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, </s>, ...).

    Found by rendering a probe reply and taking the first special token after it, so it works for
    any template instead of hard-coding one family.
    """
    probe = "PROBE_REPLY_42"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    tail = tokenizer(text[text.index(probe) + len(probe) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for tid in tail:
        if tid in special:
            return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("chat template closes assistant turns with no special token and the tokenizer has no EOS")
    return tokenizer.eos_token_id


def _ids(tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: the template already wrote BOS/turn markers; adding them again is the
    # classic doubled-BOS bug.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, messages: list[dict], eot_id: int, max_len: int | None = None) -> Encoded:
    """Tokenize a validated conversation; labels cover assistant replies and their end-of-turn token."""
    full = _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    if max_len is not None and len(full) > max_len:
        raise ChatFormatError("too_long", f"{len(full)} tokens > max_seq_len {max_len}")
    labels = [IGNORE_INDEX] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _ids(
            tokenizer, tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        )
        upto = _ids(tokenizer, tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        if full[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            raise ChatFormatError("template_not_prefix_stable", "chat template renders turns differently in context")
        reply = upto[len(prompt) :]
        if eot_id not in reply:
            raise ChatFormatError("no_end_of_turn", f"assistant turn {i} has no end-of-turn token {eot_id}")
        end = len(prompt) + reply.index(eot_id) + 1  # train up to and including end-of-turn, not the "\n" after it
        labels[len(prompt) : end] = full[len(prompt) : end]
    bos = tokenizer.bos_token_id
    if bos is not None and len(full) > 1 and full[0] == bos and full[1] == bos:
        raise ChatFormatError("doubled_bos", "sequence starts with two BOS tokens")
    return Encoded(full, labels)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the generation prompt (what serving sends to the model)."""
    return _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

"""Small text helpers shared by preprocess, synthetic and evaluate."""

from __future__ import annotations

import hashlib
import json
import re

HANGUL = re.compile(r"[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
LETTER = re.compile(r"[A-Za-z\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
# Code spans: a fenced block (group 1, after its optional language line) or inline code on one line (group 2).
CODE = re.compile(r"```(?:[^\n`]*\n)?(.*?)```|`([^`\n]+)`", re.S)


def detect_lang(text: str, ko_share: float = 0.2) -> str:
    """'ko' when Hangul makes up at least `ko_share` of the letters, else 'en'.

    Korean MLOps text is full of English terms (DVC, LoRA, `kubectl`), so a plain majority vote
    would call much of it English; 20% Hangul letters is already unmistakably Korean prose.
    """
    letters = LETTER.findall(CODE.sub(" ", text))  # commands and flags are English in any language
    if not letters:
        return "en"
    return "ko" if sum(1 for c in letters if HANGUL.match(c)) / len(letters) >= ko_share else "en"


def conversation_lang(messages: list[dict]) -> str:
    return detect_lang(" ".join(m["content"] for m in messages if m["role"] != "system"))


def row_id(messages: list[dict]) -> str:
    """Content hash of a conversation: the key for exact dedup and for the hash-based split."""
    canon = json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]

"""Text metrics for Korean and English answers: chrF, ROUGE-L, key-term recall, perplexity.

The scores come from the reference libraries (sacrebleu's chrF, rouge_score's LCS) called directly:
`evaluate.load(...)` fetches Hub modules and fails offline. Two traps are handled here:
- rouge_score's default tokenizer keeps only [a-z0-9] and turns Hangul into nothing (every Korean pair
  scores 0), so ROUGE-L gets `Tokenizer`: ASCII words plus one token per Hangul syllable (Korean glues
  particles to words, so character-level LCS is the usual choice for it);
- chrF works on characters already, so it needs nothing for Korean.
Key-term recall asks "did the answer mention the commands, flags, products and identifiers the reference
uses?", the facts a DevOps answer is judged by; Korean answers use the same English terms, so one
extractor serves both languages.
"""

from __future__ import annotations

import keyword
import math
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from llmops.stage import StageError
from llmops.text import CODE

LANGS = ("en", "ko")  # the languages every score is also reported for

# Lower-case CLI/product names that carry a fact even without backticks or capitals.
TOOLS = frozenset(
    "dvc git pip conda docker kubectl helm mlflow vllm python pytest torchrun accelerate deepspeed nvidia-smi "
    "huggingface-cli hf curl make ruff uv ollama llama.cpp tensorboard wandb bitsandbytes peft trl transformers "
    "safetensors".split()
)
_FLAG = re.compile(r"(?<![A-Za-z0-9_-])--?[A-Za-z][A-Za-z0-9_-]*(?:=[A-Za-z0-9_.:/-]+)?")
_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/+#-]*[A-Za-z0-9_+#]|[A-Za-z0-9]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:[eE]-?\d+)?")
_ROUGE_TOKEN = re.compile(r"[a-z0-9]+|[\uac00-\ud7a3]")
_STRIP = ".,;:!?()[]{}<>\"'`"
_NOT_TERMS = frozenset({"e.g", "i.e", "etc", "vs"})


def normalize(text: str) -> str:
    """NFKC + lower case: full-width letters and compatibility jamo compare equal to their plain forms."""
    return unicodedata.normalize("NFKC", text).lower()


class Tokenizer:
    """rouge_score tokenizer for ko/en: lower-cased ASCII words/numbers and single Hangul syllables."""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall(normalize(text))


def _is_term(word: str) -> bool:
    if word.lower() in TOOLS:
        return True
    if any(c in word for c in "._/:") and re.search(r"[A-Za-z]", word):  # peft.LoraConfig, params.yaml, models/base
        return True
    if sum(c.isupper() for c in word) >= 2:  # DVC, MLflow, LoRA, vLLM, PyTorch
        return True
    if re.search(r"[A-Za-z]", word) and re.search(r"\d", word):  # bf16, nf4, H100, fp8
        return True
    return bool(_NUMBER.fullmatch(word)) and sum(c.isdigit() for c in word) >= 2  # 4096, 0.9 (not "1", "2")


def key_terms(text: str) -> set[str]:
    """The technical terms of a reference answer, normalised (see module docstring).

    Everything inside `code` spans and fenced blocks counts (split on whitespace), plus flags
    (`--max-model-len`, `-S`), dotted/pathy identifiers, snake_case, acronyms and CamelCase product
    names, letter+digit names (bf16, H100), multi-digit numbers, and known lower-case tool names.
    """
    terms: set[str] = set()
    for m in CODE.finditer(text):
        for tok in (m.group(1) or m.group(2)).split():
            tok = tok.split("(")[0].strip(_STRIP) if not tok.startswith("(") else tok.strip(_STRIP)  # f(x) -> f
            if len(tok) >= 2 and re.search(r"[A-Za-z0-9]", tok) and not keyword.iskeyword(tok):  # not `for`/`in`
                terms.add(normalize(tok))
    prose = CODE.sub(" ", text)
    terms.update(normalize(m.group(0)) for m in _FLAG.finditer(prose))
    for m in _WORD.finditer(prose):
        word = m.group(0).strip(_STRIP)
        if word and word.lower() not in _NOT_TERMS and (_is_term(word) or "_" in word):
            terms.add(normalize(word))
    return terms


def _mentions(text: str, term: str) -> bool:
    # ASCII-only boundaries: a Korean particle glued to a term ("LoRA가", "`dvc push`로") still counts.
    return re.search(rf"(?<![a-z0-9_-]){re.escape(term)}(?![a-z0-9_])", text) is not None


def term_recall(answer: str, reference: str) -> float | None:
    """Share of the reference's key terms found in the answer; None when the reference has none."""
    terms = key_terms(reference)
    if not terms:
        return None
    ans = normalize(answer)
    return sum(_mentions(ans, t) for t in terms) / len(terms)


def qa_rows(rows: list[dict], path: str) -> list[dict]:
    """Held-out QA rows {id, lang, question, keywords} (id defaults to qa-N). The first bad row fails naming what is
    wrong with it: a missing/empty field, a language other than en/ko, a duplicate id, or a keyword its question
    already contains (echoing the question would score)."""
    if not rows:
        raise StageError(f"{path} has no questions: one JSON object a line, {{id, lang, question, keywords}}")
    out, seen = [], set()
    for n, r in enumerate(rows, 1):
        kw, q = r.get("keywords"), r.get("question")
        problems = []
        if not isinstance(q, str) or not q.strip():
            problems.append("question must be a non-empty string")
        if r.get("lang") not in LANGS:
            problems.append(f"lang must be en or ko, not {r.get('lang')!r}")
        if not isinstance(kw, list) or not kw or not all(isinstance(k, str) and k.strip() for k in kw):
            problems.append("keywords must be a non-empty list of non-empty strings")
        if problems:
            raise StageError(f"{path}: row {n}: {'; '.join(problems)}")
        if echoed := [k for k in kw if normalize(k) in normalize(q)]:
            raise StageError(f"{path}: row {n}: keyword(s) {echoed} appear in the question; echoing it would score")
        if (rid := r.get("id", f"qa-{n}")) in seen:
            raise StageError(f"{path}: row {n}: id {rid!r} is used by an earlier row; ids must be unique")
        seen.add(rid)
        out.append({"id": rid, "lang": r["lang"], "question": q, "keywords": kw})
    return out


def keyword_score(answer: str, keywords: Sequence[str]) -> float:
    """Share of the required keywords the answer names (NFKC, case-insensitive, as substrings: `dvc push -r`
    names `dvc push`)."""
    ans = normalize(answer)
    return sum(normalize(k) in ans for k in keywords) / len(keywords)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0–100."""
    if not hypotheses:
        return float("nan")
    return CHRF().corpus_score(list(hypotheses), [list(references)]).score


def chrf_stats(hypotheses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """sacrebleu's chrF match counts, one row per answer (integers): summed over any subset of rows they give that
    subset's corpus chrF, so a bootstrap re-scores resamples without re-reading the texts (sacrebleu's own
    significance tests do the same)."""
    stats = CHRF()._extract_corpus_statistics(list(hypotheses), [list(references)])
    return np.asarray(stats, dtype=np.int64).reshape(len(hypotheses), -1)


def chrf_from_stats(summed: Sequence[int]) -> float:
    """Corpus chrF (0–100) from summed chrf_stats rows."""
    return CHRF()._compute_score_from_stats([int(x) for x in summed]).score


def rouge_l_scores(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Sentence ROUGE-L F1 (0–1) per answer with the Hangul-aware tokenizer."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Tokenizer())
    return [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references, strict=True)]


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence ROUGE-L F1 (0–1) with the Hangul-aware tokenizer."""
    if not hypotheses:
        return float("nan")
    return sum(rouge_l_scores(hypotheses, references)) / len(hypotheses)


def mean_recall(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-answer key-term recall (0–1) over references that have key terms."""
    scores = [s for h, r in zip(hypotheses, references, strict=True) if (s := term_recall(h, r)) is not None]
    return sum(scores) / len(scores) if scores else float("nan")


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {
        "chrf": chrf(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "keyword_recall": mean_recall(hypotheses, references),
    }


def perplexity(nll_sums: Iterable[float], n_tokens: Iterable[int]) -> dict[str, float]:
    """Token-weighted mean loss (nats/token) over all scored tokens and its exp."""
    total, n = sum(nll_sums), sum(n_tokens)
    loss = total / n if n else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if n else float("nan")}

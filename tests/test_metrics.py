"""llmops.metrics: golden values on hand-made Korean and English pairs (derivations in the comments)."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer

from llmops import metrics

KO_REF, KO_HYP = "모델을 저장합니다", "모델을 병합합니다"


def test_chrf_golden_values():
    # chrF ignores spaces; per n-gram order n=1..6: P_n = R_n (same lengths), score = mean_n P_n (beta irrelevant).
    # "abd" vs "abc": 1-grams 2/3, 2-grams 1/2, 3-grams 0/1, no 4..6-grams in either -> (2/3 + 1/2 + 0) / 3.
    assert metrics.chrf(["abd"], ["abc"]) == pytest.approx(100 * (2 / 3 + 1 / 2) / 3)
    # Korean, 8 syllables each: 1-grams 6/8 (모 델 을 합 니 다), 2-grams 4/7 (모델 델을 합니 니다),
    # 3-grams 2/6 (모델을 합니다), 4..6-grams 0 -> (6/8 + 4/7 + 2/6 + 0 + 0 + 0) / 6.
    assert metrics.chrf([KO_HYP], [KO_REF]) == pytest.approx(100 * (6 / 8 + 4 / 7 + 2 / 6) / 6)
    assert metrics.chrf([KO_REF, "same"], [KO_REF, "same"]) == pytest.approx(100.0)
    assert math.isnan(metrics.chrf([], []))


def test_rouge_l_keeps_hangul():
    # The trap: rouge_score's default tokenizer drops Hangul, so a perfect Korean answer scores 0.
    assert rouge_scorer.RougeScorer(["rougeL"]).score(KO_REF, KO_REF)["rougeL"].fmeasure == 0.0
    assert metrics.Tokenizer().tokenize("LoRA가 뭐예요? `r=16`") == ["lora", "가", "뭐", "예", "요", "r", "16"]
    # Syllables: LCS(모델을저장합니다, 모델을병합합니다) = 모델을+합니다 = 6 of 8 each -> F1 0.75.
    assert metrics.rouge_l([KO_HYP], [KO_REF]) == pytest.approx(0.75)
    # Words: LCS = "dvc push to upload" (4); P = 4/5, R = 4/6 -> F1 = 8/11.
    assert metrics.rouge_l(["use dvc push to upload"], ["Run dvc push to upload outputs."]) == pytest.approx(8 / 11)
    assert metrics.rouge_l([KO_REF, "x"], [KO_REF, "y"]) == pytest.approx(0.5)  # mean over rows


def test_chrf_stats_of_any_rows_sum_to_those_rows_corpus_chrf():
    # What delta_ci's bootstrap relies on: summed per-row counts re-score a resample (rows repeat) exactly.
    hyps, refs = ["abd", KO_HYP, "use dvc push"], ["abc", KO_REF, "run dvc push to upload"]
    stats = metrics.chrf_stats(hyps, refs)
    assert stats.shape[0] == 3 and stats.dtype.kind == "i"
    for rows in ([0], [1, 2], [0, 1, 2], [2, 2, 0]):
        want = metrics.chrf([hyps[i] for i in rows], [refs[i] for i in rows])
        assert metrics.chrf_from_stats(stats[rows].sum(0)) == pytest.approx(want, abs=1e-12)
    assert metrics.rouge_l_scores([KO_HYP, "x"], [KO_REF, "y"]) == pytest.approx([0.75, 0.0])


def test_key_terms_pick_commands_flags_products_identifiers():
    ref = (
        "Run `dvc exp run -S train.lr=3e-4`, then compare with --md in MLflow or vLLM. "
        "It uses peft.LoraConfig and train_test_split with bf16 at 4096 tokens; e.g. 1 GPU."
    )
    assert metrics.key_terms(ref) == {
        "dvc",
        "exp",
        "run",
        "-s",
        "train.lr=3e-4",  # everything in a code span
        "--md",
        "mlflow",
        "vllm",
        "peft.loraconfig",
        "train_test_split",
        "bf16",
        "4096",
        "gpu",
    }  # not: Run/It/then (prose), "e.g", "1"
    assert metrics.key_terms("시드를 3~5개로 반복하세요.") == set()


def test_term_recall_korean_particles_and_word_boundaries():
    ref = "Use `dvc push` with --jobs 8 and log to MLflow."  # terms: dvc, push, --jobs, mlflow
    # Korean glues particles to terms (MLflow에, --jobs를): still found; dvc/push are missing -> 2/4.
    assert metrics.term_recall("MLflow에 기록하고 --jobs를 주세요", ref) == pytest.approx(0.5)
    assert metrics.term_recall("dvc push --jobs 8, then MLflow", ref) == pytest.approx(1.0)
    assert metrics.term_recall("use half precision", "`hf` download") == pytest.approx(0.0)  # "hf" is not in "half"
    assert metrics.term_recall("anything", "시드를 바꿔 보세요") is None
    # The mean skips references without terms instead of counting them as 0 or 1.
    assert metrics.mean_recall(["dvc", "x"], ["`dvc`", "no terms here"]) == pytest.approx(1.0)


def test_perplexity_is_token_weighted():
    got = metrics.perplexity([2.0, 4.0], [1, 3])  # 6 nats over 4 tokens
    assert got == {"loss": pytest.approx(1.5), "perplexity": pytest.approx(math.exp(1.5))}
    assert math.isnan(metrics.perplexity([], [])["loss"])

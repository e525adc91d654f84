"""evaluate: exact output shape, zero adapter → zero deltas, held-out QA scoring, served stop tokens, vLLM fallback."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from llmops import chat, config, hardware, io, metrics, modeling, scoring
from llmops.stage import StageError
from stages import evaluate, evaluate_base, merge
from tests.conftest import make_adapter, write_params, write_processed

SCOPE_KEYS = {"loss", "perplexity", "chrf", "rouge_l", "keyword_recall", "n", "qa"}
QA = [
    {"id": "en-1", "lang": "en", "question": "How do I upload tracked data?", "keywords": ["dvc push"]},
    {"id": "ko-1", "lang": "ko", "question": "실험을 비교하려면?", "keywords": ["dvc exp show", "--only-changed"]},
]
PUSH = "Run `dvc push`: it uploads the cached files to the default remote."
ASK = {"role": "user", "content": "How do I upload my tracked data files?"}
SYNTHETIC = [{"id": "s-1", "lang": "en", "source": "synthetic:docs", "n_tokens": 0,
              "messages": [ASK, {"role": "assistant", "content": PUSH}]}]  # fmt: skip


def _pipeline(tmp_path, tiny_model_dir, method: str, b_std: float, **overrides):
    """processed rows + a made adapter + the merge stage, then a params file for evaluate."""
    params = write_params(
        tmp_path,
        {
            "merge.parity_samples": 2,
            "evaluate.max_samples": 4,
            "evaluate.max_new_tokens": 8,
            "evaluate.batch_size": 3,
            "evaluate.engine": "hf",
            **overrides,
        },
        base_dir=tiny_model_dir,
    )
    p = config.load(params, "evaluate")
    write_processed(tmp_path / "data" / "processed", n_per_split=4)
    io.write_jsonl(p.paths.synthetic_train, SYNTHETIC)
    io.write_jsonl(p.paths.qa_set, QA)
    make_adapter(tiny_model_dir, tmp_path / "models" / "adapter", method=method, b_std=b_std)
    merge.main(str(params))
    return params, p


def test_outputs_have_exact_keys_and_auto_falls_back_to_hf(tmp_path, tiny_model_dir, monkeypatch):
    params, p = _pipeline(tmp_path, tiny_model_dir, "qlora", 0.05, **{"evaluate.engine": "auto"})

    def broken_vllm(*args, **kwargs):
        raise RuntimeError("no CPU kernels for this model")

    monkeypatch.setattr(scoring, "vllm_usable", lambda: True)
    monkeypatch.setattr(scoring, "generate_vllm", broken_vllm)
    res = evaluate.main(str(params))
    assert set(res) == {"base", "tuned", "delta", "delta_ci95", "nearest_train", "compute"}
    for model in ("base", "tuned"):
        assert set(res[model]) == SCOPE_KEYS | {"en", "ko"}  # overall figures, then per language
        assert set(res[model]["en"]) == set(res[model]["ko"]) == SCOPE_KEYS
        assert res[model]["n"] == 4 and res[model]["en"]["n"] == res[model]["ko"]["n"] == 2
        assert res[model]["qa"]["n"] == 2 and res[model]["en"]["qa"]["n"] == res[model]["ko"]["qa"]["n"] == 1
    assert set(res["delta"]) == SCOPE_KEYS - {"n"} | {"en", "ko"}
    assert set(res["delta"]["en"]) == set(res["delta"]["ko"]) == SCOPE_KEYS - {"n"}
    answer_keys = {"chrf", "rouge_l", "keyword_recall", "qa"}  # intervals for what answers score, not for losses
    assert set(res["delta_ci95"]) == answer_keys | {"en", "ko"} and set(res["delta_ci95"]["ko"]) == answer_keys
    lookup = SCOPE_KEYS - {"loss", "perplexity"}  # answers looked up, not generated: no losses
    assert set(res["nearest_train"]) == lookup | {"en", "ko"} and set(res["nearest_train"]["ko"]) == lookup
    dtype = modeling.resolve_dtype("auto")  # what a reviewer needs to compare two machines' figures
    assert res["compute"] == {"machine": hardware.machine(), "loss_dtype": dtype, "generate_dtype": dtype,
                              "engine": "hf"}  # fmt: skip  # vLLM failed to start, auto fell back
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text()) == res

    samples = io.read_jsonl(tmp_path / "metrics" / "samples.jsonl")
    assert [s["set"] for s in samples] == ["test"] * 4 + ["qa"] * 2
    assert [s["id"] for s in samples[:4]] == sorted(s["id"] for s in samples[:4])
    assert set(samples[0]) == {"set", "id", "lang", "prompt", "reference", "base", "tuned", "nearest_train",
                               "score_base", "score_tuned"}  # fmt: skip
    assert samples[5]["reference"] == "dvc exp show | --only-changed"
    for s in samples[4:]:  # each QA row's score is the share of its keywords its answer names
        kw = s["reference"].split(" | ")
        assert s["score_tuned"] == sum(k in s["tuned"].lower() for k in kw) / len(kw)
    qa_mean = sum(s["score_tuned"] for s in samples[4:]) / 2
    assert res["tuned"]["qa"]["score"] == pytest.approx(qa_mean)
    with open(tmp_path / "metrics" / "eval_plot.csv", encoding="utf-8") as f:
        plot = list(csv.DictReader(f))
    assert set(plot[0]) == {"metric", "model", "value"}
    assert len(plot) == 4 * 3 * 3  # (chrF, ROUGE-L, recall, QA) x (all, en, ko) x (base, tuned, nearest_train)
    assert [r["model"] for r in plot[:3]] == ["base", "tuned", "nearest_train"]


def test_nearest_train_answers_each_question_with_the_closest_training_question_s_answer():
    rows = [*SYNTHETIC, {"id": "t", "lang": "en", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I compare experiments?"},
        {"role": "assistant", "content": "Use `dvc exp show`."}, {"role": "user", "content": "Only changed ones?"},
        {"role": "assistant", "content": "Add `--only-changed`."}]}]  # fmt: skip
    got = evaluate.nearest_train(rows, ["How can I upload tracked data files?", "How to compare experiments?",
                                        "show only changed ones", "완전히 다른 질문", "qqqqqqq"])  # fmt: skip
    assert got == [PUSH, "Use `dvc exp show`.", "Add `--only-changed`.", "", ""]  # no shared 5-gram: no answer
    assert evaluate.nearest_train([], ["How do I upload?"]) == [""]


def test_nearest_train_scores_the_lookup_of_what_training_saw(tmp_path, tiny_model_dir):
    """The QA question nearly repeats a synthetic training question: looked up, its answer names the keyword. With
    `train.synthetic_repeats: 0` training never saw that row, and the lookup does not use it either."""
    params, p = _pipeline(tmp_path, tiny_model_dir, "lora", 0.0)
    res = evaluate.main(str(params))
    assert res["nearest_train"]["en"]["qa"] == {"score": 1.0, "n": 1}
    samples = io.read_jsonl(p.paths.eval_samples)
    trained = {r["messages"][-1]["content"] for r in io.read_jsonl(tmp_path / "data/processed/train.jsonl")}
    assert all(s["nearest_train"] in trained | {PUSH, ""} for s in samples if s["set"] == "test")  # looked up, verbatim
    assert [s["nearest_train"] for s in samples if s["id"] == "en-1"] == [PUSH]
    params = write_params(tmp_path, {"merge.parity_samples": 2, "evaluate.max_samples": 4, "evaluate.max_new_tokens": 8,
                                     "evaluate.engine": "hf", "train.synthetic_repeats": 0}, base_dir=tiny_model_dir)  # fmt: skip
    assert evaluate.main(str(params))["nearest_train"]["en"]["qa"]["score"] == 0.0
    assert PUSH not in {s["nearest_train"] for s in io.read_jsonl(p.paths.eval_samples)}


def test_a_fine_tune_reuses_the_base_rows_only_when_scored_alike(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """evaluate_base scores the base once; evaluate then scores only the tuned model and its figures are exactly
    those of scoring both here. evaluate_base answers to `base_max_new_tokens` (12) and evaluate cuts them to its
    `max_new_tokens` (8, then 5): an evaluate-only change scores the tuned model alone (what the cut gives: the next
    two tests; the tiny random model only repeats a newline). A budget above 12, rows without ids or other
    settings score the base again, and the log says why."""
    over = {"merge.parity_samples": 2, "evaluate.max_samples": 4, "evaluate.batch_size": 3, "evaluate.engine": "hf",
            "evaluate.base_max_new_tokens": 12}  # fmt: skip
    params, p = _pipeline(tmp_path, tiny_model_dir, "qlora", 0.05, **over)
    alone = evaluate.main(str(params))  # no evaluate_base output yet: the base is scored in-process, to 8 tokens
    stored = evaluate_base.main(str(params))
    assert io.read_json(p.paths.eval_base) == stored and stored["engine"] == "hf"
    assert {len(ids.split()) for ids in stored["answer_ids"] + stored["qa_answer_ids"]} == {12}
    scored, score_model = [], scoring.score_model
    monkeypatch.setattr(scoring, "score_model", lambda d, *a: scored.append(d.name) or score_model(d, *a))
    assert evaluate.main(str(params)) == alone and scored == ["merged"]

    def rerun(**changed) -> dict:
        scored.clear()
        caplog.clear()
        return evaluate.main(str(write_params(tmp_path, {**over, **changed}, base_dir=tiny_model_dir)))

    shorter = rerun(**{"evaluate.max_new_tokens": 5})  # an evaluate-only change: the base rows are reused, cut
    assert scored == ["merged"] and "base_rescored" not in caplog.text
    io.write_json(p.paths.eval_base, ["not", "evaluate_base's", "rows"])  # a stale or foreign file: scored again
    assert rerun(**{"evaluate.max_new_tokens": 5}) == shorter and scored == ["merged", tiny_model_dir.name]
    io.write_json(p.paths.eval_base, {k: v for k, v in stored.items() if k != "qa_answer_ids"})  # an older format
    assert rerun(**{"evaluate.max_new_tokens": 5}) == shorter and scored == ["merged", tiny_model_dir.name]
    assert "it has no answer ids" in caplog.text
    io.write_json(p.paths.eval_base, stored)
    rerun(**{"evaluate.max_new_tokens": 16})  # longer than evaluate_base answered
    assert scored == ["merged", tiny_model_dir.name]
    assert "evaluate.max_new_tokens 16 > the 12 answered there (evaluate.base_max_new_tokens)" in caplog.text
    rerun(**{"evaluate.max_new_tokens": 5, "evaluate.batch_size": 2})  # other settings
    assert scored == ["merged", tiny_model_dir.name] and "scored with other batch_size" in caplog.text


def test_cut_decodes_the_first_ids_of_each_stored_answer(base_model_dir):
    """scoring.cut on stored rows made by hand: each answer is its first `max_new` ids decoded as score_model does
    (whole characters: a Korean syllable split across byte tokens is dropped, not shown as U+FFFD); losses and
    engine are carried over; an empty answer stays empty."""
    tok = modeling.load_tokenizer(base_model_dir)
    en, ko = (
        tok.encode(t, add_special_tokens=False) for t in ("Run `dvc push` to upload the data.", "데이터를 올리세요")
    )
    stored = {"losses": [{"nll": 1.5, "n": 3}, {"nll": 2.0, "n": 4}], "engine": "vllm", "settings": {},
              "answer_ids": scoring.pack_ids([en, []]), "qa_answer_ids": scoring.pack_ids([ko])}  # fmt: skip
    split = next(n for n in range(1, len(ko)) if "\ufffd" in tok.decode(ko[:n]))  # a cut inside a syllable
    full = scoring.cut(base_model_dir, stored, 1000)
    assert full == {"losses": stored["losses"], "engine": "vllm", "answers": ["Run `dvc push` to upload the data.", ""],
                    "qa_answers": ["데이터를 올리세요"]}  # fmt: skip
    short = scoring.cut(base_model_dir, stored, 4)
    assert short["answers"] == [tok.decode(en[:4]).strip(), ""] and len(short["answers"][0]) < len(full["answers"][0])
    korean = scoring.cut(base_model_dir, stored, split)["qa_answers"][0]
    assert "\ufffd" not in korean and "데이터를 올리세요".startswith(korean)


def test_answers_cut_to_a_shorter_budget_are_the_answers_of_that_budget(tmp_path, base_model_dir):
    """What evaluate does with evaluate_base's rows (scoring.cut): greedy answers to 16 tokens, cut to 6, are the
    answers, text and all, of a 6-token run (the real model: the tiny random one repeats a newline)."""
    params = write_params(tmp_path, {"evaluate.max_samples": 2, "evaluate.batch_size": 2, "evaluate.engine": "hf"},
                          base_dir=base_model_dir)  # fmt: skip
    p = config.load(params, "evaluate")
    write_processed(tmp_path / "data" / "processed", n_per_split=2)
    io.write_jsonl(p.paths.qa_set, QA)
    items, qa = scoring.eval_sets(p.paths, p.evaluate)
    eos, defaults = scoring.sampling_defaults(base_model_dir)
    args = (base_model_dir, items, qa, p.evaluate, "hf", "bfloat16", eos, defaults, p.seed, "evaluate")
    long, short = scoring.score_model(*args, 16), scoring.score_model(*args, 6)
    assert scoring.cut(base_model_dir, long, 6) == {k: short[k] for k in ("losses", "engine", "answers", "qa_answers")}
    assert all(s and s != t for s, t in zip(short["answers"] + short["qa_answers"],
                                            long["answers"] + long["qa_answers"], strict=True))  # fmt: skip


def test_keyword_score_counts_named_keywords_not_echoes():
    assert metrics.keyword_score("Run `dvc push -r s3`.", ["dvc push"]) == 1.0
    assert metrics.keyword_score("`DVC EXP SHOW`로 비교하세요", ["dvc exp show", "--only-changed"]) == 0.5
    assert metrics.keyword_score("Use git.", ["dvc push"]) == 0.0


def test_a_qa_keyword_inside_its_question_is_refused(tmp_path):
    bad = [{"id": "x", "lang": "en", "question": "What does dvc push do?", "keywords": ["dvc push"]}]
    with pytest.raises(StageError, match=r"qa\.jsonl: row 1: keyword\(s\) \['dvc push'\] appear in the question"):
        scoring.qa_items(bad, "data/eval/qa.jsonl")


@pytest.mark.parametrize("native, want", [(False, "float32"), (True, "bfloat16")])
def test_vllm_generates_in_the_dtype_make_serve_runs(tmp_path, tiny_model_dir, monkeypatch, native, want):
    """bf16 weights are served in fp32 on a CPU that only emulates bf16 (llmops.hardware.serving_dtype), and
    evaluate scores what is served: the same dtype, not the ~20x slower emulated one."""
    params, _ = _pipeline(tmp_path, tiny_model_dir, "lora", 0.0, **{"evaluate.engine": "vllm"})
    seen = []

    def fake_vllm(model_dir, prompts, eos, defaults, max_new, dtype, seed):
        seen.append(dtype)
        return [[] for _ in prompts]

    monkeypatch.setattr(scoring, "generate_vllm", fake_vllm)
    monkeypatch.setenv("LLMOPS_NATIVE_BF16", str(int(native)))
    res = evaluate.main(str(params))
    assert seen and set(seen) == {want} == {res["compute"]["generate_dtype"]}
    assert hardware.serving_dtype("auto", "cpu") == ("auto" if native else "float32")


def test_repo_qa_set_is_held_out_from_the_training_questions():
    """Every QA row is well-formed, its keywords are not in its question, and no question is a near copy of a
    training question (character 5-gram Jaccard < 0.5 against every user turn of the seed data and, through the
    synthetic stage's filter, of the synthetic rows)."""
    from llmops import dedup
    from stages import synthetic
    from tests.conftest import ROOT, repo_params

    rows = io.read_jsonl(ROOT / repo_params()["paths"]["qa_set"])
    items = scoring.qa_items(rows, "qa")
    assert len(items) == 80 and {it["lang"] for it in items} == {"en", "ko"}
    seed = [m["content"] for f in ("seed_en", "seed_ko") for r in io.read_jsonl(ROOT / f"data/raw/{f}.jsonl")
            for m in r["messages"] if m["role"] == "user"]  # fmt: skip
    sims = dedup.jaccard(dedup.shingles([r["question"] for r in rows]), dedup.shingles(seed))
    assert sims.max() < 0.5
    assert synthetic.HELDOUT_SIMILARITY <= 0.5  # and no synthetic question comes closer than that either


def test_zero_adapter_gives_zero_deltas(tmp_path, tiny_model_dir):
    params, p = _pipeline(tmp_path, tiny_model_dir, "lora", 0.0)
    res = evaluate.main(str(params))
    d = res["delta"]

    def leaves(x):
        return [w for v in x.values() for w in leaves(v)] if isinstance(x, dict) else [x]

    # loss, perplexity, chrf, rouge_l, keyword_recall, qa.score: overall, en and ko
    assert len(leaves(d)) == 18 and all(v == 0.0 for v in leaves(d) if v is not None)
    assert d["loss"] == 0.0 and d["chrf"] == 0.0
    assert all(v == 0.0 for v in leaves(res["delta_ci95"]) if v is not None)  # the same answers: no spread either
    samples = io.read_jsonl(tmp_path / "metrics" / "samples.jsonl")
    assert len(samples) == 6 and all(s["base"] == s["tuned"] for s in samples)


def _ci_sets():
    """6 test rows (3 en, 3 ko) and 4 QA rows; the tuned answers name every key term and keyword, the base's none."""
    refs = ["Run `dvc push` to upload.", "Use `--max-model-len 8192`.", "Set `lora_dropout=0.05`.",
            "`dvc repro -s train`로 실행해.", "`CUBLAS_WORKSPACE_CONFIG=:4096:8`을 설정하세요.", "`kubectl logs`로 확인해."]  # fmt: skip
    items = [{"reference": r, "lang": "en" if i < 3 else "ko"} for i, r in enumerate(refs)]
    qa = [{"keywords": k, "lang": lang} for k, lang in ((["dvc push"], "en"), (["vllm serve"], "en"),
          (["dvc gc"], "ko"), (["mlflow.set_tag"], "ko"))]  # fmt: skip
    tuned = (refs, [" and ".join(q["keywords"]) for q in qa])
    base = (["I am not sure about that."] * 6, ["Please check the documentation."] * 4)
    return items, qa, {"base": base, "tuned": tuned}


def test_delta_ci_brackets_a_sure_gain_and_is_the_same_for_the_same_seed():
    items, qa, answers = _ci_sets()
    ci = evaluate.delta_ci(items, qa, answers, seed=7)
    assert set(ci) == {"chrf", "rouge_l", "keyword_recall", "qa", "en", "ko"}
    # every row gains the most a row can: recall and QA +1 on every resample, so the interval is the point
    for node in (ci, ci["en"], ci["ko"]):
        assert node["keyword_recall"] == node["qa"]["score"] == {"lo": 1.0, "hi": 1.0}
        assert node["chrf"]["lo"] > 0 and node["rouge_l"]["lo"] > 0
    assert evaluate.delta_ci(items, qa, answers, seed=7) == ci


def test_delta_ci_of_a_mixed_result_holds_zero_and_the_point_delta():
    items, qa, answers = _ci_sets()
    tuned, qa_tuned = list(answers["tuned"][0]), list(answers["tuned"][1])
    tuned[1], tuned[2], tuned[4], tuned[5] = answers["base"][0][:4]  # two rows right per language, the rest as base
    qa_tuned[1] = qa_tuned[3] = "no idea"
    answers["tuned"] = (tuned, qa_tuned)
    ci = evaluate.delta_ci(items, qa, answers, seed=7)
    point = metrics.mean_recall(tuned, [it["reference"] for it in items]) - 0.0  # the base names no term
    assert ci["keyword_recall"]["lo"] <= point <= ci["keyword_recall"]["hi"]
    assert ci["en"]["qa"]["score"]["lo"] == 0.0 and ci["en"]["qa"]["score"]["hi"] == 1.0  # 1 of 2 right: 0, 0.5 or 1
    assert ci["ko"]["keyword_recall"]["lo"] == 0.0  # a resample of only the ko row it misses: no gain


def test_perplexity_pass_equals_the_padded_full_logit_pass(tiny_model_dir):
    """evaluate and merge score each row alone and project to the vocabulary only where a label is: the same summed
    NLL and token count per row as a padded, full-logit forward (multi-turn rows of unequal length)."""
    import torch.nn.functional as F

    tok = modeling.load_tokenizer(tiny_model_dir)
    model = modeling.load_model(tiny_model_dir, quantize_4bit=False, dtype="float32", device_map="cpu").eval()
    turns = [("user", "What is DVC?"), ("assistant", "A data version control tool."), ("user", "And dvc push?"),
             ("assistant", "It uploads cached data to the remote.")]  # fmt: skip
    convs = [turns[:2], turns, [("user", "LoRA가 뭐예요?"), ("assistant", "저랭크 어댑터 학습법이에요.")]]
    enc = [chat.encode(tok, [{"role": r, "content": c} for r, c in m], chat.end_of_turn_id(tok)) for m in convs]
    width = max(len(e.input_ids) for e in enc)  # the reference: one right-padded batch, logits everywhere
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in enc])
    mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in enc])
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    want = []
    for row, e in zip(logits, enc, strict=True):
        labels = torch.tensor(e.labels[1:])
        keep = labels != chat.IGNORE_INDEX
        want.append((F.cross_entropy(row[: len(labels)][keep], labels[keep], reduction="sum").item(), int(keep.sum())))
    got = scoring.assistant_nll(model, enc, "loss")
    assert [g["n"] for g in got] == [n for _, n in want] == [e.n_trainable for e in enc]
    assert [g["nll"] for g in got] == pytest.approx([w for w, _ in want], rel=1e-5)
    assert got[0]["n"] < got[1]["n"]  # the second turn's reply counts too


def test_generation_stops_at_every_served_eos_id(tiny_model_dir):
    tok = modeling.load_tokenizer(tiny_model_dir)
    model = modeling.load_model(tiny_model_dir, quantize_4bit=False, dtype="bfloat16", device_map="cpu").eval()
    prompts = [chat.prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("What is DVC?", "LoRA가 뭐예요?")]
    eos, defaults = scoring.sampling_defaults(tiny_model_dir)
    assert eos == [2] and defaults == {"repetition_penalty": 1.0}
    with torch.inference_mode():
        first = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert all(t not in eos for t in first), "the random tiny model should not stop at once"
    free = scoring.generate_hf(model, prompts, eos, defaults, max_new=6, bs=2)  # left-padded batch of 2
    assert [a[0] for a in free] == first and all(len(a) <= 6 for a in free)
    # Declare each prompt's greedy first token a stop id as well: every answer now ends before it starts.
    assert scoring.generate_hf(model, prompts, [*eos, *first], defaults, max_new=6, bs=2) == [[], []]


@pytest.mark.slow
def test_vllm_engine_answers_like_hf_generate(base_model_dir):
    """The vllm engine (what serving runs) and HF generate agree on greedy answers of the real model; its answers
    to a shorter budget are the first tokens of the longer ones."""
    pytest.importorskip("vllm")
    tok = modeling.load_tokenizer(base_model_dir)
    questions = ("How do I push DVC-tracked data to a remote?", "LoRA의 rank는 무엇을 조절하나요?")
    prompts = [chat.prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    eos, defaults = scoring.sampling_defaults(base_model_dir)
    threads = torch.get_num_threads()
    served = scoring.generate_vllm(base_model_dir, prompts, eos, defaults, max_new=12, dtype="bfloat16", seed=0)
    # a shorter budget gives the first tokens of a longer one (evaluate cuts evaluate_base's answers to its own)
    short = scoring.generate_vllm(base_model_dir, prompts, eos, defaults, max_new=5, dtype="bfloat16", seed=0)
    assert short == [s[:5] for s in served]
    # the engine is gone and so is its grip on the process: torch threads can be set again (its CPU worker
    # replaces torch.set_num_threads with a no-op), and the count is what it was
    assert torch.get_num_threads() == threads
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    model = modeling.load_model(base_model_dir, quantize_4bit=False, dtype="bfloat16", device_map="cpu").eval()
    local = scoring.generate_hf(model, prompts, eos, defaults, max_new=12, bs=2)
    assert all(len(s) == 12 for s in served)  # no premature stop, max_new_tokens honoured
    # bf16 kernels differ (vLLM's CPU linear vs torch), so a near-tie may flip a token ("LoRa" vs "LoR"):
    # same first token, and near-identical text
    assert [s[0] for s in served] == [h[0] for h in local]
    texts = [[tok.decode(a) for a in answers] for answers in (served, local)]
    assert metrics.chrf(*texts) >= 70, texts

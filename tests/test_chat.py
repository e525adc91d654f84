"""Chat encoding: the labels a model trains on and the traps around BOS/EOS."""

from __future__ import annotations

import pytest

from llmops import chat
from llmops.modeling import load_tokenizer


@pytest.fixture(scope="module")
def tok(base_model_dir):
    return load_tokenizer(base_model_dir)


def test_labels_cover_exactly_assistant_replies_and_end_of_turn(tok):
    eot = chat.end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is DVC?"},
        {"role": "assistant", "content": "Data Version Control."},
        {"role": "user", "content": "그리고 MLflow는?"},
        {"role": "assistant", "content": "실험 추적 도구입니다."},
    ]
    enc = chat.encode(tok, msgs, eot)
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=False) if lab != -100])
    assert trained == "Data Version Control.<|im_end|>실험 추적 도구입니다.<|im_end|>"
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids[1] != tok.bos_token_id
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_prompt_ids_match_serving_render(tok):
    msgs = [{"role": "user", "content": "hi"}]
    ids = chat.prompt_ids(tok, msgs)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert (
        ids == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )


def test_double_bos_template_is_rejected(tok):
    class DoubleBos:
        bos_token_id = tok.bos_token_id
        all_special_ids = tok.all_special_ids
        eos_token_id = tok.eos_token_id

        def apply_chat_template(self, messages, **kw):
            return "<|im_start|>" + tok.apply_chat_template(messages, **kw)

        def __call__(self, text, **kw):
            return tok(text, **kw)

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(chat.ChatFormatError, match="doubled_bos"):
        chat.encode(DoubleBos(), msgs, chat.end_of_turn_id(tok))


def test_assistant_token_loss_of_the_real_model_is_golden(tok, base_model_dir):
    """The loss every stage reports (train's eval loss, merge's parity, evaluate's perplexity) on the real model, in
    fp32: a label mask that slipped by one token, took a prompt token or dropped the end of turn moves it far off."""
    import torch.nn.functional as F

    from llmops import io, modeling
    from tests.conftest import ROOT

    rows = io.read_jsonl(ROOT / "data/raw/seed_en.jsonl")[:2] + io.read_jsonl(ROOT / "data/raw/seed_ko.jsonl")[:2]
    enc = [chat.encode(tok, r["messages"], chat.end_of_turn_id(tok)) for r in rows]
    assert [e.n_trainable for e in enc] == [90, 109, 159, 103]
    model = modeling.load_model(base_model_dir, quantize_4bit=False, dtype="float32", device_map="cpu").eval()
    scored = list(modeling.assistant_positions(model, enc))
    assert [len(t) for _, t in scored] == [90, 109, 159, 103]
    nll = sum(F.cross_entropy(lg, tg, reduction="sum").item() for lg, tg in scored) / 461
    assert nll == pytest.approx(3.52859, rel=1e-4)

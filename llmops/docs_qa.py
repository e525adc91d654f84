"""The offline docs Q&A generator: facts mined from the docs snapshot (commands, options, API fields), rendered
through the phrasings in `paths.synthetic_templates` into questions people ask and answers that quote the
documentation (or its hand translation). Deterministic for a seed. Used by the synthetic stage."""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

LANGS = ("en", "ko")
TOOLS = {"dvc": "DVC", "mlflow": "MLflow"}
# First words of a documented summary that make it a task ("Upload tracked files ..." → "How do I upload ...?").
VERBS = frozenset("add apply build check checkout cleanup collect configure create delete deploy display download "
                  "freeze garbage generate get hide initialize install list log manage migrate modify move perform "
                  "predict print promote pull push record register remove rename reproduce restore run save search "
                  "serve set show stage start stop track unfreeze update upgrade upload view visualize".split())  # fmt: skip


@dataclass(frozen=True)
class Candidate:
    lang: str
    question: str
    answer: str
    kind: str = ""
    grounding: str = ""  # the documented text the answer quotes (docs), or the teacher's context


def _names(command: str, aliases: dict[str, list[str]]) -> str:
    """The command as users type it: each word replaced by its shortest alias (`dvc exp run`)."""
    words = command.split()
    return " ".join(min([w, *aliases.get(" ".join(words[: i + 1]), [])], key=len) for i, w in enumerate(words))


def first_sentence(doc: str) -> str:
    """The documented text's first sentence, with its period ("e.g." and "i.e." do not end one)."""
    m = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", doc)
    return (doc[: m.start()] if m else doc).strip().rstrip(".") + "."


def intent(doc: str) -> str | None:
    """`Upload tracked files to remote storage.` → `upload tracked files to remote storage`; None if not a task."""
    first = first_sentence(doc).rstrip(".")
    if first.split(" ", 1)[0].lower() not in VERBS or len(first) > 120:
        return None
    return first[0].lower() + first[1:]


def facts(snap: dict, skip: list[str], ko: dict[str, dict]) -> list[dict]:
    """Every fact the phrasings can ask about: {kind, key, vars, ko, grounding}; commands, options, API fields."""
    aliases = {c["command"]: c["aliases"] for c in snap["commands"] if c["aliases"]}
    facts = []
    for c in snap["commands"]:
        if " " not in c["command"] or any(c["command"] == g or c["command"].startswith(f"{g} ") for g in skip):
            continue  # the bare tool ("dvc") is no task
        name = _names(c["command"], aliases)
        base = {"cmd": c["command"], "name": name, "tool_title": TOOLS.get(c["tool"], c["tool"])}
        if len(c["usage"]) <= 100:  # a longer synopsis is noise in a short answer
            base["usage"] = c["usage"]
        if c["summary"]:
            task = {"intent": i} if (i := intent(c["summary"])) else {}
            extra = _option_notes(c["options"], name, ko)
            facts.append({"kind": "command", "key": name, "ko": _with(ko.get(name), extra.pop("ko_options", None)),
                          "grounding": c["summary"],
                          "vars": {**base, **task, **extra, "summary": first_sentence(c["summary"])}})  # fmt: skip
        for o in c["options"]:
            flag = max(o["flags"], key=len)
            if not o["help"] or flag in ("--help", "--quiet", "--verbose"):
                continue
            task = {"intent": i} if (i := intent(o["help"])) else {}
            spec = flag + (f" {o['metavar']}" if o["metavar"] else "")
            facts.append({"kind": "option", "key": f"{name} {flag}", "ko": ko.get(f"{name} {flag}"),
                          "grounding": o["help"], "vars": {**base, **task, "flag": flag, "spec": spec,
                                                           "help": first_sentence(o["help"])}})  # fmt: skip
    for api in snap["apis"]:
        for f in api["fields"]:
            if f["help"]:
                meta = ", ".join(f"{k} `{f[k]}`" for k in ("type", "default") if f[k]) or "undocumented type"
                task = {"intent": i} if (i := intent(f["help"])) else {}
                facts.append({"kind": "field", "key": f"{api['api']}.{f['name']}", "ko": None, "grounding": f["help"],
                              "vars": {"api": api["api"], "field": f["name"], "meta": meta, **task,
                                       "help": first_sentence(f["help"])}})  # fmt: skip
    return facts


def _option_notes(options: list[dict], name: str, ko: dict[str, dict]) -> dict:
    """The command's first two documented options as a sentence ({options}), and, where they are translated, a
    Korean one ({ko_options}): what makes an answer more than a one-liner, still in the documentation's words."""
    usable = [o for o in options if o["help"] and not {"--help", "--quiet", "--verbose"} & set(o["flags"])]
    # the translated ones first: they are the options people reach for (-S and --queue of `dvc exp run`)
    picked = sorted(usable, key=lambda o: f"{name} {max(o['flags'], key=len)}" not in ko)[:2]
    out = {}
    if picked:
        notes = [f"`{'`/`'.join(o['flags'])}` ({first_sentence(o['help']).rstrip('.')})" for o in picked]
        out["options"] = "Useful options: " + ", ".join(notes) + "."
    ko_notes = [f"`{max(o['flags'], key=len)}` 옵션은 {t['desc']}" for o in picked
                if (t := ko.get(f"{name} {max(o['flags'], key=len)}"))]  # fmt: skip
    if ko_notes:
        out["ko_options"] = " ".join(ko_notes)
    return out


def _with(ko: dict | None, ko_options: str | None) -> dict | None:
    return {**ko, "ko_options": ko_options} if ko and ko_options else ko


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def render(fact: dict, lang: str, templates: dict, phrasings: int, seed: int) -> list[Candidate]:
    """Up to `phrasings` question phrasings (seeded per fact), each with an answer phrasing of its own; only
    phrasings whose every {field} the fact has."""
    kind = templates.get(fact["kind"], {}).get(lang)
    if kind is None or (lang == "ko" and not fact["ko"]):
        return []
    v = {**fact["vars"], **(fact["ko"] or {})}
    questions = [q for q in kind["questions"] if _fields(q) <= v.keys()]
    answers = [a for a in kind["answers"] if _fields(a) <= v.keys()]
    richest = max(len(_fields(a)) for a in answers)  # the fullest answer the fact supports
    answers = [a for a in answers if len(_fields(a)) == richest]
    rng = random.Random(f"{seed}:{fact['key']}:{lang}")
    return [
        Candidate(lang, q.format(**v), rng.choice(answers).format(**v), fact["kind"], fact["grounding"])
        for q in rng.sample(questions, min(phrasings, len(questions)))
    ]


def candidates(facts: list[dict], templates: dict, phrasings: int, seed: int):
    """Commands first (what a user asks most), then options, then API fields; translated facts first within each
    kind (they give both languages); a seeded shuffle otherwise; both languages per fact."""
    order = {"command": 0, "option": 1, "field": 2}
    facts = sorted(facts, key=lambda f: f["key"])
    random.Random(f"{seed}:facts").shuffle(facts)
    for fact in sorted(facts, key=lambda f: (order[f["kind"]], f["ko"] is None)):  # stable: the shuffle stays
        for lang in LANGS:
            yield from render(fact, lang, templates, phrasings, seed)

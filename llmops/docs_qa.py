"""The offline docs Q&A generator: hand-written facts (`paths.synthetic_facts`: the commands, flags and APIs people
ask about, in their words, both languages) and facts mined from the docs snapshot (commands, options, API fields),
rendered through the phrasings in `paths.synthetic_templates` into questions people ask and answers that state
the fact (or quote the documentation, or its hand translation). Deterministic for a seed. Used by the synthetic
stage."""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmops.stage import StageError

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


# A hand-written fact: what it is (`what`, named in answers) and the Korean noun with its object particle.
CURATED_KEYS = ("name", "what", "tool", "intents", "summary", "goals", "desc")
WHAT_KO = {"command": "명령을", "option": "옵션을", "function": "함수를", "method": "메서드를", "class": "클래스를",
           "argument": "인자를", "file": "파일을", "setting": "설정을", "env_var": "환경 변수를", "concept": "개념을"}  # fmt: skip


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


def read_yaml(path: str):
    """A git-tracked YAML input of the generator (templates, facts); a syntax error names the file and line."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise StageError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None


def curated_facts(entries, source: str) -> list[dict]:
    """The hand-written facts as generator facts (kind `curated`; `intent`/`goal` are lists, one per phrasing).
    Every problem at once, on one line, each naming the entry and key."""
    if not isinstance(entries, list):
        raise StageError(f"{source}: expected a YAML list of facts (name, what, tool, intents, summary, goals, desc)")
    problems, facts, seen = [], [], set()
    for i, e in enumerate(entries):
        name = e.get("name") if isinstance(e, dict) and isinstance(e.get("name"), str) else None
        where = f"{source}: entry {i}" + (f" ({name})" if name else "")
        if not isinstance(e, dict):
            problems.append(f"{where}: not a mapping")
            continue
        bad = [f"missing or empty `{k}`" for k in CURATED_KEYS if not e.get(k)]
        bad += [f"unknown key `{k}`" for k in sorted(set(e) - set(CURATED_KEYS), key=str)]
        bad += [f"`{k}` must be a string" for k in ("name", "what", "tool", "summary", "desc")
                if e.get(k) and not isinstance(e[k], str)]  # fmt: skip
        if isinstance(e.get("what"), str) and e["what"] not in WHAT_KO:
            bad.append(f"`what` is {e['what']!r}, expected one of {', '.join(WHAT_KO)}")
        for k in ("intents", "goals"):
            if e.get(k) and not (isinstance(e[k], list) and all(isinstance(x, str) and x.strip() for x in e[k])):
                bad.append(f"`{k}` must be a list of non-empty strings")
        if name in seen:
            bad.append("duplicate `name` (one fact per entry)")
        seen.add(name)
        if bad:
            problems += [f"{where}: {b}" for b in bad]
            continue
        facts.append({"kind": "curated", "key": name, "grounding": e["summary"].strip(),
                      "vars": {"name": name, "what": e["what"].replace("_", " "), "tool_title": e["tool"],
                               "intent": [x.strip() for x in e["intents"]],
                               "task": [_second_person(x.strip()) for x in e["intents"]], "summary": e["summary"].strip()},
                      "ko": {"goal": [x.strip() for x in e["goals"]], "desc": _ko_first_sentence(e["desc"]),
                             "what_obj": WHAT_KO[e["what"]]}})  # fmt: skip
    if problems:
        raise StageError(f"{len(problems)} problem(s) in {source}, fix them and rerun: " + "; ".join(problems))
    return facts


def with_related(facts: list[dict], n: int) -> list[dict]:
    """Each curated fact with the next `n` facts of its tool (file order, wrapping) stated after its answer (vars
    `related`, ko `related_ko`): a reply that also names the neighbouring command, flag or API, as a person's answer
    does ("... then `dvc push`"). A tool with one fact gets none; n = 0 leaves the answers as they were."""
    out = []
    for f in facts:
        same = [g for g in facts if g["vars"]["tool_title"] == f["vars"]["tool_title"]]
        i = same.index(f)
        nxt = [same[(i + k) % len(same)] for k in range(1, min(n, len(same) - 1) + 1)]
        en = " ".join(f"Related {g['vars']['what']}: `{g['key']}`. {first_sentence(g['vars']['summary'])}" for g in nxt)
        ko = " ".join(f"참고로 `{g['key']}` {g['ko']['what_obj'][:-1]}도 있습니다. {g['ko']['desc']}" for g in nxt)
        out.append({**f, "vars": {**f["vars"], "related": en}, "ko": {**f["ko"], "related_ko": ko}})
    return out


def _second_person(intent: str) -> str:
    """The user's words for the task as the answer says them back ("upload my data" → "upload your data")."""
    for a, b in (
        (r"\bI'm\b", "you're"),
        (r"\bI\b", "you"),
        (r"\bmy\b", "your"),
        (r"\bme\b", "you"),
        (r"\bmine\b", "yours"),
    ):
        intent = re.sub(a, b, intent)
    return intent


def _ko_first_sentence(desc: str) -> str:
    """A Korean answer states the fact's first sentence only: Korean costs ~3 tokens a syllable here, and a second
    phrasing of the question teaches more per token than a longer answer."""
    return re.split(r"(?<=[다요])\.\s", desc.strip(), maxsplit=1)[0].rstrip(".") + "."


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
    phrasings whose every {field} the fact has. A list-valued field (a curated fact's intents) gives phrasing i
    its i-th entry, so the phrasings of one fact ask in different words."""
    kind = templates.get(fact["kind"], {}).get(lang)
    if kind is None or (lang == "ko" and not fact["ko"]):
        return []
    v = {**fact["vars"], **(fact["ko"] or {})}
    questions = [q for q in kind["questions"] if _fields(q) <= v.keys()]
    answers = [a for a in kind["answers"] if _fields(a) <= v.keys()]
    if fact["kind"] != "curated":  # mined facts: the fullest answer the fact supports; curated ones have every field
        richest = max(len(_fields(a)) for a in answers)
        answers = [a for a in answers if len(_fields(a)) == richest]
    rng = random.Random(f"{seed}:{fact['key']}:{lang}")
    out = []
    for i, q in enumerate(rng.sample(questions, min(phrasings, len(questions)))):
        vi = {k: x[i % len(x)] if isinstance(x, list) else x for k, x in v.items()}
        answer = f"{rng.choice(answers).format(**vi)} {vi.get('related' if lang == 'en' else 'related_ko', '')}".strip()
        out.append(Candidate(lang, q.format(**vi), answer, fact["kind"], fact["grounding"]))
    return out


def candidates(facts: list[dict], templates: dict, phrasings: int, seed: int, curated_phrasings: int | None = None):
    """Hand-written facts first (the ones people ask most, `curated_phrasings` each), then mined commands, options
    and API fields; translated facts first within each kind (they give both languages); a seeded shuffle
    otherwise; both languages per fact."""
    order = {"curated": 0, "command": 1, "option": 2, "field": 3}
    facts = sorted(facts, key=lambda f: f["key"])
    random.Random(f"{seed}:facts").shuffle(facts)
    for fact in sorted(facts, key=lambda f: (order[f["kind"]], f["ko"] is None)):  # stable: the shuffle stays
        for lang in LANGS:
            n = curated_phrasings if fact["kind"] == "curated" and curated_phrasings else phrasings
            yield from render(fact, lang, templates, n, seed)

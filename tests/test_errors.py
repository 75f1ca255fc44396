"""Bad input (docs/errors.md): each case exits 2 with one stderr line naming the file and the line or
key, and leaves no output behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MICRO = Path(__file__).parent / "configs" / "micro.yaml"


def micro() -> dict:
    return yaml.safe_load(MICRO.read_text())


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_IT = [{"id": f"x:{i}", "instruction": f"q{i}", "response": f"a{i}"} for i in range(3)]
GOOD_EVAL = [{"id": f"e:{i}", "instruction": f"q{i}"} for i in range(3)]


def realdata_config(tmp: Path, model_dir: Path, **over) -> dict:
    cfg = {"name": "real", "seeds": [0], "base": str(model_dir),
           "it_data": str(jsonl(tmp / "it.jsonl", GOOD_IT)), "eval_data": str(jsonl(tmp / "eval.jsonl", GOOD_EVAL)),
           "variants": {"lft": {"method": "lora"}}}
    cfg.update(over)
    return cfg


# Each case: (name, how to build the config file or args, expected text in the error line)
def _cases(tmp: Path, model_dir: Path):
    counter = iter(range(1000))

    def cfg_file(data: dict | str) -> Path:
        p = tmp / f"study{next(counter)}.yaml"
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return p

    m = micro()
    yield "malformed YAML", cfg_file("name: [unclosed\nseeds: 1\n"), "malformed YAML"
    yield "not a mapping", cfg_file("- a\n- b\n"), "expected a YAML mapping"
    yield "unknown top-level key", cfg_file({**m, "sedes": [0]}), "key 'sedes': unknown key"
    yield "unknown nested key", cfg_file({**m, "world": {**m["world"], "n_famlies": 3}}), "key 'world.n_famlies'"
    yield "wrong type", cfg_file({**m, "seeds": "zero"}), "key 'seeds': expected a list"
    yield "wrong scalar type", cfg_file({**m, "pretrain": {**m["pretrain"], "steps": "many"}}), "key 'pretrain.steps'"
    yield "unknown method", cfg_file({**m, "variants": {"x": {"method": "qlora"}}}), "key 'variants.x.method'"
    yield "unknown tune key", cfg_file({**m, "variants": {"x": {"method": "lora", "tune": {"lr": 1}}}}), \
        "variants.x.tune"
    yield "unknown shared tune key", cfg_file({**m, "tune": {**m.get("tune", {}), "lr": 1}}), "key 'tune.lr'"
    yield "bad shift mode", cfg_file({**m, "shift": {"mode": "approx"}}), "key 'shift.mode'"
    yield "bad base context", cfg_file({**m, "shift": {"base_contexts": ["chat"]}}), "key 'shift.base_contexts'"
    yield "duplicate seeds", cfg_file({**m, "seeds": [0, 0]}), "key 'seeds': duplicate seeds"
    yield "no seeds", cfg_file({**m, "seeds": []}), "key 'seeds'"
    yield "no variants", cfg_file({**m, "variants": {}}), "key 'variants'"
    yield "finding names a missing variant", cfg_file({**m, "findings": {"sft": "full"}}), "key 'findings.sft'"
    yield "unknown IT style", cfg_file({**m, "variants": {"x": {"method": "lora", "data": "it_poetic"}}}), \
        "variants.x.data"
    yield "invalid world knob", cfg_file({**m, "world": {**m["world"], "n_families": 0}}), "n_families"
    yield "heads do not divide width", cfg_file({**m, "pretrain": {**m["pretrain"], "num_heads": 3}}), \
        "num_heads"
    yield "neither world nor base", cfg_file({k: v for k, v in m.items() if k not in ("world", "pretrain")}), \
        "key 'world'"
    yield "missing config file", tmp / "nope.yaml", "nope.yaml: file not found"
    yield "missing IT data file", cfg_file(realdata_config(tmp, model_dir, it_data=str(tmp / "missing.jsonl"))), \
        "missing.jsonl: file not found"
    bad = jsonl(tmp / "bad.jsonl", [GOOD_IT[0], "{not json"])
    yield "malformed JSONL line", cfg_file(realdata_config(tmp, model_dir, it_data=str(bad))), "bad.jsonl:2: malformed JSON"
    dup = jsonl(tmp / "dup.jsonl", [GOOD_IT[0], GOOD_IT[0]])
    yield "duplicate ids", cfg_file(realdata_config(tmp, model_dir, it_data=str(dup))), "dup.jsonl:2: field 'id': duplicate"
    empty = jsonl(tmp / "empty.jsonl", [])
    yield "empty dataset", cfg_file(realdata_config(tmp, model_dir, it_data=str(empty))), "empty.jsonl: dataset is empty"
    nores = jsonl(tmp / "nores.jsonl", [{"id": "a", "instruction": "q"}])
    yield "row without a response", cfg_file(realdata_config(tmp, model_dir, it_data=str(nores))), \
        "nores.jsonl:1: field 'response'"
    noinst = jsonl(tmp / "noinst.jsonl", [{"id": "a", "question": "q"}])
    yield "eval row without an instruction", cfg_file(realdata_config(tmp, model_dir, eval_data=str(noinst))), \
        "noinst.jsonl:1: field 'instruction'"
    yield "missing base model", cfg_file(realdata_config(tmp, model_dir, base=str(tmp / "no-model"))), "no-model"
    yield "drop_twin_sources on own data whose eval records name no twin", cfg_file(realdata_config(
        tmp, model_dir, variants={"cf": {"method": "lora", "drop_twin_sources": True}})), \
        "key 'variants.cf.drop_twin_sources': needs eval records that name a 'twin'"
    yield "geo with a world", cfg_file({**m, "base": str(model_dir), "geo": {"max_countries": 20}}), "key 'geo'"
    yield "geo with it_data", cfg_file(realdata_config(tmp, model_dir, geo={})), \
        "key 'geo': 'geo' builds the IT and eval data"
    yield "unknown geo key", cfg_file({"name": "g", "base": str(model_dir), "geo": {"max_countrys": 20},
                                       "variants": {"lft": {"method": "lora"}}}), "key 'geo.max_countrys'"
    frame = tmp / "frame.txt"
    frame.write_text("# Query:\n\n# Answer:\n")
    yield "frame without placeholder", cfg_file(realdata_config(tmp, model_dir, frame=str(frame))), "{instruction}"


def case_ids():
    return [c[0] for c in _cases(Path("/tmp"), Path("/tmp"))]


@pytest.mark.parametrize("case", case_ids())
def test_bad_study_input_is_one_line_exit_2_and_no_output(case, tmp_path, tiny_model_dir):
    cases = {name: (path, needle) for name, path, needle in _cases(tmp_path, tiny_model_dir)}
    path, needle = cases[case]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "itlens.cli", "study", str(path), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, (case, r.returncode, r.stderr[-1500:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("itlens: error: "), r.stderr
    assert needle in lines[0], (needle, lines[0])
    assert not out.exists(), "a failed command must leave no output"


def test_the_error_list_documents_every_case():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    missing = [c for c in case_ids() if f"| {c} |" not in doc]
    assert not missing, missing
    assert len(case_ids()) >= 20


def _out_cases(tmp: Path):
    """(name, argv, needle, paths that must be left as they were)."""
    src = jsonl(tmp / "it.jsonl", GOOD_IT)
    (tmp / "afile").write_text("keep me\n")
    (tmp / "adir").mkdir()
    (tmp / "adir" / "keep.txt").write_text("keep me\n")
    held = tmp / "run"
    held.mkdir()
    inside = jsonl(held / "responses.jsonl", [{"id": "a", "instruction": "q", "response": "r", "model": "m"}])
    yield ("--out is a file", ["world", "--out", "afile"], "afile: key '--out': exists and is not a folder",
           [tmp / "afile"])
    yield ("--out holds the input", ["judge", "--responses", str(inside), "--out", str(held), "--set",
                                     "api_key_env="], "holds the input", [inside])
    yield ("--out is the working folder", ["world", "--out", "."], "is the working folder", [src])
    yield ("--out file is a folder", ["data", "subset", str(src), "--n", "1", "--out", "adir"],
           "adir: key '--out': is a folder; the output is a file", [tmp / "adir" / "keep.txt"])
    yield ("--out under a file", ["data", "subset", str(src), "--n", "1", "--out", "afile/x.jsonl"],
           "afile is a file, not a folder", [tmp / "afile"])
    yield ("--out is the input file", ["data", "subset", str(src), "--n", "1", "--out", str(src)],
           "is the input", [src])
    yield ("input is a folder", ["data", "subset", "adir", "--n", "1", "--out", "x.jsonl"],
           "adir: is a folder, expected a JSONL file", [tmp / "adir" / "keep.txt"])
    (tmp / "broken").mkdir()
    (tmp / "broken" / "metrics.json").write_text('{"findings": [')
    yield ("damaged metrics.json", ["compare", "broken", "broken"], "metrics.json: not valid JSON (line 1",
           [tmp / "broken" / "metrics.json"])
    (tmp / "nofid").mkdir()
    (tmp / "nofid" / "metrics.json").write_text('{"findings": [{"holds": true}]}')
    yield ("metrics.json finding without id", ["report", "nofid"], "key 'findings[0]'", [tmp / "nofid" / "metrics.json"])
    for name, text, key in (("noclaim", '{"findings": [{"id": "F1", "holds": true}]}', None),
                            ("nullev", '{"findings": [{"id": "F1", "claim": "c", "evidence": null}]}',
                             "findings[0].evidence"),
                            ("badholds", '{"findings": [{"id": "F1", "claim": "c", "holds": "yes"}]}',
                             "findings[0].holds"),
                            ("badrow", '{"findings": [], "models": {"base": 3}}', "models.base")):
        (tmp / name).mkdir()
        (tmp / name / "metrics.json").write_text(text)
        if key is None:  # a finding without a claim still renders
            continue
        yield (f"metrics.json {name}", ["report", name], f"key '{key}'", [tmp / name / "metrics.json"])
    (tmp / "noclaim" / "figures").mkdir()
    (tmp / "noclaim" / "figures" / "index.json").write_text('{"file": "x.png"}')
    yield ("damaged figure index", ["report", "noclaim"], "index.json: expected a JSON list",
           [tmp / "noclaim" / "figures" / "index.json"])


@pytest.mark.parametrize("case", [
    "--out is a file", "--out holds the input", "--out is the working folder", "--out file is a folder",
    "--out under a file", "--out is the input file", "input is a folder", "damaged metrics.json",
    "metrics.json finding without id", "metrics.json nullev", "metrics.json badholds", "metrics.json badrow",
    "damaged figure index"])
def test_bad_output_paths_and_damaged_results_are_input_errors(case, tmp_path, monkeypatch, capsys):
    """Checked before any work: exit 2, one line, nothing written, nothing replaced."""
    from itlens.cli import main

    monkeypatch.chdir(tmp_path)
    cases = {name: rest for name, *rest in _out_cases(tmp_path)}
    argv, needle, kept = cases[case]
    before = {p: p.read_bytes() for p in kept}
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert ex.value.code == 2 and len(err) == 1 and needle in err[0], (case, ex.value.code, err)
    assert {p: p.read_bytes() for p in kept} == before
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing  # nothing written, moved or removed


@pytest.mark.parametrize("argv, needle", [
    (["data", "subset", "x.jsonl", "--n", "abc", "--out", "y"],
     "itlens data subset: Invalid value for '--n': Input should be a valid integer"),
    (["shiftt"], "itlens: No such command 'shiftt'."),
    (["shift", "--base", "b", "--bogus", "1"], "itlens shift: No such option: --bogus"),
    (["shift", "--base", "b", "--responses", "r", "--out", "o"], "itlens shift: Missing option '--tuned'."),
])
def test_usage_errors_are_one_line_exit_2(argv, needle, capsys):
    """click's usage errors were its own 4-line block (Usage:, Try ..., blank, Error:)."""
    from itlens.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"itlens: error: {needle}"), lines
    assert lines[0].endswith("--help')")


def test_a_dead_worker_is_one_line_saying_how_to_resume(monkeypatch, capsys):
    """A study worker killed with workers > 1 surfaced as 'internal error: BrokenProcessPool' and a traceback."""
    from concurrent.futures.process import BrokenProcessPool

    import itlens.cli as cli

    def dies(*a, **k):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(cli, "app", dies)
    with pytest.raises(SystemExit) as e:
        cli.main(["study", "x.yaml", "--out", "y"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again to resume" in err and "Traceback" not in err


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_half_written_output(tmp_path):
    """The machine's errors (a full disk, a quota, a read-only folder) were a traceback and 'internal error'.
    Here the process may write no file past 1 KB (RLIMIT_FSIZE; writes past it fail with EFBIG)."""
    import resource
    import signal

    src = tmp_path / "it.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "instruction": f"q{i}", "response": "a" * 200}) + "\n"
                           for i in range(20)))

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    out = tmp_path / "sub.jsonl"
    r = subprocess.run([sys.executable, "-m", "itlens.cli", "data", "subset", str(src), "--n", "10", "--out", str(out)],
                       capture_output=True, text=True, preexec_fn=small_files)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("itlens: error: ") and "File too large" in lines[0] and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["it.jsonl"]  # no output, no temp file left

"""Config loading, errors, atomic IO and the CLI's exit codes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Literal, Optional

import pytest

from itlens.config import KEY_OMITS_DEFAULT, config_hash, from_dict, key_dict, load_config, to_dict
from itlens.errors import InputError
from itlens.io import atomic_dir, atomic_write_json, read_records


@dataclasses.dataclass
class Inner:
    r: int = 8
    alpha: float = 16.0


@dataclasses.dataclass
class Outer:
    name: str = "x"
    method: Literal["lora", "full"] = "lora"
    inner: Inner = dataclasses.field(default_factory=Inner)
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    note: Optional[str] = None


def test_config_roundtrip_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\ninner:\n  r: 4\n  alpha: 1e-3\n")
    cfg = load_config(Outer, p, ["inner.r=16", "method=full"])
    assert cfg.inner.r == 16 and cfg.inner.alpha == pytest.approx(1e-3) and cfg.method == "full"
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert config_hash(cfg) == config_hash(from_dict(Outer, to_dict(cfg)))
    assert config_hash(cfg) != config_hash(Outer())


@dataclasses.dataclass
class OuterLater(Outer):
    """Outer as a later version defines it: one more option, added with KEY_OMITS_DEFAULT."""

    samples: int = dataclasses.field(default=0, metadata={KEY_OMITS_DEFAULT: True, "help": "added later"})
    extras: list[int] = dataclasses.field(default_factory=list, metadata={KEY_OMITS_DEFAULT: True})


def test_an_option_added_later_keeps_old_cache_keys_until_it_is_set():
    old = config_hash({"v": 1, "cfg": to_dict(Outer(name="z"))})  # a key written by the older version
    assert config_hash({"v": 1, "cfg": key_dict(OuterLater(name="z"))}) == old
    assert config_hash(OuterLater(name="z")) == config_hash(Outer(name="z"))
    assert config_hash({"v": 1, "cfg": key_dict(OuterLater(name="z", samples=6))}) != old
    assert config_hash({"v": 1, "cfg": key_dict(OuterLater(name="z", extras=[1]))}) != old
    assert "samples" in to_dict(OuterLater())  # the resolved config still shows every option


@pytest.mark.parametrize("text,needle", [
    ("nme: y\n", "key 'nme': unknown key"),
    ("inner:\n  rr: 3\n", "key 'inner.rr': unknown key"),
    ("inner:\n  r: three\n", "key 'inner.r': expected an integer"),
    ("method: qlora\n", "key 'method': expected one of"),
    ("sizes: 3\n", "key 'sizes': expected a list"),
    ("name: [unclosed\n", "malformed YAML"),
    ("- a\n- b\n", "expected a YAML mapping"),
    ("name: x\ninner:\n  r: 3\nname: y\n", ":4: malformed YAML: duplicate key 'name' (first on line 1)"),
    ("inner:\n  r: 010\n", "key 'inner.r': expected an integer"),  # not octal 8
    ("inner:\n  r: 1:30\n", "key 'inner.r': expected an integer"),  # not sexagesimal 90
    ("inner: {r: 3, r: 4}\n", ":1: malformed YAML: duplicate key 'r' (first on line 1)"),  # one line, flow style
    ("inner: &d {r: 3}\nname: x\nnote: {<<: *d, r: 4, r: 5}\n", ":3: malformed YAML: duplicate key 'r'"),
])
def test_config_errors_name_file_and_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(InputError) as ei:
        load_config(Outer, p)
    assert str(p) in str(ei.value) and needle in str(ei.value)


def test_read_records_validation(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "instruction": "q", "response": "r"}\n{"id": "a", "instruction": "q", "response": "r"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: field 'id': duplicate id"):
        read_records(p, "instruction")
    p.write_text('{"id": "a", "instruction": "q"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:1: field 'response': missing"):
        read_records(p, "instruction")
    p.write_text('{"id": "a", "instruction": "q", "response": "r"}\n{oops\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: malformed JSON"):
        read_records(p, "instruction")
    for constant in ("NaN", "Infinity", "-Infinity"):  # Python's json reads them; no other parser does
        p.write_text('{"id": "a", "instruction": "q", "response": "r"}\n{"id": "b", "score": %s}\n' % constant)
        with pytest.raises(InputError, match=rf"d.jsonl:2: malformed JSON: {constant} is not a JSON value"):
            read_records(p, "any")
    p.write_text("\n")
    with pytest.raises(InputError, match="empty"):
        read_records(p, "instruction")
    p.write_text('{"id": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert read_records(p, "instruction")[0]["id"] == "m"
    # a lone UTF-16 surrogate (half an escaped emoji) is valid JSON but not text; a whole pair is fine
    p.write_text('{"id": "a", "instruction": "q", "response": "ok \\ud83d\\ude00"}\n'
                 '{"id": "b", "messages": [{"role": "user", "content": "bad \\ud83d"}]}\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: field 'messages': contains a lone UTF-16 surrogate"):
        read_records(p, "instruction")
    p.write_text('{"id": "a", "instruction": "q", "response": "ok \\ud83d\\ude00"}\n')
    assert read_records(p, "instruction")[0]["response"] == "ok \U0001f600"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            atomic_write_json(d / "x.json", {"a": 1})
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as d:
        atomic_write_json(d / "x.json", {"a": 1})
    assert json.loads((target / "x.json").read_text()) == {"a": 1}


def test_cli_exit_codes():
    exe = [sys.executable, "-m", "itlens.cli"]
    r = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "itlens" in r.stdout
    r = subprocess.run(exe + ["no-such-command"], capture_output=True, text=True)
    assert r.returncode == 2


def test_tokenizer_roundtrip_and_template(tiny_tokenizer):
    text = "happy to help! the city of north river was born in 1970."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    assert rendered == "<|user|>hi<|end|><|assistant|>yo<|end|>"


def test_set_fills_an_empty_section_and_reads_numbers_as_yaml_1_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n")  # an empty section, as left by commenting out its keys
    cfg = load_config(Outer, p, ["inner.r=12", "inner.alpha=1e-3"])
    assert cfg.inner.r == 12 and cfg.inner.alpha == 0.001


def test_a_date_is_text_as_in_yaml_1_2_so_it_is_a_name_or_a_one_line_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: 2024-05-01\n")  # a study named by its date
    assert load_config(Outer, p).name == "2024-05-01"
    assert load_config(Outer, None, ["name=2024-05-01"]).name == "2024-05-01"
    p.write_text("inner:\n  r: 2024-05-01\n")
    with pytest.raises(InputError, match=r"c\.yaml: key 'inner\.r': expected an integer, got '2024-05-01'$"):
        load_config(Outer, p)


@dataclasses.dataclass
class WithFlags:
    name: str = "x"
    stopwords: bool = False
    variants: dict[str, int] = dataclasses.field(default_factory=dict)


def test_only_true_and_false_are_booleans_as_in_yaml_1_2_and_a_flag_still_takes_yes(tmp_path):
    """YAML 1.1 read no/yes/on/off as booleans: a variant keyed `no` became "False" and a study named
    `no` was an error. They are text now, and a true/false field still takes them as YAML 1.1 did."""
    p = tmp_path / "c.yaml"
    p.write_text("name: no\nstopwords: yes\nvariants: {no: 1, on: 2, off: 3, 'yes': 4}\n")
    cfg = load_config(WithFlags, p)
    assert cfg.name == "no" and cfg.stopwords is True and cfg.variants == {"no": 1, "on": 2, "off": 3, "yes": 4}
    assert load_config(WithFlags, p, ["stopwords=Off", "name=on"]) == WithFlags("on", False, cfg.variants)
    assert load_config(WithFlags, None, ["stopwords=TRUE"]).stopwords is True
    with pytest.raises(InputError, match=r"key 'stopwords': expected true or false, got 'maybe'$"):
        load_config(WithFlags, None, ["stopwords=maybe"])


def test_a_merge_key_fills_a_section_and_the_keys_written_beside_it_override_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  <<: {r: 3, alpha: 2.0}\n  r: 4\n")  # as `<<: *defaults` shares one section
    assert load_config(Outer, p).inner == Inner(r=4, alpha=2.0)


def test_itlens_figures_leave_the_callers_matplotlib_alone(tmp_path):
    """A notebook that imports itlens and draws its figures keeps its own backend and rcParams."""
    code = f"""
import matplotlib
matplotlib.use("svg")
matplotlib.rcParams.update({{"font.size": 13.0, "axes.grid": False, "text.parse_math": True}})
before = (matplotlib.get_backend(), dict(matplotlib.rcParams))
import itlens.report, itlens.study
from itlens.analysis.knowledge import plot_accuracy
p = plot_accuracy({{"base": {{"acc": 0.5}}, "$$x$$": {{"acc": 0.7}}}}, {str(tmp_path / "acc.png")!r})
assert p.read_bytes()[:4] == b"\\x89PNG"
after = (matplotlib.get_backend(), dict(matplotlib.rcParams))
assert after == before, [(k, before[1][k], after[1][k]) for k in before[1] if before[1][k] != after[1][k]]
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_conversation_needs_a_user_message_before_its_last_one(tmp_path):
    p = tmp_path / "d.jsonl"
    ok = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    for turns in ([{"role": "assistant", "content": "hello"}],
                  [{"role": "system", "content": "be nice"}, {"role": "assistant", "content": "hello"}]):
        p.write_text(json.dumps(ok) + "\n" + json.dumps({"id": "b", "messages": turns}) + "\n")
        with pytest.raises(InputError, match=r"d.jsonl:2: field 'messages': expected a user message"):
            read_records(p, "instruction")
    p.write_text(json.dumps({"id": "c", "messages": [{"role": "assistant", "content": "hi, ask me"}] + ok["messages"]})
                 + "\n")
    assert read_records(p, "instruction")[0]["id"] == "c"  # an assistant opener is fine when a user turn follows


def _set_loaders():
    from pathlib import Path

    from itlens.analysis.borrowing import BorrowingConfig
    from itlens.analysis.copying import CopyingConfig
    from itlens.analysis.knowledge import KnowledgeConfig
    from itlens.analysis.token_shift import ShiftConfig
    from itlens.generate import GenerateConfig
    from itlens.geo import load_geo_config
    from itlens.judge.config import JudgeConfig
    from itlens.pretrain import load_pretrain_config
    from itlens.study import StudyConfig, resolve_sections
    from itlens.tune import load_tune_config
    from itlens.world import load_world_config

    mini = Path(__file__).resolve().parents[1] / "configs" / "mini.yaml"
    return {"tune": lambda o: load_tune_config(None, o), "generate": lambda o: load_config(GenerateConfig, None, o),
            "data simplify": lambda o: load_config(JudgeConfig, None, o),
            "judge": lambda o: load_config(JudgeConfig, None, o), "geo": lambda o: load_geo_config(None, o),
            "study": lambda o: resolve_sections(load_config(StudyConfig, mini, o), file=str(mini)),
            "shift": lambda o: load_config(ShiftConfig, None, o),
            "knowledge": lambda o: load_config(KnowledgeConfig, None, ["eval=e.jsonl", "responses.base=r.jsonl"] + o),
            "copying": lambda o: load_config(CopyingConfig, None, ["it_data=i.jsonl", "responses.m=r.jsonl"] + o),
            "borrowing": lambda o: load_config(BorrowingConfig, None, ["it_data=i.jsonl", "responses.m=r.jsonl"] + o),
            "world": lambda o: load_world_config(None, o), "pretrain": lambda o: load_pretrain_config(None, o)}


def test_every_set_example_in_the_cli_help_is_a_key_of_that_commands_config():
    import re

    import typer.main

    from itlens.cli import app

    loaders = _set_loaders()
    root, seen = typer.main.get_command(app), set()

    def walk(group, prefix=""):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                walk(cmd, f"{prefix}{name} ")
                continue
            opt = next((p for p in cmd.params if "--set" in getattr(p, "opts", [])), None)
            if opt is None:
                continue
            example = re.search(r"--set (\S+)", opt.help).group(1)
            key, value = example.split("=", 1)
            loaders[f"{prefix}{name}"]([example])  # a wrong key is an InputError naming it
            with pytest.raises(InputError, match=re.escape(key.split(".")[-1])):
                loaders[f"{prefix}{name}"]([f"{key}x={value}"])  # (and the loader does check keys)
            seen.add(f"{prefix}{name}")

    walk(root)
    assert seen == set(loaders)
    flt = root.commands["data"].commands["filter"]
    helps = " ".join(p.help or "" for p in flt.params)
    assert "judge.jsonl" in helps and "--field mean" in helps


def test_set_without_a_key_a_config_folder_and_a_line_cut_short_say_what_is_wrong(tmp_path):
    """`--set =3` and `--set a..b=3` name the override (were: "unknown key" with no key, or key 'a.'); a
    folder given as the config says so (was: "file not found"); a JSONL line cut short is reported at its
    last column (was: column 1, the start of the next line)."""
    for text in ("=3", " =3", "inner..r=3", "inner.=3"):
        with pytest.raises(InputError, match=r"key '--set': override .* expected KEY=VALUE"):
            load_config(Outer, None, [text])
    with pytest.raises(InputError, match="is a folder, expected a YAML file"):
        load_config(Outer, tmp_path)
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "instruction": "q", "response": "r"}\n{"id": "b", "instruction": "q",\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: malformed JSON: .* \(column 32\)"):
        read_records(p, "instruction")


def test_a_jsonl_file_starting_with_a_byte_order_mark_reads_as_its_records(tmp_path):
    """Windows PowerShell 5.1 and Notepad write a BOM: every JSONL reader failed on line 1. A BOM anywhere else is
    still not JSON."""
    p = tmp_path / "bom.jsonl"
    p.write_text('\ufeff{"id": "a", "instruction": "q"}\n{"id": "b", "instruction": "r"}\n', encoding="utf-8")
    assert [r["id"] for r in read_records(p, "prompt")] == ["a", "b"]
    p.write_text('{"id": "a", "instruction": "q"}\n\ufeff{"id": "b", "instruction": "r"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bom.jsonl:2: malformed JSON"):
        read_records(p, "prompt")


def test_a_conversation_without_its_answer_keeps_its_last_question():
    """to_messages(with_response=False) dropped the last message whatever it was: a prompt record whose messages end
    on the user's question lost the question."""
    from itlens.io import to_messages

    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "capital of France?"}]
    assert to_messages({"id": "p", "messages": convo}, with_response=False) == convo
    answered = convo + [{"role": "assistant", "content": "Paris"}]
    assert to_messages({"id": "i", "messages": answered}, with_response=False) == convo



def test_an_empty_section_is_its_defaults():
    """`shift:` with nothing under it is YAML's null: it was 'expected a mapping, got NoneType'. A section that
    may be absent (Optional, such as a study's judge) stays absent."""
    import yaml

    from itlens.study import StudyConfig

    head = "name: t\nseeds: [0]\nbase: x\nit_data: a.jsonl\neval_data: b.jsonl\nvariants: {lft: {method: lora}}\n"
    empty = from_dict(StudyConfig, yaml.safe_load(head + "shift:\ngenerate:\ntune:\nfindings:\njudge:\n"))
    plain = from_dict(StudyConfig, yaml.safe_load(head))
    assert (empty.shift, empty.generate, empty.tune, empty.findings, empty.judge) == \
        (plain.shift, {}, {}, plain.findings, None)
    assert config_hash(to_dict(empty)) == config_hash(to_dict(plain))

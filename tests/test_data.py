"""Dataset-format loaders on small fixture files written for this project (no rows from the real sets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itlens.data import FORMATS, convert, load_records
from itlens.errors import InputError
from itlens.io import read_records

FIX = Path(__file__).parent / "fixtures" / "datasets"


def test_alpaca_json_array_maps_input_and_stable_ids():
    recs = load_records("alpaca", FIX / "alpaca.json")
    assert [r["id"] for r in recs] == ["alpaca:0", "alpaca:1", "alpaca:2"]
    assert "input" not in recs[0]  # empty input is dropped
    assert recs[1] == {"id": "alpaca:1", "instruction": "Add the two numbers.", "input": "7 and 5",
                       "response": "7 + 5 = 12."}


def test_dolly_context_becomes_input_and_category_is_carried():
    recs = load_records("dolly", FIX / "dolly.jsonl")
    assert recs[1]["id"] == "dolly:1" and recs[1]["input"].startswith("The meeting moved")
    assert [r["category"] for r in recs] == ["open_qa", "summarization", "brainstorming"]


def test_lima_single_turn_and_multi_turn():
    recs = load_records("lima", FIX / "lima.jsonl")
    assert recs[0]["instruction"] == "How do I keep basil fresh?" and recs[0]["source"] == "wikihow"
    multi = recs[2]
    assert [m["role"] for m in multi["messages"]] == ["user", "assistant", "user", "assistant"]
    assert multi["messages"][-1]["content"] == "No: 9 = 3 x 3."


def test_lima_test_prompts():
    recs = load_records("lima-test", FIX / "lima_test.jsonl")
    assert recs == [{"id": "lima-test:0", "instruction": "Explain why the sea is salty.", "source": "stackexchange"},
                    {"id": "lima-test:1", "instruction": "Plan a one-day trip to a nearby forest.",
                     "source": "wikihow"}]


def test_tulu_uses_own_ids_and_keeps_system_and_multi_turn_as_messages():
    recs = load_records("tulu", FIX / "tulu.jsonl")
    assert [r["id"] for r in recs] == ["tulu:flan_v2_0", "tulu:oasst1_7", "tulu:sharegpt_3"]
    assert recs[0]["instruction"] == "Translate to French: good morning" and recs[0]["source"] == "flan_v2"
    assert recs[1]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert len(recs[2]["messages"]) == 4


def test_evol_both_releases():
    plain = load_records("evol", FIX / "evol_70k.json")
    assert plain[0]["response"] == "Curious, graceful, independent." and plain[1]["id"] == "evol:1"
    v2 = load_records("evol", FIX / "evol_v2.json")
    assert v2[0] == {"id": "evol:0", "instruction": "Sort these numbers: 3, 1, 2.", "response": "1, 2, 3."}
    assert [m["content"] for m in v2[1]["messages"]] == ["Name a metal.", "Iron.", "Another?", "Copper."]


def test_medinstruct_alpagasus_and_medinstruct_test():
    med = load_records("medinstruct", FIX / "medinstruct.json")
    assert med[1]["input"] == "The patient presented with pyrexia." and med[1]["id"] == "medinstruct:1"
    gas = load_records("alpagasus", FIX / "alpagasus.json")
    assert gas[1] == {"id": "alpagasus:1", "instruction": "Classify the animal.", "input": "salmon",
                      "response": "Fish."}
    test = load_records("medinstruct-test", FIX / "medinstruct_test.jsonl")
    assert test[0]["id"] == "medinstruct-test:0" and test[0]["reference"].startswith("Cool it")
    assert "reference" not in test[1] and test[1]["difficulty"] == "2"


def test_just_eval_first_n_by_default_and_task_types_carried():
    recs = load_records("just-eval", FIX / "just_eval.jsonl", limit=4)
    assert [r["id"] for r in recs] == ["just-eval:0", "just-eval:1", "just-eval:2", "just-eval:3"]
    assert recs[1]["task_types"] == ["math", "reasoning"] and recs[1]["topics"] == ["arithmetic"]
    assert recs[2]["task_types"] == ["coding", "info-seek"]  # the comma-separated `task` spelling
    assert FORMATS["just-eval"].default_limit == 800
    assert len(load_records("just-eval", FIX / "just_eval.jsonl")) == 5  # fewer rows than the default 800


@pytest.mark.parametrize("fmt,name,where,field", [
    ("alpaca", "alpaca_bad.json", "[1]", "output"),
    ("dolly", "dolly_bad.jsonl", ":2", "response"),
    ("lima", "lima_bad.jsonl", ":2", "conversations"),
    ("tulu", "tulu_bad.jsonl", ":3", "messages[1]"),
    ("just-eval", "just_eval_bad.jsonl", ":2", "task_types"),
])
def test_malformed_rows_name_file_row_and_field(fmt, name, where, field):
    with pytest.raises(InputError) as err:
        load_records(fmt, FIX / name)
    msg = str(err.value)
    assert name in msg and where in msg and f"field '{field}'" in msg


def test_broken_json_line_and_unknown_format():
    with pytest.raises(InputError, match=r"broken.jsonl:2: malformed JSON"):
        load_records("alpaca", FIX / "broken.jsonl")
    with pytest.raises(InputError, match="unknown dataset format"):
        load_records("sharegpt", FIX / "alpaca.json")


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIX / "dolly.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dolly.parquet")
    assert load_records("dolly", tmp_path / "dolly.parquet") == load_records("dolly", FIX / "dolly.jsonl")


def test_hub_id_offline_is_a_clear_input_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="cannot load hub dataset 'tatsu-lab/alpaca'"):
        load_records("alpaca")  # the default hub id
    with pytest.raises(InputError, match="no default hub id"):
        load_records("alpagasus")


def test_sample_is_seeded_and_nested():
    small = load_records("tulu", FIX / "tulu.jsonl", sample=1, seed=5)
    large = load_records("tulu", FIX / "tulu.jsonl", sample=2, seed=5)
    assert len(small) == 1 and small[0] in large
    with pytest.raises(InputError, match="larger than the dataset"):
        load_records("tulu", FIX / "tulu.jsonl", sample=9)


def test_convert_writes_valid_contract_records(tmp_path):
    out = tmp_path / "lima.jsonl"
    assert convert("lima", FIX / "lima.jsonl", out) == 3
    assert [r["id"] for r in read_records(out, "instruction")] == ["lima:0", "lima:1", "lima:2"]
    out2 = tmp_path / "je.jsonl"
    convert("just-eval", FIX / "just_eval.jsonl", out2, limit=2)
    assert len(read_records(out2, "prompt")) == 2


def test_cli_data_convert(tmp_path):
    from itlens.cli import main

    out = tmp_path / "out.jsonl"
    main(["data", "convert", "--format", "dolly", "--in", str(FIX / "dolly.jsonl"), "--out", str(out),
          "--sample", "2", "--seed", "1"])
    rows = read_records(out, "instruction")
    assert len(rows) == 2 and all(r["id"].startswith("dolly:") for r in rows)


def test_cli_data_convert_bad_row_exits_2_without_output(tmp_path, capsys):
    from itlens.cli import main

    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "convert", "--format", "dolly", "--in", str(FIX / "dolly_bad.jsonl"), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dolly_bad.jsonl:2" in err[0] and "field 'response'" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("name", ["paper-llama2-7b.yaml", "gemma-geo.yaml"])
def test_shipped_study_configs_validate(name):
    """Every section passes its stage's schema (the data files are prepared by the user first, so the
    file preflight of ``load_study_config`` is not run here)."""
    from itlens.config import load_config
    from itlens.resources import CONFIGS_DIR
    from itlens.study import StudyConfig, resolve_sections

    cfg = load_config(StudyConfig, CONFIGS_DIR / name)
    resolve_sections(cfg, file=name)
    assert {"lft", "sft", "neftune"} <= set(cfg.variants)


@pytest.mark.parametrize("kw,key,needle", [({"limit": -1}, "--limit", "got -1"),
                                           ({"sample": 99}, "--sample", "larger than the dataset (3 records)"),
                                           ({"sample": 0}, "--sample", "positive")])
def test_convert_option_errors_name_the_option(kw, key, needle):
    with pytest.raises(InputError) as e:
        load_records("dolly", FIX / "dolly.jsonl", **kw)
    assert f"key '{key}'" in str(e.value) and needle in str(e.value)


def test_hub_dataset_ids_with_a_dot_are_ids_not_files(monkeypatch):
    import itlens.data as data

    asked = []
    monkeypatch.setattr(data, "_load_hub_dataset",
                        lambda hub_id, split: asked.append(hub_id) or [{"instruction": "q", "output": "a"}])
    assert load_records("alpaca", "teknium/OpenHermes-2.5")[0]["response"] == "a"
    assert asked == ["teknium/OpenHermes-2.5"]
    for missing in ("data/it.jsonl", "nowhere/x.JSON", "a/b/c"):
        with pytest.raises(InputError, match="file not found"):
            load_records("alpaca", missing)


@pytest.mark.parametrize("turns", [[{"role": "assistant", "content": "hello"}],
                                   [{"role": "system", "content": "be nice"}, {"role": "assistant", "content": "hi"}]])
def test_a_conversation_without_a_user_turn_is_an_input_error_naming_file_and_line(turns, tmp_path):
    p = tmp_path / "t.jsonl"
    ok = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p.write_text(json.dumps(ok) + "\n" + json.dumps({"id": "b", "messages": turns}) + "\n")
    with pytest.raises(InputError, match=r"t.jsonl:2: field 'messages': expected a user turn"):
        load_records("tulu", p)
    p.write_text(json.dumps({"conversations": [{"from": "gpt", "value": t["content"]} for t in turns]}) + "\n")
    with pytest.raises(InputError, match=r"t.jsonl:1: field 'conversations': expected a user turn"):
        load_records("evol", p)


def test_own_ids_must_be_real_ids_and_list_text_tags_are_lists(tmp_path):
    """tulu's own `id` of true or "" used to become 'tulu:True' / 'tulu:'; a just-eval export that stores
    task_types as the text of a list used to be split into "['reasoning'" and "'math']"."""
    row = json.loads((FIX / "tulu.jsonl").read_text().splitlines()[0])
    for bad in (True, "", "  "):
        f = tmp_path / "tulu.jsonl"
        f.write_text(json.dumps({**row, "id": bad}) + "\n")
        with pytest.raises(InputError, match=r"tulu.jsonl:1: field 'id': expected a non-empty string or integer"):
            load_records("tulu", f)
    ev = json.loads((FIX / "just_eval.jsonl").read_text().splitlines()[1])
    f = tmp_path / "just_eval.jsonl"
    f.write_text(json.dumps({**ev, "task_types": "['reasoning', 'math']"}) + "\n")
    assert load_records("just-eval", f)[0]["task_types"] == ["reasoning", "math"]
    f.write_text(json.dumps({**ev, "task_types": "['reasoning', "}) + "\n")
    with pytest.raises(InputError, match=r"field 'task_types': expected a list of strings"):
        load_records("just-eval", f)


def test_json_files_as_editors_and_exporters_write_them(tmp_path):
    """A .json file with a UTF-8 BOM (Windows editors) or holding JSON Lines (many hub exports, pandas'
    lines=True) reads like the array it stands for (both were 'malformed JSON'); a broken array names its
    line, and a lone surrogate escape is an input error, not a UnicodeEncodeError when the output is written."""
    rows = [json.loads(line) for line in (FIX / "dolly.jsonl").read_text().splitlines()]
    want = load_records("dolly", FIX / "dolly.jsonl")
    text = json.dumps(rows, indent=1, ensure_ascii=False)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    assert load_records("dolly", bom) == want
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_records("dolly", lines) == want
    lines.write_text(json.dumps(rows[0]) + "\n")  # JSON Lines of one row
    assert load_records("dolly", lines) == want[:1]
    lines.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-1] + "\n")
    with pytest.raises(InputError, match=r"lines.json:2: malformed JSON"):
        load_records("dolly", lines)
    broken = tmp_path / "broken.json"
    broken.write_text(text.replace('",\n', '"\n', 3))
    with pytest.raises(InputError, match=r"broken.json:\d+: malformed JSON: Expecting ',' delimiter \(column"):
        load_records("dolly", broken)
    lone = tmp_path / "lone.json"
    lone.write_text(json.dumps([rows[0], {**rows[1], "response": "smile \ud83d"}]))
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError, match=r"lone.json: key '\[1\]': field 'response': contains a lone UTF-16 surrogate"):
        convert("dolly", lone, out)
    assert not out.exists()


def test_an_empty_system_turn_is_dropped_not_an_error(tmp_path):
    """Exports write `{"from": "system", "value": ""}` as a placeholder: it says nothing, so the conversation
    is read without it (was: 'a turn is empty', which stopped the whole conversion)."""
    sharegpt = tmp_path / "sharegpt.json"
    conv = [{"from": "system", "value": "", "weight": None}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Yo"}]
    sharegpt.write_text(json.dumps([{"conversations": conv}]))
    assert load_records("evol", sharegpt) == [{"id": "evol:0", "instruction": "Hi", "response": "Yo"}]
    msgs = tmp_path / "tulu.jsonl"
    turns = [{"role": "system", "content": " "}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "More"},
             {"role": "assistant", "content": "No."}]
    msgs.write_text(json.dumps({"id": "x", "messages": turns}) + "\n")
    assert load_records("tulu", msgs)[0]["messages"] == turns[1:]
    msgs.write_text(json.dumps({"id": "x", "messages": [turns[1], {"role": "assistant", "content": ""}]}) + "\n")
    with pytest.raises(InputError, match=r"tulu.jsonl:1: field 'messages': a turn is empty"):
        load_records("tulu", msgs)


def test_a_dataset_saved_with_save_to_disk_is_a_source(tmp_path):
    """`datasets`' save_to_disk folders (a Dataset, or a DatasetDict read by --split) were refused as
    'expected a file'; a folder that is not one says what a source can be."""
    import datasets

    rows = [json.loads(line) for line in (FIX / "dolly.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    want = load_records("dolly", FIX / "dolly.jsonl")
    assert load_records("dolly", tmp_path / "ds") == want
    assert load_records("dolly", tmp_path / "dd", split="validation") == want
    with pytest.raises(InputError, match=r"dd: key '--split': has no split 'train' \(splits: validation\)"):
        load_records("dolly", tmp_path / "dd")
    bad = [{**r, "response": None} if i == 2 else r for i, r in enumerate(rows)]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(InputError, match=r"bad: key '\[2\]': field 'response': expected a string, got null"):
        load_records("dolly", tmp_path / "bad")
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match=r"plain: is a folder; expected a .jsonl, .json or .parquet file, or a folder"):
        load_records("dolly", tmp_path / "plain")


def test_a_missing_number_written_as_nan_never_reaches_the_output(tmp_path):
    """A parquet float column spells a missing difficulty NaN: it is left out (was: written as NaN, a
    JSONL that itlens itself then refused to read). A .json with a NaN literal is refused as JSONL is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": 1, "instruction": "q?", "task_types": ["math"], "difficulty": float("nan")},
            {"id": 2, "instruction": "r?", "task_types": ["math"], "difficulty": 3.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "je.parquet")
    out = tmp_path / "je.jsonl"
    convert("just-eval", tmp_path / "je.parquet", out)
    assert [r.get("difficulty") for r in read_records(out, "prompt")] == [None, 3.0]
    pq.write_table(pa.Table.from_pylist([{"id": 1, "instruction": "q?", "difficulty": float("nan")}]),
                   tmp_path / "med.parquet")
    assert "difficulty" not in load_records("medinstruct-test", tmp_path / "med.parquet")[0]  # was "nan"
    (tmp_path / "je.json").write_text(json.dumps(rows))
    with pytest.raises(InputError, match=r"je.json: malformed JSON: NaN is not a JSON value"):
        convert("just-eval", tmp_path / "je.json", tmp_path / "je2.jsonl")
    assert not (tmp_path / "je2.jsonl").exists()


# ------------------------------------------------------------- hub ids without network (loopback hubs)
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def silent_hub():
    """A loopback 'hub' that accepts connections and never answers (a hung proxy or firewall)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture()
def refusing_hub():
    """A loopback 'hub' that answers every request as the hub answers one for a private repo (or one that
    does not exist) without a token: 401, X-Error-Code RepoNotFound."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(401)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _convert_with_hub(endpoint: str, source: str, tmp_path: Path, **env: str):
    """``itlens data convert`` in a fresh process (the HF libraries read their settings when imported),
    online as far as the environment says, against ``endpoint`` as the hub; (result, seconds)."""
    import os
    import subprocess
    import sys
    import time

    clean = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    clean.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), **env)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "itlens.cli", "data", "convert", "--format", "alpaca", "--in",
                             source, "--out", str(tmp_path / "out.jsonl")], capture_output=True, text=True,
                            env=clean, cwd=tmp_path, timeout=120)
    return result, time.perf_counter() - start


@pytest.mark.parametrize("hub", ["closed port", "silent server"])
def test_an_uncached_hub_id_without_a_hub_fails_in_seconds_with_one_line(hub, silent_hub, tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}" if hub == "closed port" else silent_hub
    result, seconds = _convert_with_hub(endpoint, "data/alpaca", tmp_path)  # a mistyped local path, or a hub id
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no retry lines from huggingface_hub
    assert lines[0].startswith("itlens: error: data/alpaca: ") and "no local file or folder" in lines[0]
    assert "not in the local HF cache" in lines[0] and f"the hub ({endpoint}) is unreachable" in lines[0]
    assert seconds < 15, seconds  # was 25 s of retries; the hub check waits 3 s at most
    assert not (tmp_path / "out.jsonl").exists()


def test_a_cached_hub_dataset_is_read_from_the_cache_without_a_hub_or_retries(tmp_path):
    import glob
    import os
    import shutil

    import datasets

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n"
                           for i in range(3)), encoding="utf-8")
    datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=str(tmp_path / "build"))
    built = Path(next(p for p in glob.glob(str(tmp_path / "build" / "json" / "*" / "*" / "*")) if os.path.isdir(p)))
    # what datasets leaves in its cache after loading the hub dataset myorg/mydata once
    cached = tmp_path / "hf" / "datasets" / "myorg___mydata" / "default" / "0.0.0" / built.name
    shutil.copytree(built, cached)
    (cached / "json-train.arrow").rename(cached / "mydata-train.arrow")

    result, seconds = _convert_with_hub(f"http://127.0.0.1:{_closed_port()}", "myorg/mydata", tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["response"] for r in read_records(tmp_path / "out.jsonl", "instruction")] == ["a0", "a1", "a2"]
    assert result.stderr == "" and seconds < 15, (seconds, result.stderr)  # no retries, no cache notes


def test_a_hub_that_refuses_a_dataset_id_says_a_token_may_be_needed(refusing_hub, tmp_path):
    result, _ = _convert_with_hub(refusing_hub, "myorg/private-set", tmp_path, HF_TOKEN="")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load hub dataset 'myorg/private-set'" in lines[0], result.stderr
    assert "needs a token" in lines[0] and "no local file or folder" in lines[0]


def test_own_ids_are_all_or_none_and_task_types_not_empty(tmp_path):
    """A just-eval/Tulu row without its own id got its position as id ('just-eval:1') beside rows with
    their own ids, so it posed as the dataset's row 1 (or collided with it); and a prompt with an empty
    task-type list passed, to drop out of the per-task-type scores unseen. Both are errors naming the row."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"id": 5, "instruction": "x", "task": "math"}) + "\n"
                     + json.dumps({"instruction": "y", "task": "math"}) + "\n")
    with pytest.raises(InputError) as e:
        load_records("just-eval", mixed)
    assert (e.value.line, e.value.field) == (2, "id") and "earlier rows have their own id" in str(e.value)
    mixed.write_text(json.dumps({"instruction": "y", "task": "math"}) + "\n"
                     + json.dumps({"id": 5, "instruction": "x", "task": "math"}) + "\n")
    with pytest.raises(InputError, match=r"mixed.jsonl:2: field 'id': this row has its own id"):
        load_records("just-eval", mixed)
    none = tmp_path / "none.jsonl"  # no row has an id: positions, as before
    none.write_text("".join(json.dumps({"instruction": q, "task": "math"}) + "\n" for q in ("a", "b")))
    assert [r["id"] for r in load_records("just-eval", none)] == ["just-eval:0", "just-eval:1"]
    for tags in ([], "[]", " , "):
        empty = tmp_path / "empty.jsonl"
        empty.write_text(json.dumps({"id": 0, "instruction": "x", "task_types": ["math"]}) + "\n"
                         + json.dumps({"id": 1, "instruction": "x", "task_types": tags}) + "\n")
        with pytest.raises(InputError, match=r"empty.jsonl:2: field 'task_types': expected at least one task type"):
            load_records("just-eval", empty)

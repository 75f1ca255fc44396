"""The judge against a real HTTP server on 127.0.0.1 that misbehaves, and a real tiny local model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from judge_server import ASPECTS, JudgeServer, Reply, ScriptedJudge, scores_json

from itlens.config import from_dict, load_config
from itlens.errors import InputError
from itlens.judge import (ChatClient, JudgeConfig, JudgeParseError, RewriteError, Rewriter,
                          length_controlled_win_rate, pairwise_compare, paper_reference, parse_multi_aspect,
                          score_responses)

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c"


@pytest.fixture()
def api_key(monkeypatch):
    monkeypatch.setenv("ITLENS_TEST_JUDGE_KEY", SECRET)
    return SECRET


def make_cfg(server: JudgeServer, tmp_path: Path, **kw) -> JudgeConfig:
    base = dict(base_url=server.base_url, model="judge-test", api_key_env="ITLENS_TEST_JUDGE_KEY",
                timeout_s=0.5, max_attempts=3, backoff_initial_s=0.01, backoff_max_s=0.05,
                max_retry_after_s=1.0, concurrency=4, cache_dir=str(tmp_path / "cache"),
                bootstrap_samples=200, figures=False)
    base.update(kw)
    return from_dict(JudgeConfig, base)


def resp(i: str, text: str, model: str = "m1", tags=None, instruction: str | None = None) -> dict:
    rec = {"id": i, "instruction": instruction or f"question {i}?", "response": text, "model": model}
    if tags is not None:
        rec["task_types"] = tags
    return rec


def assert_no_secret(folder: Path, caplog_text: str = "") -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in caplog_text


# ------------------------------------------------------------------------------------- parsing
def test_parse_multi_aspect_validates_and_never_imputes():
    ok = parse_multi_aspect("```json\n" + scores_json(depth="2", clarity=5) + "\n```")
    assert ok["scores"] == {"helpfulness": 4, "clarity": 5, "factuality": 4, "depth": 2, "engagement": 4}
    bad = [scores_json(depth=6), scores_json(depth=0), scores_json(depth="N/A"), scores_json(depth=3.5),
           scores_json(depth="high"), scores_json(depth=None), scores_json()[:-40], "Score: 5/5",
           json.dumps({a: {"score": 4} for a in ASPECTS[:4]}), "[1, 2, 3]"]
    for text in bad:
        with pytest.raises(JudgeParseError):
            parse_multi_aspect(text)


# --------------------------------------------------------------------- misbehaving endpoint
def test_score_responses_every_item_scored_or_counted_failure(tmp_path, api_key, caplog):
    caplog.set_level(logging.DEBUG)
    bad = scores_json()[:50]
    scripts = {
        "429": [Reply(status=429, headers={"Retry-After": "0.3"}), Reply(scores_json(depth=2))],
        "500once": [Reply(status=500), Reply(scores_json(depth=3))],
        "500ever": [Reply(status=500)],
        "hangonce": [Reply(hang_s=3), Reply(scores_json(depth=5))],
        "hangever": [Reply(hang_s=3)],
        "nonjson_then_ok": [Reply("I think it is rather good."), Reply(scores_json(clarity=2))],
        "truncated": [Reply(bad, finish_reason="length")],
        "range": [Reply(scores_json(helpfulness=7))],
        "notnum": [Reply(scores_json(factuality="excellent"))],
        "na": [Reply(scores_json(depth="N/A"))],
        "badbody": [Reply(raw_body=b"<html>oops</html>"), Reply(raw_body=b'{"id": 1}')],
    }
    rows = [resp(f"q{i}", f"plain answer {i} <<score:{i % 5 + 1}>>", tags=["info-seek"]) for i in range(5)]
    rows += [resp(name, f"answer <<{name}>>", tags=["math"]) for name in scripts]
    with JudgeServer(ScriptedJudge(scripts), api_key=SECRET) as srv:
        cfg = make_cfg(srv, tmp_path)
        t0 = time.monotonic()
        result = score_responses(rows, cfg)
        elapsed = time.monotonic() - t0
        out = result.write(tmp_path / "run")
        assert all(r["authorization"] == f"Bearer {SECRET}" for r in srv.requests)
        # Retry-After honoured: the retry came no sooner than the server asked.
        t429 = [r["time"] for r in srv.requests_with("429")]
        assert len(t429) == 2 and t429[1] - t429[0] >= 0.29
        # Bounded attempts: a server that always fails is asked exactly max_attempts times.
        assert len(srv.requests_with("500ever")) == cfg.max_attempts
        assert len(srv.requests_with("hangever")) == cfg.max_attempts
        assert len(srv.requests_with("badbody")) == cfg.max_attempts
        # Re-asked once, then counted.
        assert len(srv.requests_with("truncated")) == 2
        assert len(srv.requests_with("nonjson_then_ok")) == 2
    assert elapsed < 20

    items = {it["id"]: it for it in result.items}
    expected = {"429": "ok", "500once": "ok", "500ever": "api_failure", "hangonce": "ok", "hangever": "api_failure",
                "nonjson_then_ok": "ok", "truncated": "parse_failure", "range": "parse_failure",
                "notnum": "parse_failure", "na": "parse_failure", "badbody": "api_failure"}
    for name, status in expected.items():
        assert items[name]["status"] == status, (name, items[name])
        if status != "ok":
            assert items[name]["scores"] is None and items[name]["mean"] is None and items[name]["error"]
    assert items["429"]["scores"]["depth"] == 2 and items["hangonce"]["scores"]["depth"] == 5
    assert items["nonjson_then_ok"]["scores"]["clarity"] == 2 and items["nonjson_then_ok"]["asked"] == 2
    assert "cut off" in items["truncated"]["error"]
    assert items["429"]["attempts"] == 2 and items["500ever"]["attempts"] == 3 and items["truncated"]["asked"] == 2
    for i in range(5):
        assert items[f"q{i}"]["scores"] == {a: i % 5 + 1 for a in ASPECTS}

    s = result.summary
    assert s["n_items"] == len(rows) and s["failures"] == {"parse": 4, "api": 3} and s["n_scored"] == 9
    m1 = s["models"]["m1"]
    scored = [it for it in result.items if it["status"] == "ok"]
    for a in ASPECTS:  # means over scored items only: nothing imputed for failures
        assert m1["aspects"][a]["estimate"] == pytest.approx(np.mean([it["scores"][a] for it in scored]))
        assert m1["aspects"][a]["n"] == 9
        assert m1["aspects"][a]["low"] <= m1["aspects"][a]["estimate"] <= m1["aspects"][a]["high"]
    assert m1["task_types"]["info-seek"]["estimate"] == pytest.approx(3.0)
    assert m1["task_type_failures"]["math"] == {"parse": 4, "api": 3}
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.yaml", "judge.jsonl", "summary.json"]
    assert len((out / "judge.jsonl").read_text().splitlines()) == len(rows)
    assert_no_secret(tmp_path, caplog.text)


def test_rerun_is_served_from_cache(tmp_path, api_key):
    rows = [resp(f"q{i}", f"answer {i} <<score:{i % 5 + 1}>>") for i in range(4)]
    rows.append(resp("bad", "answer <<bad>>"))
    with JudgeServer(ScriptedJudge({"bad": [Reply("not json")]})) as srv:
        cfg = make_cfg(srv, tmp_path)
        first = score_responses(rows, cfg)
        n = len(srv.requests)
        second = score_responses(rows, cfg)
        assert len(srv.requests) == n == 4 + 2  # nothing new asked; the bad item was asked twice
    assert second.summary == first.summary
    assert all(it["cached"] for it in second.items)
    assert [it["scores"] for it in second.items] == [it["scores"] for it in first.items]
    cache_files = list((tmp_path / "cache").rglob("*.json"))
    assert len(cache_files) == n
    assert_no_secret(tmp_path)


def test_key_problems_are_input_errors_without_the_key(tmp_path, monkeypatch):
    with JudgeServer(api_key="the-right-one") as srv:
        cfg = make_cfg(srv, tmp_path)
        monkeypatch.delenv("ITLENS_TEST_JUDGE_KEY", raising=False)
        with pytest.raises(InputError, match="ITLENS_TEST_JUDGE_KEY is not set"):
            score_responses([resp("a", "x")], cfg)
        monkeypatch.setenv("ITLENS_TEST_JUDGE_KEY", SECRET)
        with pytest.raises(InputError, match="HTTP 401") as err:
            score_responses([resp("a", "x")], cfg)
        assert SECRET not in str(err.value) and SECRET not in repr(ChatClient(cfg))


def test_config_is_strict(tmp_path):
    with pytest.raises(InputError, match="unknown key"):
        from_dict(JudgeConfig, {"modle": "x"})
    with pytest.raises(InputError, match="max_attempts"):
        from_dict(JudgeConfig, {"max_attempts": 0})
    with pytest.raises(InputError, match="paper_reference"):
        from_dict(JudgeConfig, {"paper_reference": ["LLaMa-2 7B LFT | Alpaca 53K | just-eval-instruct 1k"]})
    yml = tmp_path / "j.yaml"
    yml.write_text("backend: local\nmodel: /some/dir\n")
    cfg = load_config(JudgeConfig, yml, ["temperature=0.5", "params={seed: 1}"])
    assert (cfg.backend, cfg.temperature, cfg.params) == ("local", 0.5, {"seed": 1})


# --------------------------------------------------------------------------------- aggregation
def test_task_type_means_follow_the_paper(tmp_path, api_key):
    rows = [resp("a", "<<score:5>>", tags=["coding", "math"]), resp("b", "<<score:3>>", tags=["coding"]),
            resp("c", "<<score:1>>", tags="Math"), resp("d", "<<score:2>>", model="m2", tags=["writing"])]
    with JudgeServer() as srv:
        s = score_responses(rows, make_cfg(srv, tmp_path)).summary
    m1 = s["models"]["m1"]
    assert m1["task_types"]["coding"]["estimate"] == pytest.approx(4.0)
    assert m1["task_types"]["math"]["estimate"] == pytest.approx(3.0)  # an item counts toward each tag
    assert m1["overall"]["estimate"] == pytest.approx(3.0)
    assert s["models"]["m2"]["aspects"]["depth"]["estimate"] == 2.0
    assert set(s["models"]) == {"m1", "m2"}


# ------------------------------------------------------------------------------------ pairwise
def test_pairwise_both_orders_ties_and_failures(tmp_path, api_key):
    a = [resp(f"p{i}", "a long and detailed answer " * (2 if i % 3 else 1), model="A") for i in range(6)]
    b = [resp(f"p{i}", "a medium answer here " * (1 if i % 3 else 2) + "!", model="B") for i in range(6)]
    a.append(resp("pos", "short <<pos>>", model="A"))
    b.append(resp("pos", "a much longer answer", model="B"))
    a.append(resp("broken", "x <<broken>>", model="A"))
    b.append(resp("broken", "y", model="B"))
    a.append(resp("only_in_a", "z", model="A"))
    scripts = {"pos": [Reply(json.dumps({"winner": "A"}))], "broken": [Reply('{"winner": "C"}')]}
    with JudgeServer(ScriptedJudge(scripts)) as srv:
        res = pairwise_compare(a, b, make_cfg(srv, tmp_path))
        prompts = [r["body"]["messages"][0]["content"] for r in srv.requests_with("pos")]
        # Both orders were asked (requests run concurrently, so they may arrive in either order).
        assert sorted(p.index("<<pos>>") < p.index("much longer") for p in prompts) == [False, True]
    items = {it["id"]: it for it in res.items}
    assert "only_in_a" not in items and len(items) == 8
    assert items["pos"]["winner"] == "tie" and items["pos"]["a_first"] == "a" and items["pos"]["b_first"] == "b"
    assert items["broken"]["status"] == "parse_failure" and items["broken"]["winner"] is None
    s = res.summary
    # A is longer on 4 of the 6 regular pairs and the judge picks the longer answer.
    assert (s["wins_a"], s["wins_b"], s["ties"], s["failures"]["parse"]) == (4, 2, 1, 1)
    assert s["win_rate_a"]["estimate"] == pytest.approx((4 + 0.5) / 7)
    assert s["order_consistency"] == pytest.approx(6 / 7) and s["longer_wins"] == 1.0
    assert s["lc_win_rate_a"]["estimate"] is not None
    out = res.write(tmp_path / "pw")
    assert (out / "pairwise.jsonl").is_file() and json.loads((out / "summary.json").read_text())["n_pairs"] == 8


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    rng = np.random.default_rng(0)
    len_b = rng.integers(200, 400, size=300).astype(float)
    len_a = len_b + rng.normal(120, 150, size=300)  # A is usually longer, but no better
    delta = len_a - len_b
    pref = 1 / (1 + np.exp(-3 * np.tanh(delta / delta.std())))  # the judge only likes length
    assert pref.mean() > 0.65
    assert length_controlled_win_rate(pref, len_a, len_b) == pytest.approx(0.5, abs=0.01)
    # And a real quality edge survives length control.
    pref2 = 1 / (1 + np.exp(-(1.0 + 3 * np.tanh(delta / delta.std()))))
    assert length_controlled_win_rate(pref2, len_a, len_b) == pytest.approx(1 / (1 + np.exp(-1.0)), abs=0.01)


# ------------------------------------------------------------------------------------ rewriter
def test_rewriter_over_http(tmp_path, api_key):
    with JudgeServer(ScriptedJudge({"fail": [Reply(status=500)]})) as srv:
        rw = Rewriter(make_cfg(srv, tmp_path))
        out = rw("Name a primary colour.", "Red is one. There are also others, with a long history.")
        assert out == "Red is one."
        body = srv.requests[-1]["body"]["messages"][0]["content"]
        assert "Name a primary colour." in body and "long history" in body
        assert rw.rewrite_many([("q1", "First. Second."), ("q2", "Alpha. Beta.")]) == ["First.", "Alpha."]
        with pytest.raises(RewriteError, match="HTTP 500"):
            rw.rewrite("q", "text <<fail>>")


# -------------------------------------------------------------------------------- local backend
def test_local_backend_counts_garbage_as_parse_failures(tmp_path, tiny_model_dir):
    rows = [resp("a", "the city is north.", tags=["info-seek"]), resp("b", "happy to help.", tags=["writing"])]
    cfg = from_dict(JudgeConfig, {"backend": "local", "model": str(tiny_model_dir), "max_tokens": 12,
                                  "cache_dir": str(tmp_path / "cache"), "bootstrap_samples": 50, "figures": False})
    result = score_responses(rows, cfg)
    assert [it["status"] for it in result.items] == ["parse_failure", "parse_failure"]
    assert all(it["asked"] == 2 and it["scores"] is None and it["raw"] for it in result.items)
    assert result.summary["n_scored"] == 0 and result.summary["failures"]["parse"] == 2
    assert result.summary["models"]["m1"]["aspects"]["depth"]["estimate"] is None
    # the tiny model's replies are empty (it ends at a special token at once): not cached, so asked again; greedy
    # decoding gives the same answers
    assert all(r.strip() == "" for it in result.items for r in it["raw"])
    assert not list((tmp_path / "cache").rglob("*.json"))
    again = score_responses(rows, cfg)
    assert not any(it["cached"] for it in again.items) and again.summary == result.summary


# ------------------------------------------------------------------------------ figures and CLI
def test_paper_reference_lookup():
    ref = paper_reference("llama-2 7b lft | Alpaca 52K | just-eval-instruct 1k")
    assert ref["aspects"]["helpfulness"] == 3.36 and ref["task_types"]["writing"] == 3.3
    assert paper_reference("LLaMa-2 7B LFT | chatgpt 9k | just-eval-instruct 1k")["task_types"]["writing"] is None


def test_cli_judge_and_pairwise(tmp_path, api_key, capsys):
    from itlens.cli import main

    rows = [resp(f"q{i}", f"answer {i} <<score:{i % 5 + 1}>>", tags=[t]) for i, t in
            enumerate(["coding", "math", "writing", "coding", "info-seek", "math"])]
    rows_b = [dict(r, response=r["response"] + " and more words", model="m2") for r in rows]
    fa, fb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    fa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fb.write_text("".join(json.dumps(r) + "\n" for r in rows_b))
    with JudgeServer() as srv:
        cfg_file = tmp_path / "judge.yaml"
        cfg_file.write_text(f"base_url: {srv.base_url}\napi_key_env: ITLENS_TEST_JUDGE_KEY\n"
                            f"cache_dir: {tmp_path / 'cache'}\nbootstrap_samples: 100\n")
        sets = ["--set", "paper_reference=['LLaMa-2 7B LFT | Alpaca 52K | just-eval-instruct 1k']"]
        main(["judge", str(cfg_file), "--responses", str(fa), "--out", str(tmp_path / "j"), *sets])
        main(["judge", str(cfg_file), "--pairwise", str(fa), str(fb), "--out", str(tmp_path / "p")])
    summary = json.loads((tmp_path / "j" / "summary.json").read_text())
    assert summary["n_scored"] == 6 and summary["judge"]["paper_judge"] is True
    assert (tmp_path / "j" / "radar_aspects.png").stat().st_size > 1000
    assert (tmp_path / "j" / "radar_task_types.png").stat().st_size > 1000
    pw = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert pw["wins_b"] == 6 and pw["win_rate_a"]["estimate"] == 0.0
    assert "judged 6" in capsys.readouterr().out

    fa.write_text('{"id": "x", "instruction": "q", "model": "m"}\n')
    with pytest.raises(SystemExit) as ex:
        main(["judge", str(cfg_file), "--responses", str(fa), "--out", str(tmp_path / "bad")])
    assert ex.value.code == 2 and not (tmp_path / "bad").exists()
    err = capsys.readouterr().err
    assert "a.jsonl:1" in err and "response" in err
    with pytest.raises(SystemExit) as ex:
        main(["judge", "--out", str(tmp_path / "bad")])
    assert ex.value.code == 2
    assert_no_secret(tmp_path)


def _completion(message) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "judge-test",
                       "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}).encode()


def test_replies_that_are_not_chat_completions_are_retried_then_counted(tmp_path, api_key):
    """Bodies the openai SDK accepts without validating: counted api failures, never a crash."""
    scripts = {
        "nullmessage": [Reply(raw_body=_completion(None))],
        "choicestring": [Reply(raw_body=json.dumps({"id": "c", "object": "chat.completion", "created": 0,
                                                    "model": "m", "choices": "oops"}).encode())],
        "numbercontent": [Reply(raw_body=_completion({"role": "assistant", "content": 5}))],
        "floatscore": [Reply(scores_json(depth=4.0, clarity="2"))],
    }
    rows = [resp(name, f"answer <<{name}>>") for name in scripts]
    with JudgeServer(ScriptedJudge(scripts), api_key=SECRET) as srv:
        result = score_responses(rows, make_cfg(srv, tmp_path))
        assert len(srv.requests_with("numbercontent")) == 3  # retried up to max_attempts
    items = {it["id"]: it for it in result.items}
    for name in ("nullmessage", "choicestring", "numbercontent"):
        assert items[name]["status"] == "api_failure" and items[name]["error"], items[name]
    assert items["floatscore"]["status"] == "ok"
    assert items["floatscore"]["scores"]["depth"] == 4 and items["floatscore"]["scores"]["clarity"] == 2


@pytest.mark.parametrize("setting, needle", [
    ("params.top_k=40", "key 'params.top_k': not a parameter of the chat-completions API"),
    ("params.temperature=0.5", "key 'params.temperature': params may not set 'temperature'"),
    ("temperature=.nan", "key 'temperature': expected a finite number"),
    ("timeout_s=0", "key 'timeout_s': expected a finite number > 0"),
    ("reask_prompt_file=nothere.txt", "nothere.txt: key 'reask_prompt_file': prompt file not found"),
])
def test_bad_judge_settings_fail_before_any_request(tmp_path, api_key, capsys, setting, needle):
    from itlens.cli import main

    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(resp("a", "an answer")) + "\n")
    with JudgeServer() as srv:
        with pytest.raises(SystemExit) as ex:
            main(["judge", "--responses", str(f), "--out", str(tmp_path / "out"), "--set", f"base_url={srv.base_url}",
                  "--set", "api_key_env=ITLENS_TEST_JUDGE_KEY", "--set", f"cache_dir={tmp_path / 'cache'}",
                  "--set", setting])
        assert srv.requests == []
    assert ex.value.code == 2 and not (tmp_path / "out").exists()
    assert needle in capsys.readouterr().err


def test_judge_record_errors_name_the_file_and_line(tmp_path, api_key, capsys):
    from itlens.cli import main

    a, b, t = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "t.jsonl"
    a.write_text("".join(json.dumps(resp(f"q{i}", "x")) + "\n" for i in range(3)))
    b.write_text("".join(json.dumps(resp(f"q{i}", "y", instruction="other?" if i == 2 else None)) + "\n"
                         for i in range(3)))
    t.write_text(json.dumps(resp("q0", "x")) + "\n" + json.dumps(resp("q1", "x", tags=5)) + "\n")
    with JudgeServer() as srv:
        sets = ["--set", f"base_url={srv.base_url}", "--set", "api_key_env=ITLENS_TEST_JUDGE_KEY"]
        for args, needle in ((["--responses", str(t)], "t.jsonl:2: field 'task_types'"),
                             (["--pairwise", str(a), str(b)], f"b.jsonl:3: field 'instruction': id 'q2' answers "
                                                              f"a different instruction than {a}:3")):
            with pytest.raises(SystemExit) as ex:
                main(["judge", *args, "--out", str(tmp_path / "out"), *sets])
            assert ex.value.code == 2 and needle in capsys.readouterr().err
        assert srv.requests == []


def test_a_key_given_where_its_variable_name_goes_is_never_echoed(tmp_path, monkeypatch, capsys):
    """`api_key_env: sk-...` (the key pasted in place of the variable's name) is refused without showing it;
    a name with lower-case letters that is not set is not shown either (was: "environment variable sk-... is
    not set" on stderr, in logs)."""
    from itlens.cli import main

    rpath = tmp_path / "r.jsonl"
    rpath.write_text(json.dumps(resp("a", "x")) + "\n")
    monkeypatch.delenv("gsk_abcdefABCDEF0123456789", raising=False)
    for value in (SECRET, "gsk_abcdefABCDEF0123456789"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["judge", "--responses", str(rpath), "--out", str(tmp_path / "j"), "--set", f"api_key_env={value}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "key 'api_key_env'" in err and value not in err, err
        assert not (tmp_path / "j").exists()
    with pytest.raises(InputError, match="not the key itself") as err:
        from_dict(JudgeConfig, {"api_key_env": SECRET})
    assert SECRET not in str(err.value)
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)  # an ordinary name is still named
    with pytest.raises(InputError, match="MY_JUDGE_KEY is not set"):
        ChatClient(from_dict(JudgeConfig, {"api_key_env": "MY_JUDGE_KEY", "base_url": "http://127.0.0.1:9/v1",
                                           "cache": False}))._openai_client()


def test_a_local_judge_model_that_is_not_there_is_named(tmp_path):
    """backend local with a folder that does not exist: "not found", not "couldn't connect to huggingface.co"."""
    from itlens.judge.client import LocalChatModel

    with pytest.raises(InputError, match="key 'model': cannot load a local judge model: model directory not found"):
        LocalChatModel(str(tmp_path / "no-such-model"))


# ----------------------------------------------------------------------------- review regressions
class _CountingJudge:
    """Answers request k (1-based, in arrival order) with every score = k (capped at 5)."""

    def __init__(self):
        self.n = 0
        self._lock = threading.Lock()

    def __call__(self, body):
        with self._lock:
            self.n += 1
            k = min(self.n, 5)
        time.sleep(0.05)  # keep concurrent duplicates in flight together
        return Reply(scores_json({a: k for a in ASPECTS}))


def test_identical_requests_are_sent_once_and_a_rerun_replays_them(tmp_path, api_key):
    """Two generators giving the same answer to the same prompt: one request, one shared answer (was: two
    concurrent paid requests, scores that depended on which finished first, a rerun replaying the other one)."""
    rows = [resp(f"x{i}", "the same answer", model=f"m{i}", instruction="same question?") for i in range(3)]
    judge = _CountingJudge()
    with JudgeServer(judge) as srv:
        cfg = make_cfg(srv, tmp_path)
        first = score_responses(rows, cfg)
        assert judge.n == 1
        again = score_responses(rows, cfg)
        assert judge.n == 1
    assert [it["scores"] for it in first.items] == [it["scores"] for it in again.items] == [
        {a: 1 for a in ASPECTS}] * 3
    assert again.summary == first.summary


@pytest.mark.parametrize("params", [{"extra_headers": {"Authorization": f"Bearer {SECRET}"}},
                                    {"extra_headers": {"api-key": SECRET}},
                                    {"extra_query": {"key": SECRET}},
                                    {"extra_body": {"auth": {"access_token": SECRET}}}])
def test_a_key_smuggled_into_params_is_refused(tmp_path, params):
    """params are written to summary.json, config.resolved.yaml and the cache (was: accepted, so the key landed
    in all three)."""
    with pytest.raises(InputError, match=r"key 'params\.extra_\w+\.[\w.-]+': params may not carry a credential") as e:
        from_dict(JudgeConfig, {"params": params, "api_key_env": "", "cache_dir": str(tmp_path)})
    assert SECRET not in str(e.value)
    from_dict(JudgeConfig, {"params": {"seed": 1, "extra_body": {"top_k": 40}}, "api_key_env": ""})  # still fine
    schema = {"type": "object", "properties": {"key": {"type": "string"}, "token": {"type": "integer"}}}
    from_dict(JudgeConfig, {"params": {"extra_body": {"guided_json": schema}}, "api_key_env": ""})  # not credentials


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "localhost:8000", "ftp://host/v1", "http:///v1"])
def test_a_base_url_that_is_not_an_http_url_fails_before_any_request(url):
    """(was: every request a connection error, retried with backoff, every item an api failure, exit 0)"""
    with pytest.raises(InputError, match="key 'base_url': expected an http:// or https:// URL"):
        from_dict(JudgeConfig, {"base_url": url, "api_key_env": ""})
    from_dict(JudgeConfig, {"backend": "local", "model": "/some/dir", "base_url": url})  # unused there


def test_a_pairwise_failure_carries_the_error_of_its_status(tmp_path, api_key):
    """A shown first: unparsable; B shown first: HTTP 500. The pair is an api failure and says so (was: the
    parse error as the api failure's error)."""
    def judge(body):
        shown_first = body["messages"][0]["content"].split("[Answer A]\n", 1)[1]
        return Reply("not json") if shown_first.startswith("<<A>>") else Reply(status=500)

    with JudgeServer(judge) as srv:
        res = pairwise_compare([resp("p", "<<A>> a", model="A")], [resp("p", "<<B>> b", model="B")],
                               make_cfg(srv, tmp_path, max_attempts=2))
    item = res.items[0]
    assert item["status"] == "api_failure" and "HTTP 500" in item["error"], item
    assert res.summary["failures"] == {"parse": 0, "api": 1}


def test_an_integer_temperature_from_python_hits_the_yaml_runs_cache(tmp_path, api_key):
    """``JudgeConfig(temperature=0)`` and YAML ``temperature: 0`` (coerced to 0.0) are one judge (was: two cache
    keys, so a notebook rerun of a CLI run paid for every answer again and could get different ones)."""
    rows = [resp(f"q{i}", f"answer {i}") for i in range(3)]
    with JudgeServer() as srv:
        cfg = make_cfg(srv, tmp_path)
        assert cfg.temperature == 0.0
        score_responses(rows, cfg)
        n = len(srv.requests)
        again = score_responses(rows, dataclasses.replace(cfg, temperature=0))
        assert len(srv.requests) == n
    assert all(it["cached"] for it in again.items)


def test_a_cache_entry_that_is_not_an_object_is_ignored(tmp_path, api_key, caplog):
    """(was: AttributeError: 'NoneType' object has no attribute 'get', the whole run lost)"""
    rows = [resp("a", "an answer <<score:2>>")]
    with JudgeServer() as srv:
        cfg = make_cfg(srv, tmp_path)
        score_responses(rows, cfg)
        entry = next((tmp_path / "cache").rglob("*.json"))
        entry.write_text("null")
        again = score_responses(rows, cfg)
        assert len(srv.requests) == 2
    assert again.items[0]["status"] == "ok" and again.items[0]["scores"]["depth"] == 2
    assert "ignoring unusable cache entry" in caplog.text
    assert json.loads(entry.read_text())["content"]  # rewritten with the new answer


def test_an_endpoint_wanting_a_key_when_none_is_configured_says_so(tmp_path):
    """api_key_env '' against an endpoint with auth (was: "endpoint refused the API key from $ (HTTP 401)")."""
    with JudgeServer(api_key=SECRET) as srv:
        cfg = make_cfg(srv, tmp_path, api_key_env="")
        with pytest.raises(InputError, match="key 'api_key_env': endpoint requires an API key \\(HTTP 401\\); "
                                             "set api_key_env"):
            score_responses([resp("a", "x")], cfg)


def test_a_key_given_twice_in_a_reply_is_invalid_not_last_wins(tmp_path, api_key):
    """Two "depth" entries: which one the judge meant is unknown (was: json.loads kept the last, silently)."""
    dup = scores_json()[:-1] + ', "depth": {"reason": "on second thought", "score": 1}}'
    with pytest.raises(JudgeParseError, match='"depth" is given twice'):
        parse_multi_aspect(dup)
    with JudgeServer(ScriptedJudge({"dup": [Reply(dup), Reply(scores_json(depth=2))]})) as srv:
        item = score_responses([resp("d", "answer <<dup>>")], make_cfg(srv, tmp_path)).items[0]
    assert item["status"] == "ok" and item["asked"] == 2 and item["scores"]["depth"] == 2


def test_an_unknown_model_is_one_input_error_not_an_api_failure_per_item(tmp_path, api_key):
    """HTTP 404 (a typo in model, or base_url without /v1) is the same for every item (was: every item an api
    failure and exit 0; in a study, a finished stage that reruns reused)."""
    with JudgeServer(ScriptedJudge({}, default=lambda body: Reply(status=404))) as srv:
        with pytest.raises(InputError, match="key 'model': the endpoint has no model 'judge-test' \\(HTTP 404\\)"):
            score_responses([resp(f"q{i}", "x") for i in range(8)], make_cfg(srv, tmp_path))
        assert len(srv.requests) <= 8  # not retried


# ------------------------------------------------------------------- keys and endpoints (Azure, OpenRouter)
def _headers(request: dict, name: str) -> list[str]:
    return [v for k, v in request["headers"] if k.lower() == name.lower()]


def test_the_key_goes_in_the_named_header_and_nowhere_else(tmp_path, api_key, caplog, capsys):
    """Azure OpenAI: the bare key in ``api-key``, no Authorization header at all, and Azure's deployment URL with
    its api-version query as pasted from the portal (was: the query ended up before the path,
    ``/v1?api-version=...chat/completions``, a 404). The key is in no file, log line or output."""
    from itlens.cli import main

    caplog.set_level(logging.DEBUG)
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(resp(f"q{i}", f"answer {i} <<score:{i % 5 + 1}>>")) + "\n" for i in range(4)))
    with JudgeServer(api_key=SECRET, api_key_header="api-key") as srv:
        base = srv.base_url.replace("/v1", "/openai/deployments/judge-test") + "?api-version=2024-10-21"
        cfg_file = tmp_path / "azure.yaml"
        cfg_file.write_text(f"base_url: {base}\nmodel: judge-test\napi_key_env: ITLENS_TEST_JUDGE_KEY\n"
                            f"api_key_header: api-key\ncache_dir: {tmp_path / 'cache'}\nbootstrap_samples: 50\n"
                            "figures: false\nparams: {extra_headers: {X-Title: itlens}}\n")
        with pytest.MonkeyPatch.context() as mp:  # an ambient Authorization (openai 3.x reads this variable)
            mp.setenv("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer ambient-from-the-environment")
            main(["judge", str(cfg_file), "--responses", str(f), "--out", str(tmp_path / "out")])
        assert len(srv.requests) == 4
        for r in srv.requests:
            assert _headers(r, "api-key") == [SECRET]
            assert _headers(r, "Authorization") == []  # neither "Bearer <key>" nor "Bearer none"
            assert _headers(r, "X-Title") == ["itlens"]  # params.extra_headers still sent beside the key
            assert r["path"] == "/openai/deployments/judge-test/chat/completions?api-version=2024-10-21"
    out, err = capsys.readouterr()
    assert "judged 4: 4 scored" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["judge"]["base_url"] == base  # the endpoint as given, api-version included
    assert "api_key_header: api-key" in (tmp_path / "out" / "config.resolved.yaml").read_text()
    assert_no_secret(tmp_path, caplog.text + out + err)


def test_a_key_refused_names_the_variable_and_the_header_never_the_key(tmp_path, api_key):
    """The endpoint wants ``api-key``: sent as Bearer, the 401 says so and points at api_key_header; sent in the
    header but wrong, it names the header. Neither message quotes the key, nor the server's message (which quotes
    part of what it got, as OpenAI's does)."""
    with JudgeServer(api_key="the-right-one", api_key_header="api-key") as srv:
        for header, needle in (("Authorization", "sent as Authorization: Bearer; an endpoint that wants it in another "
                                                 "header, such as Azure OpenAI's api-key, needs api_key_header"),
                               ("api-key", "sent in the api-key header")):
            cfg = make_cfg(srv, tmp_path, api_key_header=header)
            with pytest.raises(InputError) as e:
                score_responses([resp("a", "x")], cfg)
            msg = str(e.value)
            assert msg.startswith("key 'api_key_env': endpoint refused the API key from $ITLENS_TEST_JUDGE_KEY "
                                  "(HTTP 401, ") and needle in msg, msg
            assert SECRET[:10] not in msg and "Incorrect API key" not in msg and "\n" not in msg
        with pytest.raises(InputError, match=r"key 'api_key_env': endpoint requires an API key \(HTTP 401\); set "
                                             r"api_key_env .* api_key_header"):
            score_responses([resp("a", "x")], make_cfg(srv, tmp_path, api_key_env=""))
    with JudgeServer(api_key=SECRET) as srv:  # "authorization" in any case is the usual Bearer
        item = score_responses([resp("a", "x")], make_cfg(srv, tmp_path, api_key_header="authorization")).items[0]
        assert item["status"] == "ok" and srv.requests[0]["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("setting, needle", [
    ({"api_key_header": "api key"}, "expected the NAME of an HTTP header"),
    ({"api_key_header": ""}, "expected the NAME of an HTTP header"),
    ({"api_key_header": SECRET + "0123456789abcdefghijklmnop"}, "not the key itself; the value given is not shown"),
    ({"api_key_header": "Content-Type"}, "the HTTP client sets it itself"),
    ({"api_key_header": "Proxy-Authorization"}, "a proxy would consume it"),
    ({"api_key_header": "X-Stainless-Lang"}, "the HTTP client sets it itself"),
    ({"api_key_header": "api-key", "api_key_env": ""}, "but api_key_env is '' (no key)"),
])
def test_a_bad_key_header_is_one_line_naming_api_key_header(setting, needle):
    with pytest.raises(InputError) as e:
        from_dict(JudgeConfig, setting)
    msg = str(e.value)
    assert msg.startswith("key 'api_key_header': ") and needle in msg and "\n" not in msg, msg
    assert SECRET not in msg


def test_the_key_header_may_not_be_set_again_in_params(tmp_path):
    """Sent per request, params.extra_headers would replace the key (and its value is written to summary.json)."""
    with pytest.raises(InputError, match=r"key 'params\.extra_headers\.X-Gateway-Auth': params\.extra_headers may "
                                         r"not set 'X-Gateway-Auth': it is api_key_header"):
        from_dict(JudgeConfig, {"api_key_header": "X-Gateway-Auth", "params": {"extra_headers": {"x-gateway-auth": "v"}}})


@pytest.mark.parametrize("url, what", [
    ("https://user:{s}@example.com/v1", "user:password@ before the host"),
    ("https://{s}@example.com/v1", "user:password@ before the host"),
    ("https://example.com/v1?key={s}", "the query parameter 'key'"),
    ("https://example.com/v1?api_key={s}", "the query parameter 'api_key'"),
    ("https://example.com/v1?api-version=2024-10-21&api-key={s}", "the query parameter 'api-key'"),
    ("https://example.com/v1?token={s}", "the query parameter 'token'"),
    ("https://example.com/v1?access_token={s}", "the query parameter 'access_token'"),
    ("https://example.com/v1?sig={s}&se=2030", "the query parameter 'sig'"),
    ("https://example.com/v1?X-Amz-Signature={s}", "the query parameter 'X-Amz-Signature'"),
    ("https://example.com/v1?password={s}", "the query parameter 'password'"),
    ("https://example.com/v1?client_secret={s}", "the query parameter 'client_secret'"),
    ("https://example.com/api?code={s}", "the query parameter 'code'"),
])
def test_a_base_url_with_credentials_is_refused_without_echoing_them(tmp_path, capsys, url, what):
    """base_url is written to summary.json, config.resolved.yaml and every cache key (was: accepted, so a key in
    it landed in all three). Refused for every backend, before any request, in one line that says where the key
    goes instead; the URL is never echoed."""
    from itlens.cli import main

    url = url.format(s=SECRET)
    with pytest.raises(InputError) as e:
        from_dict(JudgeConfig, {"base_url": url})
    msg = str(e.value)
    assert msg.startswith("key 'base_url': may not carry ") and what in msg and "\n" not in msg, msg
    assert "the key goes in the environment variable named by api_key_env" in msg and SECRET not in msg
    with pytest.raises(InputError, match="key 'base_url': may not carry"):
        from_dict(JudgeConfig, {"base_url": url, "backend": "local", "model": "/some/dir"})
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(resp("a", "x")) + "\n")
    with pytest.raises(SystemExit) as ex:
        main(["judge", "--responses", str(f), "--out", str(tmp_path / "out"), "--set", f"base_url={url}"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "key 'base_url'" in err and SECRET not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_base_url_with_plain_query_parameters_is_allowed_and_they_are_sent(tmp_path, api_key):
    """api-version (Azure's deployment URLs) and other non-secret parameters stay allowed, and reach the endpoint
    on every request; a fragment (never sent) or a parameter given twice is refused."""
    for url in ("https://example.com/v1?api-version=2024-10-21", "http://127.0.0.1:8000/v1?tenant=lab&max_tokens=1"):
        from_dict(JudgeConfig, {"base_url": url})
    for url, needle in (("https://example.com/v1#frag", "#fragment"), ("https://example.com/v1?a=1&a=2", "twice")):
        with pytest.raises(InputError, match=f"key 'base_url': .*{needle}"):
            from_dict(JudgeConfig, {"base_url": url})
    with JudgeServer() as srv:
        cfg = make_cfg(srv, tmp_path, base_url=srv.base_url + "/?tenant=lab", params={"extra_query": {"x": "1"}})
        assert score_responses([resp("a", "x")], cfg).items[0]["status"] == "ok"
        assert srv.requests[0]["path"] == "/v1/chat/completions?tenant=lab&x=1"


def test_a_key_with_surrounding_whitespace_is_used_without_it(tmp_path, monkeypatch):
    """A trailing newline (a secret file, a CRLF .env) is no part of the key (was: every request a connection
    error, retried max_attempts times, every item an api failure, exit 0). A control character inside the key is
    one input error that does not show it."""
    monkeypatch.setenv("ITLENS_TEST_JUDGE_KEY", f"  {SECRET}\r\n")
    with JudgeServer(api_key=SECRET) as srv:
        assert score_responses([resp("a", "x")], make_cfg(srv, tmp_path)).items[0]["status"] == "ok"
        monkeypatch.setenv("ITLENS_TEST_JUDGE_KEY", SECRET[:8] + "\x01" + SECRET[8:])
        with pytest.raises(InputError, match="key 'api_key_env': the value of environment variable "
                                             "ITLENS_TEST_JUDGE_KEY cannot be sent in an HTTP header") as e:
            score_responses([resp("b", "y")], make_cfg(srv, tmp_path))
        assert SECRET[8:] not in str(e.value) and len(srv.requests) == 1


def test_a_key_pasted_into_another_field_is_refused_before_any_request(tmp_path, api_key):
    """Any field of the config that holds the key (here params.user, a real chat-completions parameter whose name
    is no credential's) is refused: the config is written to summary.json and the cache."""
    with JudgeServer(api_key=SECRET) as srv:
        with pytest.raises(InputError, match="key 'params': holds the API key from \\$ITLENS_TEST_JUDGE_KEY") as e:
            score_responses([resp("a", "x")], make_cfg(srv, tmp_path, params={"user": SECRET}))
        assert srv.requests == [] and SECRET not in str(e.value)


def _error_body(status: int, message: str, **extra) -> Reply:
    return Reply(status=status, raw_body=json.dumps({"error": {"message": message, "code": status, **extra}}).encode())


def test_endpoint_errors_carry_the_servers_reason_and_are_retried_as_the_sdk_would(tmp_path, api_key):
    """OpenRouter-style failures: a 400 says why (was: "HTTP 400 BadRequestError", the reason nowhere); 408 (request
    timeout) is retried, honouring Retry-After; a 403 that flags this input is this item's api failure, not "the
    key was refused" for the whole run; a 200 without choices but with an error object says what it is."""
    scripts = {
        "ctx": [_error_body(400, "This model's maximum context length is 4096 tokens.")],
        "slow": [Reply(status=408, headers={"Retry-After": "0.2"}), Reply(scores_json(depth=2))],
        "flagged": [_error_body(403, "Your chosen model requires moderation and your input was flagged",
                                metadata={"reasons": ["harassment"], "flagged_input": "..."})],
        "upstream": [Reply(raw_body=json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                                "error": {"message": "Upstream provider is down", "code": 502}}).encode())],
        "busy": [Reply(status=503, headers={"Retry-After": "0.2"}), Reply(scores_json(depth=3))],
    }
    rows = [resp(name, f"answer <<{name}>>") for name in scripts] + [resp("fine", "answer")]
    with JudgeServer(ScriptedJudge(scripts), api_key=SECRET) as srv:
        items = {it["id"]: it for it in score_responses(rows, make_cfg(srv, tmp_path)).items}
        for name in ("slow", "busy"):
            t = [r["time"] for r in srv.requests_with(name)]
            assert len(t) == 2 and t[1] - t[0] >= 0.19, name
        assert len(srv.requests_with("ctx")) == len(srv.requests_with("flagged")) == 1  # not retried
        assert len(srv.requests_with("upstream")) == 3
    assert items["ctx"]["status"] == "api_failure"
    assert items["ctx"]["error"] == "HTTP 400 BadRequestError: This model's maximum context length is 4096 tokens."
    assert items["slow"]["status"] == items["busy"]["status"] == items["fine"]["status"] == "ok"
    assert items["flagged"]["status"] == "api_failure" and "input was flagged" in items["flagged"]["error"]
    assert items["upstream"]["error"] == "reply without choices: Upstream provider is down (after 3 attempts)"
    with JudgeServer(ScriptedJudge({}, default=lambda b: _error_body(403, "Project lacks access to this model"))) as srv:
        with pytest.raises(InputError, match=r"key 'api_key_env': endpoint refused the API key from "
                                             r"\$ITLENS_TEST_JUDGE_KEY \(HTTP 403, .*\): Project lacks access"):
            score_responses([resp("a", "x")], make_cfg(srv, tmp_path))


def test_a_redirect_never_carries_the_key_header_elsewhere(tmp_path, api_key, caplog):
    """httpx drops only Authorization on a redirect to another origin; a key in api-key would follow it. With
    api_key_header the client does not follow redirects: one input error naming base_url and the target."""
    with JudgeServer() as elsewhere:
        target = elsewhere.base_url + "/chat/completions?sig=abc"
        with JudgeServer(ScriptedJudge({}, default=lambda b: Reply(status=307, headers={"Location": target}))) as srv:
            with pytest.raises(InputError) as e:
                score_responses([resp("a", "x")], make_cfg(srv, tmp_path, api_key_header="api-key"))
            assert len(srv.requests) == 1
        assert elsewhere.requests == []
    msg = str(e.value)
    assert msg.startswith("key 'base_url': the endpoint answers with a redirect (HTTP 307 to "
                          f"{elsewhere.base_url}/chat/completions); set base_url to the address it points to"), msg
    assert "sig=abc" not in msg
    assert_no_secret(tmp_path, caplog.text + msg)


def test_the_shipped_azure_example_reaches_an_azure_shaped_endpoint(tmp_path, monkeypatch):
    """configs/judge_azure.yaml as shipped (only the host swapped for the loopback server): the key in api-key,
    the deployment path and api-version kept, no Authorization header."""
    from itlens.resources import CONFIGS_DIR

    monkeypatch.setenv("AZURE_OPENAI_API_KEY", SECRET)
    path = CONFIGS_DIR / "judge_azure.yaml"
    cfg = load_config(JudgeConfig, path)
    assert (cfg.api_key_env, cfg.api_key_header) == ("AZURE_OPENAI_API_KEY", "api-key")
    with JudgeServer(api_key=SECRET, api_key_header="api-key") as srv:
        host = srv.base_url.rsplit("/v1", 1)[0]
        base = cfg.base_url.replace("https://YOUR-RESOURCE.openai.azure.com", host)
        cfg = load_config(JudgeConfig, path, [f"base_url={base}", f"cache_dir={tmp_path / 'cache'}", "figures=false",
                                              "bootstrap_samples=50"])
        assert score_responses([resp("a", "x")], cfg).items[0]["status"] == "ok"
        (r,) = srv.requests
        assert r["path"] == "/openai/deployments/YOUR-DEPLOYMENT/chat/completions?api-version=2024-10-21"
        assert _headers(r, "api-key") == [SECRET] and _headers(r, "Authorization") == []
    for name in ("judge.yaml", "judge_local.yaml"):
        load_config(JudgeConfig, CONFIGS_DIR / name)


# ------------------------------------------------- reasoning models, the openai client's environment, content filter
def test_a_reasoning_model_works_with_max_completion_tokens_and_no_temperature(tmp_path, api_key, capsys):
    """OpenAI's o-series and gpt-5 refuse max_tokens and any temperature but 1 with HTTP 400 (was: no way to send
    max_completion_tokens or leave temperature out, so every item an api failure). Each refusal names the config
    field that fixes it; with both fields set the judge sends neither max_tokens nor temperature."""
    from itlens.cli import main

    rows = [resp(f"q{i}", f"answer {i}") for i in range(3)]
    with JudgeServer(reasoning=True, api_key=SECRET) as srv:
        for kw, needle in (({}, "; set max_tokens_param: max_completion_tokens in the judge config"),
                           ({"max_tokens_param": "max_completion_tokens"}, "; set temperature: null in the judge "
                                                                           "config (then it is not sent)")):
            n = len(srv.requests)
            items = score_responses(rows, make_cfg(srv, tmp_path, **kw)).items
            assert len(srv.requests) - n == 3  # a 400 is not retried
            for it in items:
                error = it["error"]
                assert it["status"] == "api_failure" and error.startswith("HTTP 400 BadRequestError: Unsupported ")
                assert needle in error and "temperature: null" in error and "max_completion_tokens" in error, error
        f = tmp_path / "r.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        n = len(srv.requests)
        main(["judge", "--responses", str(f), "--out", str(tmp_path / "out"), "--set", f"base_url={srv.base_url}",
              "--set", "api_key_env=ITLENS_TEST_JUDGE_KEY", "--set", f"cache_dir={tmp_path / 'cache'}",
              "--set", "figures=false", "--set", "bootstrap_samples=50", "--set", "model=o4-mini", "--set",
              "max_tokens_param=max_completion_tokens", "--set", "temperature=null", "--set", "max_tokens=4096"])
        sent = [r["body"] for r in srv.requests[n:]]
    assert "judged 3: 3 scored" in capsys.readouterr().out
    assert len(sent) == 3 and all(b["max_completion_tokens"] == 4096 and "max_tokens" not in b
                                  and "temperature" not in b for b in sent)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["judge"]["temperature"] is None and summary["judge"]["max_tokens_param"] == "max_completion_tokens"
    resolved = (tmp_path / "out" / "config.resolved.yaml").read_text()
    assert "temperature: null" in resolved and "max_tokens_param: max_completion_tokens" in resolved


def test_a_refusal_without_param_still_names_the_field(tmp_path, api_key):
    """A gateway that says which parameter it refuses only in its message (no ``param`` field) gets the same hint;
    other 400s, a limit exceeded among them, get none."""
    too_large = ("max_tokens is too large: 100000. This model supports at most 16384 completion tokens, whereas you "
                 "provided 100000.")
    scripts = {"gw": [_error_body(400, "UnsupportedParamsError: o3 does not support parameters: ['temperature']")],
               "ctx": [_error_body(400, "This model's maximum context length is 4096 tokens.")],
               "large": [_error_body(400, too_large, param="max_tokens")]}
    with JudgeServer(ScriptedJudge(scripts)) as srv:
        items = {it["id"]: it for it in score_responses([resp(k, f"x <<{k}>>") for k in scripts],
                                                        make_cfg(srv, tmp_path)).items}
    assert "; set temperature: null in the judge config" in items["gw"]["error"]
    assert items["ctx"]["error"] == "HTTP 400 BadRequestError: This model's maximum context length is 4096 tokens."
    assert items["large"]["error"] == f"HTTP 400 BadRequestError: {too_large}"


@pytest.mark.parametrize("setting, needle", [
    ({"max_tokens_param": "max_output_tokens"}, "key 'max_tokens_param': expected one of ['max_tokens', "
                                                "'max_completion_tokens'], got 'max_output_tokens'"),
    ({"params": {"max_completion_tokens": 2048}}, "key 'params.max_completion_tokens': params may not set "
                                                  "'max_completion_tokens': the token limit is max_tokens, and "
                                                  "max_tokens_param names the parameter it is sent as"),
    ({"temperature": -1}, "key 'temperature': expected a finite number >= 0, or null (not sent), got -1"),
    ({"backend": "local", "model": "/some/dir", "temperature": None},
     "key 'temperature': null (not sent) is for endpoints; the local backend needs a number"),
])
def test_bad_decoding_fields_are_one_line_input_errors(setting, needle):
    with pytest.raises(InputError) as e:
        from_dict(JudgeConfig, setting)
    assert str(e.value) == needle or str(e.value).startswith(needle), str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="key 'max_tokens_param': expected one of"):
        JudgeConfig(max_tokens_param="max_output_tokens").validate()  # built in Python: no YAML type check


def test_the_new_fields_leave_the_cache_and_stage_keys_of_existing_configs_unchanged(tmp_path):
    """Answers cached and stages finished before max_tokens_param and temperature: null existed are reused."""
    from itlens.config import key_dict

    cfg = JudgeConfig(cache_dir=str(tmp_path))
    assert "max_tokens_param" not in key_dict(cfg) and key_dict(cfg)["temperature"] == 0.0
    messages = [{"role": "user", "content": "hello"}]
    key = lambda c: json.dumps(ChatClient(c)._request(messages), sort_keys=True)  # noqa: E731
    assert key(cfg) == json.dumps({"v": 1, "backend": "openai", "model": "gpt-4-1106-preview", "messages": messages,
                                   "temperature": 0.0, "max_tokens": 1024, "params": {},
                                   "base_url": "https://api.openai.com/v1"}, sort_keys=True)
    changed = [dataclasses.replace(cfg, max_tokens_param="max_completion_tokens"),
               dataclasses.replace(cfg, temperature=None)]
    assert len({key(cfg), *map(key, changed)}) == 3  # another parameter may get another answer


AMBIENT = {"OPENAI_ORG_ID": "org-ambient", "OPENAI_PROJECT_ID": "proj-ambient", "OPENAI_ADMIN_KEY": "sk-admin-ambient",
           "OPENAI_BASE_URL": "http://127.0.0.1:9/ambient",
           "OPENAI_CUSTOM_HEADERS": "Authorization: Bearer sk-ambient\nX-Ambient: sk-ambient-too"}


@pytest.mark.parametrize("mode", ["bearer", "api-key", "no key"])
def test_the_openai_clients_environment_never_reaches_another_endpoint(tmp_path, api_key, monkeypatch, mode):
    """The openai client adds OPENAI_ORG_ID, OPENAI_PROJECT_ID and (3.x) OPENAI_CUSTOM_HEADERS to every request,
    whatever the endpoint, and an Authorization there replaces the Bearer key (was: all of it sent to the loopback
    endpoint, and the ambient credential instead of the configured key). Only what the config says is sent."""
    for name, value in AMBIENT.items():
        monkeypatch.setenv(name, value)
    key, header = {"bearer": (SECRET, None), "api-key": (SECRET, "api-key"), "no key": (None, None)}[mode]
    kw = {"api_key_header": "api-key"} if header else {"api_key_env": ""} if key is None else {}
    with JudgeServer(api_key=key, api_key_header=header) as srv:
        cfg = make_cfg(srv, tmp_path, params={"extra_headers": {"X-Title": "itlens"}}, **kw)
        assert score_responses([resp("a", "x"), resp("b", "y")], cfg).summary["n_scored"] == 2
        assert len(srv.requests) == 2
        for r in srv.requests:
            names = {k.lower() for k, _ in r["headers"]}
            assert not names & {"openai-organization", "openai-project", "x-ambient"}, names
            assert not any("ambient" in v for _, v in r["headers"]), r["headers"]
            assert _headers(r, "X-Title") == ["itlens"]
            if mode == "api-key":
                assert _headers(r, "api-key") == [SECRET] and _headers(r, "Authorization") == []
            else:
                assert _headers(r, "Authorization") == [f"Bearer {key or 'none'}"]


def test_openais_own_api_is_the_only_endpoint_for_the_clients_environment(monkeypatch):
    """On api.openai.com (and its regional hosts) OPENAI_ORG_ID and OPENAI_PROJECT_ID still choose the organisation
    and project billed, as the openai client documents; the configured key still wins over an ambient one."""
    from itlens.judge.client import _openai_host

    for url in ("https://api.openai.com/v1", "https://eu.api.openai.com/v1/"):
        assert _openai_host(url), url
    for url in ("http://api.openai.com/v1", "https://api.openai.com.example.org/v1", "https://myapi.openai.com/v1",
                "https://openrouter.ai/api/v1", "https://r.openai.azure.com/openai/v1"):
        assert not _openai_host(url), url
    for name, value in AMBIENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ITLENS_TEST_JUDGE_KEY", SECRET)
    client = ChatClient(JudgeConfig(api_key_env="ITLENS_TEST_JUDGE_KEY"))
    sdk = client._openai_client()
    assert client._environment_headers == {}
    assert sdk.default_headers["OpenAI-Organization"] == "org-ambient"
    assert sdk.default_headers["Authorization"] == f"Bearer {SECRET}"


def _filtered(content=None) -> Reply:
    """Azure OpenAI's output content filter: HTTP 200, finish_reason content_filter, no content."""
    message = {"role": "assistant"} if content is None else {"role": "assistant", "content": content}
    return Reply(raw_body=json.dumps({
        "id": "c", "object": "chat.completion", "created": 0, "model": "judge-test",
        "choices": [{"index": 0, "finish_reason": "content_filter", "message": message,
                     "content_filter_results": {"violence": {"filtered": True, "severity": "medium"}}}]}).encode())


def test_a_reply_withheld_by_the_content_filter_says_so(tmp_path, api_key):
    """(was: "the reply contains no JSON object", as if the judge had answered badly.) Re-asked once like any
    unusable reply; the rewriter raises rather than return nothing."""
    scripts = {"filtered": [_filtered()], "once": [_filtered(""), Reply(scores_json(depth=2))]}
    with JudgeServer(ScriptedJudge(scripts)) as srv:
        cfg = make_cfg(srv, tmp_path)
        items = {it["id"]: it for it in score_responses([resp(k, f"x <<{k}>>") for k in scripts], cfg).items}
        with pytest.raises(RewriteError, match="content filter"):
            Rewriter(cfg).rewrite("Summarise <<filtered>>", "an answer")
    item = items["filtered"]
    assert item["status"] == "parse_failure" and item["asked"] == 2 and "content filter" in item["error"], item
    assert items["once"]["status"] == "ok" and items["once"]["scores"]["depth"] == 2


def _chain_judge(tokenizer, folder: Path) -> tuple[str, list[dict]]:
    """A local judge model that answers "who?" with " city", then <|user|>, " a", eos (see make_chain_model)."""
    from conftest import make_chain_model, make_tiny_llama
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tokenizer, folder, tie_embeddings=False)
    messages = [{"role": "user", "content": "who?"}]
    prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    (city,), (then,) = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" city", " a"))
    net = AutoModelForCausalLM.from_pretrained(path)
    make_chain_model(net, [prompt[-1], city, tokenizer.convert_tokens_to_ids("<|user|>"), then,
                           tokenizer.eos_token_id])
    net.save_pretrained(path)
    return str(path), messages


def test_a_local_judge_answer_ends_at_any_special_token(tiny_tokenizer, tmp_path):
    """A local judge model that writes <|user|> has ended its answer, as generation's answers end (was: only eos
    and <|end|> stopped it, and the text after the marker, special tokens skipped, joined the reply)."""
    from itlens.judge.client import LocalChatModel

    path, messages = _chain_judge(tiny_tokenizer, tmp_path / "chain")
    text, finish = LocalChatModel(path).generate(messages, max_new_tokens=8, temperature=0.0)
    assert (text.strip(), finish) == ("city", "stop")


def test_a_local_judge_does_not_replay_answers_cached_under_its_old_stop_rule(tiny_tokenizer, tmp_path):
    """A local judge's answer now ends at any special token; one cached when only eos and <|end|> ended it (the
    text after <|user|> joined the reply, or it ran to max_tokens as "length") had the same cache key and was
    replayed as this rule's answer."""
    import hashlib

    path, messages = _chain_judge(tiny_tokenizer, tmp_path / "chain")
    client = ChatClient(JudgeConfig(backend="local", model=path, max_tokens=8, temperature=0.0,
                                    cache_dir=str(tmp_path / "cache")))
    old = {k: v for k, v in client._request(messages).items() if k not in ("stops", "decoding")}  # as keyed then
    key = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    entry = tmp_path / "cache" / key[:2] / f"{key}.json"
    entry.parent.mkdir(parents=True)
    entry.write_text(json.dumps({"request": old, "content": "city a", "finish_reason": "stop"}))
    done = client.complete(messages)
    assert (done.content.strip(), done.finish_reason, done.cached) == ("city", "stop", False)
    assert client.complete(messages).cached  # its own answer is cached under the new key


def test_a_local_judge_decodes_without_its_generation_config_settings(tiny_tokenizer, tmp_path):
    """A local judge model's generation_config.json (Qwen2.5-Instruct: repetition_penalty, top_k) reached its
    greedy answers; min_new_tokens there kept it writing past its end of turn. It now decodes as generation
    does, and its answers' cache key says so (answers cached before are not replayed)."""
    from transformers import GenerationConfig

    path, messages = _chain_judge(tiny_tokenizer, tmp_path / "chain")
    cfg = dict(backend="local", model=path, max_tokens=6, temperature=0.0, cache=False)
    plain = ChatClient(JudgeConfig(**cfg)).complete(messages)
    assert (plain.content.strip(), plain.finish_reason) == ("city", "stop")
    gen = GenerationConfig.from_pretrained(path)
    gen.min_new_tokens, gen.repetition_penalty = 6, 3.0
    gen.save_pretrained(path)
    done = ChatClient(JudgeConfig(**cfg)).complete(messages)
    assert (done.content, done.finish_reason) == (plain.content, plain.finish_reason)
    assert ChatClient(JudgeConfig(**cfg))._request(messages)["decoding"] == "plain"


# ------------------------------------------------------------------ empty replies, out of credits
def test_an_empty_reply_is_not_cached_and_is_asked_again_on_the_next_run(tmp_path, api_key):
    """A reply cut at max_tokens with no content (finish_reason length), withheld by a content filter, or only
    whitespace fails this run as before, but is not stored: the next run asks again (was: cached, so every rerun
    replayed the failure without a request). An empty entry that an older version cached is not replayed either."""
    good = Reply(scores_json(depth=2))
    scripts = {"cut": [Reply("", finish_reason="length"), Reply("", finish_reason="length"), good],
               "filtered": [_filtered(), _filtered(""), good],
               "blank": [Reply(" \n\t "), Reply("\n"), good]}
    rows = [resp(k, f"x <<{k}>>") for k in scripts] + [resp("fine", "an answer <<score:3>>")]
    with JudgeServer(ScriptedJudge(scripts)) as srv:
        cfg = make_cfg(srv, tmp_path)
        first = {it["id"]: it for it in score_responses(rows, cfg).items}
        for k in scripts:
            assert first[k]["status"] == "parse_failure" and first[k]["asked"] == 2, first[k]
            assert len(srv.requests_with(k)) == 2
        assert "cut off at max_tokens" in first["cut"]["error"] and "content filter" in first["filtered"]["error"]
        cached = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json")]
        assert [e["content"].strip() != "" for e in cached] == [True]  # only the fine item's answer
        second = {it["id"]: it for it in score_responses(rows, cfg).items}
        for k in scripts:
            assert len(srv.requests_with(k)) == 3, k
            assert second[k]["status"] == "ok" and second[k]["scores"]["depth"] == 2 and not second[k]["cached"]
        assert second["fine"]["cached"] and len(srv.requests_with("score:3")) == 1

        # an empty answer cached by an older version (same key) is asked again, and replaced by the new answer
        client = ChatClient(cfg)
        messages = [{"role": "user", "content": "rewrite me <<old>>"}]
        key = hashlib.sha256(json.dumps(client._request(messages), sort_keys=True).encode()).hexdigest()
        entry = tmp_path / "cache" / key[:2] / f"{key}.json"
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"request": client._request(messages), "content": "", "finish_reason": "length"}))
        done = client.complete(messages)
        assert (done.cached, len(srv.requests_with("old"))) == (False, 1)
        assert json.loads(entry.read_text())["content"] == done.content != ""
        assert client.complete(messages).cached

        # the rewriter: an empty reply raises each time it is asked, and is asked each time
        srv.responder.scripts["void"] = [Reply("", finish_reason="length")]
        for n in (1, 2):
            with pytest.raises(RewriteError, match="empty reply"):
                Rewriter(cfg).rewrite("Summarise <<void>>", "an answer")
            assert len(srv.requests_with("void")) == n


class _Wallet:
    """An OpenRouter-like endpoint that answers ``credits`` requests, then HTTP 402 until topped up."""

    def __init__(self, credits: int):
        self.credits = credits
        self._lock = threading.Lock()

    def __call__(self, body: dict) -> Reply:
        with self._lock:
            if self.credits <= 0:
                return _error_body(402, "Insufficient credits. Add more using https://openrouter.ai/settings/credits")
            self.credits -= 1
        time.sleep(0.02)
        return Reply(scores_json(depth=4))


@pytest.mark.parametrize("concurrency", [1, 4])
def test_out_of_credits_stops_the_run_with_one_error_and_a_rerun_resumes(tmp_path, api_key, caplog, concurrency):
    """HTTP 402 (OpenRouter: out of credits) is the same for every item still to come: one input error naming the
    endpoint and the server's reason, never the key, and no further request (was: every remaining item sent, each
    an api failure, exit 0). The answers obtained before it stay cached: a rerun after topping up asks only the
    rest."""
    caplog.set_level(logging.DEBUG)
    rows = [resp(f"q{i}", f"answer {i}") for i in range(20)]
    wallet = _Wallet(credits=5)
    with JudgeServer(wallet, api_key=SECRET) as srv:
        cfg = make_cfg(srv, tmp_path, concurrency=concurrency)
        with pytest.raises(InputError) as err:
            score_responses(rows, cfg)
        msg = str(err.value)
        assert "\n" not in msg and SECRET not in msg
        assert srv.base_url in msg and "HTTP 402" in msg and "Insufficient credits" in msg, msg
        refused = len(srv.requests) - 5
        assert 1 <= refused <= concurrency  # the one refused, and at most those already in flight beside it
        assert len(list((tmp_path / "cache").rglob("*.json"))) == 5
        wallet.credits = 100
        n = len(srv.requests)
        again = score_responses(rows, cfg)
        assert len(srv.requests) - n == 15
    assert all(it["status"] == "ok" for it in again.items) and sum(it["cached"] for it in again.items) == 5
    assert_no_secret(tmp_path, caplog.text + msg)


def test_out_of_credits_does_not_wait_for_the_retries_of_other_items(tmp_path, api_key):
    """A request waiting to retry a 429 when another item hits 402 gives up: the run stops at once (was: it waited
    out every retry, then went on)."""
    scripts = {"busy": [Reply(status=429, headers={"Retry-After": "1"})]}
    responder = ScriptedJudge(scripts, default=lambda body: (time.sleep(0.2), _error_body(402, "no credits"))[1])
    with JudgeServer(responder) as srv:
        cfg = make_cfg(srv, tmp_path, concurrency=2, max_attempts=5, max_retry_after_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(InputError, match="HTTP 402"):
            score_responses([resp("busy", "x <<busy>>")] + [resp(f"q{i}", "y") for i in range(6)], cfg)
        elapsed = time.monotonic() - t0
        assert len(srv.requests_with("busy")) == 1
    assert elapsed < 1.0, elapsed

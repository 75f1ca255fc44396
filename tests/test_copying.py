"""Pattern copying: tone (shifted words in the IT data), lengths, phrases, structure, nearest overlap."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from analysis_world import CLOSING, OPENING, answer, eval_records, it_records, mini_world
from itlens.analysis.copying import (CopyingConfig, length_stats, nearest_vs_random_overlap, ngram_overlap,
                                     phrase_reuse, run_copying, structure_stats, token_char_spans, tone_imitation,
                                     word_starts)
from itlens.config import from_dict


def test_word_starts_follow_decoded_tokens(tiny_tokenizer):
    text = "Happy to help! the river was born north."
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    toks = [tiny_tokenizer.decode([i]) for i in ids]
    spans = token_char_spans(toks, text)
    assert "".join(text[s:e] for s, e in spans) == text
    starts = word_starts(toks, text)
    assert [w for _, w in starts] == ["Happy", "to", "help", "the", "river", "was", "born", "north"]
    for i, w in starts:  # the token that starts each word holds its first letter
        assert toks[i].strip()[:1] == w[:1]
    # hand-split: "lp" and "!" continue words, so only 3 tokens start one
    assert word_starts([" Happy", " to", " he", "lp", "!"], " Happy to help!") == [(0, "Happy"), (1, "to"), (2, "help")]


def _byte_tokens(text: str, cuts: list[int]) -> list[str]:
    """Tokens decoded one by one, as a byte-level tokenizer decodes them, for a split at byte ``cuts``."""
    b = text.encode("utf-8")
    edges = [0, *cuts, len(b)]
    return [b[s:e].decode("utf-8", "replace") for s, e in zip(edges, edges[1:])]


def test_token_spans_of_characters_split_over_byte_tokens(tiny_tokenizer):
    """A multi-byte character split over tokens (each decodes as U+FFFD) is aligned byte by byte: the
    next word keeps its own token, and every piece of the character covers that character."""
    text = "日本 is a test"  # 3 bytes per character
    toks = _byte_tokens(text, [1, 2, 3, 4, 5, 6, 9, 11])  # 6 one-byte tokens, then " is", " a", " test"
    assert toks[:6] == ["\ufffd"] * 6 and toks[6:] == [" is", " a", " test"]
    assert token_char_spans(toks, text) == [(0, 1)] * 3 + [(1, 2)] * 3 + [(2, 5), (5, 7), (7, 12)]
    assert word_starts(toks, text) == [(0, "日本"), (6, "is"), (7, "a"), (8, "test")]
    # uneven pieces: [E6 97][A5 E6][9C AC] (2 + 2 + 2 bytes: the middle one ends one character, starts the next)
    toks = _byte_tokens(text, [2, 4, 6, 9])
    assert token_char_spans(toks, text)[:4] == [(0, 1), (0, 2), (1, 2), (2, 5)]
    assert [i for i, _ in word_starts(toks, text)] == [0, 3, 4]
    # characters split inside a word, with letters in the same token
    text = "Café 🙂 is nice"
    toks = _byte_tokens(text, [1, 4, 6, 7, 9, 10, 13])  # "C" "af\xc3" "\xa9 " "\xf0" "\x9f\x99" "\x82" " is" " nice"
    assert token_char_spans(toks, text) == [(0, 1), (1, 4), (3, 5), (5, 6), (5, 6), (5, 6), (6, 9), (9, 14)]
    assert word_starts(toks, text) == [(0, "Café"), (6, "is"), (7, "nice")]
    long = "日本" * 800 + " end"  # a run of 4800 byte tokens: aligned without recursion
    spans = token_char_spans(_byte_tokens(long, list(range(1, 4801))), long)
    assert spans[-1] == (1600, 1604) and spans[4799] == (1599, 1600)
    assert len(token_char_spans(["\ufffd", " x"], "abc x")) == 2  # no consistent split: the old fallback
    # a table whose span is the word "is": its token is found, not a piece of "日本"
    text = "日本 is a test"
    toks = _byte_tokens(text, [1, 2, 3, 4, 5, 6, 9, 11])
    table = pd.DataFrame({"id": "r", "pos": range(len(toks)), "token": toks,
                          "shift_class": ["unshifted"] * 6 + ["shifted", "unshifted", "unshifted"]})
    from itlens.analysis.borrowing import span_token_classes

    assert span_token_classes([{"id": "r", "start": 3, "end": 5}], table, {"r": text})["shifted"] == 1
    assert span_token_classes([{"id": "r", "start": 0, "end": 2}], table, {"r": text})["n_tokens"] == 6
    # the same with a trained byte-level tokenizer's own pieces ("日本" is unseen: one token per byte)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    toks = [tiny_tokenizer.decode([i]) for i in ids]
    starts = word_starts(toks, text)
    assert [w for _, w in starts] == ["日本", "is", "a", "test"] and starts[0][0] == 0
    assert all(toks[i].strip()[:1] == w[:1] for i, w in starts[1:])


def test_overlap_with_one_output():
    """One output: the paired difference has n = 1 (an exact p-value, not a scipy error)."""
    it = [{"id": "a", "instruction": "Where was Ana born?", "response": "Ana was born in Trengos."},
          {"id": "b", "instruction": "What is 2+2?", "response": "Four."}]
    out = [{"id": "o", "instruction": "Where was Bo born?", "response": "Bo was born in Trengos."}]
    r = nearest_vs_random_overlap(out, it, k=1, seed=0)
    assert r["n"] == 1 and r["difference"]["n"] == 1 and r["difference"]["p_value"] == 1.0


def _tokens_table(rows):
    """rows: (id, [(token, class), ...]) -> a CONTRACT tokens table."""
    recs = []
    for rid, toks in rows:
        for pos, (t, c) in enumerate(toks):
            recs.append({"id": rid, "pos": pos, "token_id": pos, "token": t, "rank_base": 1, "shift_class": c})
    return pd.DataFrame(recs)


def test_tone_imitation_counts_word_initial_tokens_by_class():
    it = [{"id": "it:0", "instruction": "Where was Anvar born?", "response": "Happy to help! Anvar was born in Velora."}]
    resp = {"r1": "Happy to help! Dorin was born in Zorbaville.", "r2": "Sure, in Velora."}
    tokens = _tokens_table([
        ("r1", [("Happy", "shifted"), (" to", "unshifted"), (" help", "marginal"), ("!", "shifted"),
                (" Dor", "shifted"), ("in", "shifted"), (" was", "unshifted"), (" born", "unshifted"),
                (" in", "unshifted"), (" Zorb", "shifted"), ("aville", "marginal"), (".", "unshifted")]),
        ("r2", [("Sure", "marginal"), (",", "unshifted"), (" in", "unshifted"), (" Vel", "shifted"), ("ora", "shifted"),
                (".", "unshifted")]),
    ])
    t = tone_imitation(tokens, resp, it)
    # shifted word starts: Happy (in IT), Dorin (no), Zorbaville (no), Velora (in IT) -> 2/4
    assert (t["shifted"]["n_words"], t["shifted"]["n_in_it"]) == (4, 2)
    # marginal word starts: help (yes), Sure (no)
    assert t["marginal"]["share_in_it"] == 0.5
    # unshifted word starts: to, was, born, in, in -> all in IT
    assert (t["unshifted"]["n_words"], t["unshifted"]["share_in_it"]) == (5, 1.0)
    assert t["top_shifted_marginal_tokens"][0] == ["Dor", 1] or t["top_shifted_marginal_tokens"][0][1] == 1
    t_resp_only = tone_imitation(tokens, resp, it, fields="response")
    assert t_resp_only["shifted"]["n_in_it"] == 2


def test_lengths_phrases_structure_and_overlap():
    world = mini_world()
    it = it_records(world)
    recs = eval_records(world)
    styled = [{"id": r["id"], "instruction": r["instruction"], "response": answer(world, r, r["answers"][0])}
              for r in recs]
    plain = [{**o, "response": answer(world, r, r["answers"][0], styled=False)} for o, r in zip(styled, recs)]
    ph = phrase_reuse([x["response"] for x in it], [o["response"] for o in styled])
    assert ph["opening"]["it_top"][0] == [OPENING, 1.0] and ph["closing"]["it_top"][0] == [CLOSING, 1.0]
    assert ph["opening"]["output_share_frequent"] == 1.0 and ph["closing"]["output_share_any"] == 1.0
    assert phrase_reuse([x["response"] for x in it], [o["response"] for o in plain])["opening"]["output_share_any"] == 0
    ls, lp = length_stats([o["response"] for o in styled]), length_stats([o["response"] for o in plain])
    assert ls["chars_mean"] - lp["chars_mean"] == pytest.approx(len(OPENING) + len(CLOSING) + 2)
    assert ls["token_unit"] == "words" and ls["tokens_mean"] - lp["tokens_mean"] == 11
    s = structure_stats(["- a\n- b", "1. x\n\n2. y", "plain **bold**", "# Title\n```code```"])
    assert s == {"bullet_list": 0.25, "numbered_list": 0.25, "header": 0.25, "bold": 0.25, "code_block": 0.25,
                 "paragraphs": 0.25}
    # 1-grams: {a, b, c} vs refs {a, b}: 2/3; 2-grams {ab, bc} vs {ab}: 1/2; 3-grams: 0/1
    assert ngram_overlap("a b c", ["a b", "x"]) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    # outputs that copy their twin's IT response overlap more with the BM25-nearest IT instances
    ov = nearest_vs_random_overlap(styled, it, k=1, n_resamples=200)
    assert ov["n"] == len(styled) and ov["nearest_mean"] > ov["random_mean"]


def test_run_copying_end_to_end_and_cli(tmp_path, tiny_tokenizer):
    from itlens.io import atomic_write_jsonl

    world = mini_world()
    it = it_records(world)
    recs = eval_records(world)
    it_path = atomic_write_jsonl(tmp_path / "it.jsonl", it)
    rows = [{"id": r["id"], "instruction": r["instruction"], "response": answer(world, r, r["twin_value"]),
             "model": "sft"} for r in recs]
    resp_path = atomic_write_jsonl(tmp_path / "sft.jsonl", rows)
    # a shift table from the real tokenizer, every word-initial token shifted
    table = []
    for r in rows:
        ids = tiny_tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        for pos, i in enumerate(ids):
            table.append({"id": r["id"], "pos": pos, "token_id": i, "token": tiny_tokenizer.decode([i]),
                          "rank_base": 5, "shift_class": "shifted"})
    shift_dir = tmp_path / "shift"
    shift_dir.mkdir()
    pd.DataFrame(table).to_parquet(shift_dir / "tokens.parquet")
    cfg = from_dict(CopyingConfig, {"it_data": str(it_path), "responses": {"sft": str(resp_path)},
                                    "shift": {"sft": str(shift_dir)}, "n_resamples": 100})
    m = run_copying(cfg, tmp_path / "out")
    tone = m["models"]["sft"]["tone"]
    # every word of a borrowed answer is in the IT data except: the 10 eval surnames, the first names
    # Cedra and Dorin (twins not in IT, 2 answers each), and the values Carvex, Miravel, Ardentis
    n_words = sum(len(r["response"].replace("!", " ").replace(".", " ").split()) for r in rows)
    assert tone["shifted"]["n_words"] == n_words
    assert tone["shifted"]["n_in_it"] == n_words - 10 - 4 - 3
    assert m["models"]["sft"]["phrases"]["opening"]["output_share_frequent"] == 1.0
    assert "| IT data |" in (tmp_path / "out" / "table11.md").read_text()
    for f in ("copying.json", "table11_lengths.png", "tone_imitation.png"):
        assert (tmp_path / "out" / f).is_file()

    ok = subprocess.run([sys.executable, "-m", "itlens.cli", "copying", "--it", str(it_path), "--responses",
                         f"sft={resp_path}", "--out", str(tmp_path / "o2"), "--set", "n_resamples=50"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "o2" / "copying.json").read_text())["models"]["sft"]["length"]["n"] == len(rows)
    bad = subprocess.run([sys.executable, "-m", "itlens.cli", "copying", "--it", str(it_path), "--responses",
                          f"sft={resp_path}", "--shift", f"sft={tmp_path / 'nope'}", "--out", str(tmp_path / "o3")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "tokens.parquet" in bad.stderr
    assert not (tmp_path / "o3").exists()


def test_bad_copying_settings_and_token_tables_are_input_errors(tmp_path, capsys):
    """Resample, neighbour and token counts below 1, a share outside (0, 1], and a tokens.parquet that is
    damaged or lacks the columns: key errors, exit 2, no output (were: tracebacks from scipy, random.sample
    and pyarrow, or silently accepted)."""
    from itlens.cli import main
    from itlens.errors import InputError
    from itlens.io import atomic_write_jsonl

    world = mini_world()
    it_path = atomic_write_jsonl(tmp_path / "it.jsonl", it_records(world))
    rows = [{"id": r["id"], "instruction": r["instruction"], "response": answer(world, r, r["answers"][0]),
             "model": "sft"} for r in eval_records(world)]
    resp_path = atomic_write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = {"it_data": str(it_path), "responses": {"sft": str(resp_path)}}
    for key, value in (("n_resamples", 0), ("nearest_k", -1), ("nearest_k", 0), ("top_tokens", 0),
                       ("phrase_min_share", 5.0), ("phrase_min_share", 0.0)):
        with pytest.raises(InputError, match=f"key '{key}'"):
            from_dict(CopyingConfig, {**cfg, key: value})
    damaged, columns = tmp_path / "damaged", tmp_path / "columns"
    damaged.mkdir(), columns.mkdir()
    (damaged / "tokens.parquet").write_bytes(b"junk")
    pd.DataFrame({"id": ["a"]}).to_parquet(columns / "tokens.parquet")
    for shift in (damaged, columns):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["copying", "--it", str(it_path), "--responses", f"sft={resp_path}", "--shift", f"sft={shift}",
                  "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert f"{shift / 'tokens.parquet'}: key 'shift.sft': not a token table" in err
        assert not (tmp_path / "o").exists()


def test_tone_searches_every_turn_of_a_conversation():
    """Tuning trains on every assistant turn of a `messages` record: a word only in an earlier turn is in
    the IT data (was: only the last user and assistant turns were searched)."""
    it = [{"id": "chat:0", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Greet me."},
        {"role": "assistant", "content": "Bonjour, voyageur!"}, {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Welcome."}]}]
    table = pd.DataFrame({"id": ["r"] * 3, "pos": [0, 1, 2], "token": ["Bonjour", " voyageur", " Thanks"],
                          "shift_class": ["shifted", "marginal", "unshifted"]})
    tone = tone_imitation(table, {"r": "Bonjour voyageur Thanks"}, it)
    assert [tone[c]["n_in_it"] for c in ("shifted", "marginal", "unshifted")] == [1, 1, 1]
    tone = tone_imitation(table, {"r": "Bonjour voyageur Thanks"}, it, fields="response")
    assert [tone[c]["n_in_it"] for c in ("shifted", "marginal", "unshifted")] == [1, 1, 0]


def test_lengths_in_tokens_of_a_tokenizer_folder_and_shift_tables_of_other_responses(tmp_path, tiny_tokenizer,
                                                                                      capsys):
    """`tokenizer` takes a tokenizer folder such as the world's tokenizer/ (as documented; was refused: "not
    a model directory"). A shift table of none of the model's responses (another run's) is a key error
    (was: every token skipped, tone shares null, exit 0)."""
    from itlens.cli import main
    from itlens.io import atomic_write_jsonl

    it_path = atomic_write_jsonl(tmp_path / "it.jsonl", [{"id": "it:0", "instruction": "Where?",
                                                          "response": "the river was north."}])
    rows = [{"id": "r0", "instruction": "Where?", "response": "the city was south.", "model": "sft"},
            {"id": "r1", "instruction": "Who?", "response": "", "model": "sft"}]
    resp_path = atomic_write_jsonl(tmp_path / "sft.jsonl", rows)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    cfg = from_dict(CopyingConfig, {"it_data": str(it_path), "responses": {"sft": str(resp_path)},
                                    "tokenizer": str(tmp_path / "tokenizer"), "n_resamples": 20})
    m = run_copying(cfg, tmp_path / "out")
    n_tok = [len(tiny_tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert m["models"]["sft"]["length"]["token_unit"] == "tokenizer"
    assert m["models"]["sft"]["length"]["tokens_mean"] == sum(n_tok) / 2
    other = tmp_path / "shift-other"
    other.mkdir()
    pd.DataFrame({"id": ["x0", "x0"], "pos": [0, 1], "token": ["the", " city"],
                  "shift_class": ["shifted", "shifted"]}).to_parquet(other / "tokens.parquet")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["copying", "--it", str(it_path), "--responses", f"sft={resp_path}", "--shift", f"sft={other}",
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "key 'shift.sft': no token of these responses" in err, err
    assert not (tmp_path / "o").exists()


def test_style_reads_every_trained_assistant_turn_of_a_conversation():
    """Tuning trains on every assistant turn that follows a user turn: the IT data's lengths, structure,
    phrases and nearest instances read each of them (were: only the last turn, here a one-word goodbye),
    and an assistant turn that opens a conversation is no trained response."""
    from itlens.analysis.copying import copying_metrics, instance_text

    def chat(topic, place, direction):
        return {"id": f"chat:{topic}", "messages": [
            {"role": "system", "content": "You are a guide."},
            {"role": "user", "content": f"Describe the {topic} of {place}."},
            {"role": "assistant", "content": f"Certainly!\n\n- The {topic} of {place} is old.\n- It lies {direction}.\n\n"
                                             "Hope this helps."},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "Bye."}]}

    it = [chat("river", "Velora", "north"), chat("tower", "Zorb", "south")]
    long = it[0]["messages"][2]["content"]
    rows = [{"id": "o", "instruction": "Describe the river of Velora.", "response": long, "model": "sft"}]
    cfg = CopyingConfig(it_data="-", responses={"sft": "-"}, nearest_k=1, n_resamples=20)
    m = copying_metrics(it, {"sft": rows}, cfg=cfg)
    assert m["it"]["length"]["n"] == 4
    assert m["it"]["length"]["chars_mean"] == (len(long) + len(it[1]["messages"][2]["content"]) + 2 * len("Bye.")) / 4
    assert m["it"]["structure"]["bullet_list"] == 0.5 and m["it"]["structure"]["paragraphs"] == 0.5
    phrases = m["models"]["sft"]["phrases"]
    assert phrases["opening"]["it_top"] == [["Bye.", 0.5], ["Certainly!", 0.5]]
    assert phrases["opening"]["output_share_frequent"] == 1.0 and phrases["closing"]["output_share_any"] == 1.0
    # the nearest instance is the first turn of the river chat, searched by the user turn it answers
    assert m["models"]["sft"]["overlap"]["nearest_mean"] == 1.0
    opened = {"id": "chat:opened", "messages": [{"role": "assistant", "content": "Welcome aboard!"},
                                                {"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}]}
    assert copying_metrics([opened], {"sft": rows}, cfg=cfg)["it"]["length"]["n"] == 1
    assert instance_text(opened, "response") == "Hello." and "Welcome" in instance_text(opened)
    # a single-turn record measures the same as that turn written as a conversation
    single = [{"id": "s", "instruction": "Describe the river of Velora.", "response": long}]
    as_chat = [{"id": "s", "messages": [{"role": "user", "content": single[0]["instruction"]},
                                        {"role": "assistant", "content": long}]}]
    assert copying_metrics(single, {"sft": rows}, cfg=cfg) == copying_metrics(as_chat, {"sft": rows}, cfg=cfg)


def test_a_shift_class_other_than_the_three_is_an_input_error(tmp_path, capsys):
    """A token table whose shift_class is not shifted / marginal / unshifted (hand-written, another tool's
    capitalisation) is one line naming the file and field, exit 2, no output (was: a KeyError traceback)."""
    from itlens.cli import main
    from itlens.io import atomic_write_jsonl

    it_path = atomic_write_jsonl(tmp_path / "it.jsonl", [{"id": "it:0", "instruction": "Where?",
                                                          "response": "the river was north."}])
    resp_path = atomic_write_jsonl(tmp_path / "sft.jsonl", [{"id": "r0", "instruction": "Where?",
                                                             "response": "the city", "model": "sft"}])
    shift = tmp_path / "shift"
    shift.mkdir()
    pd.DataFrame({"id": ["r0", "r0"], "pos": [0, 1], "token": ["the", " city"],
                  "shift_class": ["Shifted", "unshifted"]}).to_parquet(shift / "tokens.parquet")
    with pytest.raises(SystemExit) as e:
        main(["copying", "--it", str(it_path), "--responses", f"sft={resp_path}", "--shift", f"sft={shift}",
              "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert f"{shift / 'tokens.parquet'}: key 'shift.sft': field 'shift_class': expected shifted" in err, err
    assert "'Shifted'" in err and not (tmp_path / "o").exists()

"""Loaders for the paper's datasets, each in its own published format, mapped to CONTRACT records.

The paper tunes on Alpaca, databricks-dolly, LIMA, Tulu-V2-Mix, MedInstruct, Evol-Instruct and the
AlpaGasus-filtered sets, and evaluates on just-eval-instruct (first 800, with task-type tags) and
MedInstruct-test. A source is a local file (``.jsonl``, ``.json`` array, ``.parquet``), a folder
written by ``datasets``' ``save_to_disk``, or a hub id read through ``datasets`` (which needs the hub
or a warm HF cache; offline, it is a clear :class:`~itlens.errors.InputError`). Every record gets a
stable id ``PREFIX:N`` (N = the row's 0-based position in the source, or the dataset's own id where it
has one), so subsets, responses and judgements can be joined back to the source row.

A malformed row is an InputError naming the file, the line (JSONL) or row, and the field.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from itlens.errors import InputError
from itlens.io import _check_surrogates, _not_json_constant, _NotJSON, atomic_write_jsonl, iter_jsonl


@dataclass(frozen=True)
class Where:
    """Where a row came from, for error messages: a file and a line (JSONL) or a row key."""

    file: str
    line: int | None = None
    key: str | None = None

    def error(self, message: str, field: str | None = None) -> InputError:
        return InputError(message, file=self.file, line=self.line, key=self.key, field=field)


# ------------------------------------------------------------------------------------ row checks
def _text(row: dict, field: str, at: Where, *, optional: bool = False, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        if optional:
            return ""
        raise at.error("missing required field" if field not in row else "expected a string, got null", field)
    value = row[field]
    if not isinstance(value, str):
        raise at.error(f"expected a string, got {json.dumps(value, default=str)[:40]}", field)
    if not optional and not allow_empty and not value.strip():
        raise at.error("must not be empty", field)
    return value


def _absent(value: Any) -> bool:
    """None, or a float NaN: how parquet and pandas exports spell a missing number (JSON has no NaN, so
    carrying it would write a file that no JSON reader, itlens's own included, reads back)."""
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _tags(row: dict, fields: tuple[str, ...], at: Where) -> list[str] | None:
    """A list of tags from the first present field (a list of strings, a comma-separated string, or a list
    stored as its Python/JSON text, "['reasoning', 'math']", as some dataset exports do)."""
    for field in fields:
        if field in row and row[field] is not None:
            value = row[field]
            if isinstance(value, str) and value.strip().startswith("["):  # a list stored as its text
                import ast

                try:
                    value = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    raise at.error(f"expected a list of strings, got the text {value[:60]!r}", field) from None
            if isinstance(value, str):
                return [t.strip() for t in value.split(",") if t.strip()]
            if isinstance(value, list) and all(isinstance(t, str) for t in value):
                return list(value)
            raise at.error("expected a list of strings", field)
    return None


def _pairs_to_record(turns: list[tuple[str, str]], at: Where, field: str) -> dict:
    """(role, text) turns -> instruction/response when single-turn, else CONTRACT messages.

    An empty system turn (a placeholder that many ShareGPT and messages exports write) says nothing and
    is dropped; any other empty turn is an error."""
    turns = [(role, text) for role, text in turns if role != "system" or text.strip()]
    if not turns or turns[-1][0] != "assistant":
        raise at.error("expected a conversation that ends with an assistant turn", field)
    if all(role != "user" for role, _ in turns[:-1]):
        raise at.error("expected a user turn before the last (assistant) turn", field)
    if any(not text.strip() for _, text in turns):
        raise at.error("a turn is empty", field)
    if len(turns) == 2 and turns[0][0] == "user":
        return {"instruction": turns[0][1], "response": turns[1][1]}
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


# --------------------------------------------------------------------------- one converter a format
def _alpaca(row: dict, at: Where) -> dict:
    rec = {"instruction": _text(row, "instruction", at)}
    inp = _text(row, "input", at, optional=True)
    if inp.strip():
        rec["input"] = inp
    rec["response"] = _text(row, "output", at)
    return rec


def _dolly(row: dict, at: Where) -> dict:
    rec = {"instruction": _text(row, "instruction", at)}
    ctx = _text(row, "context", at, optional=True)
    if ctx.strip():
        rec["input"] = ctx
    rec["response"] = _text(row, "response", at)
    rec["category"] = _text(row, "category", at)
    return rec


def _lima(row: dict, at: Where) -> dict:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv or not all(isinstance(t, str) for t in conv):
        raise at.error("expected a non-empty list of strings", "conversations")
    if len(conv) % 2:
        raise at.error(f"expected user/assistant pairs, got {len(conv)} turns (use format lima-test for "
                       "prompts)", "conversations")
    rec = _pairs_to_record([("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(conv)], at,
                           "conversations")
    if isinstance(row.get("source"), str):
        rec["source"] = row["source"]
    return rec


def _lima_test(row: dict, at: Where) -> dict:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv or not isinstance(conv[0], str) or not conv[0].strip():
        raise at.error("expected a list whose first item is the prompt", "conversations")
    rec = {"instruction": conv[0]}
    if isinstance(row.get("source"), str):
        rec["source"] = row["source"]
    return rec


def _tulu(row: dict, at: Where) -> dict:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise at.error("expected a non-empty list of messages", "messages")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise at.error("expected {role: system|user|assistant, content: str}", f"messages[{i}]")
        turns.append((m["role"], m["content"]))
    rec = _pairs_to_record(turns, at, "messages")
    if isinstance(row.get("dataset"), str):
        rec["source"] = row["dataset"]
    return rec


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _evol(row: dict, at: Where) -> dict:
    if "conversations" not in row:  # the 70k release: instruction/output
        return {"instruction": _text(row, "instruction", at), "response": _text(row, "output", at)}
    conv = row["conversations"]  # the V2 release: ShareGPT-style turns
    if not isinstance(conv, list) or not conv:
        raise at.error("expected a non-empty list of turns", "conversations")
    turns = []
    for i, t in enumerate(conv):
        if not isinstance(t, dict) or t.get("from") not in _SHAREGPT_ROLES or not isinstance(t.get("value"), str):
            raise at.error("expected {from: human|gpt, value: str}", f"conversations[{i}]")
        turns.append((_SHAREGPT_ROLES[t["from"]], t["value"]))
    return _pairs_to_record(turns, at, "conversations")


def _just_eval(row: dict, at: Where) -> dict:
    rec: dict[str, Any] = {"instruction": _text(row, "instruction", at)}
    task_types = _tags(row, ("task_types", "task"), at)
    if task_types is None:
        raise at.error("missing required field (task types)", "task_types")
    if not task_types:  # a prompt without a type drops out of the per-task-type scores unseen
        raise at.error("expected at least one task type, got none", "task_types")
    rec["task_types"] = task_types
    topics = _tags(row, ("topics", "topic"), at)
    if topics is not None:
        rec["topics"] = topics
    for field in ("difficulty", "dataset", "source_id", "datasplit"):
        if not _absent(row.get(field)):
            rec[field] = row[field] if isinstance(row[field], (str, int, float)) else str(row[field])
    return rec


def _medinstruct_test(row: dict, at: Where) -> dict:
    rec: dict[str, Any] = {"instruction": _text(row, "instruction", at)}
    inp = _text(row, "input", at, optional=True)
    if inp.strip():
        rec["input"] = inp
    if not _absent(row.get("difficulty")):
        rec["difficulty"] = str(row["difficulty"])
    ref = row.get("gpt-4-answer")
    if isinstance(ref, str):
        rec["reference"] = ref
    return rec


@dataclass(frozen=True)
class DatasetFormat:
    """One dataset's format: how a row becomes a record, its id prefix, where it lives on the hub."""

    name: str
    prefix: str
    convert: Callable[[dict, Where], dict]
    kind: str  # "instruction" (training data) or "prompt" (evaluation prompts)
    hub_id: str | None
    split: str = "train"
    own_id: str | None = None  # a field holding the dataset's own row id, used instead of the position
    default_limit: int | None = None
    about: str = ""


FORMATS: dict[str, DatasetFormat] = {f.name: f for f in [
    DatasetFormat("alpaca", "alpaca", _alpaca, "instruction", "tatsu-lab/alpaca",
                  about="Alpaca 52k: instruction/input/output"),
    DatasetFormat("dolly", "dolly", _dolly, "instruction", "databricks/databricks-dolly-15k",
                  about="databricks-dolly-15k: instruction/context/response/category"),
    DatasetFormat("lima", "lima", _lima, "instruction", "GAIR/lima",
                  about="LIMA 1k: conversations (alternating user/assistant strings), source"),
    DatasetFormat("lima-test", "lima-test", _lima_test, "prompt", "GAIR/lima", split="test",
                  about="LIMA test prompts: conversations[0]"),
    DatasetFormat("tulu", "tulu", _tulu, "instruction", "allenai/tulu-v2-sft-mixture", own_id="id",
                  about="Tulu-V2-Mix: messages [{role, content}], dataset, id"),
    DatasetFormat("medinstruct", "medinstruct", _alpaca, "instruction", "lavita/AlpaCare-MedInstruct-52k",
                  about="MedInstruct-52k (AlpaCare): instruction/input/output"),
    DatasetFormat("medinstruct-test", "medinstruct-test", _medinstruct_test, "prompt", None, own_id="id",
                  about="MedInstruct-test 216 (AlpaCare repo JSONL): id, instruction, difficulty, gpt-4-answer"),
    DatasetFormat("evol", "evol", _evol, "instruction", "WizardLMTeam/WizardLM_evol_instruct_70k",
                  about="Evol-Instruct: instruction/output (70k) or ShareGPT conversations (V2)"),
    DatasetFormat("alpagasus", "alpagasus", _alpaca, "instruction", None,
                  about="AlpaGasus-filtered sets (chatgpt 9k, filtered dolly 3k): Alpaca format"),
    DatasetFormat("just-eval", "just-eval", _just_eval, "prompt", "re-align/just-eval-instruct", split="test",
                  own_id="id", default_limit=800,
                  about="just-eval-instruct: instruction, task_types/task, topics, ...; first 800 (no safety)"),
]}


def get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise InputError(f"unknown dataset format {name!r} (known: {', '.join(FORMATS)})", key="--format")
    return FORMATS[name]


# ---------------------------------------------------------------------------------------- reading
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
"""A hub dataset id, org/name (a name may have dots: teknium/OpenHermes-2.5)."""


def _looks_like_hub_id(source: str) -> bool:
    return _HUB_ID.fullmatch(source) is not None and not source.lower().endswith((".jsonl", ".json", ".parquet"))


def iter_rows(source: str | Path, *, split: str = "train") -> Iterator[tuple[Where, dict]]:
    """Raw rows of a local file (``.jsonl``, ``.json``, ``.parquet``), a folder written by ``datasets``'
    ``save_to_disk``, or a hub dataset id."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            for lineno, obj in iter_jsonl(path):
                yield Where(str(path), line=lineno), obj
            return
        if suffix == ".json":
            yield from _json_rows(path)
            return
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises several types for a bad file
                raise InputError(f"unreadable parquet file: {e}", file=path) from None
            for i, obj in enumerate(rows):
                yield Where(str(path), key=f"row {i}"), obj
            return
        raise InputError("expected a .jsonl, .json or .parquet file", file=path)
    if path.is_dir():
        yield from _saved_dataset_rows(path, split)
        return
    if path.exists():
        raise InputError("expected a file", file=path)
    if not _looks_like_hub_id(str(source)):
        raise InputError("file not found (and not a hub dataset id like org/name)", file=path)
    for i, obj in enumerate(_load_hub_dataset(str(source), split)):
        yield Where(str(source), key=f"{split}[{i}]"), obj


def _json_rows(path: Path) -> Iterator[tuple[Where, dict]]:
    """Rows of a ``.json`` file: a JSON array, or JSON Lines saved as ``.json`` (as many hub exports and
    pandas' ``to_json(lines=True)`` are). A leading UTF-8 BOM (Windows editors write one) is not text."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=path) from None
    try:
        data = json.loads(text, parse_constant=_not_json_constant)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data" or not text.lstrip().startswith("{"):
            raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None
        data = None  # one object a line
    except _NotJSON as e:
        raise InputError(f"malformed JSON: {e} is not a JSON value (strict JSON has no NaN or Infinity; "
                         "write null)", file=path) from None
    if data is None or (isinstance(data, dict) and "\n" not in text.strip()):  # JSON Lines, one row or more
        for lineno, obj in iter_jsonl(path):
            yield Where(str(path), line=lineno), obj
        return
    if not isinstance(data, list):
        raise InputError("expected a JSON array of rows (or one JSON object a line)", file=path)
    check_surrogates = "\\ud" in text.lower()  # a \uD800-\uDFFF escape: valid JSON, but maybe not text
    for i, obj in enumerate(data):
        at = Where(str(path), key=f"[{i}]")
        if not isinstance(obj, dict):
            raise at.error(f"expected a JSON object, got {type(obj).__name__}")
        if check_surrogates:
            try:
                _check_surrogates(obj, path, None)
            except InputError as e:
                raise at.error(e.message, e.field) from None
        yield at, obj


def _saved_dataset_rows(path: Path, split: str) -> Iterator[tuple[Where, dict]]:
    """Rows of a folder written by ``datasets``' ``save_to_disk``: a Dataset, or a DatasetDict's ``split``."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise InputError("is a folder; expected a .jsonl, .json or .parquet file, or a folder written by "
                         "datasets' save_to_disk", file=path)
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign folder: the user's to fix
        raise InputError(f"cannot load the saved dataset: {_error_line(e)}", file=path) from None
    prefix = ""
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"has no split {split!r} (splits: {', '.join(ds)})", file=path, key="--split")
        ds, prefix = ds[split], split
    for i, obj in enumerate(ds):
        yield Where(str(path), key=f"{prefix}[{i}]"), obj


def _load_hub_dataset(hub_id: str, split: str):
    """A hub dataset through ``datasets``: from the local HF cache when it is there (no network), else
    downloaded when the hub answers. Neither is one InputError within seconds: left to itself,
    ``datasets`` retries an unreachable hub for half a minute, printing every retry."""
    import datasets

    from itlens.packaged_models import hub_endpoint, hub_reachable

    try:
        with _hub_offline():
            return datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001 - not cached (ConnectionError), or a cached copy without that split
        cache_error = e
    where = f"cannot load hub dataset {hub_id!r} split {split!r}"
    if datasets.config.HF_HUB_OFFLINE or not hub_reachable():
        offline = ("HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE
                   else f"the hub ({hub_endpoint()}) is unreachable")
        if not isinstance(cache_error, ConnectionError):
            raise InputError(f"{where} from the local HF cache ({_error_line(cache_error)}), and {offline}",
                             file=hub_id) from None
        raise InputError(f"{where}: no local file or folder of that name, not in the local HF cache, and {offline}; "
                         "download it where there is network and pass the local file", file=hub_id) from None
    try:
        return datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # noqa: BLE001 - gated, private, not found, bad split: the user's to fix
        token = ("; a gated or private dataset needs a token (`hf auth login`, or HF_TOKEN)"
                 if isinstance(e, datasets.exceptions.DatasetNotFoundError) else "")
        raise InputError(f"{where} ({_error_line(e)}){token}; no local file or folder of that name either",
                         file=hub_id) from None


def _error_line(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@contextlib.contextmanager
def _hub_offline():
    """``datasets`` and ``huggingface_hub`` in offline mode for one call (both read HF_HUB_OFFLINE only
    when imported): the local HF cache is read and the network never tried. ``datasets``' warnings that
    it fell back to its cache "since the hub couldn't be reached" are silenced: itlens asked for the cache."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE, datasets.logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved[:2]
        datasets.logging.set_verbosity(saved[2])


def load_records(fmt: str, source: str | Path | None = None, *, split: str | None = None,
                 limit: int | None = None, sample: int | None = None, seed: int = 0) -> list[dict]:
    """Read a dataset in format ``fmt`` and return CONTRACT records with stable ids.

    ``source``: a local file or hub id (default: the format's hub id). ``limit``: keep the first N
    rows (just-eval defaults to 800, the paper's regular, non-safety part; 0 keeps all).
    ``sample``: then a seeded subset of that size (:func:`itlens.transforms.subset`: smaller subsets
    nest inside larger ones for one seed, like the paper's 1K/10K/25K/52K sizes).
    """
    spec = get_format(fmt)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"expected 0 (all rows) or a positive number of rows, got {limit!r}", key="--limit")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample <= 0):
        raise InputError(f"expected a positive subset size, got {sample!r}", key="--sample")
    if source is None:
        if spec.hub_id is None:
            raise InputError(f"format {fmt!r} has no default hub id: pass a local file", key="--in")
        source = spec.hub_id
    limit = spec.default_limit if limit is None else (limit or None)
    records: list[dict] = []
    seen: dict[str, Where] = {}
    own_ids: bool | None = None  # whether this source's rows carry the format's own id (all or none must)
    for index, (at, row) in enumerate(iter_rows(source, split=split or spec.split)):
        if limit is not None and index >= limit:
            break
        rec = spec.convert(row, at)
        own = row.get(spec.own_id) if spec.own_id else None
        if spec.own_id and own is not None and (isinstance(own, bool) or not isinstance(own, (str, int))
                                                or (isinstance(own, str) and not own.strip())):
            raise at.error(f"expected a non-empty string or integer id, got {own!r}", spec.own_id)
        if spec.own_id:
            if own_ids is None:
                own_ids = own is not None
            elif own_ids != (own is not None):  # a position would pose as another row's own id
                raise at.error("missing required field (earlier rows have their own id)" if own is None else
                               "this row has its own id but earlier rows have none (ids would mix the "
                               "dataset's ids and row positions)", spec.own_id)
        rid = f"{spec.prefix}:{own if own is not None else index}"
        if rid in seen:
            raise at.error(f"duplicate id {rid!r}", spec.own_id or "id")
        seen[rid] = at
        records.append({"id": rid, **rec})
    if not records:
        raise InputError("dataset is empty (no rows)", file=str(source))
    if sample is None:
        return records
    from itlens.transforms import subset

    try:
        return subset(records, sample, seed=seed)
    except InputError as e:  # subset names its own argument ('n'); here it is the --sample option
        raise InputError(e.message, file=str(source), key="--sample") from None


def convert(fmt: str, source: str | Path | None, out: str | Path, **kwargs: Any) -> int:
    """:func:`load_records` written atomically to ``out`` (JSONL); returns the number of records."""
    records = load_records(fmt, source, **kwargs)
    atomic_write_jsonl(out, records)
    return len(records)

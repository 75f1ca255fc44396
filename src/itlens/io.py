"""Atomic writes and validated JSONL reading (CONTRACT record formats).

Every artifact is written to a temporary file in the same folder and renamed into place, so a killed
run never leaves a half-written file that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from itlens.errors import InputError


# ---------------------------------------------------------------------------------------- writing
def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide and not thread-safe to probe later


def _umask() -> int:
    return _UMASK


def _writable_parent(path: Path) -> None:
    """The nearest existing folder above ``path`` must be a folder (mkdir would fail with an OSError)."""
    for up in path.absolute().parents:
        if up.exists():
            if not up.is_dir():
                raise InputError(f"cannot write here: {up} is a file, not a folder", file=path)
            return


def check_out(path: str | Path, *, folder: bool, inputs: Iterable = (), replaced: bool = True,
              key: str | None = "--out") -> Path:
    """Refuse, before any work is done, an output path that cannot be written or that would destroy input.

    ``folder``: the command writes a folder (else a file). A replaced folder (``atomic_dir``: the old one
    goes as a whole once the new one is complete) must not be the working folder or one above it, nor
    hold one of ``inputs``; an output file must not be one of ``inputs``. Inputs that are not existing
    paths (hub ids) are ignored.
    """
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise InputError("exists and is not a folder; the output is a folder", file=p, key=key)
    if not folder and p.is_dir():
        raise InputError("is a folder; the output is a file", file=p, key=key)
    _writable_parent(p)
    target = p.resolve()
    if folder and replaced:
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise InputError("is the working folder or holds it; the output folder is replaced as a whole, so "
                             "name a folder of its own", file=p, key=key)
    for item in inputs:
        if item is None or not Path(item).exists():
            continue
        inp = Path(item).resolve()
        if inp == target or (folder and replaced and target in inp.parents):
            what = "is" if inp == target else "holds"
            how = "folder is replaced as a whole" if folder else "would replace it"
            raise InputError(f"{what} the input {item}; the output {how}, so write it elsewhere", file=p, key=key)
    return p


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InputError("is a folder; expected a file to write", file=path)
    _writable_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, fixed float formatting) so equal results are equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.bool_):
            return bool(o)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, dumps_json(obj))


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=False, default=_json_default) for r in rows]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when the block succeeds.

    An existing directory at ``path`` is replaced only after the new one is complete.
    """
    path = check_out(path, folder=True, key=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any other folder
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------- reading
def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed lines are InputErrors."""
    path = Path(path)
    if not path.is_file():
        raise InputError("is a folder, expected a JSONL file" if path.is_dir() else "file not found", file=path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("line is not UTF-8", file=path, line=lineno) from None
            if lineno == 1:  # a byte-order mark (Windows PowerShell 5.1, Notepad) is no part of the first record
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:  # without the line's end, so a line cut short is reported at its last column, not column 1
                obj = json.loads(line.rstrip("\r\n"), parse_constant=_not_json_constant)
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", file=path, line=lineno) from None
            except _NotJSON as e:
                raise InputError(f"malformed JSON: {e} is not a JSON value (strict JSON has no NaN or Infinity; "
                                 "write null)", file=path, line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError(f"expected a JSON object, got {type(obj).__name__}", file=path, line=lineno)
            if "\\ud" in line.lower():  # a \uD800-\uDFFF escape: valid JSON, but maybe not text
                _check_surrogates(obj, path, lineno)
            yield lineno, obj


class _NotJSON(ValueError):
    pass


def _not_json_constant(name: str):
    """Python's json reads NaN, Infinity and -Infinity, which no other JSON parser does; a score of NaN
    would then pass into means and tests silently."""
    raise _NotJSON(name)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_surrogates(obj: dict, path: Path, lineno: int) -> None:
    """A lone UTF-16 surrogate (half of an escaped emoji pair) cannot be encoded as UTF-8 nor tokenized."""
    def walk(value, field: str) -> None:
        if isinstance(value, str):
            m = _SURROGATE.search(value)
            if m:
                raise InputError(f"contains a lone UTF-16 surrogate (\\u{ord(m.group()):04x}), which is not text: "
                                 "fix the JSON escape (a pair such as \\ud83d\\ude00 is fine)",
                                 file=path, line=lineno, field=field)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, field)
        elif isinstance(value, list):
            for v in value:
                walk(v, field)

    for key, value in obj.items():
        walk(value, key)


def _require_str(obj: dict, field: str, path: Path, lineno: int, *, allow_empty: bool = False) -> str:
    if field not in obj:
        raise InputError("missing required field", file=path, line=lineno, field=field)
    v = obj[field]
    if not isinstance(v, str):
        raise InputError(f"expected a string, got {json.dumps(v)[:40]}", file=path, line=lineno, field=field)
    if not allow_empty and not v.strip():
        raise InputError("must not be empty", file=path, line=lineno, field=field)
    return v


def with_line_numbers(path: str | Path, records: list[dict]):
    """``(line number, record)`` for records :func:`read_records` read from ``path`` (blank lines are not
    records, so a record's index is not its line): for errors found after reading."""
    return zip((lineno for lineno, _ in iter_jsonl(path)), records)


def read_records(path: str | Path, kind: str = "any", *, allow_empty_file: bool = False) -> list[dict]:
    """Read and validate a CONTRACT JSONL file.

    ``kind``: ``"instruction"`` (instruction data: instruction/input/response or messages),
    ``"prompt"`` (evaluation prompts: instruction), ``"response"`` (id, instruction, response, model),
    or ``"any"`` (only an ``id`` is required). Ids must be unique within a file.
    """
    path = Path(path)
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        rid = obj.get("id")
        if rid is None:
            raise InputError("missing required field", file=path, line=lineno, field="id")
        if not isinstance(rid, str) or not rid:
            raise InputError(f"expected a non-empty string id, got {json.dumps(rid)}", file=path, line=lineno,
                             field="id")
        if rid in seen:
            raise InputError(f"duplicate id {rid!r} (first on line {seen[rid]})", file=path, line=lineno,
                             field="id")
        seen[rid] = lineno
        if kind == "instruction":
            _validate_instruction(obj, path, lineno)
        elif kind == "prompt":
            _require_str(obj, "instruction", path, lineno)
        elif kind == "response":
            _require_str(obj, "instruction", path, lineno)
            _require_str(obj, "response", path, lineno, allow_empty=True)
            _require_str(obj, "model", path, lineno)
            problem = token_ids_problem(obj.get("response_token_ids"))
            if problem:
                raise InputError(problem, file=path, line=lineno, field="response_token_ids")
        elif kind != "any":
            raise ValueError(f"unknown record kind {kind!r}")
        rows.append(obj)
    if not rows and not allow_empty_file:
        raise InputError("dataset is empty (no records)", file=path)
    return rows


def token_ids_problem(value) -> str | None:
    """What is wrong with a response record's ``response_token_ids`` (None when absent or a list of
    token ids: non-negative integers, numpy's too, as records built in Python from arrays hold them)."""
    if value is None:
        return None
    if not isinstance(value, list):
        return f"expected a list of token ids, got {type(value).__name__}"
    if set(map(type, value)) <= {int} and (not value or min(value) >= 0):  # plain ints: ~30x faster than below
        return None
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            try:
                shown = json.dumps(v)
            except (TypeError, ValueError):  # not a JSON value (a numpy bool, an object): say what it is
                shown = f"{v!r} ({type(v).__name__})"
            return f"expected non-negative integer token ids, got {shown}"
    return None


def _validate_instruction(obj: dict, path: Path, lineno: int) -> None:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError("expected a non-empty list of messages", file=path, line=lineno, field="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise InputError("expected {role: system|user|assistant, content: str}", file=path,
                                 line=lineno, field=f"messages[{i}]")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise InputError("the last message must be a non-empty assistant response", file=path,
                             line=lineno, field="messages")
        if all(m["role"] != "user" for m in msgs[:-1]):
            raise InputError("expected a user message before the last (assistant) message", file=path,
                             line=lineno, field="messages")
        return
    _require_str(obj, "instruction", path, lineno)
    if "input" in obj and not isinstance(obj["input"], str):
        raise InputError("expected a string", file=path, line=lineno, field="input")
    _require_str(obj, "response", path, lineno)


def user_text(rec: dict) -> str:
    """The user turn of an instruction or prompt record (instruction, plus input when present)."""
    if "messages" in rec:
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        return users[-1] if users else ""
    inp = rec.get("input") or ""
    return f"{rec['instruction']}\n\n{inp}" if inp.strip() else rec["instruction"]


def response_text(rec: dict) -> str:
    if "messages" in rec:
        return rec["messages"][-1]["content"]
    return rec["response"]


def to_messages(rec: dict, *, with_response: bool = True) -> list[dict]:
    """CONTRACT record -> chat messages (system + user [+ assistant])."""
    if "messages" in rec:
        msgs = [dict(m) for m in rec["messages"]]
        # only an answer is dropped: a prompt record's conversation ends on the question it asks
        return msgs if with_response or msgs[-1]["role"] != "assistant" else msgs[:-1]
    msgs = [{"role": "user", "content": user_text(rec)}]
    if with_response:
        msgs.append({"role": "assistant", "content": rec["response"]})
    return msgs

"""Typed configs: one dataclass serves Python, CLI and YAML (the TRL pattern).

Every stage has a ``@dataclass`` config whose field docstrings (``metadata={"help": ...}``) document
every knob. This module loads such a dataclass from a YAML file or a dict *strictly*: unknown keys
and wrong types are :class:`~itlens.errors.InputError` naming the file and the dotted key. CLI
overrides use the same path: ``--set tune.lora.r=16``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from itlens.errors import InputError

T = TypeVar("T")

_MISSING = object()


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, *, file: str | None, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (dicts to dataclasses, ints to floats)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, file=file, key=key)
            except InputError as e:  # try the next member of the union
                errors.append(e.message)
        raise InputError(f"expected {_type_name(tp)}, got {value!r}", file=file, key=key)
    if value is None and (dataclasses.is_dataclass(tp) or tp is dict or origin is dict):
        value = {}  # an empty YAML section (`shift:` with nothing under it): its defaults, as --set reads it
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise InputError(f"expected one of {list(allowed)}, got {value!r}", file=file, key=key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping for {tp.__name__}, got {type(value).__name__}",
                             file=file, key=key)
        return from_dict(tp, value, file=file, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"expected a list, got {type(value).__name__} {value!r}", file=file, key=key)
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, file=file, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"expected a mapping, got {type(value).__name__}", file=file, key=key)
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, file=file, key=f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML11_BOOLS:  # ``stopwords: yes`` as YAML 1.1 read it
            return YAML11_BOOLS[value.lower()]
        raise InputError(f"expected true or false, got {value!r}", file=file, key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InputError(f"expected an integer, got {value!r}", file=file, key=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise InputError(f"expected a number, got {value!r}", file=file, key=key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise InputError(f"expected a string, got {value!r}", file=file, key=key)
    return value


def from_dict(cls: type[T], data: dict, *, file: str | Path | None = None, prefix: str = "") -> T:
    """Build ``cls`` from ``data``; unknown keys and wrong types raise :class:`InputError`."""
    file = str(file) if file is not None else None
    if not isinstance(data, dict):
        raise InputError(f"expected a mapping, got {type(data).__name__}", file=file, key=prefix or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise InputError(f"unknown key (allowed: {', '.join(sorted(fields))})", file=file, key=key)
        kwargs[k] = _coerce(v, hints[k], file=file, key=key)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise InputError("required key is missing", file=file, key=key)
    try:
        obj = cls(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(str(e), file=file, key=prefix or None) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except InputError as e:
            if e.file is None:
                e.file = file
                e.args = (e.format(),)
            raise
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML (so ``true``, ``1e-3``, ``[1,2]`` work)."""
    if "=" not in text:
        raise InputError(f"override {text!r}: expected KEY=VALUE", key="--set")
    k, v = text.split("=", 1)
    path = k.strip().split(".")
    if not all(path):
        raise InputError(f"override {text!r}: expected KEY=VALUE with a key such as a or a.b", key="--set")
    try:
        return path, load_yaml(v) if v.strip() else ""
    except yaml.YAMLError as e:
        raise InputError(f"override {text!r}: malformed value ({getattr(e, 'problem', None) or e})", key="--set") from None


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for ov in overrides or []:
        path, value = parse_override(ov)
        cur = data
        for p in path[:-1]:
            if cur.get(p) is None:  # absent, or an empty section (``tune:`` with nothing under it)
                cur[p] = {}
            cur = cur[p]
            if not isinstance(cur, dict):
                raise InputError(f"override {ov!r}: {p} is not a mapping", key="--set")
        cur[path[-1]] = value
    return data


YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}
"""Words YAML 1.1 read as booleans. The loader reads them as text (YAML 1.2), and a true/false field still
takes them, so ``stopwords: yes`` keeps working while a key or a name ``no`` stays ``"no"``."""


class StrictLoader(yaml.SafeLoader):
    """YAML as a config file should read: a repeated key is an error (PyYAML keeps the last silently), and
    numbers are YAML 1.2's, so ``010`` is not octal 8 and ``1:30`` is not sexagesimal 90 (both stay
    strings, which a numeric field then refuses). As in YAML 1.2 a date is a string too: a ``name:
    2024-05-01`` is that text, not a ``datetime.date`` that no field takes and JSON cannot copy. And only
    true/false are booleans: ``variants: {no: ...}`` is a variant named ``no`` (YAML 1.1 made it
    ``False``), and a true/false field takes yes/no/on/off (:data:`YAML11_BOOLS`)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for i, (key_node, _) in enumerate(node.value):
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: keys written here override those
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, i)
            except TypeError:  # an unhashable key: PyYAML refuses it below
                continue
            if first != i:  # on another line, or on the same one (``{lr: 1, lr: 2}``)
                line = node.value[first][0].start_mark.line
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first on line {line + 1})",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp",
                           "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def load_yaml(text: str):
    return yaml.load(text, Loader=StrictLoader)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError("is a folder, expected a YAML file" if path.is_dir() else "file not found", file=path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(f"malformed YAML: {problem}", file=path, line=line) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError("expected a YAML mapping at the top level", file=path)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> T:
    """Load ``cls`` from YAML ``path`` (optional) with ``--set`` overrides applied."""
    data = dict(base or {})
    if path is not None:
        data.update(read_yaml(path))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, file=path)


# Field metadata flag for options added after studies were run with a version that lacked them: such a
# field enters a cache key (key_dict) only when it differs from its default, so upgrading itlens does not
# recompute finished stages whose settings it leaves unchanged.
KEY_OMITS_DEFAULT = "key_omits_default"


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return value == f.default_factory()  # type: ignore[misc]
    return False


def to_dict(cfg: Any, *, key: bool = False) -> Any:
    """Plain data of a (nested) config; ``key=True``: as it enters a cache key (see KEY_OMITS_DEFAULT)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name), key=key) for f in dataclasses.fields(cfg)
                if not (key and f.metadata.get(KEY_OMITS_DEFAULT) and _is_default(f, getattr(cfg, f.name)))}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v, key=key) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v, key=key) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def key_dict(cfg: Any) -> Any:
    """``to_dict(cfg, key=True)``: a config as it enters a stage's cache key."""
    return to_dict(cfg, key=True)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_hash(*parts: Any) -> str:
    """A short content hash of configs and other JSON-able values (stage cache keys)."""
    blob = json.dumps([key_dict(p) for p in parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, for docs and ``--help``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def load_section(cls: type, path: str | Path | None, section: str, overrides: list[str] | None = None):
    """Load ``cls`` from a YAML file: its top-level ``section:`` mapping when present, else the whole file.

    ``--set`` overrides are relative to the section (``n_families=10``); a ``section.`` prefix is accepted.
    Errors name the file and the dotted key as written in the file.
    """
    data = read_yaml(path) if path is not None else {}
    sectioned = section in data
    body = data if not sectioned else (data[section] if data[section] is not None else {})
    if not isinstance(body, dict):
        raise InputError(f"expected a mapping, got {type(body).__name__}", file=path, key=section)
    rel = [o[len(section) + 1:] if o.startswith(section + ".") else o for o in overrides or []]
    body = apply_overrides(body, rel)
    try:
        return from_dict(cls, body, file=path, prefix=section if sectioned else "")
    except InputError as e:  # keys from validate() are relative to the section
        if sectioned and e.key and not e.key.startswith(section + "."):
            e.key = f"{section}.{e.key}"
            e.args = (e.format(),)
        raise

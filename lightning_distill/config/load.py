"""How every config of the package is read: one loader for run, ``bank build``, ``teach`` and benchmark
configs (:func:`load_schema`), with the same checks on every path (a YAML file, a dict such as a
checkpoint's, ``key=value`` overrides).

A schema is a dataclass; a field whose values are a fixed set declares them beside its default with
:func:`choice` (the only place they are written), and the loader checks every such field, at any
depth, after the files and the overrides are merged. Unknown keys and wrong types fail with a
:class:`ConfigError` that names the key and lists the valid keys nearby.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

Choices = Union[Tuple[str, ...], Callable[[], Sequence[str]]]

# sets of choices that several schemas share
UNMAPPED = ("background", "ignore", "error")  # dataset or model labels that nothing maps
ON_MISSING = ("error", "warn")  # a label_map id or a class found in no label file
LAYOUTS = ("auto", "nnunet", "msd", "folder")
MODALITIES = ("CT", "MR", "none")
MR_NORMS = ("percentile", "zscore")
MODEL_FORMATS = ("checkpoint", "monai", "bundle", "torchscript")
PHANTOM_MODALITIES = ("CT", "MR")
PHANTOM_VERSIONS = ("0.3", "0.5")  # the generator: 0.3 (since 0.3.0, pinned) | 0.5 (learnable single-slice cues)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


def choice(default: str, options: Choices) -> Any:
    """A schema field whose value must be one of ``options`` (a tuple, or a function returning the names
    of a registry that may grow at run time), with its default; :func:`load_schema` checks it."""
    return dataclasses.field(default=default, metadata={"choices": options})


def same_as(schema: type, name: str) -> Any:
    """A schema field whose default (or factory) and choices are those of ``schema``'s field ``name``: one
    definition for a key that two schemas share (its type annotation is checked equal by the tests)."""
    f = next((f for f in dataclasses.fields(schema) if f.name == name), None)
    if f is None:
        raise KeyError(f"{schema.__name__} has no field {name!r}")
    return dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def _field_default(f: dataclasses.Field) -> Any:
    """A schema field's default value (its factory's product for a nested section)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def choices_of(schema: type, prefix: str = "") -> Dict[str, Choices]:
    """``{dotted key: choices}`` of every :func:`choice` field of ``schema``, nested dataclasses included."""
    out: Dict[str, Choices] = {}
    for f in dataclasses.fields(schema):
        if "choices" in f.metadata:
            out[prefix + f.name] = f.metadata["choices"]
        default = _field_default(f)
        if dataclasses.is_dataclass(default):
            out.update(choices_of(type(default), f"{prefix}{f.name}."))
    return out


def check_choices(cfg: DictConfig, schema: type, where: str) -> None:
    for key, options in choices_of(schema).items():
        allowed = tuple(options() if callable(options) else options)
        v = OmegaConf.select(cfg, key)
        if v not in allowed:
            raise ConfigError(f"{where}: {key}={v!r} is not one of {list(allowed)}")


# mappings whose keys the schemas do not fix (besides every `*kwargs`)
FREE_FORM = ("trainer", "data.splits", "transfer.select", "data.nifti.label_map", "cmedl.target.splits",
             "cmedl.target.nifti.label_map", "class_map", "data.label_map")


def _free_form(key: str) -> bool:
    return key in FREE_FORM or key.endswith("kwargs")


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not _free_form(full):
                keys.extend(_all_keys(child, full + "."))
    return keys


def _explain(e: OmegaConfBaseException, where: str, schema: Any) -> ConfigError:
    """``e`` as a :class:`ConfigError` naming the key and the valid keys near it (``schema``: a dataclass, or
    a config node whose keys are the valid ones)."""
    key = getattr(e, "full_key", None) or ""
    schema_keys = _all_keys(schema if isinstance(schema, DictConfig) else OmegaConf.structured(schema))
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        near = difflib.get_close_matches(key, schema_keys, n=5, cutoff=0.5)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in schema_keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        msg = f"{where}: unknown config key {key!r}."
        if near:
            msg += f" Did you mean {', '.join(repr(n) for n in near)}?"
        msg += f" Valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(siblings)}"
        return ConfigError(msg)
    return ConfigError(f"{where}: invalid value for {key!r}: {e.msg if hasattr(e, 'msg') else e}")


def file_layers(path: Path, seen: Sequence[Path] = ()) -> List[tuple]:
    """``(path, config)`` of the YAML file and, first, of the files it ``extends`` (relative path)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, [*seen, path]))})")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    base = node.pop("extends", None)
    layers = file_layers(extends_path(path, str(base)), [*seen, path]) if base else []
    return [*layers, (path, node)]


REPOSITORY = Path(__file__).resolve().parents[2]  # the package's source checkout (its experiments/ folder)


def extends_path(path: Path, base: str) -> Path:
    """Where ``extends: base`` in the file ``path`` points: an absolute path as it is; a relative one relative to
    the extending file's folder, or, when nothing is there and it starts with ``experiments/``, the package's own
    ``experiments/`` (so a config outside the repository can extend ``experiments/teacher.yaml``).

    Raises:
        FileNotFoundError: neither exists (the message names the file and both places looked at).
    """
    target = Path(base).expanduser()
    if target.is_absolute():
        return target
    beside = path.parent / target
    if beside.is_file():
        return beside
    ours = REPOSITORY / target
    if target.parts[:1] == ("experiments",) and ours.is_file():
        return ours
    tried = [str(beside)] + ([str(ours)] if target.parts[:1] == ("experiments",) else [])
    raise FileNotFoundError(f"{path}: extends {base!r}, which is not there ({' nor '.join(tried)}); a relative "
                            "path is relative to the extending file's folder (experiments/... also to the package's "
                            "own experiments folder)")


def load_schema(schema: type, path: Optional[str | Path] = None, overrides: Sequence[str] = (), what: str = "config",
                values: Optional[Dict[str, Any]] = None, checks: Sequence[Callable[[DictConfig, str], None]] = (),
                before_overrides: Optional[Callable[[DictConfig], DictConfig]] = None) -> DictConfig:
    """A config of ``schema``: its defaults, then ``values`` (a dict, e.g. a checkpoint's config) or the YAML
    file ``path`` (its ``extends`` chain first), then ``before_overrides(cfg)``, then the ``key=value``
    overrides; then every :func:`choice` field and every function of ``checks`` (``check(cfg, where)``).

    Raises:
        ConfigError: unknown key (with the valid ones nearby), wrong type, a value outside its choices,
            or what a check refuses.
        FileNotFoundError: the YAML file does not exist.
    """
    cfg = OmegaConf.structured(schema)
    where = str(path) if path is not None else what
    if values is not None:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(values))
        except OmegaConfBaseException as e:
            raise _explain(e, where, schema) from None
    if path is not None:
        for source, layer in file_layers(Path(path)):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as e:
                raise _explain(e, str(source), schema) from None
    if before_overrides is not None:
        cfg = before_overrides(cfg)
    cfg = apply_overrides(cfg, overrides, schema)
    check_choices(cfg, schema, where)
    for check in checks:
        check(cfg, where)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], schema: Optional[type] = None) -> DictConfig:
    """Apply ``key=value`` overrides; ``~key`` deletes an entry of a free-form mapping (``schema``: the
    dataclass whose keys an error lists; default: ``cfg``'s own keys).

    Deleting is for ``model.kwargs``, ``trainer``, ``data.nifti.label_map`` and the like, e.g.
    ``~model.kwargs.decoder_channels`` when switching to an architecture without that argument
    (merging ``model.kwargs={}`` would keep the old entries).
    """
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must be key=value (or ~key to delete a mapping entry), got {bad}")
    for o in overrides:
        if o.startswith("~"):
            key = o[1:].split("=", 1)[0]
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or leaf not in node:
                raise ConfigError(f"command-line override {o!r}: there is no {key!r} to delete")
            if not _free_form(parent):
                mapping = _free_form(key)
                raise ConfigError(f"command-line override {o!r}: {key!r} is a key of the schema, which stays; "
                                  + (f"set {key}=null (or {{}}) to clear it, or delete one of its entries (~{key}.NAME)"
                                     if mapping else f"set {key}=... to change it")
                                  + f"; ~ deletes entries of the free-form mappings only ({', '.join(FREE_FORM)}, *.kwargs)")
            del node[leaf]
        else:
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([_spaced_mapping(o)]))
            except OmegaConfBaseException as e:
                raise _explain(e, "command-line override", schema if schema is not None else cfg) from None
    return cfg


def _spaced_mapping(override: str) -> str:
    """``key={a:b,5:c}`` -> ``key={a: b,5: c}``: YAML reads ``a:b`` in a flow mapping as one key, so a
    mapping written without a space after its colons would silently become ``{'a:b': None}``. Colons
    inside quotes and ``${...}`` interpolations are left alone."""
    key, _, value = override.partition("=")
    v = value.strip()
    if not (v.startswith("{") and v.endswith("}")):
        return override
    out, quote, depth = [], None, 0
    for i, ch in enumerate(v):
        out.append(ch)
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "$" and v[i + 1:i + 2] == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        elif ch == ":" and not depth and v[i + 1:i + 2] not in (" ", ""):
            out.append(" ")
    return f"{key}={''.join(out)}"


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flat_keys(d: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested dict as ``{"a.b.c": value}``; an empty dict is a value (``{"a.b": {}}``)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    items: Dict[str, Any] = {}
    for k, v in d.items():
        items.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return items


def config_key(cfg: DictConfig, ignore: Sequence[str] = ()) -> str:
    """A short hash of ``cfg`` without its top-level keys ``ignore`` (settings of how a command runs, not of what
    it computes): a resumed ``bank build`` or ``teach`` must have the same."""
    c = OmegaConf.to_container(cfg)
    for k in ignore:
        c.pop(k, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _field_comments(schema: type) -> Dict[str, str]:
    """``{field: the comment after it in the schema's source}`` (for ``--help``; a field declared in a base
    schema keeps that schema's comment unless the subclass redeclares it with one; ``{}`` without the source)."""
    out: Dict[str, str] = {}
    for cls in reversed([c for c in schema.__mro__ if dataclasses.is_dataclass(c)]):  # the subclass's own last: it wins
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        own: Dict[str, str] = {}
        for line in lines:
            m = re.match(r"\s+(\w+): [^#]*?#\s*(.+)$", line)
            if m and '"' not in line.split("#", 1)[1][:1]:
                own.setdefault(m.group(1), m.group(2).strip())
        out.update(own)
    return out


def schema_help(schema: type, prefix: str = "") -> List[str]:
    """One line per key of ``schema`` (nested dataclasses expanded), for ``--help``:
    ``key = default  (one of: ...)  # the schema's comment``."""
    lines, comments = [], _field_comments(schema)
    for f in dataclasses.fields(schema):
        default = _field_default(f)
        key = prefix + f.name
        if dataclasses.is_dataclass(default):
            lines.extend(schema_help(type(default), key + "."))
            continue
        options = f.metadata.get("choices")
        shown = "???" if default is dataclasses.MISSING else repr(default)
        opts = "" if options is None else f"  (one of: {', '.join(options() if callable(options) else options)})"
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {key} = {shown}{opts}{note}")
    return lines

"""Load a node policy YAML file into a NodeConfig, reporting every problem with file:line.

Each problem reads ``FILE:LINE: FIELD.PATH: message``.  The YAML is composed
into a node tree first so that the line of every mapping key and sequence item
is known; a problem found by pydantic, by ``model.cross_check`` or by the
environment checks names a field path, and the path is mapped back to the line
of that key (or of its nearest parent that exists, for a missing field).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

from nodeproxy.config import model
from nodeproxy.config.environment import environment_problems
from nodeproxy.config.model import NodeConfig

Path = tuple[str | int, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class ConfigError(Exception):
    """A configuration was refused; ``problems`` holds one "FILE:LINE: PATH: message" each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


class ConfigReadError(ConfigError):
    """The file could not be read at all (missing, unreadable, a directory)."""


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration and where it came from."""

    config: NodeConfig
    source: str  # file path, or "<string>"
    digest: str  # sha256 hex of the raw bytes: identifies the version
    loaded_at: float  # time.time() when it was loaded


def format_path(path: Path) -> str:
    """("workloads", 0, "ips", 1) -> "workloads[0].ips[1]"; odd keys are quoted: labels['a/b']."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _PLAIN_KEY.match(part):
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out


def load_config(path: str | os.PathLike[str], *, check_environment: bool = False) -> LoadedConfig:
    """Read, parse and validate a node policy file; raise ConfigError listing every problem."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigReadError([f"{source}: cannot read: {e.strerror or e}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError([f"{source}:{line}: not UTF-8 text ({e.reason})"]) from None
    return _load(text, source, hashlib.sha256(raw).hexdigest(), check_environment)


def parse_config(
    text: str, source: str = "<string>", *, check_environment: bool = False
) -> LoadedConfig:
    """Parse and validate a node policy given as text; raise ConfigError listing every problem."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _load(text, source, digest, check_environment)


def _load(text: str, source: str, digest: str, check_environment: bool) -> LoadedConfig:
    try:
        doc = _parse_yaml(text, source)
        config, problems = _validate(doc, check_environment)
    except RecursionError:
        # PyYAML composes and constructs recursively: ``[[[[...`` thousands deep.
        raise ConfigError([f"{source}:1: YAML nested too deeply to read"]) from None
    if problems or config is None:
        raise ConfigError(_render(source, doc, problems))
    return LoadedConfig(config=config, source=source, digest=digest, loaded_at=time.time())


# --- YAML with line numbers ------------------------------------------------------------------


@dataclass
class _Document:
    """Parsed YAML data, the line of every key and item, and structural problems found so far."""

    data: Any
    lines: dict[Path, int]
    problems: list[model.Problem]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader used through compose_node, so the node tree (with marks) can be walked."""


def _parse_yaml(text: str, source: str) -> _Document:
    try:
        # The reader checks the text as it is constructed: a control character raises here.
        loader = _LineLoader(text)
    except yaml.reader.ReaderError as e:
        raise ConfigError([_reader_problem(source, text, e)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError([f"{source}:1: the file is empty (expected a {model.KIND} mapping)"])
        lines: dict[Path, int] = {(): node.start_mark.line + 1}
        problems: list[model.Problem] = []
        _walk(loader, node, (), lines, problems, override=True, ancestors=set())
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        raise ConfigError([_syntax_problem(source, text, e)]) from None
    except yaml.reader.ReaderError as e:
        raise ConfigError([_reader_problem(source, text, e)]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}:1: YAML syntax error: {e}"]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        problems.append(((), f"the top level must be a {model.KIND} mapping "
                             f"(got {_describe_value(data)})"))
        data = None
    return _Document(data=data, lines=lines, problems=problems)


def _reader_problem(source: str, text: str, e: yaml.reader.ReaderError) -> str:
    """A character YAML does not allow (a control character, say), at its line."""
    line = text[: e.position].count("\n") + 1
    what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
    return f"{source}:{line}: YAML syntax error: unacceptable character {what} ({e.reason})"


def _syntax_problem(source: str, text: str, e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    # The end of the stream is the line after the last one: name the last line instead.
    line = min(mark.line + 1 if mark else 1, max(1, len(text.splitlines())))
    message = e.problem or e.context or "invalid YAML"
    if e.context and e.problem and e.problem.startswith("but "):
        message = f"{e.context}, {e.problem}"
    elif e.context and e.problem and e.context_mark and e.context_mark.line + 1 != line:
        message += f" ({e.context} at line {e.context_mark.line + 1})"
    elif e.context and e.problem:
        message += f" ({e.context})"
    return f"{source}:{line}: YAML syntax error: {message}"


def _walk(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: Path,
    lines: dict[Path, int],
    problems: list[model.Problem],
    *,
    override: bool,
    ancestors: set[int],
) -> None:
    """Record the line of every key and item under node; report duplicate keys."""
    if id(node) in ancestors:  # an alias loop: the data refers to itself
        return
    ancestors = ancestors | {id(node)}

    def record(child_path: Path, child: yaml.Node, line: int, override: bool) -> None:
        if override or child_path not in lines:
            lines[child_path] = line
        _walk(loader, child, child_path, lines, problems, override=override, ancestors=ancestors)

    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            record(path + (i,), item, item.start_mark.line + 1, override)
    elif isinstance(node, yaml.MappingNode):
        merges: list[yaml.Node] = []
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            key = _key_value(loader, key_node)
            if key is None:
                continue
            line = key_node.start_mark.line + 1
            if key in first_line:
                problems.append((path + (key,),
                                 f"duplicate key {key!r} (already at line {first_line[key]})"))
            first_line.setdefault(key, line)
            record(path + (key,), value_node, line, override)
        # Keys merged in with "<<" count only where the mapping does not set them itself.
        for merged in merges:
            sources = merged.value if isinstance(merged, yaml.SequenceNode) else [merged]
            for source_node in sources:
                _walk(loader, source_node, path, lines, problems, override=False,
                      ancestors=ancestors)


def _key_value(loader: yaml.SafeLoader, key_node: yaml.Node) -> str | int | None:
    """The value of a scalar mapping key, or None for keys that cannot be part of a path."""
    if not isinstance(key_node, yaml.ScalarNode):
        return None
    try:
        key = loader.construct_object(key_node)
    except yaml.YAMLError:
        return None
    return key if isinstance(key, str | int) else str(key)


# --- validation ------------------------------------------------------------------------------


def _validate(
    doc: _Document, check_environment: bool
) -> tuple[NodeConfig | None, list[model.Problem]]:
    """Validate the data; return the config (None if invalid) and every (path, message)."""
    problems = list(doc.problems)
    if doc.data is None:
        return None, problems
    try:
        config = NodeConfig.model_validate(doc.data, by_alias=True, by_name=False)
    except ValidationError as e:
        problems.extend(_pydantic_problem(err) for err in e.errors(include_url=False))
        return None, problems
    problems.extend(model.cross_check(config))
    if check_environment:
        problems.extend(environment_problems(config))
    return config, problems


def _render(source: str, doc: _Document, problems: list[model.Problem]) -> list[str]:
    """Format problems as "FILE:LINE: PATH: message", ordered by line, without repeats."""
    rendered: list[tuple[int, str]] = []
    for path, message in problems:
        line = _line_of(doc.lines, path)
        where = f"{format_path(path)}: " if path else ""
        text = f"{source}:{line}: {where}{message}"
        if (line, text) not in rendered:
            rendered.append((line, text))
    rendered.sort(key=lambda item: item[0])
    return [text for _, text in rendered]


def _line_of(lines: dict[Path, int], path: Path) -> int:
    """The line of path's key, or of the nearest parent that exists in the document."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1


# --- pydantic errors in plain words ----------------------------------------------------------


def _pydantic_problem(err: ErrorDetails) -> tuple[Path, str]:
    path: Path = tuple(
        part for part in err["loc"] if not (isinstance(part, str) and _is_schema_tag(part))
    )
    is_key = bool(path) and path[-1] == "[key]"
    if is_key:
        path = path[:-1]
    message = _message(err, path)
    return path, f"key {message}" if is_key else message


def _is_schema_tag(part: str) -> bool:
    """pydantic puts union member descriptions such as 'function-after[...]' into loc."""
    return "[" in part and part != "[key]"


def _message(err: ErrorDetails, path: Path) -> str:
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    got = f" (got {_describe_value(err.get('input'))})"
    if kind == "extra_forbidden":
        return "unknown field" + _did_you_mean(path)
    if kind == "literal_error":
        return _choices_message(path, ctx) + got
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind]} {_number(ctx[_BOUND_KEYS[kind]])}{got}"
    if kind == "string_type" and isinstance(err.get("input"), bool | int | float):
        return f"must be a string{got[:-1]}; quote it in YAML)"
    if kind in _TYPE_WORDS:
        return f"must be {_TYPE_WORDS[kind]}{got}"
    if kind in _SIMPLE:
        return _SIMPLE[kind](ctx)
    return _clean(err["msg"])


_BOUNDS = {
    "greater_than": "greater than",
    "greater_than_equal": "at least",
    "less_than": "less than",
    "less_than_equal": "at most",
}
_BOUND_KEYS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt",
               "less_than_equal": "le"}
_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "mapping_type": "a mapping",
    "list_type": "a list",
    "finite_number": "a finite number",
}
_SIMPLE: dict[str, Callable[[dict[str, Any]], str]] = {
    "missing": lambda ctx: "required field missing",
    "too_short": lambda ctx: f"must have at least {_items(ctx['min_length'])}",
    "too_long": lambda ctx: f"must have at most {_items(ctx['max_length'])}",
    "string_too_short": lambda ctx: "must not be empty" if ctx["min_length"] == 1
    else f"must be at least {ctx['min_length']} characters long",
    "string_too_long": lambda ctx: f"must be at most {ctx['max_length']} characters long",
    "value_error": lambda ctx: str(ctx["error"]),
    "assertion_error": lambda ctx: str(ctx["error"]),
    "recursion_loop": lambda ctx: "refers to itself (a YAML alias loop)",
    "frozen_instance": lambda ctx: "cannot be changed",
}


def _items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _clean(message: str) -> str:
    """pydantic's wording for anything not handled above, without 'Input should be'."""
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message.replace("Input should be", "must be").replace("Input is", "is")


def _describe_value(value: Any) -> str:
    """A value as the YAML author wrote it: true, null, 'text', 3, or a kind for containers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return _number(value)
    return repr(value)


def _choices_message(path: Path, ctx: dict[str, Any]) -> str:
    annotation = _annotation_at(path)
    if typing.get_origin(annotation) is typing.Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
    else:
        choices = [c.strip("'\"") for c in re.split(r", | or ", str(ctx.get("expected", "")))]
    if len(choices) == 1:
        return f"must be {choices[0]}"
    return f"must be one of {', '.join(choices)}"


def _did_you_mean(path: Path) -> str:
    parent = _annotation_at(path[:-1])
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)) or not path:
        return ""
    names = [field.alias or name for name, field in parent.model_fields.items()]
    wrong = str(path[-1])
    if to_camel(wrong) in names:
        return f" (did you mean {to_camel(wrong)!r}?)"
    close = difflib.get_close_matches(wrong, names, n=1, cutoff=0.6)
    if not close:
        by_case = {name.lower(): name for name in names}
        close = [by_case[m] for m in difflib.get_close_matches(wrong.lower(), list(by_case), 1)]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _annotation_at(path: Path) -> Any:
    """The declared type at a field path of NodeConfig (Optional and Annotated unwrapped)."""
    annotation: Any = NodeConfig
    for part in path:
        annotation = _unwrap(annotation)
        origin = typing.get_origin(annotation)
        if isinstance(part, int) and origin is list:
            annotation = typing.get_args(annotation)[0]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = {f.alias or n: f for n, f in annotation.model_fields.items()}
            if part not in fields:
                return None
            annotation = fields[part].annotation
        elif origin is dict:
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    return _unwrap(annotation)


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation

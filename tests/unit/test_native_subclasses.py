"""Interpreted subclasses of the compiled group's classes (nodeproxy/native.py).

A native class (mypyc) refuses to construct an instance of a subclass defined in an
interpreted module: ``TypeError: interpreted classes cannot inherit from compiled``,
raised by the constructor, not by the class statement, so the import succeeds and every
use fails.  That is how the HTTP/2 codec's first compiled build failed every HTTP/2
client connection while 664 unit tests passed (``ClientH2Server(H2Server)`` lived in the
interpreted client_connections.py; docs/benchmarks.md, "HTTP/2 compiled, third round").

The structural check runs in both builds (it reads the sources and the classes, not the
build): every class of the package whose bases include a class of a NATIVE_MODULES
module is itself in the group, or that base says it takes interpreted subclasses
(``@mypyc_attr(allow_interpreted_subclasses=True)``) or is not native
(``native_class=False``).  The compiled check constructs the subclasses the L7 path
makes per connection.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import os
import pkgutil

import pytest

import nodeproxy
from nodeproxy import native

# Modules that need what a unit test run lacks (none today); named, never silently skipped.
UNIMPORTABLE: frozenset[str] = frozenset()


def _opened_classes(module: str) -> set[str]:
    """Classes of a group module that may be subclassed by interpreted code (by their
    mypyc_attr decorator in the source)."""
    tree = ast.parse(native.source_path(module).read_text())
    opened = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and getattr(
                    decorator.func, "id", getattr(decorator.func, "attr", "")) == "mypyc_attr":
                for keyword in decorator.keywords:
                    value = keyword.value
                    if isinstance(value, ast.Constant) and (
                            (keyword.arg == "allow_interpreted_subclasses" and value.value is True)
                            or (keyword.arg == "native_class" and value.value is False)):
                        opened.add(node.name)
    return opened


def _package_modules() -> list[str]:
    names = [nodeproxy.__name__]
    for info in pkgutil.walk_packages(nodeproxy.__path__, nodeproxy.__name__ + "."):
        if not info.name.endswith(".__main__"):  # (runs the command line)
            names.append(info.name)
    return sorted(names)


def interpreted_subclasses_of_the_group() -> list[str]:
    """'module.Class(base module.Base)' for each subclass the compiled build would refuse."""
    group = set(native.NATIVE_MODULES)
    opened = {m: _opened_classes(m) for m in group}
    refused = []
    for name in _package_modules():
        if name in group or name in UNIMPORTABLE:
            continue
        module = importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            if not inspect.isclass(cls) or cls.__module__ != name:
                continue
            for base in cls.__mro__[1:]:
                if base.__module__ in group and base.__qualname__ not in opened[base.__module__]:
                    refused.append(f"{name}.{cls_name} (base {base.__module__}."
                                   f"{base.__qualname__})")
                    break
    return refused


def test_no_interpreted_module_subclasses_a_closed_compiled_class() -> None:
    assert interpreted_subclasses_of_the_group() == []


def test_the_check_sees_a_subclass_outside_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: with client_h2 taken out of the group, ClientH2Server (an
    H2Server subclass) is named."""
    monkeypatch.setattr(native, "NATIVE_MODULES", tuple(
        m for m in native.NATIVE_MODULES if m != "nodeproxy.http.client_h2"))
    assert "nodeproxy.http.client_h2.ClientH2Server (base nodeproxy.codec.h2.H2Server)" \
        in interpreted_subclasses_of_the_group()


def _compiled() -> bool:
    if os.environ.get(native.ENV) == "0":
        return False
    import nodeproxy.http.router  # noqa: F401 - loads the group
    return native.state()[0]


def test_the_http2_protocols_the_l7_path_makes_are_constructed_compiled() -> None:
    """Compiled: the per-connection HTTP/2 server (ClientH2Server) and the pool's counted
    upstream client construct, and are native (no attribute dict)."""
    if not _compiled():
        pytest.skip("pure Python")
    from nodeproxy.http.client_connections import ClientH2Server
    from nodeproxy.http.pool import _CountedH2

    async def handler(_exchange: object) -> None:
        return None

    async def main() -> None:
        server = ClientH2Server(handler)  # type: ignore[arg-type]
        server.watch_heads(5.0, None, lambda _kind: None)
        client = _CountedH2(lambda: None, lambda: None)
        for protocol in (server, client):
            assert not hasattr(protocol, "__dict__"), type(protocol)

    asyncio.run(main())

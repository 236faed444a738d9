"""The compiled L7 path (nodeproxy/native.py, setup.py): used only when it was built from
the sources beside it, all of it or none, and never when NODEPROXY_NATIVE=0."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodeproxy import native

REPO = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_tree(root: Path, *, built: tuple[str, ...] = native.NATIVE_MODULES,
              manifest: bool = True) -> Path:
    """A package tree with every NATIVE_MODULES source, a (fake) compiled file for those
    in `built` and a build manifest of the sources as they are now."""
    for module in native.NATIVE_MODULES:
        source = native.source_path(module, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"# {module}\n")
        if module in built:
            source.with_name(source.stem + SUFFIX).write_bytes(b"\x7fELF")
    if manifest:
        record = native.manifest(native.NATIVE_MODULES, root)
        (root / "nodeproxy" / native.MANIFEST).write_text(json.dumps(record))
    return root


def test_a_build_of_the_current_sources_is_used(tmp_path: Path) -> None:
    assert native.judge(fake_tree(tmp_path), {}) == (
        True, f"compiled (mypyc): {len(native.NATIVE_MODULES)} modules")


def test_no_build_is_pure_python(tmp_path: Path) -> None:
    assert native.judge(fake_tree(tmp_path, built=()), {}) == (
        False, "pure Python: no compiled build")


def test_the_switch_turns_a_good_build_off(tmp_path: Path) -> None:
    use, why = native.judge(fake_tree(tmp_path), {"NODEPROXY_NATIVE": "0"})
    assert not use and "NODEPROXY_NATIVE=0" in why


@pytest.mark.parametrize("module", [native.NATIVE_MODULES[0], native.NATIVE_MODULES[-1],
                                    "nodeproxy.http.router"])
def test_a_source_edited_after_the_build_refuses_the_whole_build(tmp_path: Path,
                                                                 module: str) -> None:
    root = fake_tree(tmp_path)
    source = native.source_path(module, root)
    source.write_text(source.read_text() + "x = 1\n")
    use, why = native.judge(root, {})
    assert not use and why == f"pure Python: the build is older than the source of {module}"


def test_a_partial_build_is_refused(tmp_path: Path) -> None:
    use, why = native.judge(fake_tree(tmp_path, built=native.NATIVE_MODULES[1:]), {})
    assert not use and why == f"pure Python: the build lacks {native.NATIVE_MODULES[0]}"


def test_compiled_files_without_a_manifest_are_refused(tmp_path: Path) -> None:
    use, why = native.judge(fake_tree(tmp_path, manifest=False), {})
    assert not use and native.MANIFEST in why


def test_a_build_for_another_interpreter_is_refused(tmp_path: Path) -> None:
    root = fake_tree(tmp_path)
    path = root / "nodeproxy" / native.MANIFEST
    record = json.loads(path.read_text())
    record["cache_tag"] = "cpython-399"
    path.write_text(json.dumps(record))
    use, why = native.judge(root, {})
    assert not use and "cpython-399" in why


def test_every_compiled_module_is_a_source_in_the_tree() -> None:
    for module in native.NATIVE_MODULES:
        assert native.source_path(module).is_file(), module


def _compiled_files() -> list[Path]:
    found = []
    for module in native.NATIVE_MODULES:
        base = native.source_path(module).with_suffix("")
        found += [base.with_name(base.name + s) for s in importlib.machinery.EXTENSION_SUFFIXES
                  if base.with_name(base.name + s).exists()]
    return found


def test_a_build_in_this_tree_was_made_from_these_sources() -> None:
    """Drift: with compiled modules beside the sources, the build must be of exactly
    these sources (rebuild: `make native`), and then this process runs it."""
    if not _compiled_files():
        pytest.skip("no compiled build in this tree (pure Python)")
    assert native.judge(environ={})[0], native.judge(environ={})[1]
    if os.environ.get(native.ENV) != "0":
        import nodeproxy.http.router  # noqa: F401 - loads the group
        assert native.state()[0]
        assert native.loaded_compiled() == [m for m in native.NATIVE_MODULES
                                            if m in sys.modules]


def _loaded_files(env: dict[str, str]) -> list[str]:
    code = ("import importlib, nodeproxy.native as n\n"
            "for m in n.NATIVE_MODULES: print(importlib.import_module(m).__file__)\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return run.stdout.split()


def test_the_switch_imports_every_module_from_its_source() -> None:
    env = {**os.environ, "PYTHONPATH": str(native.PACKAGE_DIR.parent), native.ENV: "0"}
    files = _loaded_files(env)
    assert len(files) == len(native.NATIVE_MODULES)
    assert all(f.endswith(".py") for f in files), files


def test_without_the_switch_a_current_build_is_imported_whole() -> None:
    if not _compiled_files():
        pytest.skip("no compiled build in this tree (pure Python)")
    env = {**os.environ, "PYTHONPATH": str(native.PACKAGE_DIR.parent)}
    env.pop(native.ENV, None)
    files = _loaded_files(env)
    assert all(f.endswith(SUFFIX) for f in files), files


def test_the_http1_protocol_classes_are_native_when_compiled() -> None:
    """H1Server and H1Client are asyncio protocols by their methods only: with a Python
    base class (asyncio.Protocol) mypyc would compile them as non-native classes, their
    attributes in a per-object dict looked up generically on every request."""
    if not _compiled_files() or os.environ.get(native.ENV) == "0":
        pytest.skip("pure Python")
    import nodeproxy.http.router  # noqa: F401 - loads the group
    if not native.state()[0]:
        pytest.skip(native.state()[1])
    from nodeproxy.codec.h1 import H1Client, H1Exchange, H1Server

    async def handler(_exchange: H1Exchange) -> None:
        return None

    for protocol in (H1Server(handler, max_header_bytes=8192, idle_timeout=5), H1Client()):
        assert not hasattr(protocol, "__dict__"), type(protocol)
        with pytest.raises(AttributeError):
            protocol.not_an_attribute = 1  # type: ignore[union-attr]


def test_the_relays_classes_are_native_and_take_interpreted_subclasses() -> None:
    """Side is an asyncio protocol by its methods only (with asyncio.Protocol as base it
    would compile as a non-native class); Side and Relay allow interpreted subclasses
    (tcp/tracker.py's accepted side, dormancy's stand-ins), whose overrides compiled
    callers must reach: Relay.start (compiled) calls the subclass's forward."""
    if not _compiled_files() or os.environ.get(native.ENV) == "0":
        pytest.skip("pure Python")
    from nodeproxy.tcp.relay import Relay, Side
    if not native.state()[0]:
        pytest.skip(native.state()[1])
    side = Side("x")
    assert not hasattr(side, "__dict__")
    with pytest.raises(AttributeError):
        side.not_an_attribute = 1  # type: ignore[attr-defined]

    class Noting(Relay):
        def forward(self, src: Side, data: bytes | memoryview) -> None:
            forwarded.append(bytes(data))

    forwarded: list[bytes] = []
    down, up = Side("downstream"), Side("upstream")
    down.hold_early(b"early")
    down.lost = up.lost = True  # start() then ends it without transports
    relay = Noting(down, up, lambda d, n: None, lambda r: None)
    try:
        relay.start()
    except RuntimeError:
        pass  # _finish asks for the running loop: there is none here
    assert forwarded == [b"early"]


def test_every_object_of_the_loaded_group_survives_isinstance() -> None:
    """Every object alive after importing the whole group (compiled when built, else the
    sources) is asked isinstance() and type(), as a heap walker (gc.get_objects: a leak
    hunt, a debugger) would: a class mypyc compiled from a subclass of a C type such as
    threading.local once crashed the interpreter here.  In a child: a crash is a failed
    test, not a lost run."""
    code = ("import gc, importlib, nodeproxy.native as n\n"
            "for m in n.NATIVE_MODULES: importlib.import_module(m)\n"
            "print(n.state()[1])\n"
            "objects = gc.get_objects()\n"
            "hits = sum(isinstance(o, int) + isinstance(o, (str, Exception)) for o in objects)\n"
            "print(len(objects), hits)\n")
    env = {**os.environ, "PYTHONPATH": str(native.PACKAGE_DIR.parent)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    state, counts = run.stdout.splitlines()
    assert int(counts.split()[0]) > 10_000, counts  # the walk saw the heap


def test_no_extension_file_in_the_tree_is_outside_the_group() -> None:
    """An extension file is imported before the source beside it, whatever native.py
    decides: every one in the package must be a module of the group (or its shared
    library).  setup.py's in-place build removes the others."""
    allowed = {native.GROUP + "__mypyc", *native.NATIVE_MODULES}
    package = native.PACKAGE_DIR
    found = {path for suffix in importlib.machinery.EXTENSION_SUFFIXES
             for path in package.rglob("*" + suffix)}
    strays = []
    for path in sorted(found):
        relative = path.relative_to(package.parent)
        module = ".".join((*relative.parent.parts, relative.name.split(".")[0]))
        if module not in allowed:
            strays.append(str(path))
    assert not strays, "stale extension files (rebuild: make native): " + ", ".join(strays)

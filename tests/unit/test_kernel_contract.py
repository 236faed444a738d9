"""bpf/maps.h and its Python view, nodeproxy/capture/contract.py, agree (no root, no bcc).

Checked: every struct's fields, in order, with their types, offsets and the struct's
size; every map's name, kind, key and value layout and whether it is pinned (and where);
the counter snapshots the daemon exports (capture/maps.py) have their struct's fields.

How maps.h is read:
- struct definitions by pycparser, a real C99 parser, once comments, preprocessor lines
  and the map declarations are taken out and the kernel's fixed-width types (u8..u64,
  s8..s64, __u8..__s64) are declared as typedefs.  Offsets and sizes are computed with
  the natural alignment of the BPF target (and x86-64, aarch64): a scalar aligns to its
  size, an array to its element, a struct to its widest member.  Bit-fields, unions and
  anything else this does not model are refused with a message, never guessed at;
- map declarations are bcc macro invocations (their expansion needs bcc's helpers.h and
  is no C a parser can check on its own): each BPF_*(...) at file scope is cut out with
  its balanced parentheses and its arguments read as bcc 0.26's helpers.h defines them
  (BPF_TABLE, BPF_TABLE_PINNED, BPF_HASH, BPF_ARRAY, BPF_SOCKHASH, BPF_SK_STORAGE, with
  their defaults).  Any other BPF_ macro fails the test until the reader learns it.

The variants at the end feed the same check a modified header (and a modified Python
view) and require it to name the difference: a check that cannot fail proves nothing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from pycparser import c_ast, c_parser

from nodeproxy.capture import contract, maps

MAPS_H = Path(__file__).resolve().parents[2] / "bpf" / "maps.h"

# C scalar type -> (signed, size in bytes)
SCALARS = {
    **{f"{p}u{bits}": (False, bits // 8) for p in ("", "__") for bits in (8, 16, 32, 64)},
    **{f"{p}s{bits}": (True, bits // 8) for p in ("", "__") for bits in (8, 16, 32, 64)},
    "int": (True, 4), "unsigned int": (False, 4),
    "char": (True, 1), "unsigned char": (False, 1),
    "short": (True, 2), "unsigned short": (False, 2),
    "long long": (True, 8), "unsigned long long": (False, 8),
}
TYPEDEFS = "".join(
    f"typedef {'signed' if signed else 'unsigned'} "
    f"{ {1: 'char', 2: 'short', 4: 'int', 8: 'long long'}[size] } {name};\n"
    for name, (signed, size) in SCALARS.items() if re.fullmatch(r"_*[us]\d+", name))


@dataclasses.dataclass(frozen=True)
class MapDecl:
    name: str
    kind: str
    key: str    # a C type: "u64", "struct pod_info"
    value: str
    pin: str | None  # the pin path expression, e.g. 'NP_PIN_DIR "/pods"'
    flags: str = "0"  # map_flags, e.g. BPF_F_NO_PREALLOC


def strip_comments_and_directives(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)  # maps.h has no string with /* in it
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"\\\n", " ", text)  # continuation lines of directives
    return re.sub(r"^\s*#[^\n]*", " ", text, flags=re.M)


def split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments (commas inside parentheses stay)."""
    parts, depth, current = [], 0, ""
    for ch in args:
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        current += ch
    parts.append(current.strip())
    return parts


def map_decl(macro: str, args: list[str]) -> MapDecl:
    """What a bcc map macro declares (bcc 0.26's helpers.h, including its defaults)."""
    def kind(literal: str) -> str:
        assert re.fullmatch(r'"\w+"', literal), f"{macro}: map type {literal} not a literal"
        return literal.strip('"')

    n = len(args)
    if macro == "BPF_TABLE" and n == 5:
        return MapDecl(args[3], kind(args[0]), args[1], args[2], None)
    if macro == "BPF_TABLE_PINNED" and n in (6, 7):
        return MapDecl(args[3], kind(args[0]), args[1], args[2], args[5],
                       args[6] if n == 7 else "0")
    if macro == "BPF_HASH" and 1 <= n <= 4:
        key, value = (args + ["u64", "u64"])[1:3]
        return MapDecl(args[0], "hash", key, value, None)
    if macro == "BPF_ARRAY" and 1 <= n <= 3:
        return MapDecl(args[0], "array", "int", (args + ["u64"])[1], None)
    if macro == "BPF_SOCKHASH" and 1 <= n <= 3:
        return MapDecl(args[0], "sockhash", (args + ["u32"])[1], "int", None)
    if macro == "BPF_SK_STORAGE" and n == 2:
        return MapDecl(args[0], "sk_storage", "int", args[1], None)
    raise AssertionError(f"{macro} with {n} arguments: the contract test cannot read it; "
                         "teach map_decl() its meaning in bcc's helpers.h")


def read_header(text: str) -> tuple[c_ast.FileAST, list[MapDecl]]:
    """maps.h as (its structs parsed by pycparser, its map declarations)."""
    text = strip_comments_and_directives(text)
    decls, rest, pos = [], [], 0
    for m in re.finditer(r"\b(BPF_\w+)\s*\(", text):
        if m.start() < pos:
            continue  # inside a macro already taken
        depth, i = 1, m.end()
        while depth:
            assert i < len(text), f"unbalanced parentheses after {m.group(1)}"
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        end = re.compile(r"\s*;").match(text, i)
        assert end, f"{m.group(1)}(...) not followed by ';'"
        decls.append(map_decl(m.group(1), split_args(text[m.end():i - 1])))
        rest.append(text[pos:m.start()])
        pos = end.end()
    rest.append(text[pos:])
    ast = c_parser.CParser().parse(TYPEDEFS + "".join(rest), "maps.h")
    return ast, decls


def c_structs(ast: c_ast.FileAST) -> dict[str, c_ast.Struct]:
    found = {}
    for ext in ast.ext:
        if isinstance(ext, c_ast.Typedef):
            continue
        assert isinstance(ext, c_ast.Decl) and isinstance(ext.type, c_ast.Struct) \
            and ext.type.decls is not None and ext.name is None, \
            f"maps.h line {ext.coord.line}: only struct definitions and map declarations"
        found[ext.type.name] = ext.type
    return found


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def describe_c(node: Any, structs: dict[str, c_ast.Struct]) -> tuple[Any, int]:
    """A C type as contract.describe() describes a ctypes one, and its alignment."""
    if isinstance(node, c_ast.TypeDecl):
        node = node.type
    if isinstance(node, c_ast.ArrayDecl):
        assert isinstance(node.dim, c_ast.Constant), "array sizes must be literal numbers"
        inner, alignment = describe_c(node.type, structs)
        return ["array", inner, int(node.dim.value, 0)], alignment
    if isinstance(node, c_ast.IdentifierType):
        name = " ".join(node.names)
        assert name in SCALARS, f"type {name}: not one the contract test knows"
        signed, size = SCALARS[name]
        return ["s" if signed else "u", size], size
    if isinstance(node, c_ast.Struct):
        assert node.name in structs, f"struct {node.name} is not defined in maps.h"
        struct = structs[node.name]
        fields, offset, widest = [], 0, 1
        for decl in struct.decls:
            assert decl.bitsize is None, f"struct {node.name}.{decl.name}: bit-field"
            inner, alignment = describe_c(decl.type, structs)
            offset = align_up(offset, alignment)
            fields.append([decl.name, offset, inner])
            offset += size_of(inner)
            widest = max(widest, alignment)
        return ["struct", align_up(offset, widest), fields], widest
    raise AssertionError(f"{type(node).__name__} in maps.h: not modelled by the contract test")


def size_of(description: Any) -> int:
    if description[0] == "array":
        return size_of(description[1]) * description[2]
    return description[1]


def describe_c_name(name: str, structs: dict[str, c_ast.Struct]) -> Any:
    """A type named in a map declaration ("u64", "struct pod_info")."""
    if name.startswith("struct "):
        return describe_c(c_ast.Struct(name.split()[1], None), structs)[0]
    return describe_c(c_ast.IdentifierType(name.split()), structs)[0]


def spelled(description: Any) -> str:
    """A description as C would spell the type: u32, u32[4], struct{...}."""
    if description[0] == "array":
        return f"{spelled(description[1])}[{description[2]}]"
    if description[0] == "struct":
        return "struct{" + ", ".join(f"{n} {spelled(d)}" for n, _, d in description[2]) + "}"
    return f"{description[0]}{description[1] * 8}"


def layout_difference(c: Any, py: Any) -> str:
    """The first way two layouts differ, in words."""
    if c[0] != "struct" or py[0] != "struct":
        return f"maps.h {spelled(c)}, Python {spelled(py)}"
    c_names, py_names = [f[0] for f in c[2]], [f[0] for f in py[2]]
    if c_names != py_names:
        only_c = [n for n in c_names if n not in py_names]
        only_py = [n for n in py_names if n not in c_names]
        if only_c or only_py:
            return f"fields only in maps.h {only_c}, only in Python {only_py}"
        return f"field order maps.h {c_names}, Python {py_names}"
    for (name, c_offset, c_type), (_, py_offset, py_type) in zip(c[2], py[2], strict=True):
        if (c_offset, c_type) != (py_offset, py_type):
            return (f"field {name}: maps.h {spelled(c_type)} at {c_offset}, "
                    f"Python {spelled(py_type)} at {py_offset}")
    return f"size maps.h {c[1]}, Python {py[1]}"


def differences(header: str, view_structs: dict[str, type[ctypes.Structure]] | None = None,
                view_maps: tuple[contract.MapSpec, ...] | None = None) -> list[str]:
    """Every way the header and the Python view differ, as sentences (empty: they agree)."""
    view_structs = contract.STRUCTS if view_structs is None else view_structs
    view_maps = contract.MAPS if view_maps is None else view_maps
    ast, decls = read_header(header)
    structs = c_structs(ast)
    found = []
    for name in sorted(set(structs) | set(view_structs)):
        if name not in view_structs:
            found.append(f"struct {name}: in maps.h, not in the Python view")
        elif name not in structs:
            found.append(f"struct {name}: in the Python view, not in maps.h")
        else:
            c, py = describe_c_name(f"struct {name}", structs), contract.describe(
                view_structs[name])
            if c != py:
                found.append(f"struct {name}: {layout_difference(c, py)}")
    by_name = {d.name: d for d in decls}
    assert len(by_name) == len(decls), "a map declared twice in maps.h"
    view = {spec.name: spec for spec in view_maps}
    for name in sorted(set(by_name) | set(view)):
        if name not in view:
            found.append(f"map {name}: in maps.h, not in the Python view")
            continue
        if name not in by_name:
            found.append(f"map {name}: in the Python view, not in maps.h")
            continue
        d, spec = by_name[name], view[name]
        if d.kind != spec.kind:
            found.append(f"map {name}: kind {d.kind} in maps.h, {spec.kind} in Python")
        for what, c_type, py_type in (("key", d.key, spec.key), ("value", d.value, spec.value)):
            if c_type.startswith("struct ") and c_type.split()[1] not in structs:
                found.append(f"map {name} {what}: {c_type} is not defined in maps.h")
                continue
            c, py = describe_c_name(c_type, structs), contract.describe(py_type)
            if c != py:
                found.append(f"map {name} {what} ({c_type}): {layout_difference(c, py)}")
        pin = f'NP_PIN_DIR "/{name}"'
        if spec.pinned and d.pin != pin:
            found.append(f"map {name}: pinned in Python, maps.h pins it at {d.pin}, not {pin}")
        if not spec.pinned and d.pin is not None:
            found.append(f"map {name}: per instance in Python, pinned in maps.h ({d.pin})")
        if d.kind == "lpm_trie" and d.flags != "BPF_F_NO_PREALLOC":
            found.append(f"map {name}: an lpm_trie needs BPF_F_NO_PREALLOC (the kernel "
                         f"refuses it otherwise), maps.h has flags {d.flags}")
    return found


def test_maps_h_and_the_python_view_agree():
    assert differences(MAPS_H.read_text()) == []


def test_the_reader_sees_every_struct_and_map_of_maps_h():
    # The comparison is only as good as what the reader finds: nothing may slip past it.
    text = MAPS_H.read_text()
    ast, decls = read_header(text)
    assert set(c_structs(ast)) == set(re.findall(r"^struct (\w+) \{", text, re.M))
    assert len(decls) == len(re.findall(r"^BPF_\w+\(", text, re.M)) == len(contract.MAPS)


def test_no_source_declares_a_map_of_its_own():
    # A map declared in a .c file would escape this test (the load-time check and
    # tests/integration/test_bpf_compile.py would still refuse it, but only as root).
    sources = sorted(p for p in MAPS_H.parent.glob("*.[ch]") if p != MAPS_H)
    assert len(sources) >= 5, sources
    declared = {p.name: re.findall(r"\bBPF_[A-Z0-9_]+\s*\(", strip_comments_and_directives(
        p.read_text())) for p in sources}
    assert {name: found for name, found in declared.items() if found} == {}


def test_every_map_layout_of_the_view_is_a_struct_of_the_view():
    named = set(contract.STRUCTS.values())
    for spec in contract.MAPS:
        for t in (spec.key, spec.value):
            assert not issubclass(t, ctypes.Structure) or t in named, (spec.name, t)


@pytest.mark.parametrize("snapshot, struct", [
    (maps.PodCounters, contract.CPodCounters),
    (maps.FastPathCounters, contract.CFastpathCounters),
])
def test_the_exported_counter_snapshots_have_their_structs_fields(snapshot, struct):
    assert [f.name for f in dataclasses.fields(snapshot)] == [n for n, _ in struct._fields_]


# ---- The check fails when one side changes alone ------------------------------------


def edited(old: str, new: str) -> str:
    text = MAPS_H.read_text()
    assert text.count(old) == 1, f"variant out of date: {old!r} not once in maps.h"
    return text.replace(old, new)


@pytest.mark.parametrize("old, new, expected", [
    # a field added in C only
    ("    u64 inbound_captured;", "    u64 inbound_captured;\n    u64 refused;",
     "struct pod_counters: fields only in maps.h ['refused'], only in Python []"),
    # a field's type narrowed, which moves every field after it
    ("    u32 pod_id;\n    u32 flags;\n};", "    u16 pod_id;\n    u32 flags;\n};",
     "struct pod_info: field pod_id: maps.h u16 at 0, Python u32 at 0"),
    # two fields swapped: same names, same types, same size, another order
    ("    u32 pod_id;\n    u32 flags;\n};", "    u32 flags;\n    u32 pod_id;\n};",
     "struct pod_info: field order maps.h ['flags', 'pod_id']"),
    # a field renamed
    ("    u32 send_on_tcp; ", "    u32 send_by_tcp; ",
     "struct msg_flow: fields only in maps.h ['send_by_tcp'], only in Python ['send_on_tcp']"),
    # an array resized
    ("    u32 local_ip[4];    /* network byte order; IPv4 in [0] */",
     "    u32 local_ip[2];", "struct msg_key: field local_ip: maps.h u32[2] at 8, Python u32[4]"),
    # a struct renamed in C (and its use)
    ("struct splice_peer {", "struct splice_pair {", "struct splice_pair: in maps.h"),
    # a new struct in C only
    ("#endif", "struct extra { u32 a; };\n#endif", "struct extra: in maps.h, not"),
    # a map added, renamed, re-keyed, re-kinded, unpinned, pinned elsewhere
    ("#endif", "BPF_HASH(np_new_map, u64, u64, 16);\n#endif",
     "map np_new_map: in maps.h, not in the Python view"),
    ("BPF_HASH(splice_flows,", "BPF_HASH(splice_flow,", "map splice_flow: in maps.h"),
    ("BPF_TABLE_PINNED(\"hash\", u32, struct pod_counters, pod_stats,",
     "BPF_TABLE_PINNED(\"hash\", u64, struct pod_counters, pod_stats,",
     "map pod_stats key (u64): maps.h u64, Python u32"),
    ("BPF_TABLE(\"lru_hash\", u64, u64, np_msg_proxy_read,",
     "BPF_TABLE(\"hash\", u64, u64, np_msg_proxy_read,",
     "map np_msg_proxy_read: kind hash in maps.h, lru_hash in Python"),
    ('BPF_TABLE_PINNED("hash", u64, struct pod_info, pods, NP_MAX_PODS, NP_PIN_DIR "/pods");',
     'BPF_TABLE("hash", u64, struct pod_info, pods, NP_MAX_PODS);',
     "map pods: pinned in Python, maps.h pins it at None"),
    ('NP_PIN_DIR "/proxy_dials"', 'NP_PIN_DIR "/dials"', "map proxy_dials: pinned in Python"),
    ("BPF_HASH(splice_control, u64, struct splice_control, NP_MAX_FLOWS);",
     'BPF_TABLE_PINNED("hash", u64, struct splice_control, splice_control, NP_MAX_FLOWS, '
     'NP_PIN_DIR "/splice_control");',
     "map splice_control: per instance in Python"),
    ("BPF_ARRAY(np_msg_settings, u32, 1);", "BPF_ARRAY(np_msg_settings, u64, 1);",
     "map np_msg_settings value (u64): maps.h u64, Python u32"),
    # the probe source trie: its key's family narrowed, its flags lost, re-kinded
    ("    u32 family;     /* AF_INET or AF_INET6 */\n    u32 ip[4];      /* network byte order; "
     "IPv4 in ip[0] */", "    u16 family;\n    u32 ip[4];",
     "struct probe_key: field family: maps.h u16 at 4, Python u32 at 4"),
    (' NP_PIN_DIR "/probe_sources", BPF_F_NO_PREALLOC);', ' NP_PIN_DIR "/probe_sources");',
     "map probe_sources: an lpm_trie needs BPF_F_NO_PREALLOC"),
    ('BPF_TABLE_PINNED("lpm_trie", struct probe_key,', 'BPF_TABLE_PINNED("hash", struct probe_key,',
     "map probe_sources: kind hash in maps.h, lpm_trie in Python"),
])
def test_a_header_changed_on_one_side_only_is_caught(old, new, expected):
    found = differences(edited(old, new))
    assert any(line.startswith(expected) for line in found), found


def test_a_field_added_in_python_only_is_caught():
    class Wider(ctypes.Structure):
        _fields_ = [*contract.CPodCounters._fields_, ("refused", ctypes.c_uint64)]

    structs = {**contract.STRUCTS, "pod_counters": Wider}
    view = tuple(dataclasses.replace(s, value=Wider) if s is contract.POD_STATS else s
                 for s in contract.MAPS)
    found = differences(MAPS_H.read_text(), structs, view)
    assert found == [
        "struct pod_counters: fields only in maps.h [], only in Python ['refused']",
        "map pod_stats value (struct pod_counters): fields only in maps.h [], "
        "only in Python ['refused']"]


def test_the_probe_source_trie_has_as_many_slots_as_the_config_allows_entries():
    # The config refuses more probe sources than the kernel map holds, with a message,
    # instead of a reload that fails half-way writing the map.
    from nodeproxy.capture import constants
    from nodeproxy.config import model

    assert constants.MAX_PROBE_SOURCES == model.MAX_PROBE_SOURCES
    assert f"-DNP_MAX_PROBE_SOURCES={model.MAX_PROBE_SOURCES}" in constants.cflags("/x")


@pytest.mark.parametrize("prefix, prefixlen, family, words", [
    ("10.244.1.1/32", 64, 2, [0x0101F40A, 0, 0, 0]),
    ("10.244.7.9/16", 48, 2, [0x0000F40A, 0, 0, 0]),  # host bits dropped
    ("fd00:10:244:1::1/128", 160, 10, [0x100000FD, 0x01004402, 0, 0x01000000]),
    ("::/0", 32, 10, [0, 0, 0, 0]),  # every IPv6 source, and no IPv4 one
])
def test_a_probe_source_key_matches_the_family_then_the_prefix(prefix, prefixlen, family,
                                                               words):
    import ipaddress

    key = maps.probe_key(ipaddress.ip_network(prefix, strict=False))
    assert (key.prefixlen, key.family, list(key.ip)) == (prefixlen, family, words)


def test_a_map_only_python_names_is_caught():
    extra = contract.MapSpec("np_gone", "hash", ctypes.c_uint64, ctypes.c_uint64, pinned=False)
    found = differences(MAPS_H.read_text(), view_maps=(*contract.MAPS, extra))
    assert found == ["map np_gone: in the Python view, not in maps.h"]


def test_a_macro_the_reader_does_not_know_fails_loudly():
    with pytest.raises(AssertionError, match="BPF_PERCPU_ARRAY"):
        differences(edited("#endif", "BPF_PERCPU_ARRAY(np_cpu, u64, 4);\n#endif"))

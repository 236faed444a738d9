"""The daemon's one way into a BPF map: by its file descriptor and its layout in
nodeproxy/capture/contract.py (bpf/maps.h), through libbpf.

The loading child (nodeproxy.capture.load_child) hands the daemon a descriptor for every
map; CaptureMaps, SpliceMaps and MsgRedirect read and write them only through `BpfMap`.
Keys and values are the contract's ctypes layouts; a plain int stands for a scalar one,
and a key may also be given packed, as bytes of exactly the key's size (contract.dial_key,
contract.msg_key: a per-connection key without a ctypes object).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator, Mapping
from typing import Any

from nodeproxy.capture import contract, libbpf

BPF_ANY = 0


class BpfMap:
    """One map of the contract, open by descriptor (owned by the MapSet it came from)."""

    def __init__(self, spec: contract.MapSpec, fd: int):
        self.spec = spec
        self.fd = fd
        self._key_size = ctypes.sizeof(spec.key)

    def key(self, key: Any) -> Any:
        return self.spec.key(key) if isinstance(key, int) else key

    def _key_ref(self, key: Any) -> Any:
        """What libbpf takes as the key: a packed key as it is (its size checked: the
        kernel reads the key's full size from it), a layout or int by reference."""
        if isinstance(key, bytes):
            if len(key) != self._key_size:
                raise ValueError(f"{self.spec.name}: a key is {self._key_size} bytes, "
                                 f"not {len(key)}")
            return key
        return ctypes.byref(self.key(key))

    def value(self, value: Any) -> Any:
        return self.spec.value(value) if isinstance(value, int) else value

    def get(self, key: Any) -> Any:
        """The value at key, or None."""
        value = self.spec.value()
        return value if self.read_into(key, value) else None

    def read_into(self, key: Any, value: Any) -> bool:
        """Read the value at key into value (no allocation: for per-read paths); False
        when there is no such key."""
        code = libbpf.map_lookup(self.fd, self._key_ref(key), ctypes.byref(value))
        if code == errno.ENOENT:
            return False
        if code:
            raise OSError(code, f"{self.spec.name}: lookup: {os.strerror(code)}")
        return True

    def put(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        """Write value at key (for a sockmap or sockhash, value is a socket's fd)."""
        code = libbpf.map_update(self.fd, self._key_ref(key),
                                 ctypes.byref(self.value(value)), flags)
        if code:
            raise OSError(code, f"{self.spec.name}: update: {os.strerror(code)}")

    def put_many(self, keys: bytes, values: ctypes.Array) -> None:
        """Write len(values) elements in one syscall (a per-connection path): keys packed
        back to back (len(values) keys of the key's size), values a ctypes array of the
        value layout; each as BPF_ANY.  All or, on an error, maybe the first ones."""
        count = len(values)
        if len(keys) != count * self._key_size:
            raise ValueError(f"{self.spec.name}: {count} keys are "
                             f"{count * self._key_size} bytes, not {len(keys)}")
        code, done = libbpf.map_update_batch(self.fd, keys, ctypes.byref(values), count)
        if code:
            part = f" (the first {done} of {count} written)" if done < count else ""
            raise OSError(code, f"{self.spec.name}: batch update{part}: "
                                f"{os.strerror(code)}")

    def delete_many(self, keys: bytes) -> int:
        """Remove the keys packed back to back in `keys`, in as few syscalls as the kernel
        allows (one when all are there: a missing key ends the kernel's batch, the rest
        are tried after it); returns how many were removed."""
        size = self._key_size
        if len(keys) % size:
            raise ValueError(f"{self.spec.name}: keys of {size} bytes, not {len(keys)}")
        removed, start, count = 0, 0, len(keys) // size
        while start < count:
            code, done = libbpf.map_delete_batch(self.fd, keys[start * size:], count - start)
            removed += done
            if code and code != errno.ENOENT:
                raise OSError(code, f"{self.spec.name}: batch delete: {os.strerror(code)}")
            start += done + (1 if code else 0)
        return removed

    def delete(self, key: Any) -> bool:
        """Remove key; False when it was not there."""
        code = libbpf.map_delete(self.fd, self._key_ref(key))
        if code in (errno.ENOENT, errno.EINVAL) and self.spec.kind in ("sockmap", "array"):
            return False  # an empty sockmap slot; array slots cannot be deleted
        if code == errno.ENOENT:
            return False
        if code:
            raise OSError(code, f"{self.spec.name}: delete: {os.strerror(code)}")
        return True

    def keys(self) -> list[Any]:
        """Every key now (a snapshot: safe to delete while going through it)."""
        out = []
        previous = None
        while True:
            current = self.spec.key()
            code = libbpf.map_next_key(
                self.fd, None if previous is None else ctypes.byref(previous),
                ctypes.byref(current))
            if code == errno.ENOENT:
                return out
            if code:
                raise OSError(code, f"{self.spec.name}: next key: {os.strerror(code)}")
            out.append(current)
            previous = current

    def items(self) -> Iterator[tuple[Any, Any]]:
        """(key, value) of every key that is still there when read."""
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                yield key, value


class MapSet:
    """The descriptors of one loaded program set's maps, by contract name; closing it
    closes them (a per-instance map goes with its last descriptor and program)."""

    def __init__(self, fds: Mapping[str, int]):
        specs = {spec.name: spec for spec in contract.MAPS}
        unknown = set(fds) - set(specs)
        if unknown:
            raise KeyError(f"maps not in the contract: {sorted(unknown)}")
        self._maps = {name: BpfMap(specs[name], fd) for name, fd in fds.items()}

    def open(self, spec: contract.MapSpec) -> BpfMap:
        try:
            return self._maps[spec.name]
        except KeyError:
            raise KeyError(f"the loaded programs have no map {spec.name!r}") from None

    def close(self) -> None:
        for bpf_map in self._maps.values():
            if bpf_map.fd >= 0:
                os.close(bpf_map.fd)
                bpf_map.fd = -1
        self._maps.clear()

"""One dependency graph of the LUKS devices: what each needs back before it can be resumed.

A device needs another when it sits on it (sysfs slaves, through LVM, dm-integrity, RAID or
a loop device whose backing file lives on the other's file system), when its keyfile lives
there, or when its detached header (crypttab header=) does. Resume goes dependencies
first; suspend is the reverse, so a loop-backed image is flushed into its file before the
file system under it stops. Reading a keyfile or a header through a device that is still
suspended waits in D state for good, which is why the helper follows this order.

Essential devices (SPEC 2.8, issue 11) hold /, /usr, /var or swap, or are needed by an
essential device (its lower layers, its keyfile, its header): nothing is thawed while one
is suspended. The others may be skipped at the prompt.

Pure: the inputs are what devices.py read (block nodes, mount points, crypttab).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

__all__ = ["DeviceGraph", "Locate", "build_graph", "resume_order", "suspend_order"]


class Node(Protocol):
    """What the graph needs of a block device (devices.BlockNode)."""

    @property
    def kname(self) -> str: ...
    @property
    def slaves(self) -> tuple[str, ...]: ...
    @property
    def backing_file(self) -> str | None: ...


# Where a path lives: the kname of the block device (a /dev node itself, or the device
# whose file system holds the file), or None when that cannot be known.
Locate = Callable[[str], str | None]


@dataclass(frozen=True)
class Wants:
    """One LUKS device as the graph sees it."""

    name: str  # dm name
    kname: str  # "dm-3"
    keyfile: str | None = None  # crypttab's key file, a path on the real root
    header: str | None = None  # crypttab's header=


@dataclass(frozen=True)
class DeviceGraph:
    # dm name -> dm names that must be back before it (transitively, all LUKS devices
    # found, excluded ones too: an excluded device between two others still passes the
    # order on).
    needs: Mapping[str, frozenset[str]]
    # None: unknown (no mount table), every device counts as essential.
    essential: frozenset[str] | None
    # Devices whose keyfile cannot be used at resume: it lives on the device itself or on
    # something that needs it, or nobody can tell where it lives. They take a passphrase.
    keyfile_unusable: frozenset[str]

    def is_essential(self, name: str) -> bool:
        return self.essential is None or name in self.essential


def lower_edges(nodes: Mapping[str, Node], locate: Locate) -> dict[str, tuple[str, ...]]:
    """kname -> the knames it sits on: its sysfs slaves and, for a loop device, the device
    whose file system holds the backing file (sysfs shows no slave for a loop device)."""
    edges: dict[str, tuple[str, ...]] = {}
    for node in nodes.values():
        below = list(node.slaves)
        if node.backing_file:
            where = locate(node.backing_file)
            if where is not None and where != node.kname and where not in below:
                below.append(where)
        edges[node.kname] = tuple(below)
    return edges


def _reach(start: Iterable[str], step: Callable[[str], Iterable[str]]) -> set[str]:
    """Everything reachable from `start` through `step`, `start` included."""
    seen: set[str] = set()
    queue = list(start)
    while queue:
        k = queue.pop()
        if k in seen:
            continue
        seen.add(k)
        queue.extend(step(k))
    return seen


def _closure(direct: Mapping[str, set[str]]) -> dict[str, set[str]]:
    # Transitive; a name in its own closure means a cycle.
    return {n: _reach(deps, lambda m: direct.get(m, ())) for n, deps in direct.items()}


def build_graph(
    nodes: Mapping[str, Node],
    luks: Sequence[Wants],
    locate: Locate,
    essential_knames: Iterable[str] | None,
) -> DeviceGraph:
    """essential_knames: the block devices behind /, /usr, /var and swap; None: unknown."""
    edges = lower_edges(nodes, locate)
    by_kname = {w.kname: w.name for w in luks}

    def luks_at_or_below(kname: str) -> set[str]:
        reach = _reach([kname], lambda k: edges.get(k, ()))
        return {by_kname[k] for k in reach if k in by_kname}

    direct: dict[str, set[str]] = {}
    for w in luks:
        direct[w.name] = luks_at_or_below(w.kname) - {w.name}
        if w.header and (where := locate(w.header)) is not None:
            direct[w.name] |= luks_at_or_below(where) - {w.name}
    structural = _closure(direct)
    keyed = sorted((w for w in luks if w.keyfile), key=lambda w: w.name)
    place = {w.name: locate(w.keyfile) for w in keyed if w.keyfile}
    lost = {n for n, k in place.items() if k is None}
    unusable: set[str] = set()
    for w in keyed:
        if (k := place[w.name]) is not None:
            holders = luks_at_or_below(k)
        else:
            # Nobody can tell where it lives: after every device that does not need this
            # one (nor has a keyfile as lost), as the helper did before there was a graph.
            holders = {n for n, deps in structural.items() if w.name not in deps} - lost
        # A keyfile on the device itself, or behind it, can never be read at resume (the
        # read would wait on the suspended device for good): a passphrase instead.
        trial = {**direct, w.name: direct[w.name] | holders}
        if w.name in _closure(trial)[w.name]:
            unusable.add(w.name)
        else:
            direct = trial
    needs = {n: frozenset(deps - {n}) for n, deps in _closure(direct).items()}
    essential: frozenset[str] | None = None
    if essential_knames is not None:
        at_mounts = set().union(*(luks_at_or_below(k) for k in essential_knames))
        essential = frozenset(_reach(at_mounts, lambda n: needs.get(n, ())))
    return DeviceGraph(needs, essential, frozenset(unusable))


T = TypeVar("T")


def _kahn(items: Sequence[T], name: Callable[[T], str], waits: Callable[[T, str], bool]) -> list[T]:
    # Kahn's algorithm with the name as the tie-break, so the order is stable. A cycle
    # (malformed input, not a real layout) puts its members last, by name, rather than loop.
    pending = sorted(items, key=name)
    placed: list[T] = []
    while pending:
        left = {name(i) for i in pending}
        ready = [i for i in pending if not any(waits(i, n) for n in left - {name(i)})]
        if not ready:
            placed.extend(pending)
            break
        placed.append(ready[0])
        pending.remove(ready[0])
    return placed


def resume_order(
    items: Sequence[T], name: Callable[[T], str], needs: Callable[[T], Iterable[str]]
) -> list[T]:
    """What is needed first."""
    return _kahn(items, name, lambda i, other: other in set(needs(i)))


def suspend_order(
    items: Sequence[T], name: Callable[[T], str], needs: Callable[[T], Iterable[str]]
) -> list[T]:
    """Whatever needs another device first (upper layers, loop-backed images, devices whose
    keyfile or header lives on another): the reverse of the resume's relation."""
    by_name = {name(i): i for i in items}
    return _kahn(items, name, lambda i, other: name(i) in set(needs(by_name[other])))

"""What the explorer needs from a model (faultline.check.contract.Model), cheaply.

Per state, the successors with an interned fairness-class id per edge, from the model's
``enabled(state, names=False)`` (no action-name strings on the hot path; names are
recomputed with ``actions()`` only for the states on a counterexample), and the safety
labels as a bitmask (bit i: the i-th safety property of ``model.properties`` fails).

For a model that declares a memo footprint (``memo_footprint``, faultline's model) the
explorer stores interned keys instead of states (:class:`_Codec`) and memoises the
vCPU-local actions on them. ``FAULTLINE_CHECK_MEMO=1`` (or ``check_memo=True``) checks
the footprint on every memoised edge: the model also runs, and the memo must agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from operator import itemgetter
from typing import Any

from faultline.check.contract import SAFETY, MemoFootprint, Model, Property, as_model

State = Hashable


class MemoContractError(AssertionError):
    """A memoised action read or wrote outside the footprint the model declared."""


class Adapter:
    """Successors with interned fairness-class ids, for one model."""

    def __init__(self, system: Any, *, check_memo: bool | None = None) -> None:
        self.model: Model = as_model(system)
        self.system = system
        self.class_ids: dict[Hashable, int] = {}
        self.classes: list[Hashable] = []
        self._unfair: set[int] = set()
        self._is_fair: Callable[[Any], bool] | None = getattr(self.model, "is_fair", None)
        self._enabled = self.model.enabled
        self.safety: list[Property] = [p for p in self.model.properties if p.kind == SAFETY]
        self.canonical: Callable[[State], State] | None = self.model.canonical
        if check_memo is None:
            check_memo = os.environ.get("FAULTLINE_CHECK_MEMO", "") not in ("", "0")
        self.check_memo = check_memo
        # What the explorer stores and hashes ("keys") and the model's own states: the
        # same objects unless the model declares a memo footprint (see _Codec).
        self.decode: Callable[[Any], Any] = _identity
        self._codec: _Codec | None = None
        self.expand: Callable[[Any], list[tuple[int, Any]]] = self._expand_plain
        footprint: MemoFootprint | None = getattr(self.model, "memo_footprint", None)
        if footprint is not None:
            self._codec = _Codec(self.model, footprint, self.safety)
            self.decode = self._codec.decode
            memo_ok = self.canonical is None and getattr(self.model, "sink", None) is None
            self.expand = self._expand_interned if memo_ok else self._expand_decoded
        self.bad: Callable[[Any], int] = (self._codec.bad if self._codec is not None
                                          else self._bad_plain)

    def init(self) -> State:
        """The initial state, as the explorer stores it (a key: decode() gives the state)."""
        s = self.model.init()
        if self.canonical is not None:
            s = self.canonical(s)
        return self._codec.encode(s) if self._codec is not None else s

    def is_done(self, s: State) -> bool:
        return bool(self.model.is_done(s))

    def intern(self, key: Hashable) -> int:
        cid = self.class_ids.get(key)
        if cid is None:
            cid = len(self.classes)
            self.class_ids[key] = cid
            self.classes.append(key)
            if self._is_fair is not None and not self._is_fair(key):
                self._unfair.add(cid)
        return cid

    def fair_class(self, cid: int) -> bool:
        return cid not in self._unfair

    def _bad_plain(self, s: State) -> int:
        """The safety bitmask of a state (the labels over its records)."""
        return _state_mask(self.safety, s)

    def _expand_plain(self, s: State) -> list[tuple[int, State]]:
        ids = self.class_ids
        canon = self.canonical
        out: list[tuple[int, State]] = []
        append = out.append
        for _name, key, fn, args in self._enabled(s, False):
            cid = ids.get(key)
            if cid is None:
                cid = self.intern(key)
            t = fn(s, *args)
            append((cid, t if canon is None else canon(t)))
        return out

    def _expand_interned(self, ks: Any) -> list[tuple[int, State]]:
        """_expand_plain over interned keys, memoised per vCPU. vCPU v's actions
        (enabled_vcpu) and the effect of each vCPU-local one depend only on the records
        of v's footprint, so they are memoised on those records' ids: on a hit (most
        states) the successors' keys are spliced from the memo without decoding the state
        or running the model. An action declared wide (MemoFootprint.wide) is memoised
        again on the other vCPUs' ids (_wide). Other actions run the model on the decoded
        state. With a symmetry reduction or an event sink the memo is bypassed
        (_expand_decoded)."""
        codec = self._codec
        assert codec is not None
        reads = codec.reads
        splice = codec.splice
        vmemos = codec.vmemos
        check = self.check_memo
        s = None
        out: list[tuple[int, State]] = []
        append = out.append
        for v, vmemo in enumerate(vmemos):
            rk = reads[v](ks)
            entry = vmemo.get(rk)
            if entry is None or check:
                if s is None:
                    s = codec.decode(ks)
                fresh = self._vcpu_entry(s, ks, v)
                if entry is None:
                    entry = vmemo[rk] = fresh
                elif fresh != entry:
                    raise MemoContractError(
                        f"vCPU {v}: enabled_vcpu or one of its local actions gave a different "
                        "result for the same footprint: it reads state outside its declared "
                        "memo footprint")
            for cid, r, fn, args in entry:
                if r is not None:
                    append((cid, splice[v](ks, r)))
                elif fn is None:  # args: a _WideAction
                    t, s = self._wide(ks, v, args, s)
                    append((cid, t))
                else:
                    if s is None:
                        s = codec.decode(ks)
                    append((cid, codec.encode_from(fn(s, *args), s, ks)))
        gk = codec.global_reads(ks)
        gentry = codec.gmemo.get(gk)
        if gentry is None or check:
            if s is None:
                s = codec.decode(ks)
            fresh_g = self._global_entry(s, ks)
            if gentry is None:
                gentry = codec.gmemo[gk] = fresh_g
            elif fresh_g != gentry:
                raise MemoContractError("enabled_global or one of its memoised actions gave a "
                                        "different result for the same footprint: it reads "
                                        "state outside its declared footprint")
        for cid, r, fn, args in gentry:
            if r is not None:
                append((cid, codec.global_splice(ks, r)))
            else:
                if s is None:
                    s = codec.decode(ks)
                append((cid, codec.encode_from(fn(s, *args), s, ks)))
        return out

    def _vcpu_entry(self, s: Any, ks: tuple, v: int) -> list[tuple[int, Any, Any, Any]]:
        """vCPU v's memo entry: per enabled action (class id, effect ids) for a local
        action (run now, writes checked), (class id, None, None, _WideAction) for a wide
        one, (class id, None, fn, args) for the others."""
        codec = self._codec
        assert codec is not None
        local = codec.local
        out: list[tuple[int, Any, Any, Any]] = []
        for _n, key, fn, args in self.model.enabled_vcpu(s, v, False):  # type: ignore[attr-defined]
            fname = fn.__name__
            if (fname in local or fname in codec.wide) and args[0] != v:
                raise MemoContractError(f"{fname}: a local action of vCPU {v} must take "
                                        "v as its first argument")
            if fname in local:
                r = codec.effect(v, ks, codec.encode_from(fn(s, *args), s, ks), fname)
                out.append((self._cid(key), r, None, None))
            elif fname in codec.wide:
                out.append((self._cid(key), None, None, _WideAction(fn, args)))
            else:
                out.append((self._cid(key), None, fn, args))
        return out

    def _wide(self, ks: tuple, v: int, w: _WideAction, s: Any) -> tuple[tuple, Any]:
        """The successor key of a wide action of vCPU v (its entry is in v's memo, so v's
        footprint is fixed): memoised on the other vCPUs' ids. Returns it with the
        decoded state (None if not decoded). A third memo layer, worth its lines: with
        the workqueue's global memo, check-large under linux-qemu runs 1.29x faster
        (QEMU's broadcast keeps the exit handling from being vCPU-local; see
        docs/performance.md)."""
        codec = self._codec
        assert codec is not None
        ok = codec.wide_others[v](ks)
        r = w.memo.get(ok)
        if r is None or self.check_memo:
            if s is None:
                s = codec.decode(ks)
            kt = codec.encode_from(w.fn(s, *w.args), s, ks)
            fresh = codec.wide_reads[v](codec.check_writes(
                codec.wide_outside[v], ks, kt, f"{w.fn.__name__} of vCPU {v}", "its"))
            if r is None:
                r = w.memo[ok] = fresh
            elif fresh != r:
                raise MemoContractError(f"{w.fn.__name__} of vCPU {v} gave a different result "
                                        "for the same footprint: it reads state outside its "
                                        "declared memo footprint")
        return codec.wide_splice[v](ks, r), s

    def _global_entry(self, s: Any, ks: tuple) -> list[tuple[int, Any, Any, Any]]:
        """The global memo entry, as _vcpu_entry: (class id, effect ids) for an action
        named in the footprint's global_actions, (class id, None, fn, args) otherwise."""
        codec = self._codec
        assert codec is not None
        memoised = codec.global_local
        out: list[tuple[int, Any, Any, Any]] = []
        for _n, key, fn, args in self.model.enabled_global(s, False):  # type: ignore[attr-defined]
            if fn.__name__ in memoised:
                kt = codec.encode_from(fn(s, *args), s, ks)
                r = codec.check_writes(codec.global_others, ks, kt, fn.__name__,
                                       "the global actions'")
                out.append((self._cid(key), codec.global_reads(r), None, None))
            else:
                out.append((self._cid(key), None, fn, args))
        return out

    def _cid(self, key: Hashable) -> int:
        cid = self.class_ids.get(key)
        return self.intern(key) if cid is None else cid

    def _expand_decoded(self, ks: Any) -> list[tuple[int, State]]:
        """Interned keys without the memo: decode, run every action, encode (symmetry
        reduction: canonical() applies to whole states; an event sink: every action must
        run to emit its events)."""
        codec = self._codec
        assert codec is not None
        s = codec.decode(ks)
        canon = self.canonical
        out: list[tuple[int, State]] = []
        for _name, key, fn, args in self._enabled(s, False):
            t = fn(s, *args)
            if canon is not None:
                t = canon(t)
            out.append((self._cid(key), codec.encode_from(t, s, ks)))
        return out

    def named(self, s: State) -> list[tuple[str, State]]:  # s: a state, not a key
        """``actions(s)`` with canonical next states: what a counterexample step names."""
        canon = self.canonical
        acts = self.model.actions(s)
        if canon is None:
            return acts
        return [(n, canon(t)) for n, t in acts]


def _identity(s: State) -> State:
    return s


def _state_mask(safety: list[Property], s: Any) -> int:
    """Bit i set: the i-th safety property's label holds somewhere in ``s``."""
    m = 0
    for i, p in enumerate(safety):
        label = p.label
        assert label is not None, f"safety property {p.name} declares no label"
        if p.record == "state":
            hit = label(s)
        elif p.record == "task":
            hit = any(label(tk) for tk in s.tasks)
        else:
            hit = label(getattr(s, p.record))
        if hit:
            m |= 1 << i
    return m


class _Codec:
    """Interned keys for a model with named records (faultline's State): why and how.

    The model's state is a nested record of ~400 characters; Python does not cache tuple
    hashes, so deduplicating it costs a deep hash per edge and a deep comparison per hit.
    The explorer stores instead a flat tuple of small ints, one per record:

        (files, mem, vcpu_0 .. vcpu_n-1, task_0 .. task_m-1, guest, vmm, fired)

    each id indexing a per-kind intern table (one for all vCPUs, one for all tasks), so
    equal keys <=> equal states. ``decode`` rebuilds the State (shared record objects),
    ``encode_from(t, s, ks)`` encodes a successor t of s (key ks), reusing ks's id for
    every record t shares with s by identity (the model rebuilds only what changes).
    Per vCPU v, ``reads[v]`` picks the key positions of the memo footprint (vCPU v, its
    tasks, the shared records) and ``splice[v]`` puts new ids there. The safety labels
    are evaluated once per interned record (``bad``), never on a decoded state."""

    def __init__(self, model: Any, footprint: MemoFootprint, safety: list[Property]) -> None:
        s0 = model.init()
        cls = type(s0)
        nv, nt = len(s0.vcpus), len(s0.tasks)
        self.nv, self.nt = nv, nt
        # With one vCPU a wide action (MemoFootprint.wide) is a local one.
        self.local = footprint.actions | (footprint.wide if nv == 1 else frozenset())
        self.wide = footprint.wide if nv > 1 else frozenset()
        # Per vCPU: footprint ids -> its memo entry (Adapter._vcpu_entry); the global
        # actions' footprint ids -> their (class id, fn, args).
        self.vmemos: list[dict[tuple, list]] = [{} for _ in range(nv)]
        self.gmemo: dict[tuple, list] = {}
        b, c = 2 + nv, 2 + nv + nt  # first task position, guest position
        n = c + 3
        self._layout = {"files": [0], "mem": [1], "vcpus": list(range(2, b)),
                        "tasks": list(range(b, c)), "guest": [c], "vmm": [c + 1],
                        "fired": [c + 2]}
        if list(cls._fields) != list(self._layout):
            raise TypeError(f"the memo codec knows the records {list(self._layout)}, "
                            f"not {cls._fields}")
        tables: list[list[Any]] = [[] for _ in range(6)]
        LF, LM, LV, LT, LG, LX = tables
        interners = [self._interner(lst) for lst in tables]
        IF, IM, IV, IT, IG, IX = interners
        new = tuple.__new__
        vget, tget = LV.__getitem__, LT.__getitem__

        def decode(k: tuple) -> Any:
            # tuple.__new__, not cls(...): no Python-level __new__ per state.
            return new(cls, (LF[k[0]], LM[k[1]], tuple(map(vget, k[2:b])),
                             tuple(map(tget, k[b:c])), LG[k[c]], LX[k[c + 1]], k[c + 2]))

        def encode_from(t: Any, s: Any, ks: tuple) -> tuple:
            x = t[0]
            a0 = ks[0] if x is s[0] else IF(x)
            x = t[1]
            a1 = ks[1] if x is s[1] else IM(x)
            vs, svs = t[2], s[2]
            if vs is svs:
                vk = ks[2:b]
            else:
                vk = tuple([ks[2 + i] if x is svs[i] else IV(x) for i, x in enumerate(vs)])
            ts, sts = t[3], s[3]
            if ts is sts:
                tk = ks[b:c]
            else:
                tk = tuple([ks[b + i] if x is sts[i] else IT(x) for i, x in enumerate(ts)])
            x = t[4]
            g = ks[c] if x is s[4] else IG(x)
            x = t[5]
            m = ks[c + 1] if x is s[5] else IX(x)
            return (a0, a1, *vk, *tk, g, m, t[6])

        self.decode: Callable[[tuple], Any] = decode
        self.encode_from: Callable[[Any, Any, tuple], tuple] = encode_from
        # Per vCPU: the key positions of the footprint, and the others; itemgetters (C)
        # pick them and splice them back (from ks + r).
        shared = [p for name in footprint.shared for p in self._layout[name]]
        # The global actions' footprint: what enabled_global reads, and the tasks its
        # memoised actions (global_actions) may read and write.
        gpos = sorted([p for name in footprint.global_reads for p in self._layout[name]]
                      + [b + t for t in footprint.global_tasks])
        self.global_local = footprint.global_actions
        self.global_reads: Callable[[tuple], Any] = itemgetter(*gpos)
        self.global_others = [p for p in range(n) if p not in gpos]
        self.global_splice = _splicer(gpos, n)
        self.reads: list[Callable[[tuple], tuple]] = []
        self.splice: list[Callable[[tuple, tuple], tuple]] = []
        self._others: list[list[int]] = []
        # A wide action's: v's footprint and the other vCPUs (wide_reads), the other
        # vCPUs alone (wide_others: the key within v's memo entry), the rest.
        self.wide_reads: list[Callable[[tuple], tuple]] = []
        self.wide_splice: list[Callable[[tuple, tuple], tuple]] = []
        self.wide_others: list[Callable[[tuple], Any]] = []
        self.wide_outside: list[list[int]] = []
        for v in range(nv):
            pos = sorted([2 + v] + [b + t for t in footprint.tasks[v]] + shared)
            self._others.append([p for p in range(n) if p not in pos])
            self.reads.append(itemgetter(*pos))
            self.splice.append(_splicer(pos, n))
            if nv > 1:
                other_vcpus = [2 + u for u in range(nv) if u != v]
                wpos = sorted(pos + other_vcpus)
                self.wide_outside.append([p for p in range(n) if p not in wpos])
                self.wide_reads.append(itemgetter(*wpos))
                self.wide_splice.append(_splicer(wpos, n))
                self.wide_others.append(itemgetter(*other_vcpus))
        # Safety labels per record: bits computed once per interned record (when it is
        # interned), so a state's mask is a few list lookups (``bad``).
        self.bad: Callable[[tuple], int] = self._label_bits(safety, interners, b, c)
        # A parent sharing nothing with any state: encode() interns every record.
        o = object()
        self._nothing = (o, o, (o,) * nv, (o,) * nt, o, o, 0)
        self._nokey = (0,) * n

    @staticmethod
    def _label_bits(safety: list[Property], interners: list[Any], b: int, c: int
                    ) -> Callable[[tuple], int]:
        """bad(key): the safety bitmask of a state, from bits per interned record."""
        kinds = {"file": 0, "vcpu": 2, "task": 3, "guest": 4, "vmm": 5}
        labels: dict[int, list[tuple[int, Callable[[Any], bool]]]] = {}
        for i, p in enumerate(safety):
            if p.record not in kinds or p.label is None:
                raise ValueError(f"property {p.name}: label on {p.record!r}: the interned "
                                 f"explorer evaluates labels on one of {sorted(kinds)}")
            labels.setdefault(kinds[p.record], []).append((1 << i, p.label))
        bits: dict[int, list[int]] = {}
        for kind, ls in labels.items():
            def fn(x: Any, ls: list[tuple[int, Callable[[Any], bool]]] = ls) -> int:
                return sum(bit for bit, f in ls if f(x))
            bits[kind] = interners[kind].with_bits(fn)
        # key positions per kind: files 0, vcpus [2, b), tasks [b, c), guest c, vmm c+1
        single = [({0: 0, 4: c, 5: c + 1}[k], bits[k]) for k in bits if k in (0, 4, 5)]
        multi = [({2: itemgetter(slice(2, b)), 3: itemgetter(slice(b, c))}[k], bits[k])
                 for k in bits if k in (2, 3)]

        def bad(k: tuple) -> int:
            m = 0
            for p, bl in single:
                m |= bl[k[p]]
            for get, bl in multi:
                for i in get(k):
                    m |= bl[i]
            return m
        return bad

    @staticmethod
    def _interner(lst: list) -> _Interner:
        return _Interner(lst)

    def encode(self, s: Any) -> tuple:
        return self.encode_from(s, self._nothing, self._nokey)

    def effect(self, v: int, ks: tuple, kt: tuple, fname: str) -> tuple:
        """The memo entry for a vCPU-local action of vCPU v from key ks to key kt: the ids
        at the footprint's positions; checks it wrote nothing else (every memo miss)."""
        return self.reads[v](self.check_writes(self._others[v], ks, kt, f"{fname} of vCPU {v}",
                                               "its"))

    def check_writes(self, others: list[int], ks: tuple, kt: tuple, what: str, whose: str
                     ) -> tuple:
        """kt, once checked equal to ks at every position of ``others`` (outside the
        footprint)."""
        for p in others:
            if ks[p] != kt[p]:
                raise MemoContractError(
                    f"{what} changed {self._where(p)} outside {whose} declared memo "
                    "footprint (the model's memo_footprint is wrong)")
        return kt

    def _where(self, p: int) -> str:
        for name, positions in self._layout.items():
            if p in positions:
                return f"{name}[{positions.index(p)}]" if len(positions) > 1 else name
        return f"key position {p}"


class _Interner:
    """Record -> id in ``table`` (appending new records); optionally a list of label
    bits per id, computed when a record is first interned."""

    def __init__(self, table: list) -> None:
        self.table = table
        self.ids: dict[Any, int] = {}
        self.bits: list[int] | None = None
        self.fn: Callable[[Any], int] | None = None

    def with_bits(self, fn: Callable[[Any], int]) -> list[int]:
        self.fn = fn
        self.bits = [fn(x) for x in self.table]
        return self.bits

    def __call__(self, x: Any) -> int:
        i = self.ids.get(x)
        if i is None:
            i = self.ids[x] = len(self.table)
            self.table.append(x)
            if self.bits is not None:
                assert self.fn is not None
                self.bits.append(self.fn(x))
        return i


def _splicer(pos: list[int], n: int) -> Callable[[tuple, tuple], tuple]:
    """splice(k, r): key k (n ids) with the ids r put at the positions ``pos``."""
    pick = itemgetter(*[n + pos.index(p) if p in pos else p for p in range(n)])

    def splice(k: tuple, r: tuple) -> tuple:
        return pick(k + r)
    return splice


class _WideAction:
    """A wide action in a vCPU's memo entry: its function and arguments (what entries
    compare), and its effects by the other vCPUs' ids (Adapter._wide)."""
    __slots__ = ("args", "fn", "memo")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn = fn
        self.args = args
        self.memo: dict[Any, tuple] = {}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _WideAction) and self.fn == other.fn
                and self.args == other.args)

    __hash__ = None  # type: ignore[assignment]


# --- readable views of a state, for counterexample diffs -------------------------------

def state_view(system: Any, s: Any) -> dict[str, Any]:
    """A flat ``{"tasks.toucher.pc": 1, ...}`` view of a state: the model's own
    ``view(state)`` (faultline's model names every field), else a generic view by index
    path (``"[3][0][1]"``)."""
    view = getattr(system, "view", None)
    return view(s) if view is not None else _flatten(s, "")


def _flatten(x: Any, prefix: str) -> dict[str, Any]:
    if isinstance(x, tuple) and len(x) <= 16 and any(isinstance(y, tuple) for y in x):
        out: dict[str, Any] = {}
        for i, y in enumerate(x):
            out.update(_flatten(y, f"{prefix}[{i}]"))
        return out
    return {prefix or "state": x}


def diff_views(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The fields that changed, with their new values (None: the field went away)."""
    out = {k: v for k, v in after.items() if before.get(k, _MISSING) != v}
    out.update({k: None for k in before if k not in after})
    return out


_MISSING = object()

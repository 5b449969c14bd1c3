"""What the checker needs from a transition system, derived from its public API.

The explorer wants, per state, the successor states with a *fairness class* per edge
(which scheduler choice the edge is), cheaply: no action-name strings on the hot path.
Action names are recomputed with ``actions()`` only for the states on a counterexample.

Two kinds of systems are accepted:

- faultline's model (``faultline.model.System``): it has ``enabled(state, names=False)``
  returning ``(name, actor, fn, args)``; the class is derived from the actor (see
  :func:`model_class`).
- any object with ``init()``, ``actions(state) -> [(name, next)]`` and ``is_done(state)``
  (toy systems in tests): the class of an edge is its action name. Such a system may define
  ``is_fair(name) -> bool`` to mark actions that no fairness assumption covers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

State = Hashable


class TransitionSystem(Protocol):
    def init(self) -> State: ...

    def actions(self, s: State) -> list[tuple[str, State]]: ...

    def is_done(self, s: State) -> bool: ...


class Adapter:
    """Successors with interned fairness-class ids, for one system."""

    def __init__(self, system: Any) -> None:
        self.system = system
        self.class_ids: dict[Hashable, int] = {}
        self.classes: list[Hashable] = []
        self._unfair: set[int] = set()
        self._is_fair: Callable[[Any], bool] | None = getattr(system, "is_fair", None)
        enabled = getattr(system, "enabled", None)
        self.expand: Callable[[State], list[tuple[int, State]]]
        # What the explorer stores and hashes ("keys") and the system's own states:
        # the same objects unless the system is faultline's model (see _Codec).
        # (Any: the interned path decodes the model's flat tuples, the generic one anything)
        self.decode: Callable[[Any], Any] = _identity
        self._codec: _Codec | None = None
        if enabled is not None:
            self._enabled = enabled
            self.expand = self._expand_model
            if hasattr(system, "VCPU_LOCAL_ACTIONS") and hasattr(system, "by_vcpu"):
                self._codec = _Codec(system)
                self.decode = self._codec.decode
                self.expand = self._expand_interned
        else:
            self.expand = self._expand_generic
        canonical = getattr(system, "canonical", None)
        self.canonical: Callable[[State], State] | None = canonical

    def init(self) -> State:
        """The initial state, as the explorer stores it (a key: decode() gives the state)."""
        s = self.system.init()
        if self.canonical is not None:
            s = self.canonical(s)
        return self._codec.encode(s) if self._codec is not None else s

    def is_done(self, s: State) -> bool:
        return bool(self.system.is_done(s))

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

    def _expand_model(self, s: State) -> list[tuple[int, State]]:
        # Hot path (once per state): model_class() inlined. A vCPU edge's class is its
        # actor string, interned by the model (hash cached), so one dict hit per edge.
        ids = self.class_ids
        canon = self.canonical
        out: list[tuple[int, State]] = []
        append = out.append
        for _name, actor, fn, args in self._enabled(s, False):
            key = _class_key(actor, fn, args)
            cid = ids.get(key)
            if cid is None:
                cid = self.intern(key)
            t = fn(s, *args)
            append((cid, t if canon is None else canon(t)))
        return out

    def _expand_interned(self, ks: Any) -> list[tuple[int, State]]:
        """_expand_model over interned keys. A vCPU-local action's effect depends only on
        (action, args, the components it reads), so it is memoised on their ids: on a hit
        (~96% of edges) the successor's key is spliced from the memo without running the
        model or building a nested state. Other actions (and every action when the
        system canonicalises or records events) run the model and encode the result."""
        codec = self._codec
        assert codec is not None
        s = codec.decode(ks)
        ids = self.class_ids
        canon = self.canonical
        memo = codec.memo
        local = (codec.local if canon is None and getattr(self.system, "_ev", None) is None
                 else ())
        reads = codec.reads
        splice = codec.splice
        encode = codec.encode_from
        out: list[tuple[int, State]] = []
        append = out.append
        for _name, actor, fn, args in self._enabled(s, False):
            key = _class_key(actor, fn, args)
            cid = ids.get(key)
            if cid is None:
                cid = self.intern(key)
            fname = fn.__name__
            if fname in local:
                v = args[0]
                mk = (fname, args, reads[v](ks))
                r = memo.get(mk)
                if r is None:
                    r = memo[mk] = codec.effect(v, ks, encode(fn(s, *args), s, ks))
                append((cid, splice[v](ks, r)))
            else:
                t = fn(s, *args)
                if canon is not None:
                    t = canon(t)
                append((cid, encode(t, s, ks)))
        return out

    def _expand_generic(self, s: State) -> list[tuple[int, State]]:
        ids = self.class_ids
        canon = self.canonical
        out = []
        for name, t in self.system.actions(s):
            cid = ids.get(name)
            if cid is None:
                cid = self.intern(name)
            out.append((cid, canon(t) if canon is not None else t))
        return out

    def named(self, s: State) -> list[tuple[str, State]]:  # s: a state, not a key
        """``actions(s)`` with canonical next states: what a counterexample step names."""
        canon = self.canonical
        acts = self.system.actions(s)
        if canon is None:
            return acts
        return [(n, canon(t)) for n, t in acts]


def _identity(s: State) -> State:
    return s


def _class_key(actor: str, fn: Any, args: tuple) -> Hashable:
    """An edge's fairness class: a vCPU edge's class is its actor string (interned by the
    model, hash cached); an async worker's is its work item (token, gfn); the VMM's is the
    exit or file it handles."""
    if actor[0] == "a":  # asyncN
        item = args[1]
        return (actor, item[0], item[1])
    if actor == "vmm":
        return (actor, fn.__name__, args)
    return actor


class _Codec:
    """Interned keys for faultline's model: why and how.

    The model's state is a nested tuple of ~400 characters; Python does not cache tuple
    hashes, so deduplicating it costs a deep hash per edge and a deep comparison per hit.
    The explorer stores instead a flat tuple of small ints, one per component:

        (files, mem, vcpu_0 .. vcpu_n-1, task_0 .. task_m-1, guest, vmm, fired)

    each id indexing a per-kind intern table (one for all vCPUs, one for all tasks), so
    equal keys <=> equal states. ``decode`` rebuilds the state (shared component objects),
    ``encode_from(t, s, ks)`` encodes a successor t of s (key ks), reusing ks's id for
    every component t shares with s by identity (the model rebuilds only what changes).
    Per vCPU v, ``reads[v]`` picks the key positions a vCPU-local action can touch
    (System.VCPU_LOCAL_ACTIONS) and ``splice[v]`` puts new ids there."""

    def __init__(self, system: Any) -> None:
        nv = system.sc.vcpus
        nt = len(system.tasks)
        self.nv, self.nt = nv, nt
        self.local = system.VCPU_LOCAL_ACTIONS
        self.memo: dict[tuple, tuple] = {}
        kinds = ("F", "M", "V", "T", "G", "X")  # files, mem, vcpu, task, guest, vmm
        self.tables: dict[str, tuple[dict, list]] = {k: ({}, []) for k in kinds}
        ns: dict[str, Any] = {}
        for k, (d, lst) in self.tables.items():
            ns["L" + k] = lst
            ns["I" + k] = self._interner(d, lst)
        b, c = 2 + nv, 2 + nv + nt  # first task position, guest position
        vs = "".join(f"LV[k[{2 + i}]], " for i in range(nv))
        ts = "".join(f"LT[k[{b + i}]], " for i in range(nt))
        src = [f"def decode(k):\n    return (LF[k[0]], LM[k[1]], ({vs}), ({ts}), "
               f"LG[k[{c}]], LX[k[{c + 1}]], k[{c + 2}])"]
        # encode_from: straight-line code (no loop) since it runs once per edge.
        e = ["def encode_from(t, s, ks):",
             "    x = t[0]; a0 = ks[0] if x is s[0] else IF(x)",
             "    x = t[1]; a1 = ks[1] if x is s[1] else IM(x)",
             "    V = t[2]; SV = s[2]",
             "    if V is SV:"]
        e += [f"        v{i} = ks[{2 + i}]" for i in range(nv)] or ["        pass"]
        e += ["    else:"]
        e += [f"        x = V[{i}]; v{i} = ks[{2 + i}] if x is SV[{i}] else IV(x)"
              for i in range(nv)] or ["        pass"]
        e += ["    K = t[3]; SK = s[3]", "    if K is SK:"]
        e += [f"        k{i} = ks[{b + i}]" for i in range(nt)] or ["        pass"]
        e += ["    else:"]
        e += [f"        x = K[{i}]; k{i} = ks[{b + i}] if x is SK[{i}] else IT(x)"
              for i in range(nt)] or ["        pass"]
        e += [f"    x = t[4]; g = ks[{c}] if x is s[4] else IG(x)",
              f"    x = t[5]; m = ks[{c + 1}] if x is s[5] else IX(x)",
              "    return (a0, a1, " + "".join(f"v{i}, " for i in range(nv))
              + "".join(f"k{i}, " for i in range(nt)) + "g, m, t[6])"]
        src.append("\n".join(e))
        # Per vCPU: the positions a vCPU-local action may read or write, the others.
        n = c + 3
        self.reads: list[Callable[[tuple], tuple]] = []
        self.splice: list[Callable[[tuple, tuple], tuple]] = []
        self._pos: list[list[int]] = []
        self._others: list[list[int]] = []
        for v in range(nv):
            pos = [0, 1, 2 + v] + [b + t for t in system.by_vcpu[v]] + [c, c + 1, c + 2]
            self._pos.append(pos)
            self._others.append([p for p in range(n) if p not in pos])
            ns_v = f"reads{v}"
            src.append(f"def {ns_v}(k):\n    return (" + "".join(f"k[{p}], " for p in pos)
                       + ")")
            items = [f"r[{pos.index(p)}]" if p in pos else f"k[{p}]" for p in range(n)]
            src.append(f"def splice{v}(k, r):\n    return (" + ", ".join(items) + ",)")
        exec("\n\n".join(src), ns)  # generated from the shapes above only, no input text
        self.decode: Callable[[tuple], tuple] = ns["decode"]
        self.encode_from: Callable[[tuple, tuple, tuple], tuple] = ns["encode_from"]
        for v in range(nv):
            self.reads.append(ns[f"reads{v}"])
            self.splice.append(ns[f"splice{v}"])
        # A parent sharing nothing with any state: encode() interns every component.
        o = object()
        self._nothing = (o, o, (o,) * nv, (o,) * nt, o, o, 0)
        self._nokey = (0,) * n

    @staticmethod
    def _interner(d: dict, lst: list) -> Callable[[Any], int]:
        def intern(x: Any) -> int:
            i = d.get(x)
            if i is None:
                i = d[x] = len(lst)
                lst.append(x)
            return i
        return intern

    def encode(self, s: tuple) -> tuple:
        return self.encode_from(s, self._nothing, self._nokey)

    def effect(self, v: int, ks: tuple, kt: tuple) -> tuple:
        """The memo entry for a vCPU-local action of vCPU v from key ks to key kt: the ids
        at the positions it may touch; checks it touched nothing else."""
        for p in self._others[v]:
            if ks[p] != kt[p]:
                raise AssertionError(f"vCPU-local action of vCPU {v} changed key position "
                                     f"{p}: System.VCPU_LOCAL_ACTIONS is wrong")
        return self.reads[v](kt)


def model_class(actor: str, fn: Callable[..., Any], args: tuple) -> Hashable:
    """The weak-fairness class of one of the model's enabled actions.

    - ``vcpuN``: the vCPU runs (a task step, an interrupt or #MC delivered at entry, a
      page-ready, the request exit): "each runnable vCPU eventually runs".
    - ``asyncN`` work item: one class per queued item (token, gfn), so that each
      outstanding async PF eventually completes, not merely some of them.
    - ``vmm``: one class per kind of VMM work and its target (an exit of vCPU N, a change
      of file N): each exit is eventually handled, each file change eventually seen.
    """
    c = actor[0]
    if c == "a":  # asyncN: args = (v, (token, gfn, injected))
        item = args[1]
        return (actor, item[0], item[1])
    if c == "v" and actor == "vmm":
        return (actor, fn.__name__, args)
    return actor


# --- readable views of a state, for counterexample diffs -------------------------------

_FILE_FIELDS = ("size", "cached", "holes", "zeroed", "poison", "zero_from")
_VCPU_FIELDS = ("cur", "mode", "apf_hash", "queue", "done", "requests", "error_gfns",
                "exit", "mce_queue", "apf_id")
_TASK_FIELDS = ("status", "pc", "sub", "loop_ctrs", "steps", "token", "touched", "fails",
                "result")
_GUEST_FIELDS = ("offlined", "ring", "bad_reads")
_VMM_FIELDS = ("abort", "handled", "known", "exits", "repeats")
_MODES = ("run", "halted", "exit")
_TASK_STATUS = ("run", "sleep", "exited", "sigbus", "killed")


def state_view(system: Any, s: Any) -> dict[str, Any]:
    """A flat ``{"tasks.toucher.pc": 1, ...}`` view of a state.

    For faultline's model the field names come from the state encoding (model/state.py);
    if the encoding has changed shape, or for any other system, a generic view by index
    path (``"[3][0][1]"``) is given instead: never wrong, only less readable.
    """
    try:
        return _model_view(system, s)
    except Exception:  # an encoding this view does not know: fall back, never fail
        return _flatten(s, "")


def _model_view(system: Any, s: Any) -> dict[str, Any]:
    files, mem, vcpus, tasks, guest, vmm, fired = s
    names = system.names
    if len(tasks) != len(names) or len(vcpus) != system.sc.vcpus:
        raise ValueError("unknown encoding")
    out: dict[str, Any] = {}

    def put(prefix: str, fields: tuple[str, ...], values: tuple) -> None:
        if len(values) != len(fields):
            raise ValueError("unknown encoding")
        for k, v in zip(fields, values, strict=True):
            out[f"{prefix}.{k}"] = v

    for i, f in enumerate(files):
        put(f"files.{system.files[i].name}", _FILE_FIELDS, f)
    out["mem"] = mem
    for v, vc in enumerate(vcpus):
        put(f"vcpus[{v}]", _VCPU_FIELDS, vc)
        out[f"vcpus[{v}].mode"] = _MODES[vc[1]] if 0 <= vc[1] < len(_MODES) else vc[1]
    for t, tk in enumerate(tasks):
        put(f"tasks.{names[t]}", _TASK_FIELDS, tk)
        st = tk[0]
        out[f"tasks.{names[t]}.status"] = _TASK_STATUS[st] if 0 <= st < 5 else st
    put("guest", _GUEST_FIELDS, guest)
    put("vmm", _VMM_FIELDS, vmm)
    out["fired"] = fired
    return out


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

"""Per-model registry of prefix adapters, and the prefix tensors one forward reads.

PrefixStore (an nn.Module attached to the model, so `.to()`, `.parameters()`, DDP and state_dict see the
adapters) holds the adapters and the active set. At the start of each top-level forward it builds a
ForwardContext: every active adapter's generators run once (the MLP runs once per forward, not once per
layer), the results are cast to the compute dtype and, when a per-sequence choice is given, assembled into
a pool per location. Attention layers then only slice the context (views, no saved tensors), which keeps
gradient checkpointing exact: a recomputed layer reads the same context tensors (they reach it through the
layer kwargs that transformers captures for the recompute).

Nothing is cached between forwards: a cache keyed on version counters returned stale prefixes after
in-place `.data` writes (EMA, weight averaging), which bump no counter, and checking the values instead
costs about half of what rerunning the MLP costs. A flat (or ejected) prefix is read directly; an MLP reruns
each forward, decode steps included (eject_prefix_tuning for inference removes that cost).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import ModelGeometry, PrefixAdapter
from .config import PrefixTuningConfig

Choice = None | Tensor | Sequence[str | int | None]


@dataclass
class LocationPrefix:
    """One forward's prefix at one location, in the compute dtype.

    Shared mode (one active adapter, no per-sequence choice): `shared` [L_a, 2, Hkv, P, D], `row_of` maps a
    global layer id to its row. Pool mode: `pool` [L_all, 2, N, Hkv, Pmax, D] over the N active adapters,
    `lengths` [L_all, N] (0 where an adapter leaves that layer out), `row_of` maps layer -> row of L_all and
    `has_any` the layers where some adapter has a prefix.
    """

    row_of: Mapping[int, int]
    shared: Tensor | None = None
    pool: Tensor | None = None
    lengths: Tensor | None = None
    has_any: frozenset = frozenset()


class LayerPrefix(tuple):
    """One layer's prefix for one prefix_attention call: (prefix_k, prefix_v, prefix_index, prefix_lengths)."""

    __slots__ = ()

    def __new__(cls, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None):
        return super().__new__(cls, (prefix_k, prefix_v, prefix_index, prefix_lengths))


class ForwardContext:
    """What one forward's attention layers read: the active adapters' prefixes and the per-sequence choice."""

    def __init__(
        self,
        store: PrefixStore,
        active: tuple,
        choice: Tensor | None,
        locations: Mapping[str, LocationPrefix],
        dtype: torch.dtype,
    ):
        self.store = store
        self.active = active
        self.choice = choice  # long [n] indices into `active`, -1 = no prefix; None = all use active[0]
        self.locations = locations
        self.dtype = dtype
        self._index_by_batch: dict[int, Tensor] = {}
        self.gated = tuple(i for i, a in enumerate(active) if store.adapters[a].config.use_gating)

    def choice_for_batch(self, batch: int) -> Tensor | None:
        """The choice expanded to this batch: equal length, or repeated per sequence for a multiple
        (generate() repeats each sequence for beams / num_return_sequences with repeat_interleave)."""
        if self.choice is None:
            return None
        if batch not in self._index_by_batch:
            n = self.choice.shape[0]
            if batch == n:
                idx = self.choice
            elif n > 0 and batch % n == 0:
                idx = self.choice.repeat_interleave(batch // n)
            else:
                raise ValueError(
                    f"prefix_choice: has {n} entries but the batch has {batch} sequences; expected one entry per "
                    f"sequence (or per input sequence of generate(), which repeats them for beams)"
                )
            self._index_by_batch[batch] = idx
        return self._index_by_batch[batch]

    def layer_prefix(
        self,
        location: str | None,
        layer: int | None,
        *,
        dtype: torch.dtype,
        batch: int,
        hidden_states: Tensor | None = None,
    ) -> LayerPrefix | None:
        """The prefix arguments for one attention call, or None when this layer has no prefix."""
        if location is None or location not in self.locations:
            return None
        lp = self.locations[location]
        row = lp.row_of.get(layer)
        if row is None:
            return None
        if lp.pool is not None and layer not in lp.has_any:
            return None
        index = self.choice_for_batch(batch)
        if lp.shared is not None:
            pk, pv, lengths = lp.shared[row, 0], lp.shared[row, 1], None
        else:
            pk, pv, lengths = lp.pool[row, 0], lp.pool[row, 1], lp.lengths[row]
        if pk.dtype != dtype:  # e.g. autocast chose another dtype than the model's; a per-layer cast is tiny
            pk, pv = pk.to(dtype), pv.to(dtype)
        if self.gated and self._layer_gated(location, layer):
            return self._gated(location, layer, pk, pv, lengths, index, batch, hidden_states)
        if lp.shared is not None:
            return LayerPrefix(pk, pv)
        return LayerPrefix(pk, pv, index, lengths)

    def _layer_gated(self, location: str, layer: int) -> bool:
        return any(self.store.adapters[self.active[i]].gate(location, layer) is not None for i in self.gated)

    def _gated(self, location, layer, pk, pv, lengths, index, batch, hidden_states) -> LayerPrefix:
        """Gating scales the prefix per sequence, so it needs the pool form with one entry per sequence
        (N = B): B x P memory, which only gating forces."""
        if hidden_states is None:
            raise RuntimeError(f"prefix gating at {location} layer {layer}: the attention input was not captured")
        device = pk.device
        shared = pk.dim() == 3
        if index is None:
            index = torch.zeros(batch, dtype=torch.long, device=device)
        gk = torch.ones(batch, dtype=pk.dtype, device=device)
        gv = torch.ones(batch, dtype=pk.dtype, device=device)
        for i in self.gated:
            gate = self.store.adapters[self.active[i]].gate(location, layer)
            if gate is None:
                continue
            g = gate(hidden_states).to(pk.dtype)  # [B, 1|2]
            sel = index == i
            gk = torch.where(sel, g[:, 0], gk)
            gv = torch.where(sel, g[:, -1], gv)
        take = index.clamp(min=0)
        if shared:
            pk_b, pv_b = pk.unsqueeze(0).expand(batch, *pk.shape), pv.unsqueeze(0).expand(batch, *pv.shape)
            len_b = None
        else:
            pk_b, pv_b = pk[take], pv[take]
            len_b = lengths[take]
        pk_b = pk_b * gk[:, None, None, None]
        pv_b = pv_b * gv[:, None, None, None]
        rows = torch.arange(batch, device=device)
        per_seq_index = torch.where(index >= 0, rows, torch.full_like(rows, -1))
        return LayerPrefix(pk_b, pv_b, per_seq_index, len_b)


class PrefixStore(nn.Module):
    """All prefix adapters of one model, the active set, and the per-forward context."""

    def __init__(self, geometry: ModelGeometry, backend: str = "auto", deterministic: bool = True):
        super().__init__()
        self.geometry = geometry
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.backend = backend
        self.deterministic = deterministic
        self._current: ForwardContext | None = None
        self._entered: list[int] = []  # entry modules that opened the current context (see prefixattn.hf)
        self.any_gating = False
        self._choice_override: Tensor | None = None

    # -- registry -----------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.adapters.keys())

    def get(self, name: str) -> PrefixAdapter:
        if not isinstance(name, str):
            raise TypeError(f"adapter name: expected a str, got {type(name).__name__}")
        if name not in self.adapters:
            raise ValueError(f"unknown adapter {name!r}; this model has {self.names() or 'no adapters'}")
        return self.adapters[name]

    def check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter name: expected a non-empty str, got {name!r}")
        if "." in name:
            raise ValueError(f"adapter name: must not contain '.', got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists; delete it first or choose another name")

    def add(self, name: str, config: PrefixTuningConfig, *, device=None, metadata: dict | None = None) -> PrefixAdapter:
        self.check_new_name(name)
        adapter = PrefixAdapter(name, config, self.geometry, metadata=metadata)
        if device is not None:
            adapter = adapter.to(device)
        adapter.train(self.training)
        self.insert(adapter)
        return adapter

    def insert(self, adapter: PrefixAdapter) -> None:
        """Register an adapter that was fully built and validated elsewhere (e.g. loaded from disk)."""
        self.check_new_name(adapter.name)
        self.adapters[adapter.name] = adapter
        self.changed()

    def delete(self, name: str) -> None:
        self.get(name)
        del self.adapters[name]
        self.active = [a for a in self.active if a != name]
        self.changed()

    def set_flat_prefix(self, name: str, prefixes: Mapping[str, Tensor]) -> None:
        """Give adapter `name` these flat prefixes {location: [L_loc, 2, Hkv, P, D]} (validated first)."""
        self.get(name).set_flat_prefix(prefixes)
        self.changed()

    def flat_prefix(self, name: str) -> dict[str, Tensor]:
        """Adapter `name`'s inference prefix {location: [L_loc, 2, Hkv, P, D]} (the MLP run once, no dropout)."""
        return self.get(name).flat_prefix()

    def set_active(self, names) -> None:
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        elif isinstance(names, Iterable):
            names = list(names)
        else:
            raise TypeError(f"adapter names: expected a name, a list of names or None, got {type(names).__name__}")
        for n in names:
            self.get(n)
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names: each adapter may be active once, got {names}")
        self.active = names
        self.changed()

    def changed(self) -> None:
        self.any_gating = any(a.config.use_gating for a in self.adapters.values())

    # -- the per-sequence choice ------------------------------------------------------------------------
    def resolve_choice(self, choice: Choice, device) -> Tensor | None:
        """Validate a user's prefix_choice and turn it into long indices into the active list (-1 = none)."""
        if choice is None:
            return None
        active = self.active
        if not active:
            raise ValueError(
                "prefix_choice: given, but no adapter is active; call "
                "model.set_active_adapters([...]) with the adapters to choose from"
            )
        if isinstance(choice, Tensor):
            if choice.dim() != 1 or choice.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"prefix_choice: expected an int tensor [batch] of indices into the active adapters "
                    f"{active} (-1 = none), got dtype {choice.dtype} shape {list(choice.shape)}"
                )
            values = choice
        elif isinstance(choice, (list, tuple)):
            idx = []
            for pos, c in enumerate(choice):
                if c is None:
                    idx.append(-1)
                elif isinstance(c, str):
                    if c not in self.adapters:
                        raise ValueError(f"prefix_choice[{pos}]: unknown adapter {c!r}; this model has {self.names()}")
                    if c not in active:
                        raise ValueError(
                            f"prefix_choice[{pos}]: adapter {c!r} is not active; active adapters are "
                            f"{active} (see set_active_adapters)"
                        )
                    idx.append(active.index(c))
                elif isinstance(c, int) and not isinstance(c, bool):
                    idx.append(c)
                else:
                    raise TypeError(f"prefix_choice[{pos}]: expected an adapter name, an int index or None, got {c!r}")
            values = torch.tensor(idx, dtype=torch.long)
        else:
            raise TypeError(
                f"prefix_choice: expected a list of adapter names / indices / None, or an int tensor, "
                f"got {type(choice).__name__}"
            )
        if values.numel() == 0:
            raise ValueError("prefix_choice: expected one entry per sequence, got an empty choice")
        lo, hi = int(values.min()), int(values.max())
        if lo < -1 or hi >= len(active):
            raise ValueError(
                f"prefix_choice: indices must lie in [-1, {len(active) - 1}] (-1 = no prefix, else an "
                f"index into the active adapters {active}); got min {lo}, max {hi}"
            )
        return values.to(device=device, dtype=torch.long)

    @contextlib.contextmanager
    def choice_override(self, choice: Choice, device):
        """Within the block, forwards without their own prefix_choice use this one (generate, user code)."""
        resolved = self.resolve_choice(choice, device)
        saved = self._choice_override
        self._choice_override = resolved
        try:
            yield resolved
        finally:
            self._choice_override = saved

    # -- the per-forward context ------------------------------------------------------------------------
    def begin_forward(self, choice: Choice = None, *, dtype: torch.dtype, device) -> ForwardContext:
        active = tuple(self.active)
        if choice is None:
            resolved = self._choice_override
        elif isinstance(choice, Tensor) and choice is self._choice_override:
            resolved = choice
        else:
            resolved = self.resolve_choice(choice, device)
        if resolved is not None and resolved.device != torch.device(device):
            resolved = resolved.to(device)
        if len(active) > 1 and resolved is None:
            raise ValueError(
                f"several adapters are active ({list(active)}): pass prefix_choice=[...] (one adapter name or None "
                f"per sequence) to forward()/generate(), or activate a single adapter"
            )
        pool_mode = resolved is not None
        locations = self._build_locations(active, pool_mode, dtype) if active else {}
        return ForwardContext(self, active, resolved, locations, dtype)

    def _build_locations(self, active: tuple, pool_mode: bool, dtype) -> dict[str, LocationPrefix]:
        adapters = [self.adapters[a] for a in active]
        generated = [{loc: ad.generate(loc) for loc in ad.rows} for ad in adapters]
        out = {}
        for loc, spec in self.geometry.locations.items():
            users = [i for i, g in enumerate(generated) if loc in g]
            if not users:
                continue
            if not pool_mode:
                out[loc] = LocationPrefix(row_of=adapters[0].row_of[loc], shared=generated[0][loc].to(dtype))
                continue
            row_of = {layer: i for i, layer in enumerate(spec.layers)}
            p_max = max(adapters[i].config.prefix_length for i in users)
            template = generated[users[0]][loc]
            shape = (len(spec.layers), 2, spec.num_kv_heads, p_max, spec.head_dim)
            lengths = [[0] * len(adapters) for _ in spec.layers]
            entries = []
            for i, ad in enumerate(adapters):
                if loc not in generated[i]:
                    entries.append(template.new_zeros(shape, dtype=dtype))
                    continue
                t = generated[i][loc].to(dtype)
                plen = ad.config.prefix_length
                if plen < p_max:
                    t = F.pad(t, (0, 0, 0, p_max - plen))
                rows = [row_of[layer] for layer in ad.rows[loc]]
                if rows != list(range(len(spec.layers))):
                    t = t.new_zeros(shape).index_copy(0, torch.tensor(rows, device=t.device), t)
                entries.append(t)
                for r in rows:
                    lengths[r][i] = plen
            pool = torch.stack(entries, dim=2).contiguous()  # [L_all, 2, N, Hkv, Pmax, D]
            has_any = frozenset(layer for layer, r in row_of.items() if any(lengths[r]))
            out[loc] = LocationPrefix(
                row_of=row_of,
                pool=pool,
                lengths=torch.tensor(lengths, dtype=torch.int32, device=pool.device),
                has_any=has_any,
            )
        return out

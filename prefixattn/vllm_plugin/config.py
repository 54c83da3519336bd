"""The plugin's settings: `additional_config["prefixattn"]` of a vLLM engine, parsed and validated.

    LLM(model, additional_config={"prefixattn": {"adapters": {"sql": "out/sql", "chat": "out/chat"}}})
    vllm serve model --additional-config '{"prefixattn": {"adapters": {"sql": "out/sql"}}}'

Keys: `adapters` (required): prefix name -> adapter directory (a `save_adapter` directory, flat or MLP
form, or a PEFT prefix-tuning directory); `max_prefix_length` (optional): the pool's prefix length, so that
the memory it takes is fixed by the config and not by the adapters found; `peft_positions` (optional,
"peft" or "prefixattn"): how PEFT directories are imported (as in `prefixattn.load_peft_prefix`).
Everything is checked here, before any model or adapter is read, with errors naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEY = "prefixattn"
PEFT_POSITIONS = ("peft", "prefixattn")
_KNOWN = ("adapters", "max_prefix_length", "peft_positions")


@dataclass(frozen=True)
class PluginConfig:
    """Parsed `additional_config["prefixattn"]`. `adapters` keeps the user's order (= pool order)."""

    adapters: tuple[tuple[str, str], ...]  # (name, directory)
    max_prefix_length: int | None = None
    peft_positions: str = "peft"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.adapters]


def _where(key: str) -> str:
    return f'additional_config["{KEY}"]["{key}"]'


def parse(additional_config: Mapping[str, Any] | None) -> PluginConfig | None:
    """The plugin's config, or None when `additional_config` has no "prefixattn" entry (plugin inactive)."""
    if not additional_config or KEY not in additional_config:
        return None
    raw = additional_config[KEY]
    if not isinstance(raw, Mapping):
        raise ValueError(f'additional_config["{KEY}"]: expected a dict, got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(_KNOWN))
    if unknown:
        raise ValueError(f'additional_config["{KEY}"]: unknown key(s) {unknown}; known keys: {list(_KNOWN)}')

    adapters = raw.get("adapters")
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError(
            f"{_where('adapters')}: expected a non-empty dict of prefix name -> adapter directory, got {adapters!r}"
        )
    pairs = []
    for name, directory in adapters.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{_where('adapters')}: a prefix name must be a non-empty string, got {name!r}")
        if not isinstance(directory, (str, os.PathLike)):
            raise ValueError(
                f"{_where('adapters')}[{name!r}]: expected a directory path, got {type(directory).__name__}"
            )
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"{_where('adapters')}[{name!r}]: {directory!r} is not a directory")
        pairs.append((name, os.path.abspath(directory)))

    max_len = raw.get("max_prefix_length")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise ValueError(f"{_where('max_prefix_length')}: expected an int >= 1, got {max_len!r}")

    positions = raw.get("peft_positions", "peft")
    if positions not in PEFT_POSITIONS:
        raise ValueError(f"{_where('peft_positions')}: expected one of {list(PEFT_POSITIONS)}, got {positions!r}")
    return PluginConfig(adapters=tuple(pairs), max_prefix_length=max_len, peft_positions=positions)


def from_vllm_config(vllm_config) -> PluginConfig | None:
    """The plugin's config of a VllmConfig (None: inactive)."""
    return parse(getattr(vllm_config, "additional_config", None))

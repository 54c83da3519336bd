"""Adapter-only checkpoints for transformers' Trainer and the trainers built on it (TRL's SFTTrainer, ...).

    trainer = adapter_checkpoints(Trainer(model=model, args=args, ...))

binds Trainer's saving and loading methods (_save, _load_from_checkpoint, _load_best_model) on that one
trainer instance (its class is not touched):

- saving (every checkpoint, and trainer.save_model()) writes each adapter being trained in prefixattn's
  format, one folder per adapter (`<folder>/<adapter name>/`, read back by model.load_adapter), and the
  tokenizer and training arguments as Trainer does, instead of the whole model. The optimizer, scheduler and
  RNG files stay Trainer's own; the optimizer only holds the adapters' parameters, because Trainer builds it
  from the parameters that require a gradient, which train_adapter limits to the adapters.
- loading (train(resume_from_checkpoint=...), load_best_model_at_end) copies those folders back into the
  live adapters, in place, so resuming continues exactly where the checkpoint stopped. A folder without
  adapter checkpoints (a full-model checkpoint) goes to Trainer's own loader.

"Being trained" means: the adapter has a parameter with requires_grad. Every trainable parameter of the model
must belong to an adapter (an adapter-only checkpoint would silently drop any other one), which
model.train_adapter(name) guarantees unless train_embeddings=True.
"""

from __future__ import annotations

import os
import types

import torch

from ..tuning import io as tuning_io
from .gathered import full_copy
from .install import STORE_NAME, get_store

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes next to the model


def adapter_checkpoints(trainer):
    """Make `trainer` (a transformers Trainer or subclass) save and resume prefixattn adapters only; returns it.

    Call it after model.train_adapter(...) and before trainer.train(). Raises if no adapter is being trained
    or if parameters outside the adapters are trainable."""
    if not all(
        hasattr(trainer, attr) for attr in ("_save", "_load_from_checkpoint", "_load_best_model", "accelerator", "args")
    ):
        raise TypeError(f"adapter_checkpoints: expected a transformers Trainer, got {type(trainer).__name__}")
    trained_adapters(_base_model(trainer, trainer.model), "adapter_checkpoints")
    trainer._save = types.MethodType(_save, trainer)
    trainer._load_from_checkpoint = types.MethodType(_load_from_checkpoint, trainer)
    trainer._load_best_model = types.MethodType(_load_best_model, trainer)
    return trainer


def trained_adapters(model, who: str) -> list[str]:
    """Names of the adapters that have trainable parameters; raises if there are none, or if a trainable
    parameter lies outside the adapters."""
    store = get_store(model)
    in_store = {id(p) for p in store.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_store]
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise ValueError(
            f"{who}: parameters outside the prefix adapters are trainable ({shown}); an adapter-only checkpoint "
            f"would lose them. Freeze them (model.train_adapter(name) does) or save full checkpoints instead"
        )
    names = [n for n, a in store.adapters.items() if any(p.requires_grad for p in a.parameters())]
    if not names:
        raise ValueError(
            f"{who}: no adapter is being trained (none has a parameter with requires_grad); call "
            f"model.train_adapter(name) first"
        )
    return names


def _base_model(trainer, model):
    """The prefixattn-prepared model inside whatever wrappers (DDP, torch.compile) accelerate put around it."""
    return trainer.accelerator.unwrap_model(model, keep_torch_compile=False)


def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    """Trainer._save, writing the trained adapters instead of the model (bound by adapter_checkpoints)."""
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    model = _base_model(self, self.model)
    store = get_store(model)
    names = trained_adapters(model, "adapter_checkpoints")
    if state_dict is None:
        # Full CPU copies, taken on every rank: gathering sharded (FSDP2) parameters is a collective.
        copies = {name: full_copy(store.get(name)) for name in names}
    else:
        # Trainer gathered the full state already (FSDP full state dict); ranks other than the writer may
        # have received an empty one, so nothing here may be collective.
        if not self.args.should_save:
            return
        copies = {name: full_copy(store.get(name), _sub_state(state_dict, name)) for name in names}
    if not self.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    for name, adapter in copies.items():
        tuning_io.save_adapter(adapter, os.path.join(output_dir, name))
    tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def _sub_state(state_dict: dict, name: str) -> dict:
    prefix = f"{STORE_NAME}.adapters.{name}."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
    """Trainer._load_from_checkpoint for adapter-only folders (bound by adapter_checkpoints)."""
    model = self.model if model is None else model
    base = _base_model(self, model)
    names = trained_adapters(base, "resume_from_checkpoint")
    folders = {n: os.path.join(resume_from_checkpoint, n) for n in names}
    present = {n: os.path.isfile(os.path.join(f, tuning_io.CONFIG_NAME)) for n, f in folders.items()}
    if not any(present.values()):  # e.g. a full-model checkpoint written without adapter_checkpoints
        return type(self)._load_from_checkpoint(self, resume_from_checkpoint, model)
    missing = [n for n, ok in present.items() if not ok]
    if missing:
        raise ValueError(
            f"resume_from_checkpoint: {resume_from_checkpoint!r} has no checkpoint of the trained adapter(s) "
            f"{missing} (expected the folder(s) {[folders[n] for n in missing]})"
        )
    restore_adapters(base, folders)


def _load_best_model(self) -> None:
    """Trainer._load_best_model: reload the adapters of the best checkpoint (bound by adapter_checkpoints)."""
    self._load_from_checkpoint(self.state.best_model_checkpoint)


def restore_adapters(model, folders: dict[str, str]) -> None:
    """Copy saved adapters {name: folder} into the model's adapters of those names, in place (the optimizer
    keeps its references). Everything is read and checked before any parameter changes."""
    store = get_store(model)
    loaded = {}
    for name, folder in folders.items():
        live = store.get(name)
        saved = tuning_io.read_adapter(folder, store.geometry, name=name)
        if saved.config != live.config:
            raise ValueError(
                f"resume_from_checkpoint: adapter {name!r} in {folder!r} has config {saved.config}, but the "
                f"model's adapter has {live.config}; add the adapter with the config it was trained with"
            )
        loaded[name] = saved.state_dict()
    for name, state in loaded.items():
        store.get(name).load_state_dict(state, strict=True)  # copy_ into the existing parameters
    store.changed()

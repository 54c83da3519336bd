"""FSDP2 (fully_shard, gloo, two CPU processes): the prefix gradients and the adapter trained for a few steps
equal a one-process run on the whole batch, and the adapter saves from rank 0 as full tensors that
load_adapter reads in another process."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 300  # a hung worker fails the test instead of stalling the suite
STEPS = 3
LR = 1e-2


def _model_and_batch():
    from hf_models import batch, build

    import prefixattn
    from prefixattn import PrefixTuningConfig

    model = build("llama")
    prefixattn.init(model)
    model.add_adapter("a", config=PrefixTuningConfig(prefix_length=4, bottleneck_size=16))
    model.train_adapter("a")
    kw, _ = batch("llama", b=4)
    kw["labels"] = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    return model, kw


def _train(model, step_loss):
    """STEPS steps of Adam on the trainable parameters; returns the gradients of the first step (callable
    `grads` turns a parameter's gradient into a full tensor)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    first = None
    for step in range(STEPS):
        step_loss().backward()
        if step == 0:
            first = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
    return first


def _worker(rank, world, init_file, tests_dir, out_dir):
    import sys

    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port that another process on the machine could take meanwhile.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=90)
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from prefixattn.hf import save_full_adapter

        model, kw = _model_and_batch()
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root group holds the embeddings, the head and the prefix adapter
        half = {k: v[rank * 2 : (rank + 1) * 2] for k, v in kw.items()}
        # every token counts once in the mean over the full batch: scale by this rank's share of the tokens
        n_all = (kw["labels"][:, 1:] != -100).sum()
        n_here = (half["labels"][:, 1:] != -100).sum()
        # FSDP averages the gradients over the ranks, hence * world
        grads = _train(model, lambda: model(**half).loss * (n_here / n_all) * world)
        grads = {n: g.full_tensor() for n, g in grads.items()}  # collective: every rank gathers
        from torch.distributed.tensor import DTensor

        sharded = {n: isinstance(p, DTensor) for n, p in model.named_parameters() if p.requires_grad}
        save_full_adapter(model, os.path.join(out_dir, "adapter"), "a")  # every rank calls, rank 0 writes
        if rank == 0:
            torch.save({"grads": grads, "sharded": sharded}, os.path.join(out_dir, "grads.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's exit-time teardown: gloo's threads can still be winding down and abort
    # the process after all the work is done (see test_hf_ddp.py). Only reached on success.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_fsdp2_gloo_prefix_training_matches_one_process_and_saves_from_rank0(tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    from hf_models import build

    import prefixattn
    from prefixattn.hf import get_store

    tests_dir = os.path.dirname(__file__)
    # spawn, not fork: a forked child inherits the parent's thread pools and locks, and hung now and then.
    procs = mp.start_processes(
        _worker, args=(2, str(tmp_path / "rendezvous"), tests_dir, str(tmp_path)), nprocs=2, join=False,
        start_method="spawn",
    )  # fmt: skip
    start = time.monotonic()
    while not procs.join(timeout=1.0):
        if time.monotonic() - start > DEADLINE_S:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"FSDP workers did not finish within {DEADLINE_S} s")
    saved = torch.load(tmp_path / "grads.pt")

    model, kw = _model_and_batch()
    ref_grads = _train(model, lambda: model(**kw).loss)
    assert saved["grads"].keys() == ref_grads.keys() and ref_grads
    assert saved["sharded"].keys() == ref_grads.keys()  # FSDP made nothing else trainable
    assert all(saved["sharded"].values())  # the adapter really was sharded (DTensor parameters)
    for n in ref_grads:
        assert ref_grads[n].abs().max() > 0, n
        torch.testing.assert_close(saved["grads"][n], ref_grads[n], rtol=1e-4, atol=1e-7)

    # The rank-0 checkpoint holds full tensors, loads in this (other) process, and is the one-process adapter
    # up to the float32 rounding of summing the gradients in another order (Adam's steps are ~LR each).
    fresh = build("llama")
    prefixattn.init(fresh)
    fresh.load_adapter(str(tmp_path / "adapter"), set_active=True)
    loaded = get_store(fresh).get("a").state_dict()
    trained = get_store(model).get("a").state_dict()
    initial = get_store(_model_and_batch()[0]).get("a").state_dict()
    for n, t in trained.items():
        assert loaded[n].shape == t.shape, n
        assert (t - initial[n]).abs().max() > LR / 2, n  # training moved every tensor
        torch.testing.assert_close(loaded[n], t, rtol=1e-4, atol=1e-5)

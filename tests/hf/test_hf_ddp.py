"""DDP (gloo, two CPU processes) gives the same prefix gradients as one process on the whole batch."""

import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 120  # a hung worker fails the test instead of stalling the suite


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


def _worker(rank, world, init_file, tests_dir, out_path):
    import sys

    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port that another process on the machine could take meanwhile.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        model, kw = _model_and_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = {k: v[rank * 2 : (rank + 1) * 2] for k, v in kw.items()}
        # every token counts once in the mean over the full batch: scale by this rank's share of the tokens
        n_all = (kw["labels"][:, 1:] != -100).sum()
        n_here = (half["labels"][:, 1:] != -100).sum()
        loss = ddp(**half).loss * (n_here / n_all) * world  # DDP averages the gradients over ranks
        loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out_path)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's and C++'s exit-time teardown: gloo's threads can still be winding down
    # and abort the process ("terminate called without an active exception") after all the work is done.
    # Only reached on success; an exception above still fails the worker the usual way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_gloo_prefix_gradients_match_one_process(tmp_path):
    tests_dir = os.path.dirname(__file__)
    out = str(tmp_path / "grads.pt")
    # spawn, not fork: a forked child inherits the parent's thread pools and locks, and hung now and then.
    procs = mp.start_processes(
        _worker, args=(2, str(tmp_path / "rendezvous"), tests_dir, out), nprocs=2, join=False, start_method="spawn"
    )
    start = time.monotonic()
    while not procs.join(timeout=1.0):
        if time.monotonic() - start > DEADLINE_S:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {DEADLINE_S} s")
    ddp_grads = torch.load(out)
    model, kw = _model_and_batch()
    model(**kw).loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ddp_grads.keys() == ref.keys() and ref
    for n in ref:
        torch.testing.assert_close(ddp_grads[n], ref[n], rtol=1e-4, atol=1e-7)

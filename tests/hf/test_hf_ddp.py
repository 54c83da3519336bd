"""DDP (gloo, two CPU processes) gives the same prefix gradients as one process on the whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank, world, port, tests_dir, out_path):
    import sys

    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, kw = _model_and_batch()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = {k: v[rank * 2:(rank + 1) * 2] for k, v in kw.items()}
        # every token counts once in the mean over the full batch: scale by this rank's share of the tokens
        n_all = (kw["labels"][:, 1:] != -100).sum()
        n_here = (half["labels"][:, 1:] != -100).sum()
        loss = ddp(**half).loss * (n_here / n_all) * world  # DDP averages the gradients over ranks
        loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, out_path)
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_prefix_gradients_match_one_process(tmp_path):
    model, kw = _model_and_batch()  # first, so the forked children inherit every import
    model(**kw).loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    tests_dir = os.path.dirname(__file__)
    out = str(tmp_path / "grads.pt")
    # fork, not spawn: spawned children re-import torch and transformers (several seconds each on a 2-core
    # machine). Children set one intra-op thread first, as DataLoader workers do, which keeps fork safe.
    mp.start_processes(_worker, args=(2, _free_port(), tests_dir, out), nprocs=2, join=True, start_method="fork")
    ddp_grads = torch.load(out)
    assert ddp_grads.keys() == ref.keys() and ref
    for n in ref:
        torch.testing.assert_close(ddp_grads[n], ref[n], rtol=1e-4, atol=1e-7)

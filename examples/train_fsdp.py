"""Prefix tuning under FSDP2 (torch.distributed.fsdp.fully_shard), one process per device.

    torchrun --nproc_per_node 2 examples/train_fsdp.py
    accelerate launch --num_processes 2 examples/train_fsdp.py   # accelerate only starts the processes here

On CPUs it uses gloo, on GPUs nccl. The model is a small Llama built from a config (no download), so the
script runs anywhere; swap in AutoModelForCausalLM.from_pretrained(...) for a real one. Each rank trains on
its own slice of every batch; the adapter is saved once, from rank 0, with full (gathered) tensors, and
model.load_adapter reads it in any later, unsharded process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import prefixattn
from prefixattn import PrefixTuningConfig
from prefixattn.hf import save_full_adapter


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="fsdp_prefix")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun / accelerate launch set RANK, WORLD_SIZE, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # every rank builds the same model and adapter before sharding
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device)
    prefixattn.init(model)
    model.add_adapter("task", config=PrefixTuningConfig(prefix_length=8, bottleneck_size=64))
    model.train_adapter("task")  # freeze the model, train the prefix

    mesh = init_device_mesh(device.type, (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, head, and the adapter under model.prefix_tuning
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    # A task a prefix learns fast: continue one of four fixed token sequences.
    sequences = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        batch = sequences.repeat(world, 1)  # the global batch: 4 sequences per rank
        mine = batch[rank * 4 : (rank + 1) * 4].to(device)  # this rank's slice of the global batch
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()  # FSDP reduce-scatters (averages) the prefix gradients over the ranks
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step + 1:3d}  loss {loss.item():.3f} (rank 0's slice)", flush=True)

    n_bytes = save_full_adapter(model, args.out, "task")  # every rank calls it (it gathers); rank 0 writes
    if rank == 0:
        print(f"saved the adapter to {args.out} ({n_bytes:,} bytes)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

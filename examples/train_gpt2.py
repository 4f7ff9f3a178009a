"""Train a small GPT-2 with pipeline parallelism on CPU (gloo), one process per stage:

    torchrun --nproc_per_node 2 examples/train_gpt2.py
"""
import os

import torch

from partitioner import compile_parallel, zoo

ranks = int(os.environ.get("WORLD_SIZE", 2))
zm = zoo.build("gpt2", small=True, batch=8, seq=16)  # random weights, random tokens
pm = compile_parallel(zm.model, ["cpu"] * ranks, zm.example_args, zm.loss_fn,
                      microbatches=4, schedule="1f1b")
opt = torch.optim.AdamW(pm.parameters(), lr=3e-3)  # this rank's parameters only
for step in range(8):
    loss = pm.train_step(*zm.example_args, target=zm.target)  # same loss on every rank
    opt.step()
    opt.zero_grad()
    if pm.rank in (None, 0):
        print(f"step {step}  loss {loss.item():.4f}", flush=True)

"""A training script whose own collective comes last: a loss all-reduced for a log line,
then destroy_process_group(), no opt.close(). Launched by test_lifecycle.py."""

import sys

import torch
import torch.distributed as dist
from torch import nn

import zeroshard

dist.init_process_group("gloo")
stage = int(sys.argv[1])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=stage, lr=1e-2,
                              units=nn.Linear if stage == 3 else None)
for _ in range(3):
    loss = model(torch.randn(5, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    logged = loss.detach().clone()
    dist.all_reduce(logged)  # the script's own collective, the last one before exit
dist.destroy_process_group()

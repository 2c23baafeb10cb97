"""A job whose last collectives are HF Trainer's and the script's own, for exit_stress.py.

    torchrun --standalone --nproc_per_node=2 benchmarks/exit_hf_trainer_job.py --trainer zero --stage 3

A tiny GPT-2 trained 4 steps by ``ZeroTrainer`` (or plain ``Trainer`` + DDP, the control),
evaluated every 2 steps and at the end, then the eval loss all-gathered with
``dist.all_gather_object`` and the process group destroyed. helper-115 saw this job abort
at exit ("terminate called without an active exception") with Trainer + DDP, never with
ZeroTrainer (README, "Ending a run").
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from zeroshard.integrations.hf import ZeroTrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, 97, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=["zero", "ddp"], default="zero")
    parser.add_argument("--stage", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32))
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="exit_hf_"), max_steps=4, eval_strategy="steps",
        eval_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    data = {"train_dataset": Tokens(32, 1), "eval_dataset": Tokens(12, 2)}
    if args.trainer == "ddp":
        trainer = Trainer(model=model, args=training, **data)
    else:
        options = {"units": type(model.transformer.h[0])} if args.stage == 3 else {}
        trainer = ZeroTrainer(model=model, args=training, zero_stage=args.stage,
                              zero_options=options, **data)
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

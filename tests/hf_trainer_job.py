"""A torchrun job (2 ranks, gloo): HF Trainer + its DDP beside ZeroTrainer at stages 1-3.

    torchrun --standalone --nproc_per_node=2 tests/hf_trainer_job.py OUT fp32 bf16

Every run trains the same tiny GPT-2 from the same initial weights on the same data
with the same TrainingArguments (gradient accumulation, active clipping, a linear
schedule with warm-up, evaluation and a checkpoint every 2 steps), in fp32 and then
under bf16 autocast (one launch for both: each launch starts torch and transformers
again); rank 0 writes to OUT/PRECISION/results.pt what tests/test_hf_trainer.py
compares: each run's logged history and final parameters, runs at stages 1 and 3
resumed from the stage-1 run's checkpoint and at stages 2 and 3 from plain Trainer's,
what from_pretrained reads back from save_model, and what plain Trainer does with a
ZeroOptimizer.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys

import torch
import torch.distributed as dist
from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel,
                          Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback,
                          TrainingArguments)

import zeroshard
from zeroshard.integrations.hf import ZeroTrainer

STEPS = 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int) -> None:
        self.ids = torch.randint(0, 100, (count, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)  # every rank and every run starts from the same weights
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                      n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def max_grad_norm(bf16: bool) -> float:
    """0.5, below every step's norm (about 1): clipping is active. Not under bf16
    autocast: there the clip coefficients of DDP and zeroshard, from norms summed in
    other orders, differ by an fp32 ulp; the parameters then differ by an ulp, and the
    bf16 casts of the few weights that sit at a rounding boundary round apart,
    2^-8 each (measured on a CPU without AVX-512: grad norms 6e-6 apart two steps
    later; with clipping inactive the losses are identical and the norms an ulp
    apart). The fp32 run checks clipping."""
    return 1e9 if bf16 else 0.5


def arguments(out: str, bf16: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-3, weight_decay=0.1,
        lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=max_grad_norm(bf16), bf16=bf16,
        logging_steps=1, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=3,
        save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0)


def history(trainer: Trainer) -> list[dict]:
    keys = ("step", "loss", "grad_norm", "eval_loss", "learning_rate", "train_loss")
    return [{k: v for k, v in entry.items() if k in keys} for entry in trainer.state.log_history]


def full_parameters(model, opt=None) -> dict[str, torch.Tensor]:
    if opt is None:
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    with opt.summon_full_params():
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


class OwnZeroOptimizer(ZeroTrainer):
    """A subclass choosing its optimizer, as Trainer's docs say: ``create_optimizer``
    sets ``self.optimizer``, here a ZeroOptimizer at stage 2 over Trainer's groups."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(self.model))
            named = list(self.model.named_parameters())
            groups = [{"params": [p for n, p in named if n in decay],
                       "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            self.optimizer = zeroshard.ZeroOptimizer(self.model, torch.optim.AdamW, stage=2,
                                                     param_groups=groups, lr=self.args.learning_rate)
        return self.optimizer


class OwnPlainOptimizer(ZeroTrainer):
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.args.learning_rate)
        return self.optimizer


class SyncRefModelCallback(TrainerCallback):
    """TRL's callback of this name (trl/trainer/callbacks.py, TRL 1.16, ``sync_ref_model=True``
    in DPO and GRPO), in its shape: after each step the reference model moves toward the
    policy, reading the policy's parameters outside any forward."""

    def __init__(self, ref_model) -> None:
        self.ref_model = ref_model

    @staticmethod
    def _sync_target_model(model, target_model, alpha) -> None:
        for target_param, copy_param in zip(target_model.parameters(), model.parameters()):
            target_param.data.mul_(1.0 - alpha).add_(copy_param.data, alpha=alpha)

    @staticmethod
    def sync_target_model(model, target_model, alpha) -> None:
        SyncRefModelCallback._sync_target_model(model, target_model, alpha)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.sync_target_model(model, self.ref_model, 0.5)


class TrlHabits(Trainer):
    """A trainer built on Trainer as TRL's are: a reference model synced by the callback
    above, and ``generate()`` inside each training step (GRPO's completions), where rank
    1's sequences stop after one token (every token ends them) and rank 0's run on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ref_model = tiny_gpt2()
        self.add_callback(SyncRefModelCallback(self.ref_model))
        self.generated: list[list[int]] = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        stop = list(range(100)) if dist.get_rank() == 1 else None
        with torch.no_grad():  # synced_gpus=False, as Seq2SeqTrainer passes it outside FSDP
            tokens = self.accelerator.unwrap_model(model).generate(
                inputs["input_ids"][:1, :4], max_new_tokens=4, do_sample=False,
                eos_token_id=stop, pad_token_id=0, synced_gpus=False)
        self.generated.append(tokens[0].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)


class ZeroTrlHabits(ZeroTrainer, TrlHabits):
    """ZeroTrainer first, as with TRL's trainers (``class ZeroDPO(ZeroTrainer, DPOTrainer)``)."""


def trl_habits(out: str, stage: int | None, gather_for_generation: bool = True) -> dict:
    """Trainer + DDP (stage None) or ZeroTrainer at ``stage`` with TrlHabits: every rank's
    generated tokens, the reference model and the policy after training; whether a copy
    of the model generates as the model class's own generate over the copy; and the
    tokens of a second trainer's run over the model after ``close()`` (stage 3)."""
    model = tiny_gpt2()
    data = {"train_dataset": Tokens(32, 1)}
    args = arguments(out, bf16=False)
    args.eval_strategy, args.save_strategy = "no", "no"

    def train(trainer) -> list:
        trainer.train()
        generated = [None] * dist.get_world_size()
        dist.all_gather_object(generated, trainer.generated)
        return generated

    if stage is None:
        trainer = TrlHabits(model=model, args=args, **data)
    else:
        trainer = ZeroTrlHabits(model=model, args=args, zero_stage=stage, **data,
                                zero_options={"units": type(model.transformer.h[0])},
                                gather_for_generation=gather_for_generation)
    generated = train(trainer)
    opt = getattr(trainer, "zero_optimizer", None)
    with opt.summon_full_params() if opt is not None else contextlib.nullcontext():
        copied = copy.deepcopy(model)
    prompt = torch.tensor([[1, 2, 3]])
    copy_alike = torch.equal(
        copied.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0),
        type(copied).generate(copied, prompt, max_new_tokens=3, do_sample=False, pad_token_id=0))
    result = {"generated": generated, "reference_model": full_parameters(trainer.ref_model),
              "params": full_parameters(model, opt), "copy_generates_itself": copy_alike}
    if opt is not None:  # a second trainer over the same model, ranks stopping apart again
        opt.close()
        args.max_steps = 1
        again = ZeroTrlHabits(model=model, args=args, zero_stage=stage, **data,
                              zero_options={"units": type(model.transformer.h[0])},
                              gather_for_generation=gather_for_generation)
        result["second_generated"] = train(again)
    return result


class ZeroSeq2SeqTrainer(ZeroTrainer, Seq2SeqTrainer):
    pass


def seq2seq_predictions(out: str, stage: int | None) -> dict:
    """``Seq2SeqTrainer(predict_with_generate=True)`` over a tiny BART, 2 steps and a
    prediction, under DDP (stage None) or ZeroTrainer at ``stage`` with layer units (its
    generate runs the encoder outside the model's forward); rank 1's sequences end at
    their first token, rank 0's run on. The predictions and the parameters."""
    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_position_embeddings=32, dropout=0.0))
    model.generation_config.max_new_tokens = 4
    model.generation_config.eos_token_id = list(range(100)) if dist.get_rank() == 1 else 2
    args = Seq2SeqTrainingArguments(
        output_dir=out, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        predict_with_generate=True, per_device_eval_batch_size=2, report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, save_strategy="no")
    data = {"train_dataset": Tokens(8, 1)}
    if stage is None:
        trainer = Seq2SeqTrainer(model=model, args=args, **data)
    else:
        layers = (type(model.model.encoder.layers[0]), type(model.model.decoder.layers[0]))
        trainer = ZeroSeq2SeqTrainer(model=model, args=args, zero_stage=stage, **data,
                                     zero_options={"units": layers})
    trainer.train()
    predictions = trainer.predict(Tokens(4, 3)).predictions
    return {"predictions": torch.as_tensor(predictions),
            "params": full_parameters(model, getattr(trainer, "zero_optimizer", None))}


def run(out: str, bf16: bool, stage: int | None, resume: str | None = None,
        frozen_vectors: bool = False, trainer_class: type = ZeroTrainer) -> tuple:
    """Trainer + DDP (stage None) or ``trainer_class`` at ``stage``; (trainer, model).
    ``frozen_vectors``: the biases and LayerNorm weights frozen, so Trainer's no-decay
    param group is empty (a LoRA model's is)."""
    model = tiny_gpt2()
    for param in model.parameters():
        param.requires_grad_(not (frozen_vectors and param.dim() == 1))
    data = {"train_dataset": Tokens(32, 1), "eval_dataset": Tokens(7, 2)}
    if stage is None:
        trainer = Trainer(model=model, args=arguments(out, bf16), **data)
    else:
        options = {"units": type(model.transformer.h[0])} if stage == 3 else {}
        trainer = trainer_class(model=model, args=arguments(out, bf16), zero_stage=stage,
                                zero_options=options, **data)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model


def saved_before_training(out: str, rank: int) -> dict | None:
    """``save_model()`` of a ZeroTrainer that has not trained: what from_pretrained reads
    back (rank 0), and the model's own parameters. It raised a raw TypeError (no
    ZeroOptimizer yet: a helper's probe)."""
    model = tiny_gpt2()
    trainer = ZeroTrainer(model=model, args=arguments(out, False), zero_stage=3,
                          train_dataset=Tokens(32, 1), eval_dataset=Tokens(7, 2))
    trainer.save_model(os.path.join(out, "untrained"))
    dist.barrier()
    if rank != 0:
        return None
    again = GPT2LMHeadModel.from_pretrained(os.path.join(out, "untrained"))
    return {"read": {n: p.detach().float() for n, p in again.named_parameters()},
            "model": full_parameters(model)}


def every_ranks_error(work) -> list:
    error = None
    try:
        work()
    except Exception as exc:  # noqa: BLE001 -- what each rank saw is the result
        error = f"{type(exc).__name__}: {exc}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def plain_trainer_with_a_zero_optimizer(out: str) -> str | None:
    """What a user gets from plain Trainer with optimizers=(ZeroOptimizer, None)."""
    model = tiny_gpt2()
    opt = zeroshard.ZeroOptimizer(model, torch.optim.AdamW, stage=2, lr=1e-3)
    trainer = Trainer(model=model, args=arguments(out, False), train_dataset=Tokens(32, 1),
                      eval_dataset=Tokens(7, 2), optimizers=(opt, None))
    try:
        trainer.train()
    except RuntimeError as error:
        return str(error)
    finally:
        opt.close()
    return None


def resume_with_a_damaged_optimizer_file(out: str, bf16: bool, rank: int) -> list:
    """Plain Trainer's checkpoint of step 2 with its optimizer.pt cut short, resumed by
    ZeroTrainer: every rank's error (rank 0 reads the file; the others waited for it)."""
    import shutil
    damaged = os.path.join(out, "damaged", "checkpoint-2")
    if rank == 0:
        shutil.copytree(os.path.join(out, "stageNone", "checkpoint-2"), damaged)
        optimizer = os.path.join(damaged, "optimizer.pt")
        with open(optimizer, "rb") as f:
            data = f.read()
        with open(optimizer, "wb") as f:
            f.write(data[: len(data) // 2])
    dist.barrier()
    return every_ranks_error(lambda: run(os.path.join(out, "damaged_run"), bf16, 2, resume=damaged))


def main() -> None:
    out, precisions = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    for precision in precisions:
        folder = os.path.join(out, precision)
        results = train_every_way(folder, precision == "bf16", dist.get_rank())
        if dist.get_rank() == 0:
            os.makedirs(folder, exist_ok=True)
            torch.save(results, os.path.join(folder, "results.pt"))
    dist.destroy_process_group()


def train_every_way(out: str, bf16: bool, rank: int) -> dict:
    """What the test compares, from runs whose folders are under ``out``."""
    results: dict = {"runs": {}, "max_grad_norm": max_grad_norm(bf16)}
    for stage in (None, 1, 2, 3):
        trainer, model = run(os.path.join(out, f"stage{stage}"), bf16, stage)
        results["runs"][stage] = {"history": history(trainer),
                                  "params": full_parameters(model, getattr(trainer, "zero_optimizer", None))}
        if stage == 3:
            trainer.save_model(os.path.join(out, "exported"))  # collective
            dist.barrier()
            if rank == 0:
                again = GPT2LMHeadModel.from_pretrained(os.path.join(out, "exported"))
                results["exported"] = {n: p.detach().float() for n, p in again.named_parameters()}
    # the stage-1 run's checkpoint of step 2, resumed at stage 1 and at stage 3
    for stage in (1, 3):
        trainer, model = run(os.path.join(out, f"resumed{stage}"), bf16, stage,
                             resume=os.path.join(out, "stage1", "checkpoint-2"))
        results[f"resumed{stage}"] = {"history": history(trainer),
                                      "params": full_parameters(model, trainer.zero_optimizer)}
    # plain Trainer's checkpoint of step 2 (its optimizer.pt), resumed by ZeroTrainer; and
    # with Trainer's no-decay group empty (its scheduler.pt holds one lambda per group)
    trainer, model = run(os.path.join(out, "frozen_vectors"), bf16, None, frozen_vectors=True)
    results["runs"]["frozen_vectors"] = {"history": history(trainer),
                                         "params": full_parameters(model)}
    for key, stage, frozen in (("2", 2, False), ("3", 3, False), ("3_empty_group", 3, True)):
        source = "frozen_vectors" if frozen else "stageNone"
        trainer, model = run(os.path.join(out, f"resumed_from_trainer{key}"), bf16, stage,
                             resume=os.path.join(out, source, "checkpoint-2"),
                             frozen_vectors=frozen)
        results[f"resumed_from_trainer{key}"] = {
            "history": history(trainer), "params": full_parameters(model, trainer.zero_optimizer)}
    if not bf16:  # ZeroTrainer's own parts, the same under autocast
        trainer, model = run(os.path.join(out, "own_optimizer"), bf16, 2,
                             trainer_class=OwnZeroOptimizer)
        results["runs"]["own_optimizer"] = {
            "history": history(trainer), "params": full_parameters(model, trainer.zero_optimizer)}
        results["own_plain_optimizer_errors"] = every_ranks_error(
            lambda: run(os.path.join(out, "own_plain"), bf16, 2, trainer_class=OwnPlainOptimizer))
        results["saved_before_training"] = saved_before_training(out, rank)
        results["trl_habits"] = {stage: trl_habits(os.path.join(out, f"trl{stage}"), stage)
                                 for stage in (None, 3)}
        results["trl_habits"]["3_synced"] = trl_habits(os.path.join(out, "trl3_synced"), 3,
                                                       gather_for_generation=False)
        results["seq2seq"] = {stage: seq2seq_predictions(os.path.join(out, f"s2s{stage}"), stage)
                              for stage in (None, 3)}
    results["damaged_optimizer_errors"] = resume_with_a_damaged_optimizer_file(out, bf16, rank)
    results["plain_trainer_error"] = plain_trainer_with_a_zero_optimizer(os.path.join(out, "plain"))
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, results["plain_trainer_error"])
    results["plain_trainer_errors"] = errors
    return results


if __name__ == "__main__":
    main()

"""Hugging Face ``Trainer`` driving zeroshard: ``ZeroTrainer``.

```python
trainer = ZeroTrainer(model=model, args=args, train_dataset=data, zero_stage=2)  # was Trainer(...)
```

Note [Trainer around a ZeroOptimizer]:
    ``Trainer`` assumes data parallelism is Accelerate's: ``accelerator.prepare``
    wraps the model in ``DistributedDataParallel``, clipping and the logged norm come
    from ``torch.nn.utils.clip_grad_norm_(model.parameters())``, the optimizer state
    is saved from rank 0 and the model through ``save_pretrained`` on rank 0. Each of
    those is wrong for a model whose gradients and states live in shards (plain
    ``Trainer`` with a ZeroOptimizer is refused by the DDP wrap, Note [refusing
    DistributedDataParallel]). ``ZeroTrainer`` changes exactly those places:

    - the model is prepared by Accelerate for evaluation only (autocast under
      ``bf16=True``, ``torch.compile``), as ``Trainer`` prepares models that reduce
      their own gradients, so no DDP wraps it and ``accelerator.prepare`` leaves it be;
      ``args.device`` placement is the ZeroOptimizer's (``device=`` in
      ``zero_options``), not ``model.to()``;
    - the optimizer is the one ``Trainer.create_optimizer`` would build (its class,
      hyper-parameters and its decay / no-decay groups) inside a ZeroOptimizer of
      ``zero_stage``, unless ``optimizers=(ZeroOptimizer, scheduler)`` gives one;
    - ``max_grad_norm`` clips with ``ZeroOptimizer.clip_grad_norm_`` (the global norm
      over the reduced shards) and that norm is logged; micro-batches that do not end
      an accumulation window run under ``no_sync()``, as DDP's do under Trainer;
    - checkpoints (``save_strategy``) keep the model and optimizer in zeroshard's
      sharded format (``<checkpoint>/zeroshard``, every rank writes its shards) next
      to the ``from_pretrained`` files, and ``resume_from_checkpoint`` loads them on
      any world size; ``save_model`` writes safetensors that ``from_pretrained``
      reads, streamed from rank 0 (``zeroshard.save_full_model``).

    ``save_model`` and evaluation are collective: call them on every rank.

Note [trainers built on Trainer]:
    TRL's trainers (SFT, DPO, GRPO, reward) subclass ``Trainer`` and run under
    ``class ZeroDPO(ZeroTrainer, DPOTrainer)``; two of their habits assume that only
    DeepSpeed ZeRO-3 or FSDP shard a model, and are met here at stage 3:

    - a callback that blends the policy into a reference model between steps (TRL's
      ``SyncRefModelCallback``: ``sync_ref_model=True`` in DPO and GRPO) reads the
      parameters outside any forward, where stage 3 holds NaN placeholders: the
      reference model, then the loss and the whole policy, became NaN from the first
      sync, silently (a helper's probe). Such a callback's ``sync_target_model`` (its
      ``_sync_target_model`` is the blend) runs inside ``summon_full_params()``, on
      every rank as callbacks do (``full_precision=True`` under a policy: the fp32
      masters, as the blend of DDP's fp32 parameters);
    - ``generate()`` (GRPO's completions in its training step, ``Seq2SeqTrainer``'s
      ``predict_with_generate``, TRL's completion-logging callbacks) runs one forward
      per new token, so a rank that stopped early (its sequences reached EOS) left the
      others waiting in their next gather: a hang (a helper's probe, several stop
      tokens); transformers turns on ``synced_gpus`` only for DeepSpeed ZeRO-3 and FSDP,
      TRL gives no way to pass it, and ``Seq2SeqTrainer`` passes False (a reviewer's
      probe). And a PEFT model's ``generate`` runs its base model's forward, an
      encoder-decoder's its encoder's, outside the model's own forward, which stage 3
      refuses (GRPO with LoRA, BART and T5 evaluation: a helper's probes). So once
      ZeroTrainer has its ZeroOptimizer at stage 3, the model's ``generate`` runs
      inside ``summon_full_params()`` while that optimizer is open: the whole model
      gathered on every rank for the call, as TRL does under DeepSpeed ZeRO-3 by
      default (``ds3_gather_for_generation``), each rank then generating alone. Where
      the whole model does not fit, ``gather_for_generation=False`` keeps the units
      gathered one by one, with ``synced_gpus=True`` on more than one rank (and the
      two refusals above). Either way every rank calls it (a rank-0-only call waits in
      the gather); inside a block of the user's, ``generate`` is the plain method, so
      rank 0 may generate alone there. It stays on the model after training; a copy or
      a pickle of the model gets one serving no optimizer (the plain method), and the
      next ZeroTrainer over the model or the copy replaces it.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings

from .._comm import run_and_share
from ..checkpoint import load_checkpoint, save_checkpoint
from .._safetensors import save_full_model
from ..optimizer import ZeroOptimizer

CHECKPOINT_FOLDER = "zeroshard"  # inside each Trainer checkpoint


class ZeroTrainer(Trainer):
    """``transformers.Trainer`` over a model that a ``zeroshard.ZeroOptimizer`` shards.

    Pass ``zero_stage`` (1, 2 or 3) and optionally ``zero_options`` (other
    ``ZeroOptimizer`` arguments: ``units``, ``mixed_precision``, ``device``, ...) to
    shard the optimizer ``Trainer`` would build, or ``optimizers=(zero_optimizer,
    scheduler_or_None)`` with one built over ``model``. At stage 3 ``generate`` gathers
    the whole model for each call unless ``gather_for_generation=False`` (Note [trainers
    built on Trainer]). Everything else is ``Trainer``'s. See Note [Trainer around a
    ZeroOptimizer].
    """

    def __init__(self, *args, zero_stage: int | None = None, zero_options: dict | None = None,
                 gather_for_generation: bool = True, **kwargs) -> None:
        optimizer = (kwargs.get("optimizers") or (None, None))[0]
        if optimizer is not None and not isinstance(optimizer, ZeroOptimizer):
            raise TypeError(f"ZeroTrainer shards the optimizer itself; optimizers[0] is a "
                            f"{type(optimizer).__name__}: pass zero_stage= (and leave the optimizer "
                            "to Trainer's settings) or a zeroshard.ZeroOptimizer built over the model")
        if optimizer is None and zero_stage is None:
            raise ValueError("ZeroTrainer needs zero_stage=1, 2 or 3, or optimizers=(a "
                             "zeroshard.ZeroOptimizer over the model, scheduler or None)")
        if optimizer is not None and (zero_stage is not None or zero_options):
            raise ValueError("zero_stage / zero_options describe an optimizer for ZeroTrainer to "
                             "build; optimizers= already gives one: pass one or the other")
        self.zero_optimizer: ZeroOptimizer | None = optimizer
        self._zero_stage = zero_stage
        self._zero_options = dict(zero_options or {})
        self._gather_for_generation = gather_for_generation  # Note [trainers built on Trainer]
        super().__init__(*args, **kwargs)
        _refuse_unsupported(self)
        if optimizer is not None and optimizer.model is not self.model:
            raise ValueError("the ZeroOptimizer in optimizers= manages another module than "
                             "model=; build it over the model given to ZeroTrainer")
        if optimizer is not None:
            self._synchronise_generation()
        # Accelerate's autocast and compile, without DDP or placement: the model is then
        # marked prepared, and accelerator.prepare(model, optimizer) leaves it as it is.
        self.model_wrapped = self.accelerator.prepare_model(
            self.model, device_placement=False, evaluation_mode=True)

    # -- the optimizer ---------------------------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Trainer's optimizer (class, hyper-parameters, decay groups), sharded."""
        if self.optimizer is None:
            opt_class, kwargs = (self.optimizer_cls_and_kwargs
                                 or self.get_optimizer_cls_and_kwargs(self.args, self.model))
            if set(kwargs) & {"params", "model", "optimizer_dict"}:
                raise ValueError(f"optim={self.args.optim!r} builds its own parameter groups; "
                                 "ZeroTrainer supports torch optimizers over plain groups")
            decay = set(self.get_decay_parameter_names(self.model))
            trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in trainable if n in decay],
                       "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
            # both groups, an empty one too, as Trainer builds them: its schedulers and
            # optimizer.pt then number groups alike (a plain Trainer checkpoint of a LoRA
            # model, whose no-decay group is empty, resumes)
            self.zero_optimizer = ZeroOptimizer(
                self.model, opt_class, stage=self._zero_stage, param_groups=groups,
                **self._zero_options, **kwargs)
            self.optimizer = self.zero_optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer calls it once the optimizer is built: one a subclass's own
        ``create_optimizer`` built is taken up here (Note [an optimizer a subclass builds])."""
        self._take_up_optimizer()
        self._blend_reference_models_in_full()
        self._synchronise_generation()
        return super().create_scheduler(num_training_steps, optimizer)

    def _take_up_optimizer(self) -> None:
        """Note [an optimizer a subclass builds]:
            Trainer's documented way to choose the optimizer (per-layer learning rates) is
            to override ``create_optimizer`` and set ``self.optimizer``. ZeroTrainer knew
            only the ZeroOptimizer its own ``create_optimizer`` built, so such a subclass
            failed at the first clipping or accumulation window with a raw
            ``AttributeError: 'NoneType' object has no attribute 'clip_grad_norm_'`` (a
            helper's probe). A ZeroOptimizer built there over the model is now the one
            ZeroTrainer drives; any other optimizer (a plain torch one, which would step
            each rank's unreduced gradients) is refused on every rank before training,
            naming the fix."""
        if self.zero_optimizer is not None:
            return
        found = self.optimizer
        while not isinstance(found, ZeroOptimizer) and isinstance(
                getattr(found, "optimizer", None), torch.optim.Optimizer):
            found = found.optimizer  # Accelerate's AcceleratedOptimizer around it
        if not isinstance(found, ZeroOptimizer) or found.model is not self.model:
            raise TypeError(
                f"ZeroTrainer: create_optimizer set self.optimizer to a {type(found).__name__}"
                f"{'' if not isinstance(found, ZeroOptimizer) else ' over another module'}; "
                "ZeroTrainer steps a zeroshard.ZeroOptimizer over the trainer's model: build "
                "one there (self.optimizer = zeroshard.ZeroOptimizer(self.model, "
                "torch.optim.AdamW, stage=..., param_groups=[...], lr=...)), or leave "
                "create_optimizer to ZeroTrainer (zero_stage=)")
        self.zero_optimizer = found

    def _blend_reference_models_in_full(self) -> None:
        """Note [trainers built on Trainer]: reference-model syncs see full parameters."""
        for callback in self.callback_handler.callbacks:
            blend = getattr(callback, "_sync_target_model", None)
            sync = getattr(callback, "sync_target_model", None)
            if callable(blend) and callable(sync) and not isinstance(sync, _InFullParameters):
                callback.sync_target_model = _InFullParameters(blend, self)

    def _synchronise_generation(self) -> None:
        """Note [trainers built on Trainer]: ``generate`` waits for every rank at stage 3."""
        model = self.model
        own = vars(model).get("generate")
        if (self.zero_optimizer.stage == 3 and callable(getattr(model, "generate", None))
                and (own is None or isinstance(own, _StageThreeGenerate))):
            # not one of the user's own; one of ours (an earlier ZeroTrainer's over this
            # model, or a copy's) serves a closed optimizer: this one replaces it
            model.generate = _StageThreeGenerate(model, self.zero_optimizer,
                                                 self._gather_for_generation)

    def _move_model_to_device(self, model, device) -> None:
        if self.zero_optimizer is None:  # not sharded yet: Trainer places it as usual
            super()._move_model_to_device(model, device)

    # -- a training step -------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        # DDP's no_sync for micro-batches inside an accumulation window (Trainer runs them
        # under accelerator.no_sync(model), which finds no no_sync on an unwrapped model)
        state = self.accelerator.gradient_state
        if state.sync_gradients or state.plugin_kwargs.get("sync_each_batch", False):
            return super().training_step(model, inputs, num_items_in_batch)
        with self.zero_optimizer.no_sync():
            return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        self.accelerator.unscale_gradients()  # GradScaler (fp16), as accelerator's clipping does
        return self.zero_optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            self.accelerator.unscale_gradients()
            grad_norm = self.zero_optimizer.clip_grad_norm_(float("inf"))
        return grad_norm

    # -- saving and loading ----------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Safetensors for ``from_pretrained``, streamed from rank 0; collective."""
        if self.zero_optimizer is None:  # before train(): an ordinary module, Trainer's to save
            return super().save_model(output_dir, _internal_call)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        save_full_model(output_dir, self.model, self.zero_optimizer)
        if self.args.should_save:
            generation_config = getattr(self.model, "generation_config", None)
            if generation_config is not None and getattr(self.model, "can_generate", lambda: False)():
                generation_config.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        save_checkpoint(os.path.join(output_dir, CHECKPOINT_FOLDER), self.model, self.zero_optimizer)
        if self.args.should_save:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if os.path.isdir(os.path.join(resume_from_checkpoint, CHECKPOINT_FOLDER)):
            return  # the model comes back with the optimizer (_load_optimizer_and_scheduler)
        if self.zero_optimizer is None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:  # save_only_model=True: the weights only
            self.zero_optimizer.load_full_state_dict(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = os.path.join(checkpoint, CHECKPOINT_FOLDER)
        if os.path.isdir(folder):
            load_checkpoint(folder, self.model, self.zero_optimizer)
        elif os.path.isfile(os.path.join(checkpoint, OPTIMIZER_NAME)):
            self._load_trainers_optimizer(checkpoint)
        scheduler = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            with warnings.catch_warnings(record=True) as caught:
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
            reissue_pt_warnings(caught)

    def _load_trainers_optimizer(self, checkpoint: str) -> None:
        """A checkpoint of plain ``Trainer`` (DDP): its ``optimizer.pt`` is torch's state
        dict of Trainer's optimizer, which ``load_full_state_dict`` takes, read on rank 0
        and sent. It was ignored: the resumed run started its Adam moments and step count
        again, silently (a helper's probe, 1.7e-3 from Trainer's resume after 3 more
        steps). The weights to load with it are the model's own, as Trainer loaded them
        from the checkpoint (``_load_from_checkpoint``, in whatever form it holds them:
        safetensors, ``pytorch_model.bin``, a PEFT adapter), taken back on rank 0 with
        ``full_state_dict`` (the optimizer has no state yet)."""
        opt = self.zero_optimizer
        model_sd = (opt.full_state_dict() or (None, None))[0]  # collective
        loaded = {}

        def read():  # on CPU, as Trainer reads it (a GPU run saves it on cuda:0)
            file = os.path.join(checkpoint, OPTIMIZER_NAME)
            try:
                loaded["optim_sd"] = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ValueError(f"cannot read Trainer's optimizer state {file}: {exc}") from exc
        # an unreadable file raises on every rank (the others would wait in the load)
        run_and_share(read if model_sd is not None else None, group=opt.sharding.ranks,
                      stats=opt.comm_stats, label="load", device=opt.sharding.device)
        opt.load_full_state_dict(model_sd, loaded.get("optim_sd"))

    def _load_best_model(self) -> None:
        self.zero_optimizer.load_full_state_dict(self.state.best_model_checkpoint)


class _InFullParameters:
    """A reference-model blend run inside ``summon_full_params()`` of the trainer's
    ZeroOptimizer (Note [trainers built on Trainer]); the trainer is held weakly."""

    def __init__(self, blend, trainer: ZeroTrainer) -> None:
        self._blend = blend
        self._trainer = weakref.ref(trainer)

    def __call__(self, model, target_model, alpha) -> None:
        trainer = self._trainer()
        opt = trainer.zero_optimizer if trainer is not None else None
        if opt is None:
            return self._blend(model, target_model, alpha)
        with opt.summon_full_params(full_precision=opt.mixed_precision is not None):
            return self._blend(model, target_model, alpha)


class _StageThreeGenerate:
    """``model.generate`` over the whole model gathered, or with ``synced_gpus=True``,
    while the ZeroOptimizer is open at stage 3 (Note [trainers built on Trainer]); the
    optimizer is held weakly."""

    def __init__(self, model, opt: ZeroOptimizer | None, gather: bool) -> None:
        self._generate = type(model).generate.__get__(model)
        self._opt = weakref.ref(opt) if opt is not None else lambda: None
        self._gather = gather

    def __call__(self, *args, **kwargs):
        opt = self._opt()
        if opt is None or opt._stage is None or opt._stage.switches.summoned:
            return self._generate(*args, **kwargs)
        if self._gather:
            with opt.summon_full_params():
                return self._generate(*args, **kwargs)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            kwargs["synced_gpus"] = True  # False would hang where ranks stop apart
        return self._generate(*args, **kwargs)

    def __reduce__(self):
        # copy.deepcopy(model) and pickling: the copy gets one that generates with the
        # copy for no optimizer (the plain method), until a ZeroTrainer replaces it
        return _StageThreeGenerate, (self._generate.__self__, None, self._gather)


def _refuse_unsupported(trainer: ZeroTrainer) -> None:
    """Trainer features that would undo the sharding, refused on every rank at once."""
    args = trainer.args
    if trainer.model_init is not None or args.auto_find_batch_size:
        raise ValueError("ZeroTrainer does not rebuild the model (model_init, "
                         "auto_find_batch_size): a ZeroOptimizer manages one model object; "
                         "pass the model, and set per_device_train_batch_size yourself")
    if not getattr(trainer.accelerator, "even_batches", True):
        # a rank out of batches leaves the loop while the others wait in the next step's
        # collectives, until the process group's timeout (a helper's probe; DDP hangs too)
        raise ValueError("accelerator_config={'even_batches': False} gives the ranks "
                         "different numbers of batches where the dataset does not split "
                         "evenly, and a rank that runs out leaves the others waiting in the "
                         "next step's collectives (DistributedDataParallel hangs there too). "
                         "Leave even_batches True (the default: Accelerate completes the "
                         "last batches from the start of the dataset)")
    if args.fp16_full_eval or args.bf16_full_eval:
        raise ValueError("fp16_full_eval / bf16_full_eval cast the model with model.to(dtype), "
                         "which would replace the sharded parameters; evaluate under bf16=True "
                         "autocast or give zero_options={'mixed_precision': "
                         "zeroshard.MixedPrecision(...)} instead")
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ValueError("ZeroTrainer shards the model itself: remove the deepspeed / fsdp "
                         "settings from TrainingArguments")

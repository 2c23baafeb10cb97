"""HF Trainer: ZeroTrainer at stages 1-3 against Trainer with its own DDP, in torchrun jobs.

tests/hf_trainer_job.py trains a tiny GPT-2 on 2 ranks with gradient accumulation,
active clipping (max_grad_norm below every step's norm; in fp32 only, see
hf_trainer_job.max_grad_norm), a linear schedule with
warm-up, evaluation and checkpoints, once per run: Trainer + DDP, then ZeroTrainer
at each stage, in fp32 and under bf16 autocast (bf16=True). Differences come only
from the order of fp32 sums (the gradient norm over shards, the reductions), which
moves a parameter by about 1e-7 where AdamW's steps are 1e-3 (lr) long: the bounds
below sit a hundred times under one step, where a sharding bug (a missing reduction,
a wrong shard, clipping that does not reach the shards) moves whole steps.
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
PARAM_ATOL = 1e-5  # one hundredth of an AdamW step (lr 1e-3)
LOG_RTOL = 1e-6  # logged losses and norms: fp32 sums in another order


_JOBS: dict[str, dict] = {}  # per precision, from one job for both, shared by the fixtures below


def _job(precision: str, tmp_path_factory) -> dict:
    if not _JOBS:
        out = tmp_path_factory.mktemp("hf")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", "--max-restarts=0",
                   os.path.join(ROOT, "tests", "hf_trainer_job.py"), str(out), "fp32", "bf16"]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=700)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        _JOBS.update({p: torch.load(out / p / "results.pt", weights_only=False)
                      for p in ("fp32", "bf16")})
    return _JOBS[precision]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def job(request, tmp_path_factory):
    return _job(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def fp32_job(tmp_path_factory):
    """The fp32 job alone, for ZeroTrainer's own parts (the same under autocast)."""
    return _job("fp32", tmp_path_factory)


def assert_same_history(got: list[dict], expected: list[dict]) -> None:
    assert [sorted(e) for e in got] == [sorted(e) for e in expected], (got, expected)
    for mine, theirs in zip(got, expected):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=LOG_RTOL), (key, mine, theirs)


def assert_close_parameters(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=PARAM_ATOL, msg=name)


def after_the_checkpoint(history: list[dict]) -> list[dict]:
    """What a run resumed from the checkpoint of step 2 logged after it (train_loss
    averages the steps that run made, so it is left out)."""
    return [e for e in history if e["step"] > 2 and "train_loss" not in e]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trainer_logs_and_trains_like_trainer_with_ddp(job, stage):
    reference, run = job["runs"][None], job["runs"][stage]
    steps = [e for e in reference["history"] if "grad_norm" in e]
    assert len(steps) == 4
    if job["max_grad_norm"] < 1:  # fp32: clipping was active (hf_trainer_job.max_grad_norm)
        assert all(e["grad_norm"] > job["max_grad_norm"] for e in steps)
    assert any("eval_loss" in e for e in reference["history"])
    assert_same_history(run["history"], reference["history"])
    assert_close_parameters(run["params"], reference["params"])


@pytest.mark.parametrize("stage", [1, 3])
def test_resume_from_checkpoint_continues_the_uninterrupted_run(job, stage):
    """The stage-1 run's checkpoint of step 2, resumed on the same stage (bit for bit) and
    at stage 3 (sums in another order: the same bound as against DDP)."""
    uninterrupted, resumed = job["runs"][1], job[f"resumed{stage}"]
    assert_same_history(after_the_checkpoint(resumed["history"]),
                        after_the_checkpoint(uninterrupted["history"]))
    if stage == 1:
        for name, value in uninterrupted["params"].items():
            assert torch.equal(resumed["params"][name], value), name
    else:
        assert_close_parameters(resumed["params"], uninterrupted["params"])


@pytest.mark.parametrize("case", ["2", "3", "3_empty_group"])
def test_resume_from_plain_trainers_checkpoint_continues_its_run(job, case):
    """Plain Trainer's (DDP) checkpoint of step 2 resumed by ZeroTrainer at stage 2 or 3:
    its optimizer.pt was ignored, and the Adam moments and step count started again,
    silently (a helper's probe: 1.7e-3 from Trainer's own resume after 3 more steps).
    With Trainer's no-decay group empty (biases and norms frozen, as in a LoRA model),
    ZeroTrainer dropped the group, and loading Trainer's scheduler.pt failed with
    torch's raw IndexError."""
    source = "frozen_vectors" if case.endswith("empty_group") else None
    uninterrupted, resumed = job["runs"][source], job[f"resumed_from_trainer{case}"]
    assert_same_history(after_the_checkpoint(resumed["history"]),
                        after_the_checkpoint(uninterrupted["history"]))
    assert_close_parameters(resumed["params"], uninterrupted["params"])


def test_an_unreadable_optimizer_file_of_plain_trainer_raises_on_every_rank(job):
    """Rank 0 reads Trainer's optimizer.pt; cut short, it raised there alone and the other
    rank was left in the load's collectives (gloo: "Connection closed by peer")."""
    rank0, rank1 = job["damaged_optimizer_errors"]
    assert rank0 is not None and "optimizer.pt" in rank0, rank0
    assert rank1 is not None and "another rank failed" in rank1, rank1


def test_a_subclass_that_builds_its_own_optimizer_trains_like_trainer_with_ddp(fp32_job):
    """Note [an optimizer a subclass builds]: a ZeroOptimizer built in an overridden
    ``create_optimizer`` is the one ZeroTrainer drives (it failed at the first clipping
    with a raw AttributeError: a helper's probe); a plain torch optimizer there is refused
    on every rank, naming the fix."""
    job = fp32_job
    reference, run = job["runs"][None], job["runs"]["own_optimizer"]
    assert_same_history(run["history"], reference["history"])
    assert_close_parameters(run["params"], reference["params"])
    for error in job["own_plain_optimizer_errors"]:
        assert error is not None and error.startswith("TypeError: ZeroTrainer: create_optimizer "
                                                      "set self.optimizer to a AdamW"), error
        assert "zeroshard.ZeroOptimizer(self.model" in error, error


def test_save_model_before_training_writes_the_model(fp32_job):
    """It raised a raw TypeError on every rank (no ZeroOptimizer yet: a helper's probe)."""
    saved = fp32_job["saved_before_training"]
    for name, value in saved["model"].items():
        assert torch.equal(saved["read"][name], value), name


def test_save_model_writes_what_from_pretrained_reads(job):
    for name, value in job["runs"][3]["params"].items():
        assert torch.equal(job["exported"][name], value), name


def test_plain_trainer_with_a_zero_optimizer_is_refused_on_every_rank(job):
    """Accelerate wraps the model in DDP, which is refused; in 1 of 13 launches (under
    load) it trained the model unwrapped instead, cause not found, and then Trainer's own
    clipping of model.parameters() was refused. Either way every rank names the fix."""
    errors = job["plain_trainer_errors"]
    assert len(errors) == 2
    for error in errors:
        assert error is not None and error.startswith("zeroshard") and "ZeroTrainer" in error


def test_zero_trainer_refuses_what_would_undo_the_sharding(tmp_path):
    """Checked before any collective, so every rank raises alike (no process group here)."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from zeroshard.integrations.hf import ZeroTrainer

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10, n_positions=8))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="zero_stage"):
        ZeroTrainer(model=model, args=args)
    with pytest.raises(TypeError, match="AdamW"):
        ZeroTrainer(model=model, args=args, optimizers=(torch.optim.AdamW(model.parameters()), None))
    full_eval = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                  bf16_full_eval=True)
    with pytest.raises(ValueError, match="bf16_full_eval"):
        ZeroTrainer(model=model, args=full_eval, zero_stage=2)
    # ranks with different numbers of batches: one left the others in a collective (helper-108)
    uneven = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                               accelerator_config={"even_batches": False})
    with pytest.raises(ValueError, match="even_batches"):
        ZeroTrainer(model=model, args=uneven, zero_stage=2)


def test_a_reference_model_synced_and_generation_in_the_step_at_stage_3_equal_trainer_with_ddp(
        fp32_job):
    """Note [trainers built on Trainer]: TRL's reference-model sync read stage 3's NaN
    placeholders (the reference model, then the policy, NaN from the first sync, with no
    error), and GRPO's generate in the step hung once one rank's sequences stopped first
    (helper-78's probes, TRL 1.16), also where the caller passes synced_gpus=False, as
    Seq2SeqTrainer does (a reviewer's probe). Rank 1 stops after a token here, rank 0
    after four."""
    reference = fp32_job["trl_habits"][None]
    micro_batches = 8  # 4 steps of 2
    assert [len(tokens) for tokens in reference["generated"][1]] == [5] * micro_batches
    assert [len(tokens) for tokens in reference["generated"][0]] == [8] * micro_batches
    for run in (fp32_job["trl_habits"][3], fp32_job["trl_habits"]["3_synced"]):
        assert run["generated"] == reference["generated"]
        assert run["copy_generates_itself"] and reference["copy_generates_itself"]
        # a second ZeroTrainer after close(): an earlier one's generate was left in place
        # and served the closed optimizer (a hang, a reviewer's probe)
        assert [len(t) for t in run["second_generated"][1]] == [5, 5], run["second_generated"]
        assert_close_parameters(run["reference_model"], reference["reference_model"])
        assert_close_parameters(run["params"], reference["params"])


def test_an_encoder_decoder_predicting_with_generate_at_stage_3_equals_seq2seq_trainer_with_ddp(
        fp32_job):
    """Note [trainers built on Trainer]: an encoder-decoder's generate runs its encoder
    outside the model's forward, refused at stage 3 in Seq2SeqTrainer's evaluation (a
    helper's probe, BART and T5); now generated over the gathered model, ranks stopping
    apart (rank 1 at the first token)."""
    reference, run = fp32_job["seq2seq"][None], fp32_job["seq2seq"][3]
    assert reference["predictions"].shape[0] == 4, reference["predictions"].shape
    assert torch.equal(run["predictions"], reference["predictions"])
    assert_close_parameters(run["params"], reference["params"])


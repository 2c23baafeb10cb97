"""Checked moves (DESIGN.md: a lifecycle is an enum with checked transitions): a stage-3
unit's shard state and the stage's phase take exactly the moves listed here, and any
other raises. Pure: no process needed."""

import itertools
import types

import pytest
import torch
from torch import nn

from zeroshard._hooks import LoopSwitches, Phase
from zeroshard._unit import ShardState, Unit

SHARD_MOVES = {(ShardState.SHARDED, ShardState.GATHERING),  # a gather starts
               (ShardState.GATHERING, ShardState.GATHERED),  # it is waited for
               (ShardState.GATHERED, ShardState.SHARDED)}  # released

FORWARDS = (Phase.FORWARD, Phase.FORWARD_NO_GRAD)
PHASE_MOVES = ({(Phase.IDLE, p) for p in FORWARDS + (Phase.BACKWARD,)}
               | {(f, p) for f in FORWARDS for p in FORWARDS + (Phase.IDLE, Phase.BACKWARD)}
               | {(Phase.BACKWARD, Phase.IDLE)})


def check_move(current, move, start, to, allowed, refusal):
    """``move(to)`` from ``start`` goes there if (start, to) is ``allowed``, else raises
    ``refusal`` and stays; ``current()`` reads the state."""
    if (start, to) in allowed:
        move(to)
        assert current() is to
    else:
        with pytest.raises(RuntimeError, match=refusal):
            move(to)
        assert current() is start


@pytest.mark.parametrize("start, to", list(itertools.product(ShardState, ShardState)))
def test_a_unit_takes_only_the_listed_moves(start, to):
    unit = Unit(nn.Linear(2, 2), "layer", [])
    unit.state = start
    check_move(lambda: unit.state, unit._move, start, to, SHARD_MOVES,
               f"unit layer cannot go from {start.value}")


@pytest.mark.parametrize("start, to", list(itertools.product(Phase, Phase)))
def test_the_phase_takes_only_the_listed_moves(start, to):
    switches = LoopSwitches(phase=start)
    check_move(lambda: switches.phase, switches.enter, start, to, PHASE_MOVES,
               f"cannot go from {start.value} to {to.value}")


@pytest.mark.parametrize("synced", [True, False])
def test_release_and_end_of_backward_start_a_new_record(synced):
    unit = Unit(nn.Linear(2, 2), "layer", [])
    unit.record.armed, unit.record.ran = True, True
    unit.record.grads_arrived.add(1)
    unit.end_backward(synced)  # even after no_sync(): the window's .grad says it ran, if kept
    assert unit.state is ShardState.SHARDED
    assert (unit.record.armed, unit.record.ran, unit.record.grads_arrived) == (False, False, set())


def test_a_unit_holds_local_gradients_while_a_trainable_parameter_has_a_grad():
    layer, frozen = nn.Linear(2, 2), nn.Linear(2, 2)
    frozen.requires_grad_(False)
    buckets = [types.SimpleNamespace(params=list(m.parameters())) for m in (layer, frozen)]
    unit = Unit(layer, "layer", buckets)
    assert not unit.holds_local_grads()
    frozen.weight.grad = torch.ones(2, 2)  # a frozen parameter's .grad is not the window's
    assert not unit.holds_local_grads()
    layer.bias.grad = torch.ones(2)
    assert unit.holds_local_grads()

"""Properties of stage 3's unit tree (zeroshard/_unit_tree.py): which modules become
units and which unit owns each parameter. Pure: no processes needed.

Module trees are drawn at random: node i > 0 hangs under a node before it, some
nodes hold a parameter of their own, and some share one with another node (a tied
weight), and some are registered under a second parent too (a module shared by
module, ALBERT-style). The owner of each parameter is checked against its
definition, computed here from the tree: the deepest unit that is an ancestor (or
itself) of every place a module holding the parameter sits.
"""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cases_api import AttentionModel
from zeroshard._unit_tree import has_no_forward, select_unit_modules, unit_owners


class _Node(nn.Module):
    """A module with a forward of its own (one without is never a unit: has_no_forward)."""

    def forward(self, x):
        return x


@st.composite
def module_trees(draw):
    """(root, nodes, parents): nodes[0] is root; parents[i] lists node i's parents' indices
    (a second one: the node is registered there too, shared by module)."""
    size = draw(st.integers(1, 9))
    parents = [[]] + [[draw(st.integers(0, i - 1))] for i in range(1, size)]
    for i in range(2, size):  # a node before i is never below it: no cycle
        second = draw(st.integers(0, i - 1))
        if draw(st.integers(0, 3)) == 0 and second not in parents[i]:
            parents[i].append(second)
    nodes = [_Node() for _ in range(size)]
    for i in range(1, size):
        for parent in parents[i]:
            nodes[parent].add_module(f"child{i}", nodes[i])
    for i in range(size):
        if draw(st.booleans()):
            nodes[i].weight = nn.Parameter(torch.zeros(draw(st.integers(1, 64))))
    for i in range(size):  # tie: node i also holds the weight of another node
        source = draw(st.integers(0, size - 1))
        if draw(st.integers(0, 3)) == 0 and source != i and hasattr(nodes[source], "weight"):
            nodes[i].tied = nodes[source].weight
    return nodes[0], nodes, parents


def chains_of_units(index, parents, unit_indices):
    """For each path from node ``index`` up to the root, the unit nodes on it (itself
    included if a unit), lowest first."""
    mine = [index] if index in unit_indices else []
    if not parents[index]:
        return [mine]
    return [mine + chain for parent in parents[index]
            for chain in chains_of_units(parent, parents, unit_indices)]


@given(module_trees(), st.data())
def test_each_parameter_belongs_to_the_lowest_unit_above_all_its_holders(tree, data):
    root, nodes, parents = tree
    picked = {i for i in range(1, len(nodes)) if data.draw(st.booleans())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = select_unit_modules(root, lambda m: any(m is nodes[i] for i in picked),
                                     bucket_bytes=1)
    # one unit, the whole model, only with a word
    assert [str(w.message).count("selects no module") for w in caught] == ([1] if not picked else [])
    # the root first, then the picked modules in model.modules() order, each once
    assert chosen[0] is root
    assert [id(m) for m in chosen[1:]] == [id(m) for m in root.modules() if any(m is nodes[i] for i in picked)]
    unit_indices = {0} | picked
    owner = unit_owners(root, chosen)
    index_of_module = {id(m): i for i, m in enumerate(chosen)}
    node_of_module = {id(n): i for i, n in enumerate(nodes)}
    holders: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for param in node._parameters.values():
            holders.setdefault(id(param), []).append(i)
    assert set(owner) == set(holders)
    for param_id, holding in holders.items():
        chains = [chain for i in holding for chain in chains_of_units(i, parents, unit_indices)]
        common = [u for u in chains[0] if all(u in c for c in chains[1:])]
        expected = common[0]  # chains run upward: the first common unit is the lowest
        assert node_of_module[id(chosen[owner[param_id]])] == expected
        assert index_of_module[id(nodes[expected])] == owner[param_id]


@given(module_trees(), st.integers(1, 200))
def test_automatic_units_each_own_at_least_the_bucket_size(tree, bucket_elements):
    root, nodes, _ = tree  # tied weights and shared modules included: each counts once
    bucket_bytes = 4 * bucket_elements
    chosen = select_unit_modules(root, None, bucket_bytes)
    assert chosen[0] is root and len({id(m) for m in chosen}) == len(chosen)
    owner = unit_owners(root, chosen)
    owned = [0] * len(chosen)
    for param in root.parameters():
        owned[owner[id(param)]] += param.numel() * param.element_size()
    assert all(size >= bucket_bytes for size in owned[1:])
    assert not any(has_no_forward(m) for m in chosen[1:])
    # and no module left out could have been a unit: what it would own, unclaimed (the
    # parameters every path to whose holders passes through it: shared modules and
    # tied weights included), is below the size
    paths: dict[int, tuple[nn.Parameter, list[set[int]]]] = {}  # the modules along each
    for path, module in root.named_modules(remove_duplicate=False):
        names = path.split(".") if path else []
        along = {id(root)} | {id(root.get_submodule(".".join(names[:k])))
                              for k in range(1, len(names) + 1)}
        for param in module._parameters.values():
            paths.setdefault(id(param), (param, []))[1].append(along)
    chosen_ids = {id(m) for m in chosen}
    for module in root.modules():
        if id(module) in chosen_ids:
            continue
        inside = {id(m) for m in module.modules()}
        unclaimed = sum(p.numel() * p.element_size() for p, alongs in paths.values()
                        if id(chosen[owner[id(p)]]) not in inside
                        and all(id(module) in along for along in alongs))
        assert unclaimed < bucket_bytes


def test_a_module_with_no_forward_of_its_own_is_never_a_unit():
    """A ModuleList, or a plain nn.Module holding parameters its parent reads, is never
    called: as a unit it would never be gathered. A ModuleDict subclass with a forward of
    its own (HF SwitchTransformers' experts) is called, and was refused as a unit naming
    a forward it has (a helper's probe)."""
    class Experts(nn.ModuleDict):
        def forward(self, x):
            return sum(expert(x) for expert in self.values())

    model = nn.Module()
    model.listed = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
    model.holder = nn.Module()
    model.holder.table = nn.Parameter(torch.zeros(64, 8))
    model.experts = Experts({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
    # a Linear (72 elements) below the size, two of them above
    automatic = select_unit_modules(model, None, bucket_bytes=4 * 100)
    assert model.holder not in automatic and model.listed not in automatic
    assert model.experts in automatic
    assert select_unit_modules(model, Experts, bucket_bytes=1)[1:] == [model.experts]
    for holder in (nn.ModuleList, type(model.holder)):
        with pytest.raises(ValueError, match="no forward of their own"):
            select_unit_modules(model, holder, bucket_bytes=1)


def test_a_multihead_attentions_out_proj_is_never_a_unit_of_its_own():
    """MultiheadAttention's forward reads out_proj.weight without calling out_proj: as
    a unit of its own it was never gathered there, and an evaluation under no_grad
    computed with NaN (found by a probe). The automatic policy leaves it to the
    attention; selecting it is refused, naming a predicate that works."""
    model = AttentionModel()
    automatic = select_unit_modules(model, None, bucket_bytes=1)
    assert model.attn.out_proj not in automatic and model.attn in automatic
    with pytest.raises(ValueError, match=r"'attn.out_proj'.*type\(m\) is nn.Linear"):
        select_unit_modules(model, nn.Linear, bucket_bytes=1)
    suggested = select_unit_modules(model, lambda m: type(m) is nn.Linear, bucket_bytes=1)
    assert suggested == [model, model.head]


class _Link(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, x):
        return self.linear(x)


def test_back_references_keep_a_unit_per_block_and_a_cycle_is_walked_once():
    """Blocks keeping ``.prev``, the block before them, registered as a child: each
    block still owns its own Linear (every path to it passes through the block), and
    the automatic policy still cuts one unit per block. Enumerating every place a module
    sits made such a chain's paths multiply and a cycle endless (a reviewer's probes;
    Note [modules in several places])."""
    chain = nn.Module()
    chain.blocks = nn.ModuleList(_Link() for _ in range(48))
    for i in range(1, 48):
        chain.blocks[i].prev = chain.blocks[i - 1]
    chosen = select_unit_modules(chain, _Link, bucket_bytes=1)
    owner = unit_owners(chain, chosen)
    for block in chain.blocks:
        assert chosen[owner[id(block.linear.weight)]] is block
    automatic = select_unit_modules(chain, None, bucket_bytes=64 * 65 * 4)
    assert len(automatic) == 49, len(automatic)
    cycle = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    cycle[1].back = cycle
    for units in (nn.Linear, None):
        chosen = select_unit_modules(cycle, units, bucket_bytes=16)
        owner = unit_owners(cycle, chosen)
        assert {id(chosen[owner[id(p)]]) for p in cycle[0].parameters()} <= {id(cycle[0]), id(cycle)}

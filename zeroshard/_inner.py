"""The inner optimizers: one torch optimizer per class named by the param groups, seen as one.

A param group may carry ``"optimizer_class"`` (Muon for the hidden matrices, AdamW
for the rest); the others use ``ZeroOptimizer``'s positional class, with its
keyword arguments. Each class gets one unmodified torch optimizer over the tensors
this rank steps for its groups, and ``InnerOptimizers`` presents them as the one
optimizer ``ZeroOptimizer`` wraps: the groups in the user's order, one state
mapping, one step. With one class it holds that class's optimizer alone and its
state dict is that optimizer's, as before.

Note [a step in parts]:
    Where torch's element-wise optimizers use their foreach kernels (CUDA's default), a
    step makes its temporaries for all the tensors of a param group at once: AdamW's
    square roots of every second moment (``_foreach_sqrt``), and with Adam's coupled
    weight decay a second tensor as large; their for-loop (CPU's default) makes them one
    tensor at a time, and their fused kernels none. A group holds most of this rank's
    shards (all of them, or all but the norms' and biases'), so that was a temporary
    about as large as the shards: on the 100M GPT at 2 ranks with ``foreach=True``
    AdamW, the step's own peak was 172 / 128 / 73 MiB above backward's at stages 1 / 2 /
    3 (1634 / 1257 / 1076 MiB); in parts 9 MiB above, and 33 and 91 MiB below (1470 /
    1099 / 912 MiB; ``python benchmarks/phase_peaks.py --foreach --steps 3 --methods
    zeroshard1,zeroshard2,zeroshard3``, old and new code in turn). So a group stepped by
    the foreach kernels whose tensors exceed ``bucket_size_mb`` is stepped in parts of at
    most that (a larger tensor alone), each part a call of ``step`` that sees that group
    alone, narrowed to the part; the other groups are stepped together in one call, as
    before. The optimizer's groups and their tensors are put back after, even if a call
    raises (the parts before it are then stepped). The update is the same, bit for bit:
    these classes keep every count and moment per tensor and compute each tensor's
    update from its own. Only for a class that steps as torch's own do (its ``step`` and
    ``_init_group`` torch's, ``_validate.steps_as_torch_elementwise``): a class with its
    own may keep a count on the group, which a call per part would advance several
    times; a class that says it is element-wise (``zeroshard_elementwise``) with a step
    of its own, and the classes stepped by whole parameters, are stepped whole. The cost
    is a call of ``step`` per part: on CUDA each foreach kernel is launched once per
    part (a helper's probe of the first version of this on an H100, the inner AdamW
    alone over a 7B model's shards on one of 8 ranks, 560 of 6.25 MB in two groups:
    the step's temporaries 1669 -> 24 MiB, its time 27.0 -> 31.6 ms).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, MutableMapping

import torch

from ._validate import steps_as_torch_elementwise

GROUP_CLASS_KEY = "optimizer_class"


def class_of(group: dict, default: type) -> type:
    return group.get(GROUP_CLASS_KEY) or default


def step_cost(optimizer_class: type):
    """The cost of stepping one parameter of a shape with ``optimizer_class``, for
    balancing owners (Note [whole-parameter ownership] in _layout.py): Muon's
    Newton-Schulz iterations multiply m x n matrices, m * n * min(m, n) each; any
    other optimizer, the number of elements."""
    if issubclass(optimizer_class, getattr(torch.optim, "Muon", ())):
        return lambda shape: shape.numel() * min(shape) if len(shape) == 2 else shape.numel()
    return lambda shape: shape.numel()


def hyperparameters(group: dict) -> dict:
    """A group's own settings: everything but its tensors and its optimizer class."""
    return {k: v for k, v in group.items() if k not in ("params", GROUP_CLASS_KEY)}


class SettingsBothWays:
    """Note [settings both ways]:
        The outer groups (``opt.param_groups``) are what schedulers and the user's code
        read and write; the inner optimizers step with groups of their own. Before a
        step each outer setting written since the last one (a scheduler's new lr) goes
        to the inner group; after it every inner setting comes back. So the settings an
        optimizer class keeps on its group and changes as it steps (pytorch_optimizer's
        ``group["step"]`` for Adam-style bias correction, Prodigy's and D-Adaptation's
        ``d``, a Lookahead's counter, schedule-free AdamW's ``weight_sum``) go on from
        where its last step left them, and state dicts and checkpoints, which save the
        outer groups, hold them. Every outer setting used to go in before each step,
        which put the values taken at construction back over those: a Lookahead never
        took its slow step (2.1e-2 from DDP after 5 steps), schedule-free AdamW drifted
        1.9e-2 and a resumed LAMB restarted its bias correction, 4.3e-2 from the run
        that never stopped (a helper's probes). Written means a new object under the
        key (schedulers assign one). A tensor setting (a tensor lr, which schedulers fill
        in place) goes in whenever the inner group holds another object than the outer:
        torch's ``load_state_dict`` gives an inner optimizer new group dicts holding
        copies, and until the outer tensor went in again a scheduler's in-place fill
        reached the outer copy only, and the step's way back then wrote the stale inner
        one over it (a reviewer's probe: 4.1e-2 from DDP after a state-dict round trip).
        The groups are passed in at each call for the same reason."""

    def __init__(self, outer_groups: list[dict]) -> None:
        self._last_seen = [hyperparameters(g) for g in outer_groups]

    def to_inner(self, outer_groups: list[dict], inner_groups: list[dict]) -> None:
        for outer, inner, seen in zip(outer_groups, inner_groups, self._last_seen):
            for key, value in hyperparameters(outer).items():
                if key not in seen or seen[key] is not value or (
                        isinstance(value, torch.Tensor) and inner.get(key) is not value):
                    inner[key] = value

    def to_outer(self, outer_groups: list[dict], inner_groups: list[dict]) -> None:
        for index, (outer, inner) in enumerate(zip(outer_groups, inner_groups)):
            outer.update(hyperparameters(inner))
            self._last_seen[index] = hyperparameters(outer)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def split_state(state: dict, like: torch.Tensor) -> tuple[dict, dict]:
    """An optimizer state entry as (scalars, per-element tensors shaped like ``like``, the
    tensor it belongs to: a shard, or a parameter). A 0-dim ``like`` has only scalars."""
    scalars, per_element = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == like.shape and like.dim() > 0:
            per_element[key] = value
        else:
            scalars[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return scalars, per_element


def standin_optimizer(optimizer_class: type, group: dict,
                      standin: torch.Tensor) -> torch.optim.Optimizer:
    """``optimizer_class`` over ``standin`` alone with ``group``'s settings: as the
    constructor's arguments where it takes them (Adagrad reads its
    ``initial_accumulator_value`` there, not from the group), and in the group, which
    keeps those it takes none for (a scheduler's ``initial_lr``: as an argument it was a
    TypeError)."""
    settings = hyperparameters(group)
    try:
        accepted = inspect.signature(optimizer_class.__init__).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    arguments = {k: v for k, v in settings.items() if takes_any or k in accepted}
    return optimizer_class([{**settings, "params": [standin]}], **arguments)


def fresh_values(optimizer_class: type, group: dict) -> dict[str, float]:
    """Note [a fresh state inside a shard's]:
        A bucket's shard has one state, so a parameter inside it that has none of its
        own (its gradient was set to None in the shard's first step, or a state dict to
        load holds none for it) must be given values there. torch gives such a
        parameter a fresh state at its first step, which is not zeros for every class:
        Rprop's ``step_size`` starts at the lr of that step. Zeros there kept a Rprop
        weight still for good (its step size clamped to ``step_size_min``: a helper's
        probe, 5.4e-2 from DDP after 5 steps). So the bucket keeps such parameters in
        ``without_state``, and at the first step that steps them their elements take what
        a fresh state holds after a step of the class with the group's settings then (a
        schedule's lr) on a zero parameter with a zero gradient: the class's own
        starting values, which such a step leaves as they were (0 for the moments;
        Adamax's ``exp_inf`` it leaves at ``eps``, and its next step takes the max with
        ``|g| + eps``: the same). Until then they hold those values with the settings
        of when they joined, and a checkpoint or ``full_state_dict()`` saves no state
        for them, as torch keeps none (one taken during a warm-up freeze and resumed
        under a schedule was 3.6e-2 from DDP with their values saved as their own: a
        reviewer's probe). A state whose
        stand-in elements differ, or a class whose stand-in step fails, gives zeros.
        Not followed: SGD's momentum buffer, which torch's first step makes the gradient
        itself and a later step in a shared buffer dampens, and a count the shard
        shares (Adam's ``step``; a load warns of it, ``check_one_scalar_per_bucket``)."""
    standin = torch.zeros(2, requires_grad=True)
    standin.grad = torch.zeros(2)
    try:
        probe = standin_optimizer(optimizer_class, group, standin)
        _step_without_global_hooks(probe)
    except Exception:  # noqa: BLE001 -- any failure: zeros, as before
        return {}
    return {key: float(value[0]) for key, value in probe.state[standin].items()
            if isinstance(value, torch.Tensor) and value.shape == standin.shape
            and bool((value == value[0]).all())}


def scalars_change_the_step(optimizer_class: type, group: dict, first: dict, other: dict) -> bool:
    """Note [scalars that do not change the step]:
        A bucket's shard has one set of scalar states, so a load that would put
        parameters saved with different ones in one bucket (Adagrad's ``step`` of a
        weight whose gradient was None in some steps, beside its bias's) is refused
        (``check_one_scalar_per_bucket``). Some of torch's classes keep such a count
        and never read it, or not with their settings: Adadelta, Rprop and RMSprop
        count steps only, Adagrad reads its count only with ``lr_decay``. There the
        refusal barred a resume that loses nothing: a checkpoint of a warm-up freeze at
        stage 1 or 2 (each parameter its own count) loaded at stage 3 (a Linear's weight
        and bias in one unit's bucket) was refused (the drawn loop test with resumes).
        So the load asks the class: a two-element stand-in with ``group``'s settings
        takes two steps from the ``first`` scalars, and again from the ``other``, on
        the same values and gradients; where both end with the same values and
        per-element states, bit for bit, the bucket takes ``first``'s, and the steps
        that follow are torch's. The stand-in runs with the lr set to 0.01 where the
        group's is 0 (at lr 0 no class moves, and a schedule or an unfreeze raises it
        later: a reviewer's probe, AdamW loaded at lr 0 with counts 1 and 3, 5.3e-3 from
        DDP once the lr rose), and again with the counts (``step``) a million steps on
        (a class that reads its count past a threshold: ASGD's ``t0``). Only torch's own
        classes are asked (``_steps_as_torch``): a class of one's own may read its count
        every k steps, which no few steps show. Otherwise (Adam's bias
        correction, NAdam's ``mu_product``, Adagrad with ``lr_decay``), or where the
        stand-in cannot step, the load is refused, as before."""
    if first.keys() != other.keys() or not _steps_as_torch(optimizer_class):
        return True
    lr = group.get("lr")
    if isinstance(lr, (int, float, torch.Tensor)) and not bool(torch.as_tensor(lr).any()):
        group = {**group, "lr": 0.01}
    def later(scalars: dict) -> dict:  # the count a million steps on
        return {key: value + 10**6 if key == "step" else value for key, value in scalars.items()}
    return any(_stand_in_steps(optimizer_class, group, a)
               != _stand_in_steps(optimizer_class, group, b)
               for a, b in ((first, other), (later(first), later(other))))


def _steps_as_torch(optimizer_class: type) -> bool:
    """Whether ``optimizer_class``'s ``step`` (and the ``_init_group`` it calls, where it
    has one) are torch.optim's own: Note [scalars that do not change the step]."""
    return all(method is None or getattr(inspect.unwrap(method), "__module__", "").startswith(
        "torch.optim.") for method in (getattr(optimizer_class, "step", None),
                                       getattr(optimizer_class, "_init_group", None)))


def _stand_in_steps(optimizer_class: type, group: dict, scalars: dict):
    """Note [scalars that do not change the step]: what a two-element stand-in holds
    after two steps from ``scalars`` (its values and per-element states, as bytes to
    compare bit for bit), or a fresh object (equal to nothing) where it cannot step."""
    # fp64: a count that changes the step by less than fp32 resolves still changes it
    standin = torch.tensor([0.5, -1.5], dtype=torch.float64, requires_grad=True)
    try:
        probe = standin_optimizer(optimizer_class, group, standin)
        standin.grad = torch.tensor([0.25, -0.75], dtype=torch.float64)
        _step_without_global_hooks(probe)  # makes the state, as a real one holds
        state = probe.state[standin]
        for key, value in scalars.items():
            made = state.get(key)
            state[key] = (torch.as_tensor(value).to(made.dtype).reshape(made.shape).clone()
                          if isinstance(made, torch.Tensor) else value)
        for gradient in ([-0.5, 1.0], [0.125, 0.5]):  # a scalar made from the count in
            standin.grad = torch.tensor(gradient, dtype=torch.float64)  # one step is read
            _step_without_global_hooks(probe)  # in the next (ASGD's eta)
    except Exception:  # noqa: BLE001 -- cannot tell: the scalars matter
        return object()
    per_element = split_state(state, standin)[1].values()
    return tuple(value.detach().numpy().tobytes() for value in [standin, *per_element])


class InnerOptimizers:
    """One optimizer per class over ``tensors[i]`` for group ``i``; see the module doc."""

    def __init__(self, groups: list[dict], tensors: list[list[torch.Tensor]], default: type,
                 default_kwargs: dict, part_bytes: int) -> None:
        self.classes = [class_of(g, default) for g in groups]
        self.optimizers: list[torch.optim.Optimizer] = []
        # group i is self.optimizers[o].param_groups[k] for (o, k) = self._places[i]: looked
        # up each time, as torch's load_state_dict gives an optimizer new group dicts
        self._places: list[tuple[int, int]] = [None] * len(groups)
        self._default = 0  # the optimizer of the positional class, else the first
        for cls in dict.fromkeys(self.classes):  # first-use order
            if cls is default:
                self._default = len(self.optimizers)
            members = [i for i, c in enumerate(self.classes) if c is cls]
            kwargs = default_kwargs if cls is default else {}
            specs = [{**hyperparameters(groups[i]), "params": tensors[i]} for i in members]
            if not any(spec["params"] for spec in specs):
                # This rank owns none of the class's parameters (Note [whole-parameter
                # ownership]): a placeholder lets the class fill in its defaults, so the
                # groups look the same on every rank (schedulers, state dicts).
                specs[0] = {**specs[0], "params": [torch.zeros(1, 1)]}
                optimizer = cls(specs, **kwargs)
                optimizer.param_groups[0]["params"] = []
            else:
                optimizer = cls(specs, **kwargs)
            for k, index in enumerate(members):
                self._places[index] = (len(self.optimizers), k)
            self.optimizers.append(optimizer)
        self._part_bytes = part_bytes  # Note [a step in parts]
        self._in_parts = [steps_as_torch_elementwise(type(o)) for o in self.optimizers]
        self._by_tensor = {id(t): o for o in self.optimizers
                           for g in o.param_groups for t in g["params"]}
        self.state = _RoutedState(self)

    def own_entries(self) -> list[tuple[str, dict]]:
        """Note [state under an optimizer's own keys]:
            A class may keep state under keys of its own in ``optimizer.state``, beside
            the per-tensor entries (MADGRAD's step count ``state["k"]``); torch's
            ``state_dict`` saves them under those keys. Checkpoints and full state dicts,
            which save per-tensor state, lost them: a resumed MADGRAD restarted its count,
            7.3e-4 from the run that never stopped (a helper's sweep). They are saved with
            each class's name (the same on every rank: a class that counts its steps so
            counts on every rank, owner of parameters or not), and a load gives them back
            to the optimizer of that class (a full state dict's, torch's one optimizer's,
            to every class). State a class keeps in attributes of its own, which its own
            ``state_dict()`` adds (StableSPAM, Magma), is not saved."""
        return [(qualname(type(o)), {k: v for k, v in o.state.items()
                                      if not isinstance(k, torch.Tensor)})
                for o in self.optimizers]

    def take_own_entries(self, saved: list[tuple[str, dict]], every_class: bool = False) -> None:
        """Note [state under an optimizer's own keys]: ``saved`` by ``own_entries``."""
        for optimizer in self.optimizers:
            for name, entries in saved:
                if every_class or name == qualname(type(optimizer)):
                    optimizer.state.update(entries)

    @property
    def param_groups(self) -> list[dict]:
        """Every class's groups, in the order of the user's param groups."""
        return [self.optimizers[o].param_groups[k] for o, k in self._places]

    @property
    def defaults(self) -> dict:
        """The positional class's defaults (with its keyword arguments), limited to the
        keys every class has: a scheduler that adjusts a hyper-parameter of one class
        only (OneCycleLR's momentum or betas) then refuses, rather than writing a key
        the other classes' groups would ignore."""
        common = set.intersection(*(set(o.defaults) for o in self.optimizers))
        return {k: v for k, v in self.optimizers[self._default].defaults.items() if k in common}

    def owner_of(self, tensor: torch.Tensor) -> torch.optim.Optimizer | None:
        return self._by_tensor.get(id(tensor))

    def step(self, then=None) -> None:
        """Step every class's optimizer, then call ``then`` (before the classes' own
        post-hooks: Note [an optimizer class's own hooks])."""
        for optimizer in self.optimizers:
            _run_own_pre_hooks(optimizer)
        for optimizer, in_parts in zip(self.optimizers, self._in_parts):
            if in_parts:
                _step_in_parts(optimizer, self._part_bytes)
            else:
                _step_without_global_hooks(optimizer)
        if then is not None:
            then()
        for optimizer in self.optimizers:
            for hook in list(optimizer._optimizer_step_post_hooks.values()):
                hook(optimizer, (), {})

    def state_dict(self) -> dict:
        if len(self.optimizers) == 1:
            return self.optimizers[0].state_dict()
        return {"optimizers": [o.state_dict() for o in self.optimizers],
                "classes": [qualname(type(o)) for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(self.optimizers) == 1:
            self.optimizers[0].load_state_dict(state_dict)
            return
        mine = [qualname(type(o)) for o in self.optimizers]
        if state_dict.get("classes") != mine:
            raise ValueError(f"state dict was saved with optimizer classes "
                             f"{state_dict.get('classes')}, these groups use {mine}")
        for optimizer, saved in zip(self.optimizers, state_dict["optimizers"]):
            optimizer.load_state_dict(saved)


def _step_in_parts(optimizer: torch.optim.Optimizer, part_bytes: int) -> None:
    """Note [a step in parts]: one call of ``step`` for the groups stepped whole, and one
    for each part of a group torch would step all at once that exceeds ``part_bytes``."""
    groups = optimizer.param_groups
    calls = _calls(groups, part_bytes)
    if len(calls) <= 1:
        _step_without_global_hooks(optimizer)
        return
    whole = [group["params"] for group in groups]
    try:
        for call in calls:
            optimizer.param_groups = [group for group, _ in call]
            for group, params in call:
                group["params"] = params
            _step_without_global_hooks(optimizer)
    finally:
        optimizer.param_groups = groups
        for group, params in zip(groups, whole):
            group["params"] = params


def _calls(groups: list[dict], part_bytes: int) -> list[list[tuple[dict, list]]]:
    """Each call's (group, tensors): the groups stepped whole together, then each part."""
    together, parts = [], []
    for group in groups:
        cut = _parts(group["params"], part_bytes) if _made_all_at_once(group) else []
        if len(cut) > 1:
            parts.extend([(group, part)] for part in cut)
        else:
            together.append((group, group["params"]))
    return ([together] if together else []) + parts


def _made_all_at_once(group: dict) -> bool:
    """Whether torch's step makes this group's temporaries for all its tensors at once:
    its foreach kernels, asked for, or torch's default where no tensor is on the CPU."""
    if group.get("fused") or group.get("differentiable"):
        return False
    if group.get("foreach") is None:
        return bool(group["params"]) and all(t.device.type != "cpu" for t in group["params"])
    return bool(group["foreach"])


def _parts(tensors: list[torch.Tensor], part_bytes: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, cut into runs of at most ``part_bytes`` (a larger tensor alone)."""
    parts: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if parts and size + nbytes <= part_bytes:
            parts[-1].append(tensor)
            size += nbytes
        else:
            parts.append([tensor])
            size = nbytes
    return parts


def _step_without_global_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Step ``optimizer`` as its ``step()`` does, but for torch's global step hooks
    (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and ``_post_hook``).

    Those fire for every optimizer's step. The user's step is the ZeroOptimizer's, and
    they fire for it; the inner optimizers' steps are part of it. Fired again for
    those, on the same shards with the same gradients, a hook halving gradients halved
    them twice and step counters counted double (a helper's probe, 7.8e-3 from DDP
    after 3 steps). torch wraps each optimizer class's ``step`` (``profile_hook_step``,
    marked ``hooked``) to run the hooks around the class's own ``step``, which the
    wrapper keeps as ``__wrapped__``; that one runs here, under the wrapper's profiler
    label. The hooks stay registered: a first version set the process's hooks aside
    while stepping, and another thread's optimizer lost them meanwhile (a reviewer's
    probe). The inner optimizer's own hooks run in ``InnerOptimizers.step`` (Note [an
    optimizer class's own hooks])."""
    step = type(optimizer).step
    own_step = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if own_step is None:  # not torch's wrapper: nothing to leave out
        optimizer.step()
        return
    with torch.autograd.profiler.record_function(
            f"Optimizer.step#{type(optimizer).__name__}.step"):
        own_step(optimizer)
        optimizer._optimizer_step_code()


# Note [an optimizer class's own hooks]:
#     An optimizer class may register step hooks on each of its instances in its
#     ``__init__`` (a subclass of SGD clamping each gradient element before the step, one
#     of AdamW shrinking the parameters after it). Torch runs an instance's hooks in the
#     wrapper around the class's ``step``, which ``_step_without_global_hooks`` leaves out
#     with the global ones: the inner optimizers stepped without them, silently (a
#     helper's probe: 0.11 and 0.033 from DDP after one step, at every stage). So they
#     run here, once per ``opt.step()`` however many calls the step takes (Note [a step
#     in parts]), given the inner optimizer, over this rank's shards: the pre-hooks of
#     every class before the first call, the post-hooks after the last, once the
#     parameters kept still are back (Note [a gradient cleared before the step]). A
#     hook that works element by element then does what it does under DDP; one that
#     reduces over its tensors (a norm) sees this rank's shards. A pre-hook's new
#     arguments are refused: the inner step takes none.
def _run_own_pre_hooks(optimizer: torch.optim.Optimizer) -> None:
    for hook in list(optimizer._optimizer_step_pre_hooks.values()):
        if hook(optimizer, (), {}) is not None:
            raise RuntimeError(
                f"zeroshard: a step pre-hook of {type(optimizer).__name__} returned new "
                "arguments for its step; the inner optimizers step this rank's shards with "
                "none. Return None from the hook")


class _RoutedState(MutableMapping):
    """Every inner optimizer's ``state`` as one mapping, each tensor's entry kept by the
    optimizer that steps it; ``ZeroOptimizer.state`` too, keyed as torch's is by the
    tensors in ``param_groups`` (this rank's flat master shards). Any other key, a model
    parameter above all, is refused, naming why and what works: torch's
    ``opt.state[p] = {}`` (resetting a re-initialised layer's moments) did nothing,
    silently, against the empty dict ``opt.state`` was, and one parameter's state
    cannot be reset alone (a bucket's parameters share one state, Adam's step count
    included)."""

    def __init__(self, inner: InnerOptimizers) -> None:
        self._inner = inner

    def _holding(self, key) -> torch.optim.Optimizer | None:
        """The inner optimizer holding ``key``, a key of its class's own (MADGRAD's "k"):
        Note [state under an optimizer's own keys]; reading every entry (the memory
        report, a log line over opt.state.items()) raised at one."""
        return next((o for o in self._inner.optimizers if key in o.state), None)

    def _optimizer(self, tensor: torch.Tensor) -> torch.optim.Optimizer:
        holder = None if isinstance(tensor, torch.Tensor) else self._holding(tensor)
        if holder is not None:
            return holder
        optimizer = self._inner.owner_of(tensor)
        if optimizer is None:
            raise KeyError(
                "zeroshard: not a tensor this rank steps. opt.state is keyed by the flat shards "
                "in opt.param_groups[i]['params'], not by model parameters: the parameters of "
                "a bucket share one state (one Adam step count), so one parameter's state cannot "
                "be read or reset alone (a class whose parameters one rank each steps whole, "
                "Muon or Adafactor, keys it by the parameters this rank owns, views of those "
                "shards: iterate opt.state.items()). To read it, opt.full_state_dict() "
                "(collective; rank 0 gets torch's per-parameter state); to reset every "
                "parameter's state, opt.state.clear(), or opt.close() and a new ZeroOptimizer")
        return optimizer

    def __getitem__(self, tensor):
        """torch's ``opt.state[t]``: the entry, an empty one made for a shard not stepped
        yet, as torch's defaultdict makes it (a log line reading ``opt.state[t].get(...)``
        before the first step raised ``KeyError`` where torch answers ``{}``: helper-125).
        The inner optimizer's step fills it as it fills an entry it made itself."""
        return self._optimizer(tensor).state[tensor]

    def get(self, tensor, default=None):
        """torch's ``opt.state.get(p)``: the entry, or ``default`` for a shard not stepped
        yet. A model parameter is refused as in ``opt.state[p]``: Mapping's ``get`` would
        answer None, as if it had no state (a log line of Adam's moments read nothing,
        silently)."""
        optimizer = self._optimizer(tensor)
        return optimizer.state[tensor] if tensor in optimizer.state else default

    def find(self, tensor, default=None):
        """``tensor``'s entry, or ``default`` where it has none or another rank steps it:
        zeroshard's own reads, which ask for every bucket's master."""
        return self[tensor] if tensor in self else default

    def __setitem__(self, tensor, value) -> None:
        self._optimizer(tensor).state[tensor] = value

    def __delitem__(self, tensor) -> None:
        del self._optimizer(tensor).state[tensor]

    def __contains__(self, tensor) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return self._holding(tensor) is not None
        optimizer = self._inner.owner_of(tensor)
        return optimizer is not None and tensor in optimizer.state

    def __iter__(self) -> Iterator:
        for optimizer in self._inner.optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(o.state) for o in self._inner.optimizers)

    def clear(self) -> None:
        for optimizer in self._inner.optimizers:
            optimizer.state.clear()

"""Command line: ``zeroshard estimate --params 7.5e9 --world-size 64`` (also ``python -m zeroshard``)."""

from __future__ import annotations

import argparse
import importlib

from .memory import estimate_memory

PRECISIONS = {  # bytes per parameter: (parameters, gradients, optimizer states)
    "mixed": (2, 2, 12),  # the ZeRO paper's mixed-precision Adam
    "fp32": (4, 4, 8),  # fp32 Adam: parameters, gradients, two moments
}


def _format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _whole_if_whole(value: float) -> float | int:
    """2.0 printed as 2 in the header line; 0.5 as it is."""
    return int(value) if value.is_integer() else value


def count_parameters(spec: str, parser: argparse.ArgumentParser) -> tuple[int, int]:
    """Parameters of the model that ``module:factory`` builds (tied weights counted once):
    (trainable, frozen)."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        parser.error(f"--model must look like module.path:factory, got {spec!r}")
    import torch

    factory = getattr(importlib.import_module(module_name), factory_name)
    with torch.device("meta"):
        model = factory()
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad),
            sum(p.numel() for p in params if not p.requires_grad))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zeroshard")
    commands = parser.add_subparsers(dest="command", required=True)
    est = commands.add_parser("estimate", help="per-rank bytes of model states for each stage")
    size = est.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=float, help="number of parameters, e.g. 7.5e9")
    size.add_argument("--model", metavar="MODULE:FACTORY",
                      help="count the parameters of FACTORY() from MODULE, e.g. mypkg.models:build "
                           "(built on the meta device: no memory is allocated), trainable and "
                           "frozen (requires_grad=False) apart")
    est.add_argument("--frozen-params", type=float, default=0,
                     help="with --params: parameters that do not train, besides those (weights "
                          "only: no gradient, no optimizer state)")
    est.add_argument("--world-size", type=int, required=True)
    est.add_argument("--shard-size", type=int, default=None,
                     help="hybrid sharding: the ranks each replica shards over, with world "
                          "size / shard size replicas (default: the world size, one replica)")
    est.add_argument("--precision", choices=sorted(PRECISIONS), default="mixed")
    # floats: 4-bit weights take 0.5 bytes a parameter (the README said the CLI took such
    # fractions, and it refused them and had no option for the weights' bytes)
    est.add_argument("--param-bytes", type=float, default=None,
                     help="bytes per parameter of the weights (default: 2 mixed, 4 fp32)")
    est.add_argument("--grad-bytes", type=float, default=None,
                     help="bytes per parameter of the gradients (default: 2 mixed, 4 fp32)")
    est.add_argument("--optimizer-bytes", type=float, default=None,
                     help="optimizer-state bytes per parameter (default: 12 mixed, 8 fp32 Adam)")
    args = parser.parse_args(argv)
    if args.model is not None and args.frozen_params:
        # --model counts them itself and took its count over the one given, silently
        parser.error("--frozen-params goes with --params: --model counts the model's frozen "
                     "(requires_grad=False) parameters itself")
    if args.model is not None:
        args.params, args.frozen_params = count_parameters(args.model, parser)
    given = (args.param_bytes, args.grad_bytes, args.optimizer_bytes)
    param_bytes, grad_bytes, optimizer_bytes = (
        default if value is None else _whole_if_whole(value)
        for value, default in zip(given, PRECISIONS[args.precision]))
    try:
        table = estimate_memory(args.params, args.world_size, param_bytes=param_bytes,
                                grad_bytes=grad_bytes, optimizer_bytes=optimizer_bytes,
                                shard_size=args.shard_size, frozen_params=args.frozen_params)
    except ValueError as error:
        parser.error(str(error))
    ranks = f"{args.world_size} ranks"
    if args.shard_size is not None and args.shard_size != args.world_size:
        ranks += f" ({args.world_size // args.shard_size} replicas x {args.shard_size} shards)"
    frozen = f" (+{args.frozen_params:.4g} frozen: weights only)" if args.frozen_params else ""
    print(f"{args.params:.4g} parameters{frozen}, {ranks}, {args.precision} "
          f"({param_bytes}+{grad_bytes}+{optimizer_bytes} bytes per parameter)")
    for name, key in (("data parallel", "dp"), ("ZeRO stage 1", 1), ("ZeRO stage 2", 2),
                      ("ZeRO stage 3", 3)):
        print(f"  {name:<14} {_format_bytes(table[key]):>10} per rank")
    # zeroshard's stage 1 keeps one more gradient shard than the paper's (README: What
    # each stage keeps per rank); the table alone read 15% under a real run's
    # memory_report() (a helper's probe)
    shards = args.shard_size or args.world_size
    extra = grad_bytes * args.params / shards
    print(f"  zeroshard's stage 1 holds {_format_bytes(table[1] + extra)} per rank: one more "
          f"gradient shard ({_format_bytes(extra)}), so that p.grad keeps the local gradient")
    if grad_bytes < 4:  # MixedPrecision's docstring: clipping and step widen them
        wider = (4 - grad_bytes) * args.params / shards
        print(f"  after clipping or a step, until zero_grad(), every stage holds its gradient "
              f"shards in fp32: {_format_bytes(wider)} more per rank")
    print("  (the formula's figures: a layout starts each parameter at a multiple of 32 "
          "elements and pads each bucket to split evenly, and Muon's or Adafactor's shards "
          "to whole parameters; opt.sharding_report()['padding'] gives the real factor)")
    return 0

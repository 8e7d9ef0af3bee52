"""Sharded selection: time and traffic of one prune update over Shard(0) DTensors.

    python benchmarks/bench_distributed.py [--models resnet50 bert_base] [--world 2]

Spawns ``--world`` CPU processes in a gloo group on 127.0.0.1 (each with
``torch.get_num_threads() // world`` threads). Every rank builds its Shard(0) piece of each
weight directly (no full tensor is materialised) and times ``gmp_ext.prune_step`` in layer and
global scope: selection with all-reduced histograms, mask build and apply on the local shards,
and the all-reduce of the kept counts. Traffic is the payload handed to the collectives per
rank and update (gmp_ext.distributed.COMM_STATS); a ring all-reduce moves about twice that over
the wire. For comparison, ``gather bytes`` is what all-gathering the weights would move, and
``1-proc ms`` the same prune_step on rank 0 over full tensors with all threads. Writes
benchmarks/results/distributed_cpu_float32.json.
"""

from __future__ import annotations

import argparse
import math
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shapes import MODELS
from torch import nn
from utils import print_table, time_cpu, weights_for, write_rows

import gmp_ext
from gmp_ext import distributed

SPARSITY = 0.9


class _Holder(nn.Module):
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_parameter(f"w{i}", nn.Parameter(t))


def _local_rows(rows: int, world: int, coordinate: int) -> int:
    """Rows of mesh coordinate ``coordinate`` under Shard(0) (torch.chunk's split)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - coordinate * chunk))


def _sharded(shapes, mesh, rank: int, world: int) -> _Holder:
    from torch.distributed.tensor import DTensor, Shard

    tensors = []
    for i, shape in enumerate(shapes):
        local_shape = (_local_rows(shape[0], world, rank), *shape[1:])
        local = weights_for([local_shape], seed=1000 * i + rank)[0]
        stride = torch.empty(shape, device="meta").stride()
        tensors.append(
            DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
        )
    return _Holder(tensors)


def _run(rank: int, world: int, port: int, models: list[str], results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for model_name in models:
        shapes = MODELS[model_name]()
        model = _sharded(shapes, mesh, rank, world)
        numel = sum(math.prod(s) for s in shapes)
        for scope in ("layer", "global"):

            def update(model=model, scope=scope) -> None:
                gmp_ext.prune_step(
                    model, SPARSITY, scope=scope, params=list(dict(model.named_parameters()))
                )

            timing = time_cpu(update, repeats=5)
            distributed.COMM_STATS.reset()
            update()
            rows.append(
                {
                    "model": model_name,
                    "scope": scope,
                    "world": world,
                    "tensors": len(shapes),
                    "weights": numel,
                    "ms": timing["p50_ms"],
                    "collectives": distributed.COMM_STATS.calls,
                    "bytes": distributed.COMM_STATS.bytes,
                    "gather bytes": numel * 4 * (world - 1) // world,
                }
            )
    if rank == 0:
        results.put(rows)
    dist.destroy_process_group()


def _single_process(model_name: str, scope: str) -> float:
    full = _Holder(weights_for(MODELS[model_name]()))
    names = list(dict(full.named_parameters()))
    return time_cpu(lambda: gmp_ext.prune_step(full, SPARSITY, scope=scope, params=names))["p50_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert_base"], choices=MODELS)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    processes = [
        ctx.Process(target=_run, args=(rank, args.world, port, args.models, results))
        for rank in range(args.world)
    ]
    for process in processes:
        process.start()
    rows = results.get()
    for process in processes:
        process.join()
    for row in rows:
        row["1-proc ms"] = _single_process(row["model"], row["scope"])
    print_table(rows, list(rows[0]))
    print(f"wrote {write_rows('distributed_cpu_float32', rows)}")


if __name__ == "__main__":
    main()

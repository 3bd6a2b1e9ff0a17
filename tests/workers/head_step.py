"""Worker: one distributed Partial FC run on deterministic data, saved per rank for comparison.

Every rank builds the same full problem from a seed (uneven batch per rank: 3 + 2*rank rows), loads its
shard of the centers, and runs two steps of forward, backward and SparseSGD; the test compares the
results with a single-process float64 reference.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from partial_fc.comm import close_communicator, exit_process, get_communicator  # noqa: E402
from partial_fc.heads import CombinedMargin, PartialFC  # noqa: E402
from tests.reference import make_problem  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--margin", default="1.0,0.5,0.0")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--torch-softmax-rank", type=int, default=-1, help="this rank runs without the C passes")
    args = parser.parse_args()
    comm = get_communicator()
    if comm.rank == args.torch_softmax_rank:
        os.environ["PARTIAL_FC_NATIVE_SOFTMAX"] = "0"  # read at the head's first forward
    m1, m2, m3 = (float(v) for v in args.margin.split(","))
    results = {"backend": comm.name, "world_size": comm.world_size}
    for dtype in (torch.float64, torch.float32):
        problem = make_problem(comm.world_size, args.classes, args.dim, steps=2, seed=3)
        head = PartialFC(
            CombinedMargin(s=16.0, m1=m1, m2=m2, m3=m3),
            args.dim,
            args.classes,
            args.sample_rate,
            comm=comm,
            storage_dtype=dtype,
            chunk_rows=4,
        )
        start, count = head.class_start, head.num_local
        head.weight.copy_(problem.centers[start : start + count])
        both_update_modes = dtype == torch.float64  # both update modes face the reference
        optimizer = problem.sparse_sgd(head, update_in_backward=both_update_modes)
        rows = problem.rank_rows(comm.rank)
        per_step = []
        for embeddings, labels in zip(problem.embeddings, problem.labels):
            local = embeddings[rows].to(dtype).clone().requires_grad_(True)
            loss = head(local, labels[rows])
            loss.backward()
            optimizer.step()
            per_step.append({"loss": loss.item(), "grad": local.grad.double(), "centers": head.weight.double().clone()})
        results[str(dtype)] = {"shard": (start, count), "steps": per_step}
    torch.save(results, Path(args.out) / f"rank{comm.rank}.pt")
    close_communicator()
    exit_process(0)


if __name__ == "__main__":
    main()

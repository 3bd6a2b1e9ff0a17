"""Worker: the distributed head with inter-class filtering (SparseSGD) or with SparseAdamW, saved per rank.

Every rank builds the same full problem from a seed (uneven batch per rank: 3 + 2*rank rows), loads its
shard of the centers and runs a few steps; the tests compare the results with single-process float64
references. `run_steps` is also what the single-process tests run.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from partial_fc.comm import Communicator, close_communicator, exit_process, get_communicator  # noqa: E402
from partial_fc.errors import InputError  # noqa: E402
from partial_fc.heads import CombinedMargin, PartialFC, SparseAdamW, SparseSGD  # noqa: E402
from tests.reference import Problem, make_problem  # noqa: E402

# (storage dtype, update during backward) pairs each variant runs; float64 runs face both update modes.
RUNS = {
    "filtering": [(torch.float64, True), (torch.float32, False)],
    "adamw": [(torch.float64, True), (torch.float64, False), (torch.float32, True)],
}


def command_line(out: Path, variant: str, classes: int, dim: int, steps: int, margin, *extra: str) -> list[str]:
    """This worker's argv for a test to launch: results go to `out`; `extra` adds e.g. the threshold."""
    sizes = ["--classes", str(classes), "--dim", str(dim), "--steps", str(steps)]
    return [__file__, "--out", str(out), "--variant", variant, *sizes, "--margin", ",".join(map(str, margin)), *extra]


def build_head(problem: Problem, comm: Communicator, dtype: torch.dtype, margin, threshold: float) -> PartialFC:
    """A head over `problem`'s classes at sample rate 1, holding this rank's shard of the problem's centers."""
    classes, dim = problem.centers.shape
    head = PartialFC(
        margin, dim, classes, comm=comm, storage_dtype=dtype, chunk_rows=4, interclass_filtering_threshold=threshold
    )
    head.weight.copy_(problem.centers[head.class_start : head.class_start + head.num_local])
    return head


def run_steps(head: PartialFC, optimizer: torch.optim.Optimizer, problem: Problem, rank: int) -> list[dict]:
    """Forward, backward and step on this rank's rows of every step; loss, embedding grad, shard after each."""
    rows = problem.rank_rows(rank)
    per_step = []
    for embeddings, labels in zip(problem.embeddings, problem.labels):
        local = embeddings[rows].to(head.weight.dtype).clone().requires_grad_(True)
        loss = head(local, labels[rows])
        loss.backward()
        optimizer.step()
        per_step.append({"loss": loss.item(), "grad": local.grad.double(), "centers": head.weight.double().clone()})
    return per_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", choices=sorted(RUNS), required=True)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--margin", default="16.0,1.0,0.5,0.0", help="s,m1,m2,m3")
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--adamw", default="0.05,0.9,0.99,1e-8,0.1", help="lr,beta1,beta2,eps,weight_decay")
    args = parser.parse_args()
    comm = get_communicator()
    s, m1, m2, m3 = (float(v) for v in args.margin.split(","))
    margin = CombinedMargin(s=s, m1=m1, m2=m2, m3=m3)
    lr, beta1, beta2, eps, weight_decay = (float(v) for v in args.adamw.split(","))
    results = {"backend": comm.name, "world_size": comm.world_size, "runs": []}
    problem = make_problem(comm.world_size, args.classes, args.dim, steps=args.steps, seed=3)
    if args.variant == "filtering":
        try:
            PartialFC(margin, args.dim, args.classes, comm=comm, interclass_filtering_threshold=0.1 * (comm.rank + 1))
        except InputError as error:
            results["mismatch_error"] = str(error)
    for dtype, update_in_backward in RUNS[args.variant]:
        head = build_head(problem, comm, dtype, margin, args.threshold)
        if args.variant == "filtering":
            optimizer = SparseSGD(
                head, problem.lr, problem.momentum, problem.weight_decay, update_in_backward=update_in_backward
            )
        else:
            optimizer = SparseAdamW(head, lr, (beta1, beta2), eps, weight_decay, update_in_backward=update_in_backward)
        steps = run_steps(head, optimizer, problem, comm.rank)
        results["runs"].append({"dtype": str(dtype), "shard": (head.class_start, head.num_local), "steps": steps})
    torch.save(results, Path(args.out) / f"rank{comm.rank}.pt")
    close_communicator()
    exit_process(0)


if __name__ == "__main__":
    main()

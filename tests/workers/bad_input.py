"""Worker: rank 1 (or every rank) hands the head one kind of bad input; each rank records how it exited."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from partial_fc.comm import get_communicator  # noqa: E402
from partial_fc.heads import ArcFace, PartialFC, SparseSGD  # noqa: E402
from tests.workers.exit_status import run_and_exit  # noqa: E402

CLASSES, DIM = 10, 8


def run(case: str, rank: int, comm) -> None:
    bad = rank == 1
    sample_rate = {"sample_rate_mismatch": 1.5 if bad else 0.5, "sample_rate_zero": 0.0}.get(case, 0.5)
    classes = 1 if case == "few_classes" else CLASSES
    head = PartialFC(ArcFace(), DIM, classes, sample_rate, comm=comm)
    optimizer = SparseSGD(head, lr=0.1)
    for step in range(3):
        embeddings = torch.randn(4, DIM + (case == "wrong_width" and bad), requires_grad=True)
        labels = torch.randint(0, CLASSES, (4,))
        if bad and step == 1:
            if case == "label_too_large":
                labels[2] = CLASSES
            elif case == "label_negative":
                labels[0] = -7
            elif case == "nan_embeddings":
                embeddings = embeddings.detach().clone()
                embeddings[1, 3] = float("nan")
        head(embeddings, labels).backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = get_communicator()
    run_and_exit(comm, args.out, lambda: run(args.case, comm.rank, comm))


if __name__ == "__main__":
    main()

"""Bad records the loaders skipped: agreed on by every rank before each batch is trained on, each logged once,
and the run stopped, on every rank at the same batch, once more than ``max_bad_records`` were met in all."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from partial_fc.comm import Communicator, ReduceOp
from partial_fc.data.bad_records import BadRecord
from partial_fc.errors import PartialFCError


class TooManyBadRecords(PartialFCError):
    """More than ``max_bad_records`` distinct records could not be used; the message names the last one."""


class SkippedRecords:
    """The distinct bad records met so far on every rank, in the order the ranks agreed on them."""

    def __init__(self, comm: Communicator, limit: int, data: str, log: Callable[[str], None]):
        """Stop past ``limit`` records of the set ``data``; ``log`` prints a line (on rank 0)."""
        self.comm, self.limit, self.data, self.log = comm, limit, data, log
        self.records: dict[tuple[str, int | None], tuple[int, BadRecord]] = {}  # (file, key) -> (rank, record)

    def __len__(self) -> int:
        return len(self.records)

    def agree(self, met: Sequence[BadRecord], step: int) -> None:
        """Add the bad records this rank's batch ``met`` (a collective: one all-reduce of the count of new ones;
        only when some rank has new ones, each rank's list is broadcast); raise past the limit, on every rank."""
        new = [record for record in dict.fromkeys(met) if (record.file, record.key) not in self.records]
        count = torch.tensor([float(len(new))], device=self.comm.device)
        if not self.comm.all_reduce(count, ReduceOp.SUM).item():
            return
        for rank in range(self.comm.world_size):
            for record in self.comm.broadcast_object(new if rank == self.comm.rank else None, root=rank):
                if (record.file, record.key) not in self.records:
                    self.records[record.file, record.key] = (rank, record)
                    self.log(
                        f"step {step}: skipped bad record {record} (rank {rank}); {len(self)} so far, "
                        f"max_bad_records={self.limit}"
                    )
        if len(self) > self.limit:
            last = next(reversed(self.records.values()))[1]
            raise TooManyBadRecords(
                f"stopped at step {step}: {len(self)} bad records skipped, more than max_bad_records={self.limit} "
                f"(the last: {last}); `partial-fc check-data --rec {self.data}` lists every bad record; fix them (or "
                "raise max_bad_records) and start again, with --resume to continue from the last checkpoint"
            )

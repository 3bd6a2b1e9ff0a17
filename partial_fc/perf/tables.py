"""Markdown tables from benchmark JSON lines (`python -m partial_fc.perf.tables head FILE`).

`head`: one row per `bench head` line, as the Partial FC paper's table: sample rate 1.0 (the full softmax,
i.e. model parallel) beside 0.1 (Partial FC) at each class count, with step time, throughput and peak memory
per rank; a configuration that was not run because it does not fit says so in its row, as does one whose run
failed. The conditions (ranks, threads, load) follow the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from partial_fc.perf.conditions import FLOOR_SLOWDOWN_LIMIT, MIN_CHECKED_FLOOR_S, STEAL_SHARE_LIMIT, WAIT_SHARE_LIMIT

HEAD_COLUMNS = (
    "classes",
    "r",
    "method",
    "backend",
    "storage",
    "center update",
    "step s",
    "floor s",
    "step / floor",
    "samples/s",
    "peak GiB per rank",
    "estimate GiB per rank",
    "notes",
)


def read_lines(text: str, bench: str) -> list[dict]:
    """The JSON objects of `bench` in `text` (launcher prefixes and other output skipped)."""
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            value = json.JSONDecoder().raw_decode(line[start:])[0]
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and value.get("bench") == bench:
            found.append(value)
    return found


def _option(command: list[str], name: str, default: str) -> str:
    return command[command.index(name) + 1] if name in command[:-1] else default


def _notes(row: dict) -> str:
    if row.get("failed"):
        return f"failed: {row['failed']}"
    if row.get("fits") is False:
        return row.get("message", "does not fit")
    notes = []
    load, cores, waited = row.get("load_average_max"), row.get("cores"), row.get("compute_thread_wait_share")
    if waited is not None and waited > WAIT_SHARE_LIMIT:
        notes.append(f"warning: loaded, the compute thread waited {100 * waited:.0f}% for a core")
    elif waited is None and load is not None and cores and load > cores:
        notes.append(f"warning: loaded, load average {load:g} on {cores} cores")
    steal = row.get("steal_share")
    if steal is not None and steal > STEAL_SHARE_LIMIT:
        notes.append(f"warning: loaded, the hypervisor stole {100 * steal:.0f}% of the CPU time")
    slowdown, reference = row.get("floor_over_reference"), row.get("matmul_floor_reference_s") or 0.0
    if slowdown is not None and slowdown > FLOOR_SLOWDOWN_LIMIT and reference >= MIN_CHECKED_FLOOR_S:
        notes.append(f"warning: loaded, floor {slowdown:g}x its reference")
    return "; ".join(notes)


def _cell(value: object, digits: int = 3, significant: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if significant else f"{value:.{digits}f}"
    return str(value)


def head_row(row: dict) -> list[str]:
    """The table's cells of one `bench head` line (a failed run's from its command)."""
    command = [str(part) for part in row.get("command", [])]
    classes = int(row.get("classes", _option(command, "--classes", "0")))
    rate = float(row.get("sample_rate", _option(command, "--sample-rate", "1.0")))
    storage = row.get("storage_dtype", _option(command, "--storage-dtype", "float32"))
    if row.get("momentum_dtype") or "--momentum-dtype" in command:
        storage += f", momentum {row.get('momentum_dtype') or _option(command, '--momentum-dtype', '?')}"
    update = row.get("update", "step" if "--update-in-step" in command else "backward")
    ran = "step_s" in row
    samples = row["batch_per_rank"] * row["ranks"] / row["step_s"] if ran and row["step_s"] > 0 else None
    return [
        f"{classes:,}",
        f"{rate:g}",
        "model parallel (full softmax)" if rate >= 1.0 else "Partial FC",
        row.get("backend", "-"),
        storage,
        "in backward" if update == "backward" else "kept for step()",
        _cell(row.get("step_s"), 4, significant=True),
        _cell(row.get("matmul_floor_s"), 4, significant=True),
        _cell(row.get("step_over_floor"), 2),
        _cell(samples, 1),
        _cell(row.get("peak_memory_gib")),
        _cell(row.get("estimated_memory_gib")),
        _notes(row),
    ]


def _conditions_line(rows: list[dict]) -> str:
    ran = [row for row in rows if "ranks" in row]
    if not ran:
        return ""
    loads = [row[key] for row in ran for key in ("load_average_start", "load_average_end") if row.get(key) is not None]
    ranks = sorted({row["ranks"] for row in ran})
    threads = sorted({row.get("threads_per_rank") for row in ran if row.get("threads_per_rank") is not None})
    devices = sorted({row.get("device", "?") for row in ran})
    text = (
        f"{'/'.join(map(str, ranks))} rank(s) x {'/'.join(map(str, threads)) or '?'} thread(s) on "
        f"{', '.join(devices)}"
        f", {ran[0].get('cores', '?')} cores"
    )
    if loads:
        text += f"; 1-min load average {min(loads):g} to {max(loads):g} at the runs' starts and ends"
    warned = sum(bool(row.get("warnings")) for row in ran)
    if warned:
        text += f"; {warned} of {len(ran)} runs warned that the machine was loaded"
    return text + "."


def head_table(rows: Iterable[dict]) -> str:
    """The markdown table of `bench head` lines, then one line of their conditions."""
    rows = list(rows)
    lines = ["| " + " | ".join(HEAD_COLUMNS) + " |", "|" + "|".join(" --- " for _ in HEAD_COLUMNS) + "|"]
    lines += ["| " + " | ".join(head_row(row)) + " |" for row in rows]
    conditions = _conditions_line(rows)
    return "\n".join(lines + ([f"\n{conditions}"] if conditions else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m partial_fc.perf.tables", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["head"])
    parser.add_argument("file", nargs="?", help="JSON lines (default: stdin)")
    args = parser.parse_args(argv)
    text = Path(args.file).read_text() if args.file else sys.stdin.read()
    print(head_table(read_lines(text, "head")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark support: the conditions a figure was taken under, memory estimates and peaks, result tables.

`conditions`: load average, cores, threads and ranks stated in every benchmark's JSON, with warnings when
the machine was loaded. `memory`: the Partial FC head's per-rank memory, estimated from its sizes (the
same buffers the head and SparseSGD allocate), peak and available memory. `tables`: markdown tables
from benchmark JSON lines. `data_bench`, `ijb_bench`: the timings of `bench data` and `bench eval-ijb`.
`gpu`: the one-GPU checks of `benchmarks/gpu.sh` (matmul rate, backbone FLOPs, training throughput against
them, the summary).
"""

"""partial_fc: Partial FC face-recognition training on Horovod, MPI and torch.distributed."""

__version__ = "0.1.0"

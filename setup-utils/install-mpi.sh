#!/usr/bin/env bash
# Install OpenMPI (runtime and headers) from the distribution's packages; safe to run again.
set -euo pipefail

if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
    echo "install-mpi: OpenMPI already present: $(mpirun --version 2>/dev/null | head -n 1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev
elif command -v dnf >/dev/null 2>&1; then
    $SUDO dnf install -y openmpi openmpi-devel
else
    echo "install-mpi: no apt-get or dnf here; install OpenMPI (mpirun, mpicc) by hand" >&2
    exit 1
fi
echo "install-mpi: $(mpirun --version | head -n 1)"

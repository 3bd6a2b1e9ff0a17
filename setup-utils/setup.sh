#!/usr/bin/env bash
# Set up everything partial_fc needs on a fresh machine: OpenMPI, the Python requirements (the CPU
# build of torch on CPU machines), Horovod built against that torch, and the package itself (editable).
# Safe to run again: each step notices what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

bash setup-utils/install-mpi.sh
"$PYTHON" -m pip install -q -r requirements.txt
PYTHON="$PYTHON" bash setup-utils/install-horovod.sh
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
echo "setup: partial_fc $("$PYTHON" -c 'import partial_fc; print(partial_fc.__version__)') is ready"

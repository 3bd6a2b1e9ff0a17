#!/usr/bin/env bash
# Build Horovod 0.28.1 against the installed torch with MPI and Gloo (NCCL where CUDA is present),
# cache the wheel, install it, and check the build. Safe to run again: a cached wheel installs in seconds.
#
# Horovod 0.28.1 pins -std=c++14 in its CMake files, while torch >= 2.1 headers need C++17, so the
# compiler is wrapped by a script that rewrites the flag.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
PYTHON="${PYTHON:-python3}"
CACHE_DIR="${PARTIAL_FC_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/partial_fc/wheels}"
TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
TAG="torch${TORCH_VERSION//+/_}"
WHEEL_DIR="$CACHE_DIR/horovod-$HOROVOD_VERSION-$TAG"

installed="$("$PYTHON" -c 'import horovod.torch, horovod; print(horovod.__version__)' 2>/dev/null || true)"
if [ "$installed" = "$HOROVOD_VERSION" ]; then
    echo "install-horovod: horovod $installed already importable with torch $TORCH_VERSION"
else
    if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
        echo "install-horovod: building horovod $HOROVOD_VERSION for torch $TORCH_VERSION (about 5 minutes)"
        "$PYTHON" -m pip install -q "cmake>=3.13,<4" packaging wheel cloudpickle psutil pyyaml
        export CMAKE_POLICY_VERSION_MINIMUM=3.5  # gloo's CMakeLists predates what CMake 4 accepts
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        real_cxx="$(command -v "${CXX:-c++}")"
        cat > "$work/cxx17" <<WRAP
#!/usr/bin/env bash
args=()
for a in "\$@"; do
    if [ "\$a" = "-std=c++14" ]; then args+=("-std=c++17"); else args+=("\$a"); fi
done
exec "$real_cxx" "\${args[@]}"
WRAP
        chmod +x "$work/cxx17"
        export CXX="$work/cxx17"
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        if command -v nvcc >/dev/null 2>&1 && "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
            export HOROVOD_GPU_OPERATIONS=NCCL
        fi
        export MAKEFLAGS="-j$(nproc)"
        mkdir -p "$WHEEL_DIR"
        "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-binary horovod \
            -w "$work/dist" "horovod==$HOROVOD_VERSION"
        mv "$work"/dist/horovod-*.whl "$WHEEL_DIR"/
    else
        echo "install-horovod: using cached wheel in $WHEEL_DIR"
    fi
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
    "$PYTHON" -m pip install -q cloudpickle psutil pyyaml packaging
fi
horovodrun --check-build

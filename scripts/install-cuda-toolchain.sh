#!/usr/bin/env bash
# Installs a CUDA 13.0 toolchain from PyPI on a machine without one, so that
# `cargo check --features cuda` (and a GPU build via scripts/gpu-build.sh) works anywhere.
# The pins matter: an unpinned nvidia-nvvm pulls a newer NVVM whose PTX the 13.0 ptxas
# rejects, and cudarc refuses CUDA versions it does not know.
#
# Usage: scripts/install-cuda-toolchain.sh            # installs into $TEMPER_CUDA_HOME
#        source <(scripts/install-cuda-toolchain.sh --env)   # prints the exports only
set -euo pipefail

PREFIX="${TEMPER_CUDA_HOME:-$HOME/.cache/temper/cuda13}"
CU13="$PREFIX/site/nvidia/cu13"

print_env() {
  echo "export CUDA_ROOT=$CU13"
  echo "export CUDA_PATH=$CU13"
  echo "export PATH=$CU13/bin:\$PATH"
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}"
}

if [[ "${1:-}" == "--env" ]]; then
  print_env
  exit 0
fi

if [[ -x "$CU13/bin/nvcc" ]] && "$CU13/bin/nvcc" --version | grep -q "release 13.0"; then
  echo "CUDA 13.0 toolchain already in $CU13" >&2
else
  echo "installing the CUDA 13.0 toolchain from PyPI into $PREFIX (~300 MB)" >&2
  mkdir -p "$PREFIX"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$PREFIX/site" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 \
    nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi

# nvcc looks for cicc and libdevice under nvvm/ next to bin/, and for its headers under include/;
# the wheels spread these over several packages that all land in nvidia/cu13, so check the result.
for f in bin/nvcc bin/ptxas include/cuda_runtime.h; do
  [[ -e "$CU13/$f" ]] || { echo "error: $CU13/$f missing after install" >&2; exit 1; }
done
# cudarc's build script and candle-kernels' look for lib64/ as well as lib/.
[[ -e "$CU13/lib64" ]] || ln -s lib "$CU13/lib64"
"$CU13/bin/nvcc" --version | tail -n 2 >&2
print_env

#!/usr/bin/env bash
# Builds the `cuda`/`cudnn` features on a machine with no CUDA toolkit (and no GPU): NVIDIA's
# own PyPI wheels carry nvcc, the headers and the libraries to link against; this unpacks them
# into DIR and writes DIR/env.sh. The driver library (libcuda) comes with the GPU driver only,
# so a link-time stand-in is made from the driver functions cudarc declares; the real one is
# loaded on the GPU machine.
#
#   scripts/cuda-toolchain.sh /opt/cuda13 && source /opt/cuda13/env.sh
#   cargo build --release -p ld-server --features cudnn     # CUDA_COMPUTE_CAP=90: H100/H200
#
# About 1.3 GB of downloads (cuBLAS and cuDNN are most of it); the first build then spends
# ~20 minutes on 2 cores compiling candle's CUDA kernels.
set -euo pipefail
DIR=${1:?usage: scripts/cuda-toolchain.sh DIR}
CAP=${CUDA_COMPUTE_CAP:-90}
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$tmp" "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas>=13" "nvidia-curand>=10.4" "nvidia-cudnn-cu13>=9"
mkdir -p "$DIR/lib" "$DIR/stubs"
for w in "$tmp"/*.whl; do
    rm -rf "$tmp/x" && unzip -q -o "$w" -d "$tmp/x"
    [ -d "$tmp/x/nvidia/cu13" ] && cp -a "$tmp/x/nvidia/cu13/." "$DIR/"
    [ -d "$tmp/x/nvidia/cudnn/lib" ] && cp -a "$tmp/x/nvidia/cudnn/lib/libcudnn.so.9" "$DIR/lib/"
done
# The linker looks for the unversioned names.
(cd "$DIR/lib" && for f in libcudart.so.13 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 \
    libcurand.so.10 libcudnn.so.9; do ln -sf "$f" "${f%.so.*}.so"; done)
# libcuda stand-in: every cu* function cudarc's driver bindings declare, as an empty body.
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* 2>/dev/null | sort -V | tail -1)
if [ -z "$cudarc" ]; then
    echo "cudarc's sources are not in the cargo registry yet: run 'cargo fetch' first" >&2
    exit 1
fi
grep -rhoE "pub (unsafe )?fn cu[A-Za-z0-9_]+" "$cudarc/src/driver/sys/" | sed 's/.*fn //' |
    sort -u | awk '{print "void " $1 "(void){}"}' >"$tmp/stub.c"
cc -shared -fPIC -o "$DIR/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$tmp/stub.c"
cat >"$DIR/env.sh" <<EOF
export CUDA_HOME=$DIR CUDA_PATH=$DIR CUDA_ROOT=$DIR
export PATH=$DIR/bin:\$PATH
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-$CAP}
export LIBRARY_PATH=$DIR/lib:$DIR/stubs
export RUSTFLAGS="-L $DIR/stubs -L $DIR/lib"
export CARGO_TARGET_DIR=\${CARGO_TARGET_DIR:-target-cuda}
EOF
"$DIR/bin/nvcc" --version | tail -2
echo "source $DIR/env.sh, then: cargo build --release -p ld-server --features cudnn"

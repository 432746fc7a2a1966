#!/usr/bin/env bash
# Builds strata with the CUDA backend and gathers the binaries and the
# non-system shared libraries they need into .gpu/{bin,lib}, so they can be
# copied to a GPU machine that has the NVIDIA driver and CUDA runtime
# libraries (cuBLAS) but not the Debian packages strata builds against.
#
# On a GPU machine, from the repository root (after `tar xJf .gpu.tar.xz`):
#   export LD_LIBRARY_PATH=$PWD/.gpu/lib:/usr/local/cuda/lib64
#   STRATA_FIXTURES_DIR=$PWD/tests/fixtures .gpu/bin/strata_cuda_tests
set -euo pipefail
cd "$(dirname "$0")/.."
export STRATA_BUILD_DIR=build-gpu
bash tools/build.sh -DSTRATA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a
rm -rf .gpu
mkdir -p .gpu/bin .gpu/lib
for b in build-gpu/cli/strata build-gpu/tests/strata_engine_tests build-gpu/tests/cuda/strata_cuda_tests \
         build-gpu/bench/strata_kernel_bench build-gpu/engine/libstrata_sentencepiece_shim.so; do
  cp "$b" .gpu/bin/  # the shim is found next to the executables
done
# Shared libraries, minus the C runtime and the CUDA libraries the GPU
# machine provides itself.
for b in .gpu/bin/*; do
  ldd "$b" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -v -E '/(libc|libm|libpthread|libdl|librt|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcublas[^/]*|libcublasLt[^/]*|libcudart[^/]*|libcuda)\.so' \
  | while read -r lib; do cp -L "$lib" .gpu/lib/; done
# Ship Debian 12's libstdc++ too, so hosts with an older one work.
cp -L "$(g++ -print-file-name=libstdc++.so.6)" .gpu/lib/
# Symbols are not needed to run (and the bundle travels with the tree).
strip --strip-unneeded .gpu/bin/strata .gpu/bin/strata_*_tests .gpu/bin/strata_kernel_bench .gpu/lib/*.so* 2>/dev/null || true
# One compressed file is what travels to the GPU machine: unpack it there
# with `tar xJf .gpu.tar.xz` in the repository root. xz, not gzip: the
# bundle and the tree must fit the 64 MiB a GPU call carries. -9e: its
# 64 MiB window sees that the binaries share their CUDA kernels, which -6's
# 8 MiB window does not (19.1 vs 36.7 MB for 84 MB of binaries and
# libraries; about a minute on two cores; unpacking needs 65 MiB of RAM).
rm -f .gpu.tar.gz
tar cf - .gpu | xz -T0 -9e > .gpu.tar.xz
du -sh .gpu .gpu.tar.xz

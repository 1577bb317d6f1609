#!/usr/bin/env bash
# Reproduces vendor/ggml/ from the PyPI sdist ggml-python==0.0.45 (upstream ggml 0.15.3).
# Keeps only what a CPU-only build needs (plus the small BLAS backend), byte-for-byte upstream, then applies our
# patches (vendor/*.patch, see README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sdist_version=0.0.45
sdist_sha256=10aac52075cf3c7ef2b00d6c35b1c23f7b018dbeff8ae8df67339b4be1166f05
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip download --no-deps --no-binary :all: "ggml-python==$sdist_version" -d "$work"
tarball="$work/ggml_python-$sdist_version.tar.gz"
echo "$sdist_sha256  $tarball" | sha256sum -c -
tar -xzf "$tarball" -C "$work"
src="$work/ggml_python-$sdist_version/vendor/ggml"
dst="$here/ggml"

rm -rf "$dst"
mkdir -p "$dst/src/ggml-cpu"
cp -a "$src/CMakeLists.txt" "$src/LICENSE" "$src/ggml.pc.in" "$src/cmake" "$src/include" "$dst/"
find "$src/src" -maxdepth 1 -type f \( -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name CMakeLists.txt \) \
    -exec cp -a {} "$dst/src/" \;
cp -a "$src/src/ggml-blas" "$dst/src/"
find "$src/src/ggml-cpu" -maxdepth 1 -type f -exec cp -a {} "$dst/src/ggml-cpu/" \;
mkdir -p "$dst/src/ggml-cpu/arch"
cp -a "$src/src/ggml-cpu/cmake" "$src/src/ggml-cpu/amx" "$src/src/ggml-cpu/llamafile" "$dst/src/ggml-cpu/"
cp -a "$src/src/ggml-cpu/arch/x86" "$src/src/ggml-cpu/arch/arm" "$dst/src/ggml-cpu/arch/"
for p in "$here"/*.patch; do
    patch --no-backup-if-mismatch -p1 -d "$dst" < "$p"
done
echo "vendored ggml into $dst ($(du -sh "$dst" | cut -f1))"

#!/usr/bin/env bash
# Do llama.cpp's arm64 kernels give the Q4_K_M and Q8_0 decoders the quality they have on x86? The
# quality gate's measures (benchmarks/int4_quality.py, teacher forcing only) run under qemu-aarch64, on
# an arm64 Python with llama.cpp cross-compiled for one ggml CPU variant (ARCH: a -march string; default
# armv8.2-a+dotprod, the Neoverse N1 of Ampere Altra and Graviton 2). The fp32 reference comes from an
# x86 report (--reference): ONNX Runtime's aarch64 wheel does not import under qemu-user 7.2 (it
# segfaults), and fp32 is the same reference on every CPU class. What the kernels compute, not how fast.
#
#   python benchmarks/int4_quality.py --fp32 DIR --gguf Q4_K_M=A --gguf Q8_0=B --max-new-tokens 0 --output x86.json
#   bash benchmarks/studies/arm64_quality.sh x86.json A B [ARCH] > arm64.txt
#
# Needs Debian's qemu-user, gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, debootstrap and patchelf,
# llama.cpp's source (scripts/setup-llamacpp.sh unpacks it) and about 1 GB under $WORK. ~10 minutes of
# emulation per variant on 2 vCPUs, after a ~10 minute cross-compile.
set -euo pipefail
reference=$(realpath "$1") q4=$(realpath "$2") q8=$(realpath "$3") arch=${4:-armv8.2-a+dotprod}
repo=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-${XDG_CACHE_HOME:-$HOME/.cache}/medgemma-triton/arm64}
# the pinned sdist's root: its vendor/llama.cpp tree (export/gguf.py's llamacpp_source, which says how to get
# it when it is missing) and its llama_cpp Python package
sdist=$(cd "$repo" && .venv/bin/python -c "from medgemma_triton.export.gguf import llamacpp_source; print(llamacpp_source().parents[1])")
[ -d "$sdist/llama_cpp" ] || { echo "no llama-cpp-python package beside the llama.cpp source in $sdist" >&2; exit 1; }
mkdir -p "$WORK"
cd "$WORK"

# 1. An arm64 Debian with Python 3.11, unpacked only (nothing arm64 runs until qemu runs Python).
if [ ! -x root/usr/bin/python3.11 ]; then
    rm -rf root.partial
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libgomp1,libstdc++6,libffi8 \
        bookworm root.partial http://deb.debian.org/debian >&2
    for deb in root.partial/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" root.partial; done
    mv root.partial root
fi

# 2. The Python packages the measures import, as aarch64 wheels (the same versions as .venv).
if [ ! -d site/numpy ]; then
    pins=$("$repo/.venv/bin/python" -m pip freeze | grep -iE "^(numpy|tokenizers)==")
    rm -rf site.partial wheels && mkdir -p site.partial
    python3 -m pip download --quiet --only-binary=:all: --platform manylinux2014_aarch64 --python-version 3.11 \
        --implementation cp -d wheels $pins diskcache jinja2 typing-extensions >&2
    for wheel in wheels/*.whl; do python3 -m zipfile -e "$wheel" site.partial/; done
    mv site.partial site
fi

# 3. llama.cpp for this variant, cross-compiled, with llama-cpp-python's own Python package beside it.
tag=${arch//[^a-z0-9.]/_} && env=env-$tag build=build-$tag
if [ ! -f "$env/llama_cpp/lib/libggml-cpu.so" ]; then
    cmake -S "$sdist/vendor/llama.cpp" -B "$build" -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
        -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ARM_ARCH="$arch" \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF >&2
    cmake --build "$build" -j "$(nproc)" --target llama ggml-cpu >&2
    rm -rf "$env.partial" && mkdir -p "$env.partial"
    cp -r "$sdist/llama_cpp" "$env.partial/" && mkdir -p "$env.partial/llama_cpp/lib"
    cp -L "$build"/bin/*.so* "$env.partial/llama_cpp/lib/"
    # as the wheel's: each library finds the others beside it (load_backends relies on one libggml)
    for lib in "$env.partial"/llama_cpp/lib/*.so*; do patchelf --set-rpath '$ORIGIN' "$lib"; done
    mv "$env.partial" "$env"
fi

# 4. The measures, under qemu-aarch64 (-cpu max: every feature the variant may use).
cd "$repo"
qemu-aarch64 -cpu max -L "$WORK/root" -E PYTHONPATH="$WORK/$env:$WORK/site:$repo" "$WORK/root/usr/bin/python3.11" \
    benchmarks/int4_quality.py --checkpoint "$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$reference")" \
    --reference "$reference" --gguf "Q4_K_M=$q4" --gguf "Q8_0=$q8" --max-new-tokens 0 --threads 1 \
    --output "$WORK/quality-$env.json"
echo "report: $WORK/quality-$env.json (arch $arch)"

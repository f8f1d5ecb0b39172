"""Build and install llama-cpp-python for the cpu profile's int4/int8 decoder: `bash scripts/setup-llamacpp.sh`.

One build for every CPU: ggml's CPU backend is compiled once per CPU variant (x86-64: baseline, SSE4.2,
AVX, AVX2 (haswell), AVX-512, AVX512-VNNI, Zen 4, AVX-VNNI, AMX (sapphirerapids), ...; arm64: armv8.0 up
to SVE2/SME) as loadable libraries, and the best one for the host is picked when the process starts
(runtime/llamacpp.load_backends), never tuned to the build host (GGML_NATIVE=OFF). So the same wheel, in
the same container image, serves an AVX2-only AMD EPYC, an AMX Xeon and an arm64 box with its own kernels.

The pinned source distribution (runtime/llamacpp.py: version and sha256) is downloaded once and checked,
unpacked (llama.cpp's converter and gguf-py, export/gguf.py), and built into a wheel cached under
~/.cache/medgemma-triton/llamacpp/wheels/<key> (MEDGEMMA_LLAMA_CPP_CACHE, else $XDG_CACHE_HOME): the key
covers the sdist, the CMake flags, the compiler, the machine and Python, so every checkout and venv on
the host shares one build, as pip shares its wheel cache. Each step writes a staging path and renames it
into place, so two checkouts setting up at once never see half a file. The build takes several minutes
(docs/llamacpp.md); it shows its progress.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import subprocess
import sys
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from medgemma_triton.runtime.llamacpp import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON, LLAMA_CPP_PYTHON_SHA256

CACHE = Path(os.environ.get("MEDGEMMA_LLAMA_CPP_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medgemma-triton" / "llamacpp")
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF",  # never the build host's CPU: the variants below, picked at run time
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DLLAVA_BUILD=OFF",  # images stay on our ONNX vision encoder
    "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib",  # the variants beside libllama.so, where load_backends looks
    f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}",
)
# libggml-cpu-*.so variants GGML_CPU_ALL_VARIANTS builds on Linux (llama.cpp ggml/src/CMakeLists.txt)
VARIANTS = {"x86_64": 14, "aarch64": 8}


def progress(message: str) -> None:
    print(f"[llama.cpp {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sdist() -> Path:
    path = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not path.is_file():
        progress(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (source distribution, 77 MB)")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".download-") as staging:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", staging], check=True)
            os.replace(Path(staging) / path.name, path)
    digest = file_sha256(path)
    if digest != LLAMA_CPP_PYTHON_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {LLAMA_CPP_PYTHON_SHA256}; delete it and retry")
    source = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not (source / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=".unpack-") as staging:
            with tarfile.open(path) as archive:
                archive.extractall(staging, filter="data")
            _rename_unless_there(Path(staging) / source.name, source)
    return path


def _rename_unless_there(staged: Path, final: Path) -> None:
    """Move a finished directory into place; another process that got there first wins (same content)."""
    try:
        staged.rename(final)
    except OSError:
        if not final.is_dir():
            raise


def build_key(sdist_path: Path) -> str:
    compiler = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    parts = [LLAMA_CPP_PYTHON_SHA256, *CMAKE_ARGS, *compiler, platform.machine(), platform.python_version()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def wheel(sdist_path: Path, jobs: int) -> Path:
    """The cached wheel for this key, built first if absent."""
    key = build_key(sdist_path)
    directory = CACHE / "wheels" / key
    built = sorted(directory.glob("llama_cpp_python-*.whl"))
    if built:
        return built[0]
    (CACHE / "wheels").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE / "wheels", prefix=f".{key}."))
    build_dir = Path(tempfile.mkdtemp(dir=CACHE, prefix=f".build-{key}."))
    log_path = CACHE / f"build-{key}-{os.getpid()}.log"
    progress(f"building llama-cpp-python {LLAMA_CPP_PYTHON} with every CPU variant, {jobs} jobs "
             f"(once per host; tens of minutes on 2 cores); log: {log_path}")
    env = {**os.environ, "CMAKE_ARGS": " ".join(CMAKE_ARGS), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    started = time.monotonic()
    try:
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(staging), str(sdist_path),
                 "-C", f"build-dir={build_dir}"], stdout=log, stderr=subprocess.STDOUT, env=env)
            watcher = threading.Thread(target=_show_steps, args=(log_path, process), daemon=True)
            watcher.start()
            code = process.wait()
            watcher.join(1)
        if code != 0:
            raise SystemExit(f"building llama-cpp-python failed ({code}); the end of {log_path}:\n"
                             + "".join(log_path.read_text(errors="replace").splitlines(True)[-30:]))
        _rename_unless_there(staging, directory)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"built in {time.monotonic() - started:.0f} s")
    return sorted(directory.glob("llama_cpp_python-*.whl"))[0]


def _show_steps(log_path: Path, process: subprocess.Popen) -> None:
    """Print the build's [step/total] every 30 s while it runs."""
    shown = ""
    while process.poll() is None:
        time.sleep(30)
        steps = re.findall(r"\[(\d+)/(\d+)\]", log_path.read_text(errors="replace")[-20000:])
        if steps and steps[-1] != shown:
            shown = steps[-1]
            progress(f"compiling: {shown[0]}/{shown[1]}")


def install(wheel_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall",
                    str(wheel_path)], check=True)


def installed_key() -> str | None:
    stamp = Path(sys.prefix) / ".medgemma-llamacpp"
    return stamp.read_text().strip() if stamp.is_file() else None


def check() -> dict:
    """Load the installed build in a fresh process: the variants are all there and one is picked."""
    code = ("import json, llama_cpp, pathlib; from medgemma_triton.runtime.llamacpp import load_backends; "
            "lib = pathlib.Path(llama_cpp.__file__).parent / 'lib'; info = load_backends(); "
            "info['variants'] = sorted(p.name for p in lib.glob('libggml-cpu-*.so')); print(json.dumps(info))")
    import json

    info = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                     text=True).stdout.strip().splitlines()[-1])
    expected = VARIANTS.get(platform.machine())
    if expected and len(info["variants"]) < expected:
        raise SystemExit(f"llama.cpp has {len(info['variants'])} CPU variants, expected {expected}: {info['variants']}")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    path = sdist()
    key = build_key(path)
    if installed_key() != key:
        install(wheel(path, args.jobs))
        (Path(sys.prefix) / ".medgemma-llamacpp").write_text(key + "\n")
    info = check()
    progress(f"llama-cpp-python {LLAMA_CPP_PYTHON} ready: {len(info['variants'])} CPU variants; this CPU gets "
             f"{info['variant']}")
    return 0


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())

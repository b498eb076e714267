"""llama.cpp for the benchmark: its sources, built once from source, CPU only, into a cache directory.

``python -m benchmarks.e2e.llamacpp_build`` (or the benchmark, the first time it runs ``llamacpp``)
builds it; later runs find it and skip the build. Layout of ``<cache>/bench/llama.cpp-<version>/``
(``<cache>`` is ``$KLOTSKI_TIER_CACHE`` or ``~/.cache/klotski-tier``)::

    llama.cpp/           llama.cpp's sources, as the llama-cpp-python sdist vendors them
    build/               the CMake build tree (the llama library with ggml's CPU backend, the driver)
    bin/greedy_batched   the benchmark's driver (``benchmarks/e2e/llamacpp/greedy_batched.cpp``)
    build.json           what was built: version, CMake flags, the driver sources' digest

Sources: the sdist of ``llama-cpp-python==LLAMA_CPP_PYTHON_VERSION`` from PyPI (``pip download
--no-binary :all:``), whose ``vendor/llama.cpp`` is the llama.cpp it pins. Build: CMake, Release,
:data:`CMAKE_FLAGS` (``-DGGML_NATIVE=ON``: tuned for this CPU; no CUDA, no BLAS, no curl; static
libraries), only the targets the driver needs (``benchmarks/e2e/llamacpp/CMakeLists.txt`` adds
llama.cpp as a subdirectory, its tools, examples and tests left out), on every core this process
may use. A build counts as done when ``build.json`` says what the current code would build (a
changed driver source rebuilds the driver alone: the build tree is reused).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.paths import default_cache_dir

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python sdist whose vendored llama.cpp is built (its llama.cpp: ggml 0.25.3)."""
PACKAGE = "llama-cpp-python"
VENDOR_PREFIX = "vendor/llama.cpp/"  # inside the sdist's top directory
DRIVER = "greedy_batched"
DRIVER_SOURCES = Path(__file__).resolve().parent / "llamacpp"  # CMakeLists.txt and the driver's source
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # the driver is one self-contained binary
    "-DGGML_NATIVE=ON",  # -march=native: this CPU's vector extensions
    "-DGGML_CUDA=OFF",
    "-DGGML_BLAS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
STAMP = "build.json"
PROGRESS = re.compile(r"^\[\s*(\d+)%\]")  # CMake's Makefile generator: "[ 42%] Building ..."
PROGRESS_STEP = 10  # log a progress line every 10 % of the build


@dataclass(frozen=True)
class LlamaCppBuild:
    """Where one llama.cpp build lives (see the module docstring for the layout)."""

    root: Path

    @property
    def sources(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def driver(self) -> Path:
        return self.root / "bin" / DRIVER

    @property
    def stamp(self) -> Path:
        return self.root / STAMP

    @property
    def converter(self) -> Path:
        """llama.cpp's own Hugging Face to GGUF converter (with ``gguf-py`` beside it)."""
        return self.sources / "convert_hf_to_gguf.py"


def default_root(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return default_cache_dir() / "bench" / f"llama.cpp-{version}"


def expected_stamp(version: str = LLAMA_CPP_PYTHON_VERSION) -> dict[str, object]:
    """What ``build.json`` holds once the current code's build is done."""
    return {"version": version, "cmake_flags": list(CMAKE_FLAGS), "driver_sha256": driver_digest()}


def driver_digest(directory: Path = DRIVER_SOURCES) -> str:
    """SHA-256 over the driver's sources (file names and contents): a change rebuilds the driver."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def is_built(build: LlamaCppBuild, version: str = LLAMA_CPP_PYTHON_VERSION) -> bool:
    """Whether ``build`` holds the driver the current code builds, and the sources it was built from."""
    if not (build.driver.is_file() and build.converter.is_file() and build.stamp.is_file()):
        return False
    try:
        stamp = json.loads(build.stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(stamp == expected_stamp(version))


def find_build(root: Path | None = None) -> LlamaCppBuild | None:
    """The cached build, if it is done; never builds."""
    build = LlamaCppBuild(root or default_root())
    return build if is_built(build) else None


def ensure_built(
    root: Path | None = None,
    *,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    jobs: int | None = None,
    progress: Callable[[str], None] = logger.info,
) -> LlamaCppBuild:
    """The llama.cpp build in ``root`` (default: the cache), fetching and building what is missing."""
    build = LlamaCppBuild(root or default_root(version))
    if is_built(build, version):
        return build
    started = time.perf_counter()
    build.root.mkdir(parents=True, exist_ok=True)
    if not build.converter.is_file():
        fetch_sources(build, version, progress)
    configure(build, progress)
    compile_driver(build, jobs or usable_cores(), progress)
    build.driver.parent.mkdir(exist_ok=True)
    shutil.copy2(build.build_dir / DRIVER, build.driver)
    stamp = build.stamp.with_suffix(".tmp")
    stamp.write_text(json.dumps(expected_stamp(version), indent=2) + "\n", encoding="utf-8")
    stamp.replace(build.stamp)  # written last: a build interrupted before this point is redone
    progress(f"llama.cpp {version}: built {build.driver} in {time.perf_counter() - started:.0f} s")
    return build


def fetch_sources(build: LlamaCppBuild, version: str, progress: Callable[[str], None]) -> None:
    """``vendor/llama.cpp`` of the llama-cpp-python sdist into ``build.sources`` (atomically)."""
    progress(f"llama.cpp: downloading the {PACKAGE}=={version} sdist from PyPI")
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=build.root) as scratch:
        _run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", scratch,
             "--disable-pip-version-check", "--quiet", f"{PACKAGE}=={version}"],
            "pip download",
        )  # fmt: skip
        archives = sorted(Path(scratch).glob("*.tar.gz"))
        if not archives:
            raise ConfigError(f"pip downloaded no sdist of {PACKAGE}=={version}")
        staging = Path(scratch) / "llama.cpp"
        extract_vendored(archives[0], staging)
        if build.sources.exists():
            shutil.rmtree(build.sources)
        staging.rename(build.sources)
    progress(f"llama.cpp: sources in {build.sources}")


def extract_vendored(archive: Path, target: Path) -> None:
    """Extract the sdist's ``<top>/vendor/llama.cpp/`` into ``target`` (its git link left out)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            _top, _, inner = member.name.partition("/")
            if not inner.startswith(VENDOR_PREFIX) or inner == VENDOR_PREFIX:
                continue
            relative = inner[len(VENDOR_PREFIX) :]
            if relative == ".git":  # a submodule's pointer to a repository the sdist does not hold
                continue
            member.name = relative
            members.append(member)
        if not members:
            raise ConfigError(f"{archive.name} holds no {VENDOR_PREFIX}")
        target.mkdir(parents=True)
        tar.extractall(target, members=members, filter="data")


def configure(build: LlamaCppBuild, progress: Callable[[str], None]) -> None:
    progress(f"llama.cpp: configuring ({' '.join(CMAKE_FLAGS)})")
    _run(
        ["cmake", "-S", str(DRIVER_SOURCES), "-B", str(build.build_dir), f"-DLLAMA_SRC={build.sources}",
         *CMAKE_FLAGS],
        "cmake configure",
    )  # fmt: skip


def compile_driver(build: LlamaCppBuild, jobs: int, progress: Callable[[str], None]) -> None:
    """``cmake --build`` of the driver (and the libraries it links), with a line every 10 %."""
    progress(f"llama.cpp: compiling on {jobs} cores (minutes on a small machine)")
    argv = ["cmake", "--build", str(build.build_dir), "--target", DRIVER, "--parallel", str(jobs)]
    tail: list[str] = []
    logged = -PROGRESS_STEP
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = [*tail[-19:], line.rstrip()]
            match = PROGRESS.match(line)
            if match and int(match.group(1)) >= logged + PROGRESS_STEP:
                logged = int(match.group(1))
                progress(f"llama.cpp: compiling, {logged}%")
    if proc.returncode != 0:
        raise ConfigError(f"building llama.cpp failed (exit {proc.returncode}): " + " | ".join(tail[-5:]))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) or 1


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise ConfigError(f"{what} failed (exit {proc.returncode}): " + " | ".join(lines[-3:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e.llamacpp_build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", type=Path, default=None, help="build directory (default: in the cache)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%X")
    try:
        build = ensure_built(args.root, jobs=args.jobs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(build.driver)
    return 0


if __name__ == "__main__":
    sys.exit(main())

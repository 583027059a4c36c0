"""The C++ CPU kernels: built on first use for this CPU's capability level, cached, and loaded.

seqkern installs as pure Python; its C++ sources ship inside the package (`seqkern/csrc`, from `csrc/` of a
checkout). `import seqkern` calls `load()`, which loads the library of one capability level:

    avx512   -march=x86-64-v4  (AVX-512 F/BW/CD/DQ/VL: Intel Skylake-X and later, AMD Zen 4)
    avx2     -march=x86-64-v3  (AVX2, FMA, BMI2, F16C: Intel Haswell and later, AMD Zen 1-3)
    default  the compiler's baseline for the target (x86-64 with SSE2; aarch64; any other architecture)

chosen from the CPU, or forced lower with $SEQKERN_CPU_CAPABILITY (as ATen's ATEN_CPU_CAPABILITY). No level
enables AVX512-BF16/FP16 or AMX globally (Zen 4 has no AMX or AVX512-FP16, Skylake-X no BF16): code using them
is compiled with function-level target attributes and called after csrc/cpu/cpu_features.h's run-time checks.
Each level is its own shared library registering the same TORCH_LIBRARY_IMPL(seqkern, CPU) kernels, so only one
is ever loaded into a process (the op schemas come from seqkern/ops/_schemas.py, not from C++).

A level's library is built once into $SEQKERN_CACHE (default ~/.cache/seqkern), in a directory keyed by the
torch version, the Python ABI, the machine, the level and the location of the sources; a file there records the
hash of the sources and flags it was built from, and any change rebuilds it (ninja recompiles only what changed).
A file lock makes concurrent first uses (pytest-xdist, two processes) build once. `python -m seqkern.build`
prebuilds. A failed build never breaks `import seqkern`: it warns once (the compiler's last lines, where the full
log is, how to retry), is remembered so later imports do not rebuild the same sources, and the ops run their
pure-PyTorch references.

Environment: SEQKERN_CPU_CAPABILITY=avx512|avx2|default, SEQKERN_CACHE=<dir>, SEQKERN_NO_EXT=1 (neither build nor
load: every op on CPU tensors runs its reference), CXX (the compiler), MAX_JOBS (parallel compile jobs).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

LEVELS = ("default", "avx2", "avx512")  # ascending: a CPU that runs one level runs every level before it
CAPABILITY_VAR = "SEQKERN_CPU_CAPABILITY"
_MARCH = {"default": [], "avx2": ["-march=x86-64-v3"], "avx512": ["-march=x86-64-v4"]}
# /proc/cpuinfo flags of the x86-64 micro-architecture levels (v3 ~ AVX2+FMA, v4 ~ AVX-512); abm = LZCNT.
_X86_V3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
_X86_FLAGS = {"avx2": _X86_V3, "avx512": _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}
_CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
_LD_FLAGS = ["-fopenmp"]
RETRY_HINT = "python -m seqkern.build --retry"

# Set by load().
AVAILABLE = False
CAPABILITY: str | None = None  # the level whose library is loaded
LIBRARY: Path | None = None
IMPORT_ERROR: str | None = None


class BuildError(RuntimeError):
    """The C++ kernels could not be built; the message ends with the compiler's last lines."""


# ------------------------------------------------------------------------------------------------------------
# Capability levels.
# ------------------------------------------------------------------------------------------------------------
def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cpuinfo_flags() -> set[str] | None:
    """The `flags` of /proc/cpuinfo (what the CPU has and the kernel enabled), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_capability() -> str:
    """The highest level this CPU runs."""
    if not _is_x86_64():
        return "default"
    flags = _cpuinfo_flags()
    if flags is None:  # not Linux: ATen's own cpuid check (avx512 = F/BW/DQ/VL, avx2 = AVX2+FMA)
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    for level in reversed(LEVELS[1:]):
        if _X86_FLAGS[level] <= flags:
            return level
    return "default"


def requested_capability() -> str:
    """The level to load: $SEQKERN_CPU_CAPABILITY if set (never above what the CPU runs), else the CPU's."""
    best = cpu_capability()
    forced = os.environ.get(CAPABILITY_VAR, "").strip().lower()
    if not forced:
        return best
    if forced not in LEVELS:
        raise ValueError(f"${CAPABILITY_VAR}: expected one of {LEVELS}, got {forced!r}")
    if LEVELS.index(forced) > LEVELS.index(best):
        raise RuntimeError(f"${CAPABILITY_VAR}={forced}: this CPU ({platform.machine()}) runs at most the "
                           f"{best!r} level; its kernels would stop on an illegal instruction. Unset it or choose "
                           f"one of {LEVELS[:LEVELS.index(best) + 1]}")
    return forced


def compile_flags(level: str) -> list[str]:
    if level != "default" and not _is_x86_64():
        raise BuildError(f"the {level!r} level exists only on x86-64 (this machine: {platform.machine()})")
    return _CXX_FLAGS + _MARCH[level]


# ------------------------------------------------------------------------------------------------------------
# Sources and the cache.
# ------------------------------------------------------------------------------------------------------------
def source_dir() -> Path:
    """The C++ sources: seqkern/csrc in an installed package, csrc/ beside seqkern/ in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise BuildError(f"the C++ sources are missing (looked for {package / 'csrc'} and {package.parent / 'csrc'})")


def _source_files() -> list[Path]:
    root = source_dir()
    return sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".h") and p.is_file())


def source_hash(level: str) -> str:
    """What a build depends on: every source and header, the flags, the compiler named by $CXX, torch."""
    digest = hashlib.sha256()
    root = source_dir()
    for path in _source_files():
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps([compile_flags(level), _LD_FLAGS, os.environ.get("CXX", ""), torch.__version__]).encode())
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("SEQKERN_CACHE") or Path.home() / ".cache" / "seqkern").expanduser()


def build_dir(level: str) -> Path:
    """One directory per (torch, Python ABI, machine) and per (sources location, level). Keyed by the location,
    not the source hash, so an edit to one .cpp recompiles that file only (ninja), not all of them."""
    location = hashlib.sha256(str(source_dir()).encode()).hexdigest()[:10]
    abi = f"torch{torch.__version__}-{sys.implementation.cache_tag}-{platform.machine().lower()}"
    return cache_root() / abi / f"{level}-{location}"


def library_name(level: str) -> str:
    return f"seqkern_cpu_{level}"


def _library_file(directory: Path, level: str) -> Path | None:
    found = [p for suffix in ("so", "pyd") for p in sorted(directory.glob(f"{library_name(level)}.*.{suffix}"))]
    return found[0] if found else None


def built_library(level: str) -> Path | None:
    """The cached library of `level` built from the current sources, or None."""
    directory = build_dir(level)
    library = _library_file(directory, level)
    marker = directory / "built"
    if library is not None and marker.is_file() and marker.read_text().strip() == source_hash(level):
        return library
    return None


# ------------------------------------------------------------------------------------------------------------
# Building.
# ------------------------------------------------------------------------------------------------------------
# Run in a fresh interpreter: torch's BuildExtension (ninja, parallel, incremental) through setuptools, which
# compiles and links without loading the result (a level above this CPU's must never be loaded).
_BUILD_SCRIPT = """
import json, sys
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
spec = json.loads(sys.argv[1])
extension = CppExtension(spec["name"], spec["sources"], include_dirs=[spec["include"]],
                         extra_compile_args={"cxx": spec["cflags"]}, extra_link_args=spec["ldflags"])
setup(name=spec["name"], ext_modules=[extension], script_name="seqkern-build",
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
      script_args=["build_ext", "--force", "--build-lib", spec["out"], "--build-temp", spec["temp"]])
"""


def _tools_path() -> str:
    """PATH with this interpreter's scripts directory (and the ninja package's) first: BuildExtension runs
    `ninja`, which pip installs next to python, a directory not on PATH when the venv is not activated."""
    dirs = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _compile(level: str, directory: Path) -> None:
    """Compiles and links the library of `level` into `directory`; raises BuildError with the build's output."""
    spec = dict(name=library_name(level), sources=[str(p) for p in _source_files() if p.suffix == ".cpp"],
                include=str(source_dir()), cflags=compile_flags(level), ldflags=_LD_FLAGS, out=str(directory),
                temp=str(directory / "objects"))
    env = dict(os.environ, PATH=_tools_path())
    result = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(spec)], capture_output=True,
                            text=True, env=env, cwd=directory)
    if result.returncode != 0:
        log = directory / "build.log"
        log.write_text(result.stdout + result.stderr)
        raise BuildError(f"building the C++ kernels for {level} failed (full log: {log}):\n"
                         f"{_tail(result.stdout + result.stderr)}")


def build(level: str, *, retry: bool = False, announce: bool = True) -> Path:
    """The library of `level` for the current sources, built first if needed (once, whatever the number of
    processes asking at the same time). A failure is remembered: later calls raise the same BuildError without
    compiling again until the sources change or `retry`."""
    from filelock import FileLock  # a dependency of torch

    library = built_library(level)
    if library is not None:  # the common case, without waiting for a lock a build of other sources may hold
        return library
    directory = build_dir(level)
    directory.mkdir(parents=True, exist_ok=True)
    digest = source_hash(level)
    failed = directory / "failed"
    with FileLock(str(directory / "build.lock")):
        library = built_library(level)  # another process may have built it while this one waited
        if library is not None:
            return library
        if not retry and failed.is_file() and failed.read_text().split("\n", 1)[0] == digest:
            raise BuildError(failed.read_text().split("\n", 1)[1])
        if announce:
            print(f"seqkern: building the C++ kernels for {level} (once, ~2 min)...", file=sys.stderr, flush=True)
        try:
            _compile(level, directory)
        except BuildError as error:
            failed.write_text(f"{digest}\n{error}")
            raise
        (directory / "built").write_text(digest)
        failed.unlink(missing_ok=True)
        library = _library_file(directory, level)
        if library is None:
            raise BuildError(f"the build of {level} succeeded but left no library in {directory}")
        return library


# ------------------------------------------------------------------------------------------------------------
# Loading (import seqkern).
# ------------------------------------------------------------------------------------------------------------
def load() -> None:
    """Loads the library of the requested level (building it if needed) and sets AVAILABLE, CAPABILITY,
    LIBRARY, IMPORT_ERROR. A missing compiler or a compile error warns and leaves AVAILABLE False; an impossible
    $SEQKERN_CPU_CAPABILITY raises."""
    global AVAILABLE, CAPABILITY, LIBRARY, IMPORT_ERROR
    if os.environ.get("SEQKERN_NO_EXT") == "1":
        IMPORT_ERROR = "disabled by SEQKERN_NO_EXT=1"
        return
    level = requested_capability()
    try:
        library = build(level)
        torch.ops.load_library(str(library))
    except (BuildError, OSError) as error:
        IMPORT_ERROR = str(error)
        warnings.warn(f"seqkern: the C++ kernels are not available, so the ops run their pure-PyTorch references "
                      f"on CPU tensors (Triton still serves CUDA tensors). Retry the build with: {RETRY_HINT}\n"
                      f"{IMPORT_ERROR}", RuntimeWarning, stacklevel=3)
        return
    AVAILABLE, CAPABILITY, LIBRARY = True, level, library

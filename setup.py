"""Builds the package; the CUDA extension (csrc/ -> prefixattn._C) is added when nvcc is found.

Environment:
  PREFIXATTN_BUILD_CUDA   unset: build the extension when nvcc and pybind11 are found, GPU or not (it says
                          so on the terminal); a failed compile then only warns (the package runs on
                          Triton without it).
                          1: build it and fail the install if that is not possible. 0: never build it.
  PREFIXATTN_CUDA_ARCHS   ';'- or ','-separated targets, default "80;90a" (sm_80 and Hopper's sm_90a),
                          compiled as -gencode=arch=compute_X,code=sm_X, plus PTX of the lowest one so
                          newer GPUs can JIT it.
  CUDA_HOME / CUDA_PATH   where to look for bin/nvcc before PATH.

The extension links the CUDA runtime statically (libcudart_static) and no torch library: it takes raw
device addresses, strides and a stream handle, so it does not depend on torch's C++ ABI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CU_SOURCES = ["csrc/runtime.cu", "csrc/decode_bf16.cu", "csrc/decode_fp16.cu"]
CPP_SOURCES = ["csrc/bindings.cpp"]
HEADERS = ["csrc/decode.h", "csrc/decode_kernel.cuh", "csrc/launch.cuh"]
DEFAULT_ARCHS = "80;90a"


def _log(msg: str) -> None:
    sys.stderr.write(f"prefixattn setup: {msg}\n")  # one write: compiles log from several threads


def _notice(msg: str) -> None:
    """A line the user should see. pip hides a build's output unless -v, so it also goes to the terminal pip
    runs in, when there is one (a CI log without a terminal has it with -v)."""
    _log(msg)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(f"\nprefixattn setup: {msg}\n")
    except OSError:
        pass


def _build_mode() -> str | None:
    """'on', 'off', or None (auto)."""
    value = os.environ.get("PREFIXATTN_BUILD_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(f"PREFIXATTN_BUILD_CUDA: expected 0 or 1, got {value!r}")


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_lib_dirs(nvcc: str) -> list[str]:
    """Directories holding libcudart_static.a. nvcc itself says where its toolkit is (TOP=), which also
    works when the nvcc on PATH is a wrapper script outside the toolkit."""
    tops = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dry = subprocess.run([nvcc, "--dryrun", "-c", os.path.join(tmp, "x.cu")], capture_output=True, text=True)
        found = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
        if found:
            tops.append(found.group(1).strip())
    except OSError:
        pass
    tops.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs = []
    for top in tops:
        for sub in (
            "lib64",
            "lib",
            os.path.join("targets", "x86_64-linux", "lib"),
            os.path.join("targets", "sbsa-linux", "lib"),
        ):
            d = os.path.realpath(os.path.join(top, sub))
            if os.path.isfile(os.path.join(d, "libcudart_static.a")) and d not in dirs:
                dirs.append(d)
    return dirs


def gencode_flags() -> list[str]:
    spec = os.environ.get("PREFIXATTN_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip() for a in re.split(r"[;,\s]+", spec) if a.strip()]
    flags = []
    for arch in archs:
        arch = arch.replace("sm_", "").replace("compute_", "").replace(".", "")
        if not re.fullmatch(r"\d+[af]?", arch):
            raise SystemExit(f"PREFIXATTN_CUDA_ARCHS: expected targets like 80;90a, got {arch!r}")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    plain = sorted(a for a in archs if a.isdigit())
    if plain:  # PTX of the lowest portable target, for GPUs newer than the SASS targets
        flags.append(f"-gencode=arch=compute_{plain[0]},code=compute_{plain[0]}")
    return flags


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc (in parallel) and links them with the host compiler.

    Extensions marked optional (the auto mode) only warn when they fail to build."""

    def build_extension(self, ext):
        if getattr(ext, "_prefixattn_optional", False):
            _notice(
                "compiling the CUDA extension prefixattn._C because nvcc was found (it is used only on an NVIDIA "
                "GPU; this adds ~15 s to the install); PREFIXATTN_BUILD_CUDA=0 skips it"
            )
        try:
            self._build(ext)
        except Exception as err:  # noqa: BLE001
            if not getattr(ext, "_prefixattn_optional", False):
                raise
            _log(f"building {ext.name} failed, installing without it (the package runs on Triton): {err}")

    def _build(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            ext.extra_objects = list(ext.extra_objects or []) + self._nvcc_compile(cu, ext)
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        super().build_extension(ext)

    def _nvcc_compile(self, sources, ext) -> list[str]:
        nvcc = ext._prefixattn_nvcc
        out_dir = os.path.abspath(os.path.join(self.build_temp, "nvcc"))
        os.makedirs(out_dir, exist_ok=True)
        flags = [
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "-Xcompiler",
            "-fPIC",
            "-Xcompiler",
            "-fvisibility=hidden",
            "-Icsrc",
            *gencode_flags(),
        ]
        deps = [os.path.join(ROOT, h) for h in HEADERS] + [os.path.join(ROOT, "setup.py")]

        def compile_one(src: str) -> str:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            inputs = [os.path.join(ROOT, src)] + deps
            fresh = os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(i) for i in inputs)
            if fresh and not self.force:
                return obj
            cmd = [nvcc, *flags, "-c", src, "-o", obj]
            _log(" ".join(cmd))
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{done.stdout}{done.stderr}")
            return obj

        workers = max(1, min(len(sources), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(compile_one, sources))


def cuda_extensions() -> list:
    mode = _build_mode()
    if mode == "off":
        _log("PREFIXATTN_BUILD_CUDA=0: not building the CUDA extension prefixattn._C")
        return []
    nvcc = find_nvcc()
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        Pybind11Extension = None
    missing = []
    if nvcc is None:
        missing.append("nvcc was not found (CUDA_HOME, CUDA_PATH, PATH)")
    if Pybind11Extension is None:
        missing.append("pybind11 is not installed in the build environment")
    lib_dirs = cuda_lib_dirs(nvcc) if nvcc else []
    if nvcc and not lib_dirs:
        missing.append(f"libcudart_static.a was not found next to {nvcc}")
    if missing:
        if mode == "on":
            raise SystemExit("PREFIXATTN_BUILD_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(missing))
        _log("not building the CUDA extension prefixattn._C: " + "; ".join(missing))
        return []

    ext = Pybind11Extension(
        "prefixattn._C",
        sources=CPP_SOURCES + CU_SOURCES,
        include_dirs=["csrc"],
        library_dirs=lib_dirs,
        libraries=["cudart_static", "dl", "pthread", "rt"],
        extra_link_args=["-Wl,--exclude-libs,ALL"],  # keep the static runtime's symbols private
        depends=HEADERS + CU_SOURCES,
        cxx_std=17,
    )
    ext._prefixattn_nvcc = nvcc
    ext._prefixattn_optional = mode is None
    return [ext]


setup(ext_modules=cuda_extensions(), cmdclass={"build_ext": BuildExt})

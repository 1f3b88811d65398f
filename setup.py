"""Thin driver: the build itself lives in CMakeLists.txt (the single build truth).

`pip install --no-build-isolation .` and `pip install --no-build-isolation -e .` both run CMake
against the torch that is installed in the current environment.
Environment knobs (forwarded to CMake): LONGTUNE_CUDA=AUTO|ON|OFF, LONGTUNE_CUDA_ARCHS="80;90",
LONGTUNE_EMU=ON|OFF, LONGTUNE_SELFTEST=ON|OFF (test-only kernels),
LONGTUNE_BUILD_TYPE=Release|RelWithDebInfo|Debug, MAX_JOBS.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake() -> str:
    """The cmake of this Python environment (pip's cmake>=3.26) before the system one."""
    here = Path(sys.executable).parent / "cmake"
    return str(here) if here.exists() else (shutil.which("cmake") or "cmake")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("LONGTUNE_BUILD_DIR", ROOT / "build" / "cmake"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("LONGTUNE_BUILD_TYPE", "Release")
        cmake = _cmake()
        args = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLONGTUNE_OUTPUT_DIR={out_dir}",
        ]
        # always pass every knob so a stale CMakeCache.txt cannot keep an old choice
        defaults = {
            "LONGTUNE_CUDA": "AUTO",
            "LONGTUNE_CUDA_ARCHS": "80;90",
            "LONGTUNE_EMU": "ON",
            "LONGTUNE_SELFTEST": "ON",
        }
        for knob, default in defaults.items():
            args.append(f"-D{knob}={os.environ.get(knob) or default}")
        subprocess.run(args, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("longtune._C")], cmdclass={"build_ext": CMakeBuild})

"""Build script: the pure-Python package always, the C++/CUDA extension ``noprop._C`` when it can.

The extension (``csrc/``) has a CPU part, compiled whenever a C++ compiler is present, and CUDA
kernels, compiled whenever ``nvcc`` and a CUDA build of PyTorch are present, GPU or not. Without a
compiler the package still installs and the ops fall back to the PyTorch reference.

Environment switches:
    NOPROP_NO_EXTENSION=1       build no extension at all.
    NOPROP_SKIP_CUDA=1          build the CPU part only, even where nvcc is present.
    NOPROP_REQUIRE_EXTENSION=1  fail instead of skipping when a toolchain that is present fails:
                                the C++ part where a compiler is found, the CUDA part where nvcc
                                is found. ``make`` (and so CI) sets it.
    TORCH_CUDA_ARCH_LIST        CUDA architectures to compile for (default ``8.0;9.0``).
    CUDA_HOME                   CUDA toolkit root (default: found from ``nvcc`` on the PATH).
    MAX_JOBS                    parallel compile jobs (ninja).
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def _log(message: str) -> None:
    print(f"noprop setup: {message}", file=sys.stderr)


def _cuda_home_from_nvcc():
    """The toolkit root behind ``nvcc`` on the PATH (it may be a wrapper script elsewhere)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return os.path.dirname(line.split("=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _extensions():
    """Return ``(ext_modules, cmdclass)`` for the extension, or empty ones when it is skipped."""
    if _flag("NOPROP_NO_EXTENSION"):
        _log("NOPROP_NO_EXTENSION is set: building the pure-Python package only")
        return [], {}
    required = _flag("NOPROP_REQUIRE_EXTENSION")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _log(f"no C++ compiler ({compiler}) found: building the pure-Python package only")
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        cuda_home = _cuda_home_from_nvcc()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if required:
            raise
        _log("PyTorch is not importable at build time (use --no-build-isolation): skipping the extension")
        return [], {}

    with_cuda = (
        not _flag("NOPROP_SKIP_CUDA")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and shutil.which("nvcc") is not None
    )
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        define_macros.append(("NOPROP_WITH_CUDA", None))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        extension_type = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]}
        _log(f"building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        if required and shutil.which("nvcc") is not None and not _flag("NOPROP_SKIP_CUDA"):
            raise RuntimeError(
                "NOPROP_REQUIRE_EXTENSION is set and nvcc is present, but the CUDA kernels cannot be built "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
            )
        extension_type = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        _log("building the CPU kernels only (no nvcc, a CPU-only PyTorch, or NOPROP_SKIP_CUDA=1)")
    extension = extension_type(
        name="noprop._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )

    class BuildExtension(cpp_extension.BuildExtension):
        """Skip (with a warning) instead of failing, unless NOPROP_REQUIRE_EXTENSION is set."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler errors surface as many exception types
                if required:
                    raise
                _log(f"the extension failed to build ({error}); installing the pure-Python package only")

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    # bench/ is not installed: benchmarks run from a checkout (python -m bench.ops, noprop bench)
    packages=["noprop", "noprop.models", "noprop.kernels"],
    package_dir={"noprop": "noprop", "noprop.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

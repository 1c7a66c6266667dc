"""Builds ln_ext._C: the CPU ops always, the CUDA ops when torch has CUDA and nvcc is found.

Environment:
  LN_EXT_CUDA=0|1        0: CPU-only build; 1: fail unless the CUDA kernels can be built.
                         Unset: build them when possible and say loudly when not.
  CUDA_HOME              the CUDA toolkit (else /usr/local/cuda, else nvcc on PATH).
  TORCH_CUDA_ARCH_LIST   target archs; unset: the visible GPUs', else
                         LN_EXT_ARCHS_WITHOUT_GPU (default 8.0;8.6;8.9;9.0+PTX, for a
                         wheel that runs anywhere; `make test` sets 9.0, one arch, so that a
                         development build without a GPU takes minutes, not half an hour).
  MAX_JOBS               parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def say(msg):
    print(f"ln_ext build: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The first CUDA toolkit that really holds nvcc and the runtime library."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in filter(None, candidates):
        has_nvcc = os.path.isfile(os.path.join(home, "bin", "nvcc"))
        has_cudart = any(
            glob.glob(os.path.join(home, lib, "libcudart.so*"))
            for lib in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
        )
        if has_nvcc and has_cudart:
            return home
    return None


def want_cuda():
    """(build CUDA?, CUDA_HOME, reason when not)."""
    import torch

    mode = os.environ.get("LN_EXT_CUDA", "").strip()
    if mode == "0":
        return False, None, "LN_EXT_CUDA=0"
    home = find_cuda_home()
    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif home is None:
        reason = "no CUDA toolkit with nvcc and libcudart found (set CUDA_HOME)"
    if reason and mode == "1":
        raise SystemExit(f"ln_ext build: LN_EXT_CUDA=1 but CUDA kernels cannot be built: {reason}")
    return reason is None, home, reason


def cuda_arch_list():
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return None  # torch builds for the visible GPUs
    archs = os.environ.get("LN_EXT_ARCHS_WITHOUT_GPU") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def openmp_flags():
    """at::parallel_for is a header template whose OpenMP backend is a `#pragma omp
    parallel`: without -fopenmp it silently runs every CPU kernel on one thread.
    Only compiled with it, not linked: the OpenMP symbols then resolve to the runtime
    torch itself loaded, so torch.set_num_threads governs our kernels too."""
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def extensions():
    build_cuda, cuda_home, reason = want_cuda()
    if build_cuda:
        # cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fdiagnostics-color=always"] + openmp_flags()
    if build_cuda:
        archs = cuda_arch_list() or "the visible GPUs"
        say(f"CUDA kernels: YES, for {archs} (CUDA_HOME={cuda_home})")
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DLN_EXT_WITH_CUDA"]
        return [
            CUDAExtension(
                "ln_ext._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=[("LN_EXT_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            )
        ]
    say("=" * 72)
    say(f"CUDA kernels: NO ({reason}). This build runs on the CPU only;")
    say("ln_ext.has_cuda_kernels() is False and CUDA tensors will be rejected.")
    say("=" * 72)
    return [
        CppExtension(
            "ln_ext._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["ln_ext", "ln_ext.*"]),
    package_data={"ln_ext.hub_kernel": ["metadata.json"]},  # ln_ext.hub's kernel repository
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
)

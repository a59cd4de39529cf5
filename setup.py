"""Builds bigkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc
is found. BIGKERNELS_BUILD_CUDA=0/1 forces either way; TORCH_CUDA_ARCH_LIST is honoured (default
"8.0;9.0+PTX"); MAX_JOBS caps parallel compile jobs; BIGKERNELS_PTXAS_STRICT=1 makes register
spills and local-memory use in any CUDA kernel a build error (CI sets it). Build with:
    pip install --no-build-isolation -e .
or a wheel for every node with scripts/build_wheel.sh.

_C is bound through the LibTorch stable ABI only (torch/csrc/stable, STABLE_TORCH_LIBRARY_IMPL;
TORCH_TARGET_VERSION below, and TORCH_STABLE_ONLY makes any ATen/c10 header a compile error) and
Python's limited API (abi3, CPython >= 3.10): one build loads on every torch >= TORCH_MIN and every
CPython >= 3.10.
"""
import glob
import os
import shutil

from setuptools import find_namespace_packages, setup


def _find_cuda_home() -> None:
    # torch guesses CUDA_HOME from the nvcc on PATH; /usr/local/bin/nvcc makes that /usr/local,
    # whose lib64 has no libcudart. Follow the link to the real toolkit instead.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


_find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest torch whose stable ABI has everything _C uses (Tensor[] / optional arguments,
# parallel_for, get_num_threads, empty/to/contiguous): 2.10. The wheel's Requires-Dist says the same.
TORCH_MIN = (2, 10)
STABLE_FLAGS = [f"-DTORCH_TARGET_VERSION=0x{TORCH_MIN[0]:02x}{TORCH_MIN[1]:02x}000000000000", "-DTORCH_STABLE_ONLY"]


def _build_cuda() -> bool:
    flag = os.environ.get("BIGKERNELS_BUILD_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag is None:
        return possible
    if flag == "1" and not possible:
        raise SystemExit(f"BIGKERNELS_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} and "
                         f"CUDA_HOME={CUDA_HOME}: install a CUDA build of torch and the CUDA toolkit (nvcc)")
    return flag == "1"


def _sources(cuda: bool):
    """The CPU extension's sources, or (cuda=True) the CUDA extension's."""
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cuda:
        return [s for s in cpp if not s.endswith("_cuda.cpp")]
    return [s for s in cpp if s.endswith("_cuda.cpp")] + sorted(glob.glob("csrc/**/*.cu", recursive=True))


def _write_build_info(cuda: bool) -> None:
    """bigkernels/_build_info.py: what this build is, for bigkernels.info() (not in git)."""
    info = {"stable_abi_target": ".".join(map(str, TORCH_MIN)), "built_with_torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None}
    with open(os.path.join(ROOT, "bigkernels", "_build_info.py"), "w") as f:
        f.write(f'"""Written by setup.py at build time."""\nBUILD = {info!r}\n')


def _extensions():
    """bigkernels._C: the CPU kernels (every torch). bigkernels._C_cuda: the CUDA kernels, a second
    library loaded only under a CUDA build of torch (it links libtorch_cuda and the CUDA runtime,
    which a CPU-only torch does not have), so one wheel serves CPU and GPU nodes."""
    cuda = _build_cuda()
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    _write_build_info(cuda)
    # torch adds -DPy_LIMITED_API=0x030A0000 for py_limited_api=True; no FMA contraction: results track
    # torch to the ulp. No -fopenmp: threads come from torch's own pool through the stable parallel_for.
    cxx = ["-O3", "-ffp-contract=off"] + STABLE_FLAGS
    include_dirs = [os.path.join(ROOT, "csrc")]
    exts = [CppExtension(name="bigkernels._C", sources=_sources(False), include_dirs=include_dirs,
                         py_limited_api=True, extra_compile_args={"cxx": cxx})]
    if not cuda:
        return exts
    include_dirs = list(include_dirs)
    link = []
    # cuSPARSE / cuBLAS headers ship in the nvidia-* wheels torch depends on, not in every toolkit.
    wheel_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if os.path.isdir(wheel_inc):
        include_dirs.append(os.path.abspath(wheel_inc))
    # cuSPARSELt (2:4 sparse tensor cores) from the nvidia-cusparselt wheel torch loads at run time; without
    # it csrc/sparse/sparse24_cuda.cpp compiles to nothing. rpath: next to us in site-packages (a wheel
    # install), and for an in-place build also where it was found (not in a wheel: BIGKERNELS_WHEEL=1).
    cslt = os.path.abspath(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cusparselt"))
    cuda_cxx = cxx + ["-DBIGKERNELS_CUDA", "-DUSE_CUDA"]  # USE_CUDA: the stable ABI's CUDA shims
    if os.path.exists(os.path.join(cslt, "lib", "libcusparseLt.so.0")):
        include_dirs.append(os.path.join(cslt, "include"))
        cuda_cxx.append("-DBIGKERNELS_CUSPARSELT")
        link += [f"-L{cslt}/lib", "-l:libcusparseLt.so.0", "-Wl,-rpath,$ORIGIN/../nvidia/cusparselt/lib"]
        if os.environ.get("BIGKERNELS_WHEEL") != "1":
            link.append(f"-Wl,-rpath,{cslt}/lib")
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + STABLE_FLAGS
    if os.environ.get("BIGKERNELS_PTXAS_STRICT") == "1":
        # CI and scripts/gpu_check.sh: a kernel that spills registers or uses local memory fails the build.
        nvcc.append("-Xptxas=-warn-spills,-warn-lmem-usage,-Werror")
    exts.append(CUDAExtension(name="bigkernels._C_cuda", sources=_sources(True), include_dirs=include_dirs,
                              py_limited_api=True, extra_link_args=link,
                              extra_compile_args={"cxx": cuda_cxx, "nvcc": nvcc}))
    return exts


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """BIGKERNELS_WHEEL_FROM_INPLACE=1 (CI's wheel job): package the extensions the in-place build of
    this same tree (pip install -e . / build_ext --inplace, same setup.py and flags) has just compiled,
    instead of compiling them a second time."""

    def build_extension(self, ext):
        if os.environ.get("BIGKERNELS_WHEEL_FROM_INPLACE") != "1":
            return super().build_extension(ext)
        built = os.path.join(ROOT, *ext.name.split(".")[:-1], os.path.basename(self.get_ext_filename(ext.name)))
        if not os.path.exists(built):
            raise SystemExit(f"BIGKERNELS_WHEEL_FROM_INPLACE=1 but {built} was not built in place")
        newest = max(os.path.getmtime(os.path.join(ROOT, f)) for f in ext.sources)
        if os.path.getmtime(built) < newest:
            raise SystemExit(f"BIGKERNELS_WHEEL_FROM_INPLACE=1 but {built} is older than its sources")
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(built, dest)


setup(
    # namespace packages too: bigkernels/reference has no __init__.py
    packages=find_namespace_packages(include=["bigkernels", "bigkernels.*"], exclude=["*.__pycache__"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

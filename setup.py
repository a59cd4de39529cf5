"""Builds bigkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc
is found. BIGKERNELS_BUILD_CUDA=0/1 forces either way; TORCH_CUDA_ARCH_LIST is honoured (default
"8.0;9.0+PTX"); MAX_JOBS caps parallel compile jobs; BIGKERNELS_PTXAS_STRICT=1 makes register
spills and local-memory use in any CUDA kernel a build error (CI sets it). Build with:
    pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


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
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cuda:
        return [s for s in cpp if not s.endswith("_cuda.cpp")]
    return cpp + sorted(glob.glob("csrc/**/*.cu", recursive=True))


def _extension():
    cuda = _build_cuda()
    # torch adds -DPy_LIMITED_API for py_limited_api=True; no FMA contraction: results track torch to the ulp
    # -fopenmp: at::parallel_for is OpenMP pragmas inlined from ATen's headers; without it they
    # compile to a serial loop. libgomp resolves to the copy torch has already loaded.
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="bigkernels._C", sources=_sources(cuda), include_dirs=include_dirs, py_limited_api=True,
                  extra_link_args=["-fopenmp"])
    if not cuda:
        return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    # cuSPARSE / cuBLAS headers ship in the nvidia-* wheels torch depends on, not in every toolkit.
    wheel_inc = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if os.path.isdir(wheel_inc):
        include_dirs.append(os.path.abspath(wheel_inc))
    # cuSPARSELt (2:4 sparse tensor cores) from the nvidia-cusparselt wheel torch loads at run time; without
    # it csrc/sparse/sparse24_cuda.cpp compiles to nothing. rpath: next to us in site-packages, or as built.
    cslt = os.path.abspath(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cusparselt"))
    if os.path.exists(os.path.join(cslt, "lib", "libcusparseLt.so.0")):
        include_dirs.append(os.path.join(cslt, "include"))
        cxx.append("-DBIGKERNELS_CUSPARSELT")
        kwargs["extra_link_args"] += [f"-L{cslt}/lib", "-l:libcusparseLt.so.0", f"-Wl,-rpath,{cslt}/lib",
                                      "-Wl,-rpath,$ORIGIN/../nvidia/cusparselt/lib"]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("BIGKERNELS_PTXAS_STRICT") == "1":
        # CI and scripts/gpu_check.sh: a kernel that spills registers or uses local memory fails the build.
        nvcc.append("-Xptxas=-warn-spills,-warn-lmem-usage,-Werror")
    return CUDAExtension(extra_compile_args={"cxx": cxx + ["-DBIGKERNELS_CUDA"], "nvcc": nvcc}, **kwargs)


setup(
    packages=find_packages(include=["bigkernels", "bigkernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)

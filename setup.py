"""Build of qlora_kernels.

The CUDA extension ``qlora_kernels._C`` is compiled whenever torch is a CUDA build and nvcc is
found (no GPU is needed to build). Environment switches:

  QLORA_KERNELS_CUDA_ARCHS   compute capabilities to compile for, e.g. "9.0" or "8.0;8.6"
                             (default "8.0;8.6;8.9;9.0": A100, RTX 3090/A40, RTX 4090/L40, H100)
  QLORA_KERNELS_SKIP_CUDA=1  install without the extension (the package then runs on Triton
                             or plain torch)
  QLORA_KERNELS_DEBUG=1      compile with -G -lineinfo and host asserts
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def _say(msg: str) -> None:
    print(f"qlora_kernels setup: {msg}", file=sys.stderr, flush=True)


def _set_cuda_home() -> None:
    """Points CUDA_HOME at a real toolkit when it is unset. torch guesses it from the nvcc on
    PATH, which is wrong when that nvcc is a wrapper script outside the toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def _nvcc_found(cuda_home) -> bool:
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        if not num.isdigit():
            raise SystemExit(f"QLORA_KERNELS_CUDA_ARCHS: {arch!r} is not a compute capability like 9.0")
        # 9.0 is built as 9.0a (its wgmma instructions, for gemm_4bit.cu): sm_90a code runs on
        # every compute capability 9.0 GPU, which is all sm_90 code runs on too
        real = "90a" if num == "90" else num
        flags.append(f"-gencode=arch=compute_{real},code=sm_{real}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _extensions():
    if os.environ.get("QLORA_KERNELS_SKIP_CUDA", "") not in ("", "0"):
        _say("QLORA_KERNELS_SKIP_CUDA is set: installing WITHOUT the CUDA extension "
             "(CUDA tensors will use Triton or plain torch).")
        return [], {}
    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        _say(f"torch is not importable ({err}): installing WITHOUT the CUDA extension. "
             "Install torch first and build with --no-build-isolation to get the CUDA kernels.")
        return [], {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: installing WITHOUT the CUDA extension.")
        return [], {}
    if not _nvcc_found(CUDA_HOME):
        _say("nvcc not found (set CUDA_HOME or put nvcc on PATH): installing WITHOUT the CUDA "
             "extension (CUDA tensors will use Triton or plain torch).")
        return [], {}

    archs = os.environ.get("QLORA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    # torch's own arch list would add flags of its own; ours are explicit
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs.replace(",", ";")
    debug = os.environ.get("QLORA_KERNELS_DEBUG", "") not in ("", "0")
    nvcc_flags = [
        "-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
        # no --use_fast_math: the format is bit-exact, so divisions and roundings are IEEE
    ]
    nvcc_flags += _gencode_flags(archs)
    cxx_flags = ["-O3", "-std=c++20"]
    if debug:
        nvcc_flags += ["-G"]
        cxx_flags = ["-O0", "-g", "-std=c++20"]
    if "-gencode=arch=compute_90a,code=sm_90a" in nvcc_flags:
        # the host code may launch the sm_90a kernels (gemm_4bit.cu)
        nvcc_flags.append("-DQLORA_KERNELS_SM90A")
        cxx_flags.append("-DQLORA_KERNELS_SM90A")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/*.cu"))
    _say(f"building the CUDA extension for compute capabilities {archs} "
         f"(CUDA_HOME={CUDA_HOME}, torch {torch.__version__})")
    ext = CUDAExtension(
        name="qlora_kernels._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

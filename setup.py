"""Build script: the pure-Python package plus the compiled extensions ``ema_kernels._C`` and
``ema_kernels._C_emu``.

What gets built (printed at build time, with the reason):

* ``EMA_KERNELS_NO_EXT=1``: no extension; the package falls back to the reference/triton backends.
* torch is a CUDA build and nvcc is found (or ``EMA_KERNELS_FORCE_CUDA=1``): CUDA + CPU kernels
  (csrc/fused_cuda.cu + csrc/fused_cpu.cpp), for the archs in ``TORCH_CUDA_ARCH_LIST``
  (default ``8.0;9.0+PTX``: sm_80 and sm_90 code plus PTX that newer GPUs JIT-compile).
* otherwise (or with ``EMA_KERNELS_NO_CUDA=1``): the CPU kernels only (the ``cpp`` backend).
* and always beside ``_C`` (it needs neither nvcc nor a CUDA torch): ``ema_kernels._C_emu``, the
  emulation build -- csrc/fused_cuda.cu compiled as host C++ against csrc/cuda_emu.h, so that
  with ``EMA_KERNELS_CUDA_EMULATION=1`` the ``cuda`` backend runs its kernels on CPU tensors
  (launches as loops over blocks and threads; a test vehicle, never ``auto``'s choice).

The extension needs the installed torch at build time, so install with
``pip install --no-build-isolation -e .`` (or build in place for development with
``MAX_JOBS=2 python setup.py build_ext --inplace``).  ``EMA_KERNELS_VERBOSE_PTXAS=1`` adds
``-Xptxas -v`` (registers/spills per kernel) to the CUDA compile.
"""
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _say(msg):
    print(f"ema_kernels setup: {msg}", file=sys.stderr, flush=True)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """A CUDA toolkit root with include/cuda_runtime.h, or None.

    torch's own guess takes dirname(dirname(which nvcc)), which is wrong when nvcc on the PATH is
    a wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += ["/usr/local/cuda"]
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _arch_flags(arch_list):
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST-style string ('8.0;9.0+PTX')."""
    flags = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        suffix = "a" if num.endswith("a") else ""
        num = num.rstrip("a")
        major, _, minor = num.partition(".")
        cc = f"{major}{minor or '0'}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def _extensions():
    if _truthy("EMA_KERNELS_NO_EXT"):
        _say("EMA_KERNELS_NO_EXT=1: building no compiled extension (pure Python: the "
             "'reference' and 'triton' backends only)")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable in this build environment, so the extension cannot be "
             "built. Install torch first and use `pip install --no-build-isolation -e .`; "
             "building the pure-Python package only")
        return [], {}

    force_cuda = _truthy("EMA_KERNELS_FORCE_CUDA")
    cuda_home = _find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    torch_cuda = torch.version.cuda is not None
    no_cuda = _truthy("EMA_KERNELS_NO_CUDA")
    with_cuda = not no_cuda and (force_cuda or (torch_cuda and cuda_home is not None))
    if no_cuda:
        why = "EMA_KERNELS_NO_CUDA=1"
    elif force_cuda:
        why = "EMA_KERNELS_FORCE_CUDA=1"
    elif with_cuda:
        why = f"torch {torch.__version__} is a CUDA {torch.version.cuda} build and nvcc was " \
              f"found in {cuda_home}"
    elif not torch_cuda:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        why = "nvcc / the CUDA toolkit was not found (set CUDA_HOME or put nvcc on the PATH)"

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    omp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] + omp
    define_macros = [("TORCH_API_INCLUDE_EXTENSION_H", None)]
    sources = ["csrc/bindings.cpp", "csrc/step_table.cpp", "csrc/fused_cpu.cpp"]
    depends = [os.path.join("csrc", f) for f in
               ("fused_math.h", "kernels.h", "fused_cpu_impl.h")]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        nvcc = ["-O3", "--expt-relaxed-constexpr"] + _arch_flags(archs)
        if _truthy("EMA_KERNELS_VERBOSE_PTXAS"):
            nvcc += ["-Xptxas", "-v"]
        define_macros += [("EK_WITH_CUDA", None), ("EK_CUDA_ARCHS", f'"{archs}"')]
        ext = CUDAExtension(
            "ema_kernels._C", sources + ["csrc/fused_cuda.cu", "csrc/list_tables.cpp"],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=omp,
            depends=depends)
        _say(f"building the CUDA + CPU extension ema_kernels._C for archs {archs!r} "
             f"(TORCH_CUDA_ARCH_LIST{'' if os.environ.get('TORCH_CUDA_ARCH_LIST') else ' unset: default'}) "
             f"because {why}")
    else:
        ext = CppExtension(
            "ema_kernels._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=omp, depends=depends)
        _say(f"building the CPU-only extension ema_kernels._C (the 'cpp' backend; no 'cuda' "
             f"backend) because {why}")
    # The emulation build: the same kernels and bindings (under their own object names, so the
    # two extensions' objects do not collide), host-compiled.  No OpenMP: an emulated launch
    # runs its blocks one after the other.  -ffp-contract=off keeps one rounding per operation,
    # as the _rn intrinsics have on the GPU; -fno-strict-aliasing because the kernels move
    # parameters and state through 16-byte vector types, which nvcc allows and ISO C++ does not
    # (and the kernels' #pragma unroll means nothing to g++).
    emu_cxx = ["-O2", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
               "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
    emu = CppExtension(
        "ema_kernels._C_emu", ["csrc/bindings_emu.cpp", "csrc/step_table_emu.cpp",
                              "csrc/fused_cuda_emu.cpp", "csrc/list_tables_emu.cpp"],
        define_macros=[("TORCH_API_INCLUDE_EXTENSION_H", None), ("EK_CUDA_EMULATION", None)],
        extra_compile_args={"cxx": emu_cxx},
        depends=depends + [os.path.join("csrc", f) for f in
                           ("bindings.cpp", "step_table.cpp", "fused_cuda.cu", "cuda_emu.h",
                            "list_tables.cpp")])
    _say("also building ema_kernels._C_emu, the CUDA kernels of csrc/fused_cuda.cu compiled for "
         "the host (with EMA_KERNELS_CUDA_EMULATION=1 set before importing ema_kernels, "
         "backend='cuda' runs them on CPU tensors: a test vehicle; needs no GPU and no nvcc)")
    os.environ.setdefault("MAX_JOBS", "2")
    return [ext, emu], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

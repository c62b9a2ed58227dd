"""Build entry point; metadata lives in pyproject.toml.

By default nothing is compiled at install time: the native kernels in csrc/ are built with ninja
on first use (sam_fused/native.py), and a wheel carries their sources as sam_fused/_csrc.

SAM_FUSED_BUILD_EXT=1 builds sam_fused._C now instead (needs torch in the build environment:
``pip install --no-build-isolation .``): the CPU kernels always, the CUDA kernels where torch is a
CUDA build and nvcc is found (SAM_FUSED_CUDA=0 to skip them, =1 to require them).
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package, so a non-editable install can still build it on first use."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "sam_fused" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in CSRC.iterdir():
            if src.suffix in (".cpp", ".cu", ".cuh", ".h"):
                shutil.copy2(src, target / src.name)


def native_extension():
    """(ext_modules, cmdclass additions) for SAM_FUSED_BUILD_EXT=1, else nothing."""
    if os.environ.get("SAM_FUSED_BUILD_EXT", "0") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_flag = os.environ.get("SAM_FUSED_CUDA")
    cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_flag == "0":
        cuda = False
    elif cuda_flag == "1" and not cuda:
        raise RuntimeError("SAM_FUSED_CUDA=1, but torch is not a CUDA build or nvcc was not found")
    sources = ["csrc/bindings.cpp", "csrc/sam_cpu.cpp"] + (["csrc/sam_cuda.cu"] if cuda else [])
    define = ["-DSAM_FUSED_WITH_CUDA"] if cuda else []
    args = dict(
        name="sam_fused._C",
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"] + define, "nvcc": ["-O3", "--use_fast_math"] + define},
        extra_link_args=["-fopenmp"],
    )
    ext = CUDAExtension(**args) if cuda else CppExtension(**args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, extra_cmdclass = native_extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **extra_cmdclass})

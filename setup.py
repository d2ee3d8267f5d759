"""Build hook of dora-engine; the metadata lives in pyproject.toml.

A plain install ships the Python package and a copy of ``csrc/`` inside it (``dora_engine/_csrc``): the
C++/CUDA op is compiled just in time on first use. To compile it ahead of time (CUDA kernels too when
torch has CUDA and nvcc is found; architectures from TORCH_CUDA_ARCH_LIST, else the visible GPUs):

    DORA_BUILD_OPS=1 pip install --no-build-isolation .      # or -e . for an editable install

(``--no-build-isolation`` so that the build sees the installed torch.) The build writes its record,
``dora_engine/_ops_build.json``, next to the library: the op loads the library only in an environment
that matches it (see dora_engine/ops/builder.py).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package so that a non-editable install can still build the op just in time."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "dora_engine" / "_csrc"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(Path(__file__).parent / "csrc", target)


def build_ops_command(ops):
    """torch's build_ext that also writes the build record of ``ops`` (an OpBuilder) next to the library."""
    from torch.utils.cpp_extension import BuildExtension

    from dora_engine.ops.builder import record_path, write_record

    class BuildOpsWithRecord(BuildExtension):
        def build_extension(self, ext) -> None:
            super().build_extension(ext)
            write_record(self.get_ext_fullpath(ext.name), ops.aot_record())

        def copy_extensions_to_source(self) -> None:  # editable installs and --inplace
            super().copy_extensions_to_source()
            for built, inplace in self._records(super().get_output_mapping().items()):
                self.copy_file(built, inplace, level=self.verbose)

        def get_outputs(self) -> list[str]:
            outputs = super().get_outputs()
            return sorted({*outputs, *(str(record_path(file)) for file in outputs)})

        def get_output_mapping(self) -> dict[str, str]:
            mapping = super().get_output_mapping()
            return {**mapping, **dict(self._records(mapping.items()))}

        @staticmethod
        def _records(pairs):
            """(built, in place) library paths -> the same pairs of their build records."""
            return {(str(record_path(built)), str(record_path(inplace))) for built, inplace in pairs}

    return BuildOpsWithRecord


cmdclass = {"build_py": BuildPyWithSources}
if os.environ.get("DORA_BUILD_OPS") == "1":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # this tree's builder, not an installed one
    from dora_engine.ops.builder import OpBuilder

    ops = OpBuilder()
    setup(ext_modules=[ops.extension()], cmdclass={**cmdclass, "build_ext": build_ops_command(ops)})
else:
    setup(cmdclass=cmdclass)

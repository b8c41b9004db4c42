# cffi's API-mode build hooks into setuptools through cffi_modules, which
# pyproject.toml alone cannot express; so does the static build of
# larkns-entry, the program HTCondor runs as the job's wrapper and hooks.
import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


class build_ext_and_entry(build_ext):
    """Also builds csrc/entry.c into larkns/larkns-entry beside the C core.

    Statically linked: HTCondor starts it with the job's environment, and a
    dynamically linked program would load LD_PRELOAD's code before its first
    line (see csrc/entry.c)."""

    def run(self) -> None:
        super().run()
        out = Path(self.get_ext_fullpath("larkns._core")).parent / "larkns-entry"
        out.parent.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [
                cc,
                "-static",
                "-O2",
                "-Wall",
                "-Wextra",
                "-o",
                str(out),
                str(HERE / "csrc" / "entry.c"),
            ],
            check=True,
        )


setup(
    cffi_modules=["csrc/build_core.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_and_entry},
)

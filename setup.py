# cffi's API-mode build hooks into setuptools through cffi_modules, which
# pyproject.toml alone cannot express; so do the static builds of
# larkns-entry, the program HTCondor runs as the job's wrapper and hooks, and
# of larkns-keeper, the program every job's keeper runs.
import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"


class build_ext_and_programs(build_ext):
    """Also builds the C programs into larkns/ beside the C core.

    Statically linked.  larkns-entry: HTCondor starts it with the job's
    environment, and a dynamically linked program would load LD_PRELOAD's
    code before its first line (see csrc/entry.c).  larkns-keeper: one runs
    as root for every live job, for as long as the job, and needs no loader
    nor shared library that an upgrade could change under it."""

    def run(self) -> None:
        super().run()
        pkg = Path(self.get_ext_fullpath("larkns._core")).parent
        pkg.mkdir(parents=True, exist_ok=True)
        self._program(pkg / "larkns-entry", [CSRC / "entry.c"])
        self._program(pkg / "larkns-keeper", [CSRC / "keeper.c", CSRC / "spawn.c"])
        self._bpf(pkg / "clat.bpf.o", CSRC / "clat.bpf.c")

    def _bpf(self, out: Path, source: Path) -> None:
        """The kernel-side CLAT (eBPF), where clang can build it; without
        it, jobs' CLATs are tayga processes (larkns doctor says which)."""
        clang = os.environ.get("CLANG", "clang")
        cc = os.environ.get("CC", "cc")
        try:
            triple = subprocess.run(
                [cc, "-dumpmachine"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            triple = ""
        # <asm/...> of the host's kernel headers: Debian keeps them under
        # the multiarch triple, which -target bpf does not search.
        extra = [f"-idirafter/usr/include/{triple}"] if triple else []
        try:
            subprocess.run(
                [
                    clang,
                    "-O2",
                    "-g0",
                    "-Wall",
                    "-target",
                    "bpf",
                    *extra,
                    "-c",
                    str(source),
                    "-o",
                    str(out),
                ],
                check=True,
            )
        except (OSError, subprocess.CalledProcessError) as e:
            out.unlink(missing_ok=True)
            print(f"larkns: the kernel-side CLAT was not built ({e}); CLATs will use tayga")

    def _program(self, out: Path, sources: list[Path]) -> None:
        cc = os.environ.get("CC", "cc")
        subprocess.run(
            [
                cc,
                "-static",
                "-O2",
                "-Wall",
                "-Wextra",
                f"-I{CSRC}",
                "-o",
                str(out),
                *map(str, sources),
            ],
            check=True,
        )
        # larknsd runs the keeper as root only if no one else may write it.
        out.chmod(0o755)


setup(
    cffi_modules=["csrc/build_core.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_and_programs},
)

"""The CPU kernels built for other ISAs than the machine's widest: each build of
``isa_check.cpp`` runs the channels-as-lanes forward and backward and the transposing tile kernels
on the same rows of channels and must find them equal (two implementations, so a vector width one
of them gets wrong shows). On an AVX-512 machine this is how the AVX2 and SSE paths are kept from
rotting; ``-march=native`` is the rest of the suite's build."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

# -march value -> the /proc/cpuinfo flags a CPU needs to run its code
ISAS = {"haswell": {"avx2", "fma"}, "x86-64-v2": {"sse4_2", "popcnt"}}


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler():
    """The compiler the kernels build with ($CXX, else c++), or None where it is not on PATH."""
    from torch.utils.cpp_extension import get_cxx_compiler
    compiler = get_cxx_compiler()
    return [compiler] if shutil.which(compiler) else None


@pytest.mark.parametrize("march", [pytest.param("haswell"),
                                   pytest.param("x86-64-v2", marks=pytest.mark.slow)])
def test_lanes_and_tile_kernels_agree(march, tmp_path):
    if os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip("x86 ISAs")
    if not ISAS[march] <= _cpu_flags():
        pytest.skip(f"this CPU cannot run -march={march} code")
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "isa_check"
    build = subprocess.run([*cxx, "-O2", "-std=c++20", f"-march={march}", "-fopenmp",
                            f"-I{CSRC}", str(Path(__file__).with_name("isa_check.cpp")),
                            str(CSRC / "bft" / "bft_lanes.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 36, run.stdout

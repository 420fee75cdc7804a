"""The CPU kernels built for other ISAs than the machine's widest, each checked by a program
that must find two computations equal: ``isa_check.cpp`` runs the channels-as-lanes forward and
backward and the transposing tile kernels on the same rows of channels (two implementations, so a
vector width one of them gets wrong shows); ``dw_isa_check.cpp`` runs the depthwise kernels
against a direct loop. On an AVX-512 machine this is how the AVX2 and SSE paths are kept from
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


MARCHES = [pytest.param("haswell"), pytest.param("x86-64-v2", marks=pytest.mark.slow)]


def _build_and_run(march: str, sources, exe: Path) -> str:
    """Compiles ``sources`` for ``march`` into ``exe``, runs it, and returns what it printed
    (skips where this machine cannot build or run that code)."""
    if os.uname().machine not in ("x86_64", "amd64"):
        pytest.skip("x86 ISAs")
    flags = _cpu_flags()
    if not ISAS[march] <= flags:
        pytest.skip(f"this CPU cannot run -march={march} code")
    if march == "haswell" and "avx512f" not in flags:
        pytest.skip("-march=native builds AVX2 code on this CPU: the rest of the suite tests it")
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    # -O1: the vector code is what is checked, and it compiles in half the time of -O2
    build = subprocess.run([*cxx, "-O1", "-std=c++20", f"-march={march}", "-fopenmp",
                            f"-I{CSRC}", *map(str, sources), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    return run.stdout


@pytest.mark.parametrize("march", MARCHES)
def test_lanes_and_tile_kernels_agree(march, tmp_path):
    out = _build_and_run(march, [Path(__file__).with_name("isa_check.cpp"),
                                 CSRC / "bft" / "bft_lanes.cpp"], tmp_path / "isa_check")
    assert out.count("ok ") == 36, out


@pytest.mark.parametrize("march", MARCHES)
def test_depthwise_kernels_match_a_direct_loop(march, tmp_path):
    """Both layouts, k = 3 (compiled) and 5 (generic), strides 1 and 2, every tail length: the
    masked loads and stores of that ISA (AVX2's vmaskmov, SSE's lane by lane)."""
    dw = CSRC / "depthwise"
    out = _build_and_run(march, [Path(__file__).with_name("dw_isa_check.cpp"), dw / "dw_any.cpp",
                                 dw / "dw_k3_forward.cpp", dw / "dw_k3_backward.cpp"],
                         tmp_path / "dw_isa_check")
    assert out.count("ok ") == 312 and "78 cases, 0 mismatches" in out, out[-3000:]

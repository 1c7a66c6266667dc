"""The machine code of the built CUDA kernels (cuobjdump -sass of ln_ext._C), checked for
what ptxas may quietly do to them: spill registers to local memory (LDL/STL: every kernel
is meant to keep its values in registers and shared memory) or lose the 16-byte global
loads that the rows kernels' bandwidth depends on (vec.cuh's chunk grid).

`pytest -m check` after a build with the CUDA kernels; skipped without them or without
cuobjdump (CUDA_HOME/bin, PATH, or the copy that triton ships).
"""
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# A local-memory access: spilled registers (or an array ptxas could not keep in registers).
_LOCAL = re.compile(r"\b(LDL|STL)\b")
# A 16-byte global load, whatever its cache and predicate modifiers (LDG.E.128, LDG.E.128.CONSTANT...).
_LDG_128 = re.compile(r"\bLDG(\.\w+)*\.128\b")
_ROWS_KERNELS = ("layer_norm_fwd_rows_kernel", "layer_norm_bwd_rows_kernel")


def parse_sass(text):
    """{(arch, function name): [instruction lines]} from cuobjdump -sass output (names as printed:
    mangled; arch "sm_90"...: a fat binary holds each kernel once per architecture, and one
    architecture's code must not hide another's)."""
    functions = {}
    current, arch = None, ""
    for line in text.splitlines():
        code = re.match(r"\s*code for (sm_\w+)", line)
        if code:
            arch = code.group(1)
            continue
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = functions.setdefault((arch, header.group(1)), [])
        elif current is not None and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            current.append(line.strip())
    return functions


def spilling(functions):
    """The functions with a local-memory load or store, each with its count."""
    counts = {name: sum(1 for ins in body if _LOCAL.search(ins)) for name, body in functions.items()}
    return {name: n for name, n in counts.items() if n}


def without_16_byte_loads(functions, name_parts=_ROWS_KERNELS):
    """The functions whose name contains one of name_parts and that have no LDG.*.128."""
    return sorted(key for key, body in functions.items()
                  if any(part in key[1] for part in name_parts) and not any(_LDG_128.search(i) for i in body))


def demangle(keys):
    """'arch: readable name' for (arch, mangled name) keys."""
    names = [name for _, name in keys]
    cxxfilt = shutil.which("c++filt")
    if names and cxxfilt is not None:
        names = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [f"{arch}: {name}" for (arch, _), name in zip(keys, names)]


def find_cuobjdump():
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    candidates = [home / "bin" / "cuobjdump"]
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    spec = importlib.util.find_spec("triton")  # found without importing triton
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def sass():
    """The kernels of the built extension, disassembled once for the module."""
    import ln_ext._C as ext

    if not ext.has_cuda_kernels():
        pytest.skip("ln_ext._C was built without the CUDA kernels: nothing to disassemble")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA_HOME/bin, PATH, triton/backends/nvidia/bin)")
    proc = subprocess.run([str(cuobjdump), "-sass", ext.__file__], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    functions = parse_sass(proc.stdout)
    assert functions, f"cuobjdump -sass {ext.__file__} listed no kernels"
    return functions


@pytest.mark.check
def test_no_kernel_spills(sass):
    offenders = spilling(sass)
    lines = [f"{n:4d} LDL/STL  {name}" for name, n in zip(offenders.values(), demangle(list(offenders)))]
    assert not offenders, "kernels with local-memory loads/stores (register spills):\n" + "\n".join(lines)


@pytest.mark.check
def test_rows_kernels_use_16_byte_loads(sass):
    rows = [key for key in sass if any(part in key[1] for part in _ROWS_KERNELS)]
    assert rows, "no rows kernels in the extension's SASS"
    missing = without_16_byte_loads(sass)
    assert not missing, "rows kernels without a 16-byte global load (LDG.E.128):\n" + "\n".join(demangle(missing))


_SNIPPET = """
	code for sm_90
		Function : _ZN6ln_ext7kernels26layer_norm_bwd_rows_kernelI13__nv_bfloat16S2_fLb1ELi1EEEvNS0_9BwdParamsIT_T0_T1_EEi
	.headerflags	@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0150*/              @P0 LDG.E.128 R4, desc[UR6][R2.64] ;           /* 0x0000000602040981 */
        /*0160*/                   STL [R1+0x8], R4 ;                          /* 0x0000080401007387 */
        /*0170*/                   LDL R5, [R1+0x8] ;                          /* 0x0000080001057983 */
		..........
		Function : _ZN6ln_ext7kernels26layer_norm_fwd_rows_kernelIffffLb0ELi1EEEvNS0_9FwdParamsIT_T0_T1_T2_EEi
        /*0000*/                   LDG.E.U16 R4, desc[UR6][R2.64] ;            /* 0x0000000602047981 */
        /*0010*/                   STG.E.128 desc[UR6][R2.64], R4 ;            /* 0x0000000402007986 */
		Function : _ZN6ln_ext7kernels35layer_norm_bwd_param_reduce_kernelIffEEvPKT_iiPT0_S5_
        /*0000*/                   LDG.E R4, desc[UR6][R2.64] ;                /* 0x0000000602047981 */
"""


def test_sass_checks_find_spills_and_missing_16_byte_loads():
    """The checks above on a hand-made listing: they can fail."""
    functions = parse_sass(_SNIPPET)
    assert len(functions) == 3 and all(functions.values())
    bwd, fwd, reduce = functions
    assert spilling(functions) == {bwd: 2}
    # fwd has a 16-byte store only; the reduce kernel is not a rows kernel.
    assert without_16_byte_loads(functions) == [fwd]
    assert bwd[0] == "sm_90" and demangle([bwd])[0].startswith("sm_90: ")
    assert "layer_norm_bwd_rows_kernel<__nv_bfloat16, __nv_bfloat16, float, true, 1>" in demangle([bwd])[0] \
        or shutil.which("c++filt") is None
    # The same kernel in a second architecture is checked on its own.
    twice = parse_sass(_SNIPPET + _SNIPPET.replace("sm_90", "sm_100").replace("@P0 LDG.E.128", "@P0 LDG.E"))
    assert len(twice) == 6 and ("sm_100", bwd[1]) in without_16_byte_loads(twice)

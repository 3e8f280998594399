"""Every kernel compiled ahead of time for sm_80 and sm_90 with triton's bundled ptxas, no GPU
needed: catches what the interpreter lets through (tl.dot shape minimums, dtype mismatches, pointer
casts). Run in a process without TRITON_INTERPRET (the kernels must be JITFunctions):

    python -m tests.unit.triton_cases compile

Exit 0: all compiled; 1: a kernel failed (printed); 77: this triton cannot compile for a CUDA
target here (the reason is the last line printed).
"""

from __future__ import annotations

import time

import triton
from mole_serve.lora.backends.triton import kernels, ops
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# compute capability -> storage dtypes: every dtype for Hopper, the serving dtype (bf16) for Ampere
# (the CI budget: a cold compile is ~0.5 s a variant on a 2-core machine)
TARGETS = {90: ("fp32", "fp16", "bf16"), 80: ("bf16",)}
CANNOT_COMPILE = 77


def _sig(names: str, kind: str) -> dict[str, str]:
    return dict.fromkeys(names.split(), kind)


def variants(dt: str) -> list[tuple[triton.runtime.JITFunction, dict[str, str], dict]]:
    """(kernel, signature, constexprs) for storage dtype dt: the tile shapes ops.py launches (the
    smallest and largest of each), weights in the storage dtype and in fp32 (the gate's)."""
    out = []
    shrink = {
        "x_ptr": f"*{dt}",
        "a_ptr": f"*{dt}",
        "z_ptr": "*fp32",
        **_sig("tiles_ptr seg_slots_ptr seg_ranks_ptr", "*i32"),
        **_sig("d_in rank r_stack nr num_cols stride_xt stride_as stride_ar stride_zt stride_zc", "i32"),
    }
    for block_m, block_n in ((16, 16), (64, ops.SHRINK_MAX_BLOCK_N)):
        const = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": ops.SHRINK_BLOCK_K, "DOT_FP32": False}
        out.append((kernels.shrink_kernel, {**shrink, **_sig(" ".join(const), "constexpr")}, const))
    for w_dt, has_w, block_m, block_r in (
        (dt, True, 16, 16),
        ("fp32", True, 64, ops.EXPAND_MAX_BLOCK_R),
        (dt, False, 32, 32),
    ):
        sig = {
            "z_ptr": "*fp32",
            "w_ptr": f"*{w_dt}",
            "out_ptr": f"*{dt}",
            "b_table_ptr": "*i64",
            **_sig("b_meta_ptr tiles_ptr seg_slots_ptr seg_ranks_ptr", "*i32"),
            **_sig("rank r_stack num_cols stride_zt stride_zc stride_wt stride_wj stride_wc stride_ot", "i32"),
        }
        const = {
            "HAS_WEIGHTS": has_w,
            "BLOCK_M": block_m,
            "BLOCK_N": ops.EXPAND_BLOCK_N,
            "BLOCK_R": block_r,
            "DOT_FP32": False,
        }
        out.append((kernels.expand_kernel, {**sig, **_sig(" ".join(const), "constexpr")}, const))
    for r_pad in (1, 8):
        sig = {
            **_sig("x_ptr a_ptr b_ptr out_ptr w_ptr", f"*{dt}"),
            **_sig("rows_ptr slots_ptr", "*i64"),
            **_sig("d o rank n_blocks stride_xt stride_ot", "i32"),
        }
        const = {"R_PAD": r_pad, "BLOCK_D": ops.BLOCKS_BLOCK_D, "BLOCK_O": ops.BLOCKS_BLOCK_O}
        out.append((kernels.blocks_kernel, {**sig, **_sig(" ".join(const), "constexpr")}, const))
    return out


def try_compile(fn, signature: dict, constexprs: dict, cc: int, name: str) -> bool | None:
    """One kernel variant compiled for sm_`cc`, printed as ok or FAIL. None: this triton has no CUDA
    compiler here (ptxas)."""
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": 4, "num_stages": 2},
        )
    except Exception as e:  # noqa: BLE001 - every compile error is a finding, printed with its kernel
        if "ptxas" in str(e) and "not found" in str(e):
            print(f"triton {triton.__version__} cannot compile for CUDA here: {e}")
            return None
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return False
    assert compiled.asm.get("cubin"), name
    print(f"ok   {name} ({time.perf_counter() - start:.2f} s)", flush=True)
    return True


def compile_all() -> int:
    if not isinstance(kernels.shrink_kernel, triton.runtime.JITFunction):
        print("the kernels were imported under TRITON_INTERPRET=1; compile in a process without it")
        return 1
    failures = 0
    for cc, dtypes in TARGETS.items():
        for dt in dtypes:
            for fn, signature, constexprs in variants(dt):
                ok = try_compile(fn, signature, constexprs, cc, f"sm_{cc} {dt} {fn.__name__} {constexprs}")
                if ok is None:
                    return CANNOT_COMPILE
                failures += not ok
    return 1 if failures else 0

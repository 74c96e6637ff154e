"""Compiles every fused kernel ahead of time for an sm_90 (H100/H200) target, without a GPU, for the
block shapes the GPU launchers choose. Catches what only the GPU compiler rejects (tl.dot shapes,
shared-memory overflow) on machines that only run the interpreter. Prints one line per variant and
exits non-zero on any failure. Run without TRITON_INTERPRET (test_compile_sm90.py does that)."""
from __future__ import annotations

import itertools
import os
import sys
from concurrent.futures import ProcessPoolExecutor

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from reft_kernels.ops import fused_edit as fe  # noqa: E402
from reft_kernels.ops import mixed_edit as me  # noqa: E402
from reft_kernels.ops import orthonormal as orth  # noqa: E402

SMEM_LIMIT = 227 * 1024  # largest dynamic shared memory per block on sm_90
D = 4096


def _signature(kernel, pointers, constexprs):
    sig = {}
    for p in kernel.params:
        if p.name in constexprs:
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            sig[p.name] = pointers[p.name]
        elif p.name == "p_drop":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _compile(job):
    name, hidden_dtype, r, flags = job[:4]
    d = job[4] if len(job) > 4 else D
    if name.startswith("_gram") or name.startswith("_cholqr"):
        return _compile_orthonormal(name, r, d)
    if name.startswith("_mixed") or name == "_claim_rows_kernel":
        return _compile_mixed(name, hidden_dtype, r, flags, d)
    cfg = fe.gpu_launch_config(d, r, 16)
    kernel = getattr(fe, name)
    rows = "rows" in name
    h = {"bf16": "*bf16", "fp32": "*fp32"}[hidden_dtype]
    pointers = dict(X=h, DY=h, DX=h, U=h, SAVED=h, POS="*i64", L="*fp32", W="*bf16", BIAS="*fp32", PBIAS="*fp32",
                    STATS="*fp32", SCRATCH="*fp32", ITEM_SLOT="*i32", PART="*fp32", OUT="*fp32")
    if rows:
        block_n, block_d, warps, stages = cfg.rows_block_n, fe._next_pow2(d), cfg.rows_warps, 1
    elif name == "_edit_fwd_kernel":
        block_n, block_d, warps, stages = cfg.fwd_block_n, cfg.fwd_block_d, cfg.fwd_warps, cfg.fwd_stages
    else:
        block_n, block_d, warps, stages = cfg.bwd_block_n, cfg.bwd_block_d, cfg.bwd_warps, cfg.bwd_stages
    const = dict(R_PAD=fe.r_pad(r), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_P=cfg.block_p,
                 DOT_PRECISION="ieee" if hidden_dtype == "fp32" else "tf32", BLOCK=1024,
                 EVICT_KEEP="evict_last", EVICT_STREAM="evict_first", **flags)
    const = {k: v for k, v in const.items() if k in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, const),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
    return _compile_source(src, warps, stages, f"{name} {hidden_dtype} r={r} d={d} {flags}")


def _compile_source(src, warps, stages, label, spills=False):
    """(ok, report line) for one variant: compiled for sm_90 and within its shared memory; spills: also
    without register spills (ptxas -v on the PTX, with the ptxas Triton ships)."""
    try:
        cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        smem = cc.metadata.shared
        ok = smem <= SMEM_LIMIT
        extra = ""
        if spills:
            n_spill, regs = _ptxas_spills(cc.asm["ptx"])
            ok = ok and n_spill == 0
            extra = f" regs={regs} spill_bytes={n_spill}"
        return ok, f"{'ok  ' if ok else 'FAIL'} {label} smem={smem}{extra}"
    except Exception as e:  # report every failing variant, not only the first
        return False, f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _ptxas_spills(ptx: str) -> tuple[int, int]:
    """(spill store + load bytes, registers) that ptxas reports for sm_90."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    spill = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out))
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", out)), default=-1)
    return spill, regs


def _compile_mixed(name, hidden_dtype, r, flags, d):
    """A kernel of the mixed-adapter op (ops/mixed_edit.py) with the block shapes its launchers take from
    mixed_edit.gpu_launch_config; checked for register spills too."""
    cfg = me.gpu_launch_config(d, r, 16)
    kernel = getattr(me, name)
    h = {"bf16": "*bf16", "fp32": "*fp32"}[hidden_dtype]
    pointers = dict(X=h, DY=h, DX=h, U=h, SAVED=h, POS="*i64", IDS="*i64", OWNER="*i32", L="*fp32", W="*bf16",
                    BIAS="*fp32", PBIAS="*fp32", KINDS="*i32", RANKS="*i32", DROP="*fp32", STATS="*fp32",
                    SCRATCH="*fp32", KEYS="*i32", ORDER="*i64", SORTED_KEYS="*i32", OFFSETS="*i32", G_L="*fp32",
                    G_W="*fp32", G_B="*fp32", G_PB="*fp32", PART="*fp32")
    if "rows" in name:
        block_n, block_d, warps, stages = cfg.rows_block_n, fe._next_pow2(d), cfg.rows_warps, 1
    elif name == "_mixed_fwd_kernel":
        block_n, block_d, warps, stages = cfg.fwd_block_n, cfg.fwd_block_d, cfg.fwd_warps, cfg.fwd_stages
    elif name == "_mixed_bwd_project_kernel":
        block_n, block_d, warps, stages = cfg.bwd_block_n, cfg.step1_block_d, cfg.step1_warps, cfg.bwd_stages
    else:
        block_n, block_d, warps, stages = cfg.bwd_block_n, cfg.bwd_block_d, cfg.bwd_warps, cfg.bwd_stages
    const = dict(R_PAD=fe.r_pad(r), BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_P=cfg.block_p, BLOCK=1024,
                 DOT_PRECISION="ieee" if hidden_dtype == "fp32" else "tf32", **flags)
    const = {k: v for k, v in const.items() if k in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, const),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
    return _compile_source(src, warps, stages, f"{name} {hidden_dtype} r={r} d={d} {flags}", spills=True)


def _compile_orthonormal(name, r, d):
    kernel = getattr(orth, name)
    block_d, cols = orth.launch_blocks(d, True)
    rp = orth.r_pad(r)
    const = dict(COLS=cols, BLOCK_D=block_d, R_PAD=rp)
    pointers = {name: "*fp32" for name in ("A", "B", "PART", "Q", "CINV", "GQ", "GA")}
    src = ASTSource(fn=kernel, signature=_signature(kernel, pointers, const),
                    constexprs={(kernel.arg_names.index(k),): v for k, v in const.items()})
    warps = orth.launch_warps(rp, factorizes=name != "_gram_partial_kernel")
    return _compile_source(src, warps, 3, f"{name} r={r} d={d}")  # 3 stages: Triton's default on a GPU


# the six intervention types: (SOURCE_LINEAR, SUBTRACT_PROJ, HAS_PROJ_BIAS)
KINDS = {
    "loreft": (True, True, False), "noreft": (True, True, True), "consreft": (False, True, False),
    "lobireft": (False, False, False), "direft": (True, False, False),  # orthodireft: direft's flags
}


def jobs():
    kinds = [dict(SOURCE_LINEAR=a, SUBTRACT_PROJ=b, HAS_PROJ_BIAS=c) for a, b, c in KINDS.values()]
    for dt, r, kind in itertools.product(["bf16", "fp32"], [1, 64, 256], kinds):
        yield "_edit_fwd_kernel", dt, r, dict(kind, ACT=3, DROPOUT=True, SAVE_ROWS=True, SAVE_STATS=True)
        yield "_edit_bwd_project_kernel", dt, r, dict(SOURCE_LINEAR=kind["SOURCE_LINEAR"], ACT=3, DROPOUT=True,
                                                      ROW_MAJOR=True)
        for recompute, row_major in [(True, True), (False, False)]:
            yield "_edit_bwd_main_kernel", dt, r, dict(kind, DROPOUT=not recompute, RECOMPUTE=recompute,
                                                       ROW_MAJOR=row_major, WRITE_DX=row_major)
    # the row-resident kernels (r <= 16): whole rows in registers, up to d = 16384
    for dt, r, d, kind in itertools.product(["bf16", "fp32"], [1, 16], [4096, 16384], kinds):
        yield "_edit_fwd_rows_kernel", dt, r, dict(kind, ACT=3, DROPOUT=True, SAVE_ROWS=True, SAVE_STATS=True), d
        yield "_edit_bwd_project_rows_kernel", dt, r, dict(SOURCE_LINEAR=kind["SOURCE_LINEAR"], ACT=3, DROPOUT=True,
                                                           ROW_MAJOR=True), d
    yield "_sum_partials_kernel", "fp32", 4, {}
    # the batched orthonormalization, up to the largest rank it serves
    for name, r, d in itertools.product(["_gram_partial_kernel", "_cholqr_apply_kernel", "_cholqr_grad_kernel"],
                                        [1, 4, 32, orth.MAX_TRITON_RANK], [100, 4096, 16384]):
        yield name, "fp32", r, {}, d


def mixed_jobs():
    """The mixed-adapter kernels at the launchers' GPU blocks: the generic variants (types and activation per
    adapter, dropout, saves; fp32 and bf16) and, in bf16, a specialized one (one activation compiled in, no
    dropout); the tile kernels at r_pad = 16, 32, 64 (d = 4096; r = 1 compiles as r = 16: the bank's rank is a
    runtime argument), the row-resident ones (r <= 16) at d = 4096 and ROWS_MAX_D = 8192."""
    generic = dict(MAY_SP=True, ACT=-1, HAS_WEIGHT=True, HAS_PROJ_BIAS=True, DROPOUT=True)
    special = dict(MAY_SP=True, ACT=0, HAS_WEIGHT=True, HAS_PROJ_BIAS=False, DROPOUT=False)
    for dt, flags in [("bf16", generic), ("fp32", generic), ("bf16", special)]:
        fwd = dict(flags, SAVE_ROWS=True, SAVE_STATS=True)
        step1 = {k: flags[k] for k in ("MAY_SP", "ACT", "HAS_WEIGHT", "DROPOUT")}
        for d in [4096, me.ROWS_MAX_D]:
            for own_mode in [0, 2] if flags is generic else [1]:
                yield "_mixed_fwd_rows_kernel", dt, 16, dict(fwd, OWN_MODE=own_mode, PER_SLOT_IDS=True), d
            yield "_mixed_bwd_project_rows_kernel", dt, 16, dict(step1, OWN_MODE=0, PER_SLOT_IDS=True, ROW_MAJOR=True,
                                                                 WRITE_DX=True), d
        for r in [16, 32, 64]:
            yield "_mixed_fwd_kernel", dt, r, dict(fwd, OWN_MODE=0, PER_SLOT_IDS=True)
            yield "_mixed_bwd_project_kernel", dt, r, dict(step1, OWN_MODE=2, PER_SLOT_IDS=True, ROW_MAJOR=True,
                                                           WRITE_DX=True)
            for recompute in (False, True):
                yield "_mixed_bwd_main_kernel", dt, r, dict(
                    {k: flags[k] for k in ("MAY_SP", "HAS_WEIGHT", "HAS_PROJ_BIAS", "DROPOUT")}, RECOMPUTE=recompute,
                    WRITE_DX=True)
    for r in [16, 64]:
        yield "_mixed_bwd_fixup_kernel", "fp32", r, dict(HAS_WEIGHT=True, HAS_PROJ_BIAS=True)
    yield "_claim_rows_kernel", "fp32", 4, {}


def unique_jobs(which: str = "single"):
    """jobs() (which="single": the single-adapter op and the orthonormalization) or mixed_jobs() (which="mixed")
    without repeats (the backward step 1 only depends on SOURCE_LINEAR among the type flags)."""
    seen, out = set(), []
    for job in (mixed_jobs() if which == "mixed" else jobs()):
        key = repr(job)
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


if __name__ == "__main__":
    # argument: "single" (default) or "mixed" (the mixed-adapter kernels, also checked for register spills)
    with ProcessPoolExecutor(max_workers=int(os.environ.get("COMPILE_WORKERS", "2"))) as pool:
        results = list(pool.map(_compile, unique_jobs(sys.argv[1] if len(sys.argv) > 1 else "single")))
    for _, line in results:
        print(line)
    failed = sum(not ok for ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)

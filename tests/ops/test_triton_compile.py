"""Ahead-of-time compile of the Triton kernels for sm_80 and sm_90, without a GPU.

Each configuration is planned by the launcher itself (``triton_kernels.forward`` / ``backward`` on meta tensors
of a ViT-like shape, with a ``launch=`` that records the launches instead of running them), so tiles, warps,
constexprs and argument values are exactly those a real launch uses. The specialisation (signature, constexprs,
divisibility-16 attributes) is derived the way ``JITFunction.run`` derives it. Checks per compiled kernel:

- compilation succeeds;
- ``ptxas -v`` (the ptxas Triton itself uses for that arch, same flags) reports no spill stores/loads;
- every global load of x (and of the upstream gradient / stores of y and dx) is 16 bytes wide
  (``ld.global.v4.b32`` / ``st.global.v4.b32``): loads are attributed to kernel arguments through the LLVM IR.
  This holds for D = 200 and 1000 too (not multiples of 16): D is a constexpr and the row strides are passed in
  units of the vector width the launcher checked; rows that are not aligned (``row_pad=1``) get narrow accesses.

Also: the launch plan's backward partial buffers stay within 25% of the backward's minimal traffic at B >= 64
with at least 264 programs, and the fixed-order reduction of those partials compiles with 16-byte loads.

Run with ``-s`` to see the register table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from mpvg_kernels.ops import triton_kernels as tk  # noqa: E402

CCS = (80, 90)
DS = (192, 200, 384, 768, 1000, 1280)
DTYPES = (torch.bfloat16, torch.float32)
# (name, kernel, has_pe, pool)
VARIANTS = (
    ("fwd", "fwd", False, False),
    ("fwd+pe", "fwd", True, False),
    ("pool", "fwd", False, True),
    ("pool+pe", "fwd", True, True),
    ("bwd", "bwd", False, False),
    ("bwd+pe", "bwd", True, False),
    ("bwd-pool+pe", "bwd", True, True),
)
B, N = 32, 197  # a ViT-B/16 batch: N = 14 * 14 + 1 tokens
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# --------------------------------------------------------------------------------------------- helpers


def _ptxas_for(cc: int) -> str | None:
    """The ptxas Triton uses for this arch (its bundled one unless TRITON_PTXAS_PATH says otherwise)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(cc).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001  (older/newer Triton layouts)
        pass
    return shutil.which("ptxas")


def _sm_arch(cc: int) -> str:
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        return sm_arch_from_capability(cc)
    except Exception:  # noqa: BLE001
        return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"


def _specialise(launch: tk.Launch, backend) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` would build them."""
    fn = launch.kernel
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*launch.args, **launch.meta)
        options, signature, constexprs, attrs = fn._pack_args(backend, launch.meta, bound, spec, options)
        return signature, constexprs, attrs, options.__dict__
    except (ImportError, AttributeError, TypeError):
        pass
    # Fallback: the JIT's documented rules (pointer -> 16-byte aligned; int % 16 == 0 -> divisibility 16;
    # int == 1 -> constexpr; floats are never specialised).
    names = fn.arg_names
    values = dict(zip(names, launch.args, strict=False))
    values.update({k: v for k, v in launch.meta.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _DT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, int):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return signature, constexprs, attrs, {"num_warps": launch.meta["num_warps"]}


def _launches(launcher, *args) -> list[tk.Launch]:
    """The launches ``launcher(*args)`` (``tk.forward`` or ``tk.backward``) makes, recorded instead of run."""
    launches: list[tk.Launch] = []
    launcher(*args, launch=lambda kernel, grid, a, meta: launches.append(tk.Launch(kernel, grid, a, meta)))
    return launches


def _plan(kind: str, D: int, dtype: torch.dtype, has_pe: bool, pool: bool, n: int = N, row_pad: int = 0) -> tk.Launch:
    """The main kernel launch the launcher makes for x of shape [B, n, D] (rows D + row_pad elements apart)."""
    meta = dict(device="meta")
    x = torch.empty(B, n, D + row_pad, dtype=dtype, **meta)[:, :, :D]
    w = torch.empty(D, dtype=torch.float32, **meta)
    if kind == "fwd":
        pe = torch.empty(n, D, dtype=dtype, **meta) if has_pe else None
        launches = _launches(tk.forward, x, pe, w, w, 1e-6, pool, True)
    else:
        grad = torch.empty((B, D) if pool else (B, n, D), dtype=dtype, **meta)
        stats = torch.empty(2 * B * n, dtype=torch.float32, **meta)
        launches = _launches(tk.backward, grad, x, w, stats, has_pe, pool)
    assert launches and launches[0].kernel is (tk._ln_fwd_kernel if kind == "fwd" else tk._ln_bwd_kernel)
    return launches[0]


def _memory_ops_by_arg(llir: str, arg_names: list[str]) -> dict[str, list[str]]:
    """Map kernel argument name -> PTX global load/store instructions whose address derives from it.

    Reads the LLVM IR Triton emits: memory ops are inline-asm calls (``ld.global.v4.b32 ...``) whose pointer
    operand is a ``getelementptr`` chain rooted at one function argument.
    """
    header = re.search(r"define [^@]*@\w+\((.*?)\)\s*(?:local_unnamed_addr|#|!|\{)", llir)
    assert header, "no kernel definition in the LLVM IR"
    params = re.findall(r"%(\d+)(?=\s*(?:,|$))", header.group(1))
    arg_of = {f"%{p}": arg_names[i] for i, p in enumerate(params) if i < len(arg_names)}
    base: dict[str, str] = {}
    for m in re.finditer(r"(%[\w.]+) = getelementptr [^,]*, ptr addrspace\(1\) (%[\w.]+)", llir):
        base[m.group(1)] = m.group(2)

    def root(v: str) -> str | None:
        seen = 0
        while v in base and seen < 64:
            v, seen = base[v], seen + 1
        return arg_of.get(v)

    out: dict[str, list[str]] = {}
    for line in llir.splitlines():
        if "asm" not in line or not re.search(r"(ld|st)\.global", line):
            continue
        op = re.search(r"((?:ld|st)\.global[\w.]*)", line).group(1)
        for ptr in re.findall(r"ptr addrspace\(1\) (%[\w.]+)", line):
            name = root(ptr)
            if name is not None:
                out.setdefault(name, []).append(op)
    return out


@dataclass
class Compiled:
    name: str
    cc: int
    D: int
    dtype: torch.dtype
    cfg: tk.KernelConfig
    registers: int
    spill_stores: int
    spill_loads: int
    mem_ops: dict[str, list[str]]
    ptxas_log: str
    ptx: str = ""


def _compile(
    name: str, kind: str, D: int, dtype: torch.dtype, has_pe: bool, pool: bool, cc: int, ptxas: str, row_pad: int = 0
):
    launch = _plan(kind, D, dtype, has_pe, pool, row_pad=row_pad)
    return _compile_launch(name, kind, D, dtype, launch, cc, ptxas)


def _compile_launch(name: str, kind: str, D: int, dtype: torch.dtype, launch: tk.Launch, cc: int, ptxas: str):
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialise(launch, backend)
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=target, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(kernel.asm["ptx"])
        # The flags Triton's make_cubin passes (minus debug info), so the numbers match the real cubin.
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={_sm_arch(cc)}", ptx_path]
        cmd += ["-o", os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"ptxas failed for {name} D={D} {dtype} sm_{cc}:\n{log}"
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spills, f"unexpected ptxas -v output:\n{log}"
    arg_names = [n for n, ty in signature.items() if ty != "constexpr"]
    cfg = tk.forward_config(D, dtype) if kind == "fwd" else tk.backward_config(D, dtype)
    return Compiled(
        name, cc, D, dtype, cfg, int(regs.group(1)), int(spills.group(1)), int(spills.group(2)),
        _memory_ops_by_arg(kernel.asm["llir"], arg_names), log, kernel.asm["ptx"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def ptxas() -> dict[int, str]:
    found = {cc: _ptxas_for(cc) for cc in CCS}
    missing = [cc for cc, p in found.items() if p is None]
    if missing:
        pytest.skip(reason=f"no ptxas found for sm_{missing} (neither Triton's bundled one nor one on PATH)")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="module")
def compiled(ptxas) -> dict[tuple, Compiled]:
    results: dict[tuple, Compiled] = {}
    for cc in CCS:
        for dtype in DTYPES:
            for D in DS:
                for name, kind, has_pe, pool in VARIANTS:
                    results[(name, cc, D, dtype)] = _compile(name, kind, D, dtype, has_pe, pool, cc, ptxas[cc])
    lines = [
        "",
        f"{'kernel':<12} {'arch':<6} {'dtype':<5} {'D':>5} {'BLOCK_D':>7} {'ROWS':>4} {'warps':>5} "
        f"{'regs':>4} {'spill st/ld':>11}",
    ]
    for r in results.values():
        lines.append(
            f"{r.name:<12} sm_{r.cc:<3} {_DT[r.dtype]:<5} {r.D:>5} {r.cfg.block_d:>7} {r.cfg.rows:>4} "
            f"{r.cfg.num_warps:>5} {r.registers:>4} {r.spill_stores:>5}/{r.spill_loads:<5}"
        )
    print("\n".join(lines))
    return results


ALL_KEYS = [(name, cc, D, dt) for cc in CCS for dt in DTYPES for D in DS for name, *_ in VARIANTS]


def _id(key) -> str:
    name, cc, D, dt = key
    return f"{name}-sm{cc}-{_DT[dt]}-D{D}"


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("key", ALL_KEYS, ids=_id)
def test_compiles_without_spills(compiled, key):
    r = compiled[key]
    assert r.spill_stores == 0 and r.spill_loads == 0, f"{_id(key)} spills registers:\n{r.ptxas_log}"
    assert 0 < r.registers <= 255


@pytest.mark.parametrize("key", ALL_KEYS, ids=_id)
def test_x_loads_are_16_bytes(compiled, key):
    r = compiled[key]
    name = key[0]
    checked = {"X": "ld.global"}
    if name in ("fwd", "fwd+pe"):
        checked["Y"] = "st.global"
    if name.startswith("bwd"):
        checked["DX"] = "st.global"
        if "pool" not in name:
            checked["G"] = "ld.global"
    for arg, kind in checked.items():
        ops = [op for op in r.mem_ops.get(arg, []) if op.startswith(kind)]
        assert ops, f"{_id(key)}: found no {kind} of {arg} in the LLVM IR (parser out of date?): {r.mem_ops}"
        narrow = [op for op in ops if ".v4." not in op]
        assert not narrow, f"{_id(key)}: {arg} accesses are not all 16 bytes wide: {ops}"


def test_heuristics_are_pure_and_bounded():
    """The launch heuristics depend on (D, dtype) only and stay within hardware limits for any D."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for D in (1, 3, 5, 192, 200, 768, 1000, 1280, 4096, 8192, tk.MAX_D):
            for cfg in (tk.forward_config(D, dtype), tk.backward_config(D, dtype)):
                assert cfg.block_d >= D and cfg.block_d & (cfg.block_d - 1) == 0
                assert 1 <= cfg.num_warps <= 32 and cfg.num_warps & (cfg.num_warps - 1) == 0
                assert cfg.rows >= 1 and cfg.rows & (cfg.rows - 1) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
@pytest.mark.parametrize("variant", ["fwd+pe", "pool+pe", "bwd+pe"])
def test_other_dtypes_compile(ptxas, dtype, variant):
    """float16 x compiles for sm_90 without spills and with 16-byte x loads; float64 x (fp64 statistics) compiles.

    float64 is not held to the no-spill rule: its correctly rounded divide and sqrt are SASS subroutine calls,
    around which ptxas spills a few bytes. float64 exists for checks, not speed.
    """
    name, kind, has_pe, pool = next(v for v in VARIANTS if v[0] == variant)
    r = _compile(name, kind, 768, dtype, has_pe, pool, 90, ptxas[90])
    print(
        f"{name:<12} sm_90 {str(dtype).split('.')[-1]:<7} D=768 {r.cfg} regs={r.registers} "
        f"spill st/ld={r.spill_stores}/{r.spill_loads}"
    )
    ops = r.mem_ops.get("X", [])
    assert ops, r.mem_ops
    if dtype == torch.float16:
        assert r.spill_stores == 0 and r.spill_loads == 0, r.ptxas_log
        assert all(".v4." in op for op in ops), ops


def test_unaligned_rows_are_detected_as_narrow(ptxas):
    """Control for the width check, and the safe path: x rows 201 elements apart (a slice of a wider tensor) are
    not 16-byte aligned, so the launcher picks VEC = 1 and the x loads must be narrow; the parser must see that.
    The output y is contiguous with D = 200, so its stores stay 16 bytes wide."""
    launch = _plan("fwd", 200, torch.bfloat16, False, False, row_pad=1)
    assert launch.meta["VEC"] == 1
    r = _compile_launch("fwd", "fwd", 200, torch.bfloat16, launch, 90, ptxas[90])
    ops = r.mem_ops.get("X", [])
    assert ops and all(".v4." not in op for op in ops), ops
    assert r.mem_ops.get("Y") and all(".v4." in op for op in r.mem_ops["Y"]), r.mem_ops
    assert r.spill_stores == 0 and r.spill_loads == 0


@pytest.mark.parametrize("D", [1000, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
def test_vector_width_of_vit_widths(D, dtype):
    """D = 1000 and 200 (not multiples of 16) plan 16-byte vectors for contiguous x, narrower for odd strides."""
    full = 16 // torch.empty((), dtype=dtype).element_size()
    assert _plan("fwd", D, dtype, True, False).meta["VEC"] == full
    assert _plan("bwd", D, dtype, True, False).meta["VEC"] == full
    assert _plan("fwd", D, dtype, True, False, row_pad=2).meta["VEC"] == 2
    assert _plan("fwd", D, dtype, True, False, row_pad=1).meta["VEC"] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("D", [192, 384, 768, 1024, 1280])
@pytest.mark.parametrize("batch", [64, 128, 256])
def test_backward_partials_are_small(batch, D, dtype):
    """The backward's partial buffers (written and read back) cost <= 25% of its minimal traffic at B >= 64, with at
    least 264 programs (two waves of a 132-SM GPU), for ViT shapes (N = 197)."""
    ratio, programs = tk.partial_traffic_ratio(batch, 197, D, dtype)
    assert programs >= 264, programs
    assert ratio <= 0.25, ratio


def test_backward_partial_plan_is_a_function_of_the_shape():
    """Split counts come from the shape alone (not the device): two plans of one shape are identical."""
    a = _plan("bwd", 768, torch.bfloat16, True, False)
    tk._BWD_PLANS.clear()  # planned afresh, not the cached plan
    b = _plan("bwd", 768, torch.bfloat16, True, False)
    assert a.grid == b.grid and a.meta == b.meta
    assert [v for v in a.args if not isinstance(v, torch.Tensor)] == [
        v for v in b.args if not isinstance(v, torch.Tensor)
    ]


def test_partials_finish_compiles(ptxas):
    """The fixed-order reduction of the backward's partials compiles for sm_90 with 16-byte partial loads."""
    meta = dict(device="meta")
    x = torch.empty(B, N, 1000, dtype=torch.bfloat16, **meta)
    w = torch.empty(1000, **meta)
    stats = torch.empty(2 * B * N, **meta)
    finish = _launches(tk.backward, torch.empty_like(x), x, w, stats, True, False)[1]
    assert finish.kernel is tk._sum_partials_kernel
    r = _compile_launch("finish", "fwd", 1000, torch.float32, finish, 90, ptxas[90])
    assert r.spill_stores == 0 and r.spill_loads == 0
    # The partial pointers are loop-carried (no getelementptr chain to an argument): read the PTX directly.
    loads = re.findall(r"ld\.global[\w.]*", r.ptx)
    assert loads and all(".v4." in op for op in loads), sorted(set(loads))


@pytest.mark.parametrize("pool", [False, True])
def test_unit_arguments_compile(ptxas, pool):
    """Triton turns integer arguments equal to 1 into constants: B = 1 (one batch element per backward program,
    one dpe partial) and N = 1 (one token tile, 1 / N from a constant) must compile as well as the general case."""
    meta = dict(device="meta")
    for b, n in ((1, 197), (B, 1)):
        x = torch.empty(b, n, 1000, dtype=torch.bfloat16, **meta)
        w = torch.empty(1000, **meta)
        stats = torch.empty(2 * b * n, **meta)
        grad = torch.empty((b, 1000) if pool else (b, n, 1000), dtype=torch.bfloat16, **meta)
        fwd = _launches(tk.forward, x, torch.empty(n, 1000, dtype=torch.bfloat16, **meta), w, w, 1e-6, pool, True)
        bwd = _launches(tk.backward, grad, x, w, stats, True, pool)
        assert len(bwd) == 2
        for name, launch in (("fwd", fwd[0]), ("bwd", bwd[0]), ("finish", bwd[1])):
            r = _compile_launch(name, "fwd", 1000, torch.bfloat16, launch, 90, ptxas[90])
            assert r.registers > 0 and r.spill_stores == 0, (b, n, name, r.ptxas_log)

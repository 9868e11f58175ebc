"""Every Triton kernel of the package, lowered by Triton's own compiler to an sm_90 (Hopper) cubin on the CPU,
for each autotuning config and the constants its launches use. The interpreter (test_triton_kernels.py) runs
the arithmetic but none of the lowering, so a kernel that only fails on a GPU (an unsupported op, a layout,
shared memory past the limit) fails here instead of in a device session."""

from __future__ import annotations

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget

from mistral7b import batch_invariant, flash_decode, lora_kernels, lora_triton
from mistral7b.quant import triton_mm

HOPPER = GPUTarget("cuda", 90, 32)
BF16_IO = {"x_ptr": "*bf16", "out_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*bf16"}
FLOATS = {"scale": "fp32", "eps": "fp32"}  # scalar arguments that are not i32


def compile_all(kernel, pointers: dict[str, str], constants: dict, warps: int = 4) -> dict[str, str]:
    """kernel (a JITFunction, or an Autotuner: each of its configs) -> {config: ptx}."""
    configs = [(c.kwargs, c.num_warps) for c in kernel.configs] if hasattr(kernel, "configs") else [({}, warps)]
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # a JITFunction's own .fn is the Python function
    ptx = {}
    for meta, num_warps in configs:
        fixed = {name: value for name, value in {**constants, **meta}.items() if name in fn.arg_names}
        missing = [p.name for p in fn.params if p.is_constexpr and p.name not in fixed]
        assert not missing, f"{fn.__name__}: no value for constexpr {missing}"
        signature = {name: "constexpr" if name in fixed else pointers.get(name) or FLOATS.get(name, "i32")
                     for name in fn.arg_names}
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=fixed)
        compiled = triton.compile(source, target=HOPPER, options={"num_warps": num_warps})
        assert compiled.asm["cubin"], (fn.__name__, meta)
        ptx[str(meta)] = compiled.asm["ptx"]
    return ptx


LORA_POINTERS = {**BF16_IO, "a_ptr": "*bf16", "bt_ptr": "*bf16", "index_ptr": "*i64", "xa_ptr": "*fp32",
                 "sync_ptr": "*i32"}
LORA_CONSTANTS = {"K_SPLIT": lora_triton.K_SPLIT, "PR_POW2": 64, "BACKOFF": True}


def lora_cases():
    return [(f"lora {name}", lambda name=name: getattr(lora_kernels, name), LORA_POINTERS, LORA_CONSTANTS)
            for name in ("shrink", "expand", "fused")]


def quant_cases():
    int8 = {**BF16_IO, "q_ptr": "*i8", "scale_ptr": "*bf16"}
    int4 = {**BF16_IO, "w_ptr": "*u8", "sz_ptr": "*bf16"}
    cases = []
    for rows in (1, 16, 64):
        one_row = rows == 1
        tf32 = {"ROWS": rows, "PRECISION": "tf32"}
        cases.append((f"int8 rows {rows}", lambda one_row=one_row: triton_mm._int8_kernel(one_row), int8, tf32))
        cases.append((f"int4 rows {rows}", lambda one_row=one_row: triton_mm._int4_kernel(one_row), int4,
                      {**tf32, "GROUP": 128}))
    cases.append(("int4 one row, whole groups", triton_mm._int4_row_kernel, int4,
                  {"ROWS": 1, "PRECISION": "tf32", "GROUP": 128}))
    return cases


def attention_and_invariant_cases():
    partial = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "qpos_ptr": "*i64", "kpos_ptr": "*i64",
               "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
    decode = {"KV_HEADS": 8, "GROUP": 4, "GROUP_ROWS": flash_decode.MIN_GROUP_ROWS, "HEAD_DIM": 128,
              "BLOCK": flash_decode.BLOCK_N, "PRECISION": "tf32"}
    merge = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16"}
    block_m, block_n, block_k, _, _ = batch_invariant.TILES[torch.bfloat16]
    return [
        ("flash_decode partials", flash_decode._partial_kernel, partial, {**decode, "BY_POSITION": False}),
        ("flash_decode partials by position", flash_decode._partial_kernel, partial, {**decode, "BY_POSITION": True}),
        ("flash_decode merge", flash_decode._merge_kernel, merge, {"SPLITS_POW2": 64, "HEAD_DIM": 128}),
        ("flash_decode ordered merge", flash_decode._ordered_merge_kernel, merge, {"HEAD_DIM": 128}),
        ("invariant mm", batch_invariant._mm_kernel, BF16_IO,
         {"PRECISION": "tf32", "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}),
        ("invariant rms_norm", batch_invariant._rms_kernel, BF16_IO, {"BLOCK": 4096}),
    ]


CASES = lora_cases() + quant_cases() + attention_and_invariant_cases()


@pytest.mark.parametrize("name, factory, pointers, constants", CASES, ids=[case[0] for case in CASES])
def test_kernel_compiles_for_hopper(name, factory, pointers, constants):
    ptx = compile_all(factory(), pointers, constants)
    assert ptx and all(".target sm_90" in text for text in ptx.values()), name


def test_lora_fused_handoff_survives_lowering():
    """The fused LoRA kernel's shrink-to-expand handoff in the PTX: a gpu-scope release after the shrink,
    acquire loads in the wait, volatile loads of the partial sums, the counters reset by exchange."""
    ptx = "\n".join(compile_all(lora_kernels.fused, LORA_POINTERS, LORA_CONSTANTS).values())
    needles = ("red.global.gpu.release.add", "ld.global.gpu.acquire", "nanosleep.u32", "ld.volatile",
               "atom.global.gpu.acq_rel.exch")
    assert all(needle in ptx for needle in needles), [needle for needle in needles if needle not in ptx]

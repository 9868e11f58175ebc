"""Decode attention kernels at the 7B shape on a GPU: which one compiled decode should use.

One query token per row, 32 query heads over 8 KV heads, head dim 128, bf16, a rolling buffer of S
slots (full, in slot order p % S). Each candidate is compiled on its own and replayed as one CUDA graph
of 32 calls (a layer each, with its own K/V, so nothing is served from L2); the table gives the time
per call, the K/V bandwidth it reaches, and its error against a float32 dense reference.

- sdpa: `attention.grouped_attention`, grouped SDPA (the default today);
- reduction: `attention.reduction_decode_attention`, sums over the key axis that inductor splits;
- flex: FlexAttention (its decoding kernel for short queries), the block mask built outside the graph
  (a forward builds it once for all layers), so this is its best case.

    python benchmarks/decode_attention.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from mistral7b.attention import grouped_attention, reduction_decode_attention, sdpa_attention, visible
from mistral7b.flash_decode import flash_decode

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128


def case(batch: int, slots: int, device):
    position = 3 * slots  # long past the window: every slot is full and the buffer has wrapped
    held = torch.arange(position - slots + 1, position + 1, device=device)
    k_pos = torch.empty_like(held)
    k_pos[held % slots] = held  # slot order p % S
    k_pos = k_pos.expand(batch, slots).contiguous()
    q_pos = torch.full((batch, 1), position, device=device)
    q = [torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]
    kv = [(torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device=device, dtype=torch.bfloat16),
           torch.randn(batch, KV_HEADS, slots, HEAD_DIM, device=device, dtype=torch.bfloat16)) for _ in range(LAYERS)]
    return q, kv, q_pos, k_pos


def flex_kernel(q_pos, k_pos, window):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        distance = q_pos[b, q_idx] - k_pos[b, kv_idx]
        return (k_pos[b, kv_idx] >= 0) & (distance >= 0) & (distance < window)

    block_mask = create_block_mask(mask_mod, q_pos.shape[0], None, 1, k_pos.shape[1], device=q_pos.device)
    flex = torch.compile(flex_attention, fullgraph=True)
    return lambda q, k, v, qp, kp, w: flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def time_graph(fn, q, kv, q_pos, k_pos, window) -> float:
    """Microseconds per call: 32 calls captured in one CUDA graph, best of 5 replays."""
    outs = [fn(q[i], *kv[i], q_pos, k_pos, window) for i in range(LAYERS)]  # compile, autotune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(q[i], *kv[i], q_pos, k_pos, window) for i in range(LAYERS)]
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / LAYERS)
    del outs
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--slots", default="256,1024,4096")
    p.add_argument("--json", type=argparse.FileType("w"))
    args = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for batch in map(int, args.batches.split(",")):
        for slots in map(int, args.slots.split(",")):
            q, kv, q_pos, k_pos = case(batch, slots, device)
            window = slots
            want = sdpa_attention(q[0].float(), kv[0][0].float(), kv[0][1].float(), q_pos, k_pos, window)
            assert visible(q_pos, k_pos, window).all()
            kernels = {"flash": flash_decode,
                       "sdpa": torch.compile(grouped_attention, fullgraph=True),
                       "reduction": torch.compile(reduction_decode_attention, fullgraph=True),
                       "flex": flex_kernel(q_pos, k_pos, window)}
            kv_bytes = 2 * batch * KV_HEADS * slots * HEAD_DIM * 2
            for name, fn in kernels.items():
                try:
                    err = ((fn(q[0], *kv[0], q_pos, k_pos, window).float() - want).norm() / want.norm()).item()
                    us = time_graph(fn, q, kv, q_pos, k_pos, window)
                    row = {"batch": batch, "slots": slots, "kernel": name, "us": us, "gb_s": kv_bytes / us / 1e3,
                           "rel_err": err}
                except Exception as e:  # one kernel's failure must not lose the others' figures
                    row = {"batch": batch, "slots": slots, "kernel": name, "error": f"{type(e).__name__}: {e}"[:200]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del q, kv
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print("| batch | slots | kernel | µs per layer | K/V GB/s | rel. err vs fp32 |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['slots']} | {r['kernel']} | {r['error']} | | |")
        else:
            print(f"| {r['batch']} | {r['slots']} | {r['kernel']} | {r['us']:.1f} | {r['gb_s']:.0f} | {r['rel_err']:.1e} |")
    if args.json:
        json.dump(rows, args.json, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

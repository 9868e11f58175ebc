"""The tables of `mistral7b bench`: ours against the peers, and decode against the weight-read limit."""

from __future__ import annotations

import time

import torch


def copy_bandwidth(device, mib: int | None = None, repeats: int = 5) -> float:
    """The device's memory copy bandwidth in bytes/s, bytes read plus bytes written (STREAM's convention,
    as the H200's 4.3 TB/s was measured), best of `repeats` copies of a `mib` MiB buffer (far past any cache)."""
    device = torch.device(device)
    mib = mib or (1024 if device.type == "cuda" else 256)
    src = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dst.copy_(src)  # first touch and warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def print_table(results, args):
    ours, hf, hfc = results["ours"], results["hf"], results["hf_compiled"]
    rows = [(f"decode b1 (prompt {args.prompt_len}, {args.new_tokens} new)", "decode_b1_tok_s"),
            ("decode b1, after the first token", "decode_b1_decode_only_tok_s"),
            (f"decode b{args.batch}", f"decode_b{args.batch}_tok_s")]
    for n in [int(x) for x in args.prefill.split(",") if x]:
        rows.append((f"prefill {n}, window", f"prefill_{n}_tok_s"))
        rows.append((f"prefill {n}, window, one pass", f"prefill_{n}_window_one_pass_tok_s"))
        rows.append((f"prefill {n}, full attention", f"prefill_{n}_full_attention_tok_s"))
    rows += [("decode at 1024 context", "decode_at_1024_tok_s"), (f"decode at {args.context} context", f"decode_at_{args.context}_tok_s")]
    fmt = lambda v: "-" if v is None else (f"{v:,.1f}" if v < 1000 else f"{v:,.0f}")  # noqa: E731
    print(f"\n{results['device']} | torch {results['torch']} | transformers {results['transformers']} | {results['date']}")
    print("| tok/s | ours | HF default | HF static+compile | best peer | ours / best peer |\n|---|---|---|---|---|---|")
    gpt_fast = results.get("peers", {}).get("gpt-fast", {})
    for label, key in rows:
        a, b, c = ours.get(key), hf.get(key), hfc.get(key)
        # gpt-fast is timed both ways too, so each figure meets its like
        g = {"decode_b1_tok_s": gpt_fast.get("tok_s_with_prefill"),
             "decode_b1_decode_only_tok_s": gpt_fast.get("tok_s_decode_only")}.get(key)
        peers = [(x, n) for x, n in ((b, "HF default"), (c, "HF compiled"), (g, "gpt-fast")) if x is not None]
        best, name = max(peers, default=(None, None))
        ratio = f"{a / best:.2f}x" if a is not None and best else "-"
        print(f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(best) + ' ' + name if best else '-'} | {ratio} |")
    if "error" in gpt_fast:
        print(f"gpt-fast: {gpt_fast['error']}")
    for key in ("context_ratio", "decode_b1_peak_gib", f"decode_b{args.batch}_peak_gib", "long_context_tokens",
                "long_context_seconds", "long_context_prefill_seconds", "long_context_cache_gib", "long_context_peak_gib",
                "long_context_above_weights_gib", "weights_gib"):
        if key in ours:
            print(f"{key}: {ours[key] if not isinstance(ours[key], float) else round(ours[key], 3)}")


def limits(results: dict, args) -> dict:
    """Decode after the first token against the weight-read limit, ours and gpt-fast's (batch 1 only)."""
    given = getattr(args, "bandwidth_tb_s", None)
    # measured on the card that ran, not a figure of another card: an H100 copies at ~3/4 of an H200's rate
    bandwidth = given * 1e12 if given else copy_bandwidth(args.device)
    weight_bytes = results["weights"]["bytes"]
    out = {"bandwidth_bytes_per_s": bandwidth, "bandwidth_from": "--bandwidth-tb-s" if given else "measured copy",
           "weight_bytes": weight_bytes, "weights": results["weights"]["format"]}
    if "tensor_parallel_size" in results["weights"]:  # each GPU reads its shard: the limit is per GPU's bytes
        out["tensor_parallel_size"] = results["weights"]["tensor_parallel_size"]
    gpt_fast = results.get("peers", {}).get("gpt-fast", {})
    for batch in sorted({1, args.batch}):
        limit = batch * bandwidth / weight_bytes
        ours = results["ours"].get(f"decode_b{batch}_decode_only_tok_s")
        out[f"b{batch}"] = {"limit_tok_s": limit, "ours_tok_s": ours,
                            "gpt_fast_tok_s": gpt_fast.get("tok_s_decode_only") if batch == 1 else None,
                            "ours_over_limit": ours / limit if ours is not None else None}
    return out


def print_limit_table(results: dict, args) -> None:
    limit = results["limit"]
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    tp = limit.get("tensor_parallel_size")
    shard = f", {tp} GPUs, rank 0's shard" if tp else ""
    print(f"\ndecode after the first token, {limit['weights']} weights ({limit['weight_bytes'] / 1e9:.3f} GB{shard}), "
          f"limit = batch x {limit['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s ({limit['bandwidth_from']}) / weight bytes")
    print("| tok/s | ours | gpt-fast | limit | ours / limit |\n|---|---|---|---|---|")
    for batch in sorted({1, args.batch}):
        row = limit[f"b{batch}"]
        ratio = "-" if row["ours_over_limit"] is None else f"{row['ours_over_limit']:.2f}"
        print(f"| decode b{batch} | {fmt(row['ours_tok_s'])} | {fmt(row['gpt_fast_tok_s'])} | {fmt(row['limit_tok_s'])} "
              f"| {ratio} |")

"""`mistral7b memory`: KV cache bytes and attention FLOPs of a config, as the paper counts them."""

from __future__ import annotations

import argparse
import dataclasses

from ..quant.config import DEFAULT_GROUP_SIZE

from .common import CLIError, add_quantize_options, positive_int, print_json, quantize_of, window_size

NAME = "memory"
HELP = "KV cache and attention FLOP calculator for any config"
DESCRIPTION = ("KV cache bytes (MHA, GQA, GQA + rolling buffer), attention FLOPs (full vs sliding window) and the "
               "receptive field, for a preset, a checkpoint's config (--model), or explicit sizes (which override "
               "either).")
DEFAULT_SEQ_LENS = [4096, 8192, 32768, 131072]
MEMORY_EPILOG = """\
formulas:
  KV cache   = 2 (K,V) x n_layers x n_kv_heads x head_dim x bytes x tokens x batch
               MHA uses n_kv_heads = n_heads; the rolling buffer keeps min(tokens, W) positions per layer
  attention  = 4 x n_layers x n_heads x head_dim x pairs x batch   (QK^T and PV, 2 FLOPs per multiply-add)
               pairs = sum over queries i < n of the keys it sees:
               full causal: sum min(i+1, n) = n(n+1)/2;  sliding window: sum min(i+1, W)
  receptive field = n_layers x W  (information moves up to W tokens per layer)
"""
EPILOG = MEMORY_EPILOG
COMMON = dict(model=True, model_default_help="use --preset")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="mistral-7b-v0.1", help="base config (mistral-7b-v0.1, -v0.2, -v0.3)")
    for flag, help_ in (("--dim", "model width"), ("--n-layers", "layers"), ("--n-heads", "query heads"),
                        ("--n-kv-heads", "key/value heads"), ("--head-dim", "head size (None: dim / n_heads when --dim is given)"),
                        ("--hidden-dim", "SwiGLU hidden size"), ("--vocab-size", "vocabulary size")):
        p.add_argument(flag, type=positive_int, default=None, help=f"{help_} (None: from the base config)")
    p.add_argument("--window", type=window_size, default=None,
                   help="sliding window W, or 'none' for full attention (None: from the base config)")
    p.add_argument("--seq-len", type=positive_int, nargs="+", default=DEFAULT_SEQ_LENS, metavar="N",
                   help="sequence length(s)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences")
    p.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per cached element (2 = bf16/fp16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_quantize_options(p)  # the weights' bytes in that format (embeddings and norms in --dtype-bytes)


def memory_config(args):
    from ..config import preset
    from ..loading import open_checkpoint

    if args.model is not None:
        base = open_checkpoint(args.model).config
    else:
        base = preset(args.preset)
    overrides = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "hidden_dim": args.hidden_dim, "vocab_size": args.vocab_size,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    if args.window is not None:
        changes["sliding_window"] = None if args.window == "none" else args.window
    if args.dim is not None and args.head_dim is None:  # a new width: heads keep dim / n_heads
        changes["head_dim"] = args.dim // changes.get("n_heads", base.n_heads)
    if changes:
        changes["name"] = f"{base.name} (modified)"
    return base.with_(**changes) if changes else base


def run(args) -> int:
    from .. import memory

    config = memory_config(args)
    quant = quantize_of(args)
    if quant is not None and quant.dense:
        raise CLIError("--quantize none has no meaning here: the bf16 weights are always shown")
    if quant is not None and quant.method == "int4" and quant.group_size is None:  # no source, so no grid
        quant = dataclasses.replace(quant, group_size=DEFAULT_GROUP_SIZE)
    report = memory.report(config, args.seq_len, args.batch, args.dtype_bytes, quant=quant)
    if args.json:
        print_json(report)
        return 0
    print("\n".join(_table(config, report, args) + _summary(config, report)))
    return 0


def _table(c, report, args) -> list[str]:
    """The KV cache and FLOP rows, one column per sequence length."""
    from ..memory import format_bytes as fb
    from ..memory import format_count as fc

    windows = report["windows"]
    w_text = "no window" if not windows else "window " + "/".join(map(str, windows))
    out = [f"{c.name}: {c.n_layers} layers, {c.n_heads} query heads / {c.n_kv_heads} KV heads x {c.head_dim}, "
           f"{w_text}; {args.dtype_bytes} bytes per element, batch {args.batch}", ""]
    rows = report["seq_lens"]
    width = max(15, *(len(f"{r['seq_len']}") + 2 for r in rows))  # fits "281.48 TFLOP"
    head = f"{'KV cache':34}{'per token':>12}" + "".join(f"{r['seq_len']:>{width}}" for r in rows)
    out.append(head)
    per_token = report["kv_bytes_per_token"]

    def line(label, first, values):
        return f"{label:34}{first:>12}" + "".join(f"{v:>{width}}" for v in values)

    out.append(line(f"  MHA ({c.n_heads} KV heads)", fb(per_token["mha"]), [fb(r["kv_cache_bytes"]["mha"]) for r in rows]))
    out.append(line(f"  GQA ({c.n_kv_heads} KV heads)", fb(per_token["gqa"]), [fb(r["kv_cache_bytes"]["gqa"]) for r in rows]))
    if windows:
        out.append(line(f"  GQA + rolling buffer (W={'/'.join(map(str, windows))})", "-",
                        [fb(r["kv_cache_bytes"]["gqa_rolling"]) for r in rows]))
        out.append(line("  rolling buffer saves", "", [f"{r['rolling_saving']:.3g}x" for r in rows]))
    out.append("")
    out.append(f"{'attention FLOPs, prefill':34}{'':>12}" + "".join(f"{r['seq_len']:>{width}}" for r in rows))
    out.append(line("  full causal attention", "", [fc(r["attention_flops"]["full"]) + "FLOP" for r in rows]))
    if windows:
        out.append(line(f"  sliding {w_text}", "", [fc(r["attention_flops"]["window"]) + "FLOP" for r in rows]))
        out.append(line("  full / window", "", [f"{r['attention_flops_ratio']:.3g}x" for r in rows]))
    out.append(line("  weights' matmuls (2 x params)", "", [fc(r["linear_flops"]) + "FLOP" for r in rows]))
    out.append(f"{'attention FLOPs, last decode step':34}{'':>12}" + "".join(f"{r['seq_len']:>{width}}" for r in rows))
    out.append(line("  full causal attention", "", [fc(r["decode_attention_flops_at_end"]["full"]) + "FLOP" for r in rows]))
    if windows:
        out.append(line(f"  sliding {w_text}", "", [fc(r["decode_attention_flops_at_end"]["window"]) + "FLOP"
                                                      for r in rows]))
    out.append("")
    return out


def _summary(c, report) -> list[str]:
    from ..memory import format_bytes as fb
    from ..memory import format_count as fc

    windows, out = report["windows"], []
    rf = report["receptive_field"]
    if rf:
        desc = f"{c.n_layers} layers x {windows[0]}" if len(windows) == 1 else "sum of the layers' windows"
        out.append(f"receptive field: {desc} = {rf} tokens")
    else:
        out.append("receptive field: the whole sequence (full attention)")
    p = report["params"]
    out.append(f"parameters: {c.n_params:,} ({fc(c.n_params)}): feed-forward {fc(p['feed_forward'])}, "
               f"attention {fc(p['attention'])}, embeddings {fc(p['embeddings'])}; "
               f"weights {fb(report['weight_bytes']['bfloat16'])} ({report['weight_bytes']['bfloat16'] / 1e9:.2f} GB) in bf16")
    q = report.get("quantized_weight_bytes")
    if q:
        out.append(f"weights {q['format']}: {fb(q['total'])} ({q['total'] / 1e9:.2f} GB): linears {fb(q['linears'])}, "
                   f"head {fb(q['head'])}, embeddings {fb(q['embeddings'])}, norms {fb(q['norms'])}")
    out.append("")
    out.append(MEMORY_EPILOG.rstrip())
    return out

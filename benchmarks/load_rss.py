"""Peak resident memory while loading a large random checkpoint to the CPU.

Writes a random checkpoint (HF safetensors and Mistral consolidated.safetensors) of about `--params` parameters in
fp16, then loads each with `load_model(..., dtype=float16)` in a fresh process and reports
(peak RSS - RSS before loading) / bytes of the loaded weights. A loader that held two full copies
would show a ratio near 2.

    python benchmarks/load_rss.py --params 1.0e9
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
import mistral7b

def status(field):  # kB figures from /proc: VmRSS now, VmHWM the peak since the process started
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
t0 = time.perf_counter()
model = mistral7b.load_model(sys.argv[1], device="cpu", dtype=torch.float16)
seconds = time.perf_counter() - t0
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "weights": weights, "seconds": seconds}))
"""


def write_checkpoints(folder: Path, params: float) -> dict[str, Path]:
    import torch

    from mistral7b.config import ModelConfig
    from mistral7b.loading.hf import save as save_hf
    from mistral7b.loading.mistral import save as save_mistral
    from mistral7b.model import Transformer

    base = ModelConfig(dim=2048, n_layers=1, head_dim=128, hidden_dim=5632, n_heads=16, n_kv_heads=4,
                       vocab_size=32000, sliding_window=4096, name="rss")
    per_layer = base.with_(n_layers=2).n_params - base.n_params
    config = base.with_(n_layers=max(2, round((params - base.n_params) / per_layer) + 1))
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    paths = {"hf safetensors": save_hf(model, folder / "hf"), "mistral consolidated": save_mistral(model, folder / "mistral")}
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.0e9)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = write_checkpoints(Path(tmp), args.params)  # the writer's model is gone once this returns
        print(f"wrote checkpoints in {time.perf_counter() - t0:.1f} s", flush=True)
        for name, path in paths.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["ratio"] = (r["peak"] - r["before"]) / r["weights"]
            results[name] = r
    print("| format | weights | RSS before | peak RSS | (peak - before) / weights | load s |\n|---|---|---|---|---|---|")
    gib = 2**30
    for name, r in results.items():
        print(f"| {name} | {r['weights'] / gib:.2f} GiB | {r['before'] / gib:.2f} GiB | {r['peak'] / gib:.2f} GiB "
              f"| {r['ratio']:.2f} | {r['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

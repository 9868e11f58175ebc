"""`mistral7b bench --plot`: decode tok/s against batch size and against context length, as a PNG.

`series` reads the figures out of bench's results dict (the JSON's structure); `draw` writes them with
matplotlib, imported only there (the `plot` extra), so that bench without --plot never loads it.

The batch panel plots tok/s over whole requests, the --prompt-len prefill included: the one measure
every engine has (HF's figures are only timed that way; ours and gpt-fast's after the first token
are in the JSON and the tables). The context panel plots ours after the first token, the context
section's only measure.
"""

from __future__ import annotations

import re
from pathlib import Path

INSTALL_HINT = "--plot needs matplotlib: pip install matplotlib (or pip install 'mistral7b[plot]')"
# The panels in drawing order: (key in series(), x-axis label, title)
PANELS = (("batch", "batch size", "decode tok/s (prompt prefill included) against batch size"),
          ("context", "context length (tokens)", "decode tok/s after the first token against context"))
BATCH_KEY = re.compile(r"decode_b(\d+)_tok_s")
CONTEXT_KEY = re.compile(r"decode_at_(\d+)_tok_s")


def _by_key(figures: dict, pattern: re.Pattern) -> dict[int, float]:
    """{number in the key: figure} for the keys `pattern` matches whole, figures that are present only."""
    out = {}
    for key, value in figures.items():
        match = pattern.fullmatch(key)
        if match and value is not None:
            out[int(match.group(1))] = value
    return out


def series(results: dict) -> dict[str, dict[str, dict[int, float]]]:
    """{"batch": {engine: {batch: tok/s}}, "context": {engine: {context: tok/s}}} from bench's results;
    engines without figures, and panels without engines, are left out."""
    batch = {"ours": _by_key(results.get("ours", {}), BATCH_KEY),
             "HF default": _by_key(results.get("hf", {}), BATCH_KEY),
             "HF static+compile": _by_key(results.get("hf_compiled", {}), BATCH_KEY)}
    spec = results.get("speculative")
    if spec:
        batch[f"ours, speculative {spec['method']}"] = {
            int(k[1:]): row["tok_s"] for k, row in spec.items() if re.fullmatch(r"b\d+", k) and row.get("tok_s")}
    for name, peer in results.get("peers", {}).items():
        if peer.get("tok_s_with_prefill") is not None:  # a peer that failed holds {"error": ...} instead
            batch[name] = {int(peer.get("batch", 1)): peer["tok_s_with_prefill"]}
    panels = {"batch": batch, "context": {"ours": _by_key(results.get("ours", {}), CONTEXT_KEY)}}
    panels = {panel: {name: xs for name, xs in engines.items() if xs} for panel, engines in panels.items()}
    return {panel: engines for panel, engines in panels.items() if engines}


def draw(panels: dict[str, dict[str, dict[int, float]]], path: Path, title: str = "") -> None:
    """One panel side by side per entry of `panels` (series' shape), log2 x-axis ticked at the measured
    points, one line per engine, written to `path` as a PNG."""
    # The Agg canvas on a bare Figure: no pyplot, so no global backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    drawn = [(key, xlabel, name) for key, xlabel, name in PANELS if panels.get(key)]
    figure = Figure(figsize=(6.5 * len(drawn), 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    for ax, (key, xlabel, name) in zip(figure.subplots(1, len(drawn), squeeze=False)[0], drawn):
        xs = sorted({x for points in panels[key].values() for x in points})
        for engine, points in panels[key].items():
            ax.plot(sorted(points), [points[x] for x in sorted(points)], marker="o", label=engine)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, labels=[str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured points are ticked
        ax.set_xlim(xs[0] / 1.5, xs[-1] * 1.5)  # a single point still gets a range
        ax.set(xlabel=xlabel, ylabel="tok/s", title=name)
        top = max(y for points in panels[key].values() for y in points.values())
        ax.set_ylim(0, top * 1.08)  # from zero, so that heights compare; room above the highest point
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.savefig(path, format="png", dpi=100)


def plot_results(results: dict, path: Path) -> bool:
    """Draw `results` to `path`, or say in one line that there is nothing to plot; True if written."""
    panels = series(results)
    if not panels:
        print(f"--plot: nothing to plot (no decode or context figures); {path} not written", flush=True)
        return False
    weights = results.get("weights", {}).get("format", "")
    title = ", ".join(str(x) for x in (results.get("preset"), weights, results.get("device"), results.get("date")) if x)
    draw(panels, Path(path), title)
    print(f"plot: {path}", flush=True)
    return True

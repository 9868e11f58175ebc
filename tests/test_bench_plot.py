"""`mistral7b bench --plot` (mistral7b.bench.plot): the series read out of bench's results, the PNG drawn
from them, the flag end to end on the CPU at the tiny shape, and its one-line error without matplotlib."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mistral7b.bench.plot import INSTALL_HINT, draw, plot_results, series

matplotlib_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def random_results(rng: random.Random) -> tuple[dict, dict]:
    """(results in bench's JSON structure with fresh random figures, the series they must give). Beside
    each plotted figure sit the ones that must not be plotted: decode after the first token, peaks,
    prefill, the context ratio, the limit table's copy."""
    f = lambda: rng.uniform(1, 20000)  # noqa: E731
    batches, contexts = sorted(rng.sample([1, 2, 4, 8, 16, 32, 64], 3)), sorted(rng.sample([1024, 4096, 16384], 2))
    ours, hf = {}, {}
    for b in batches:
        ours |= {f"decode_b{b}_tok_s": f(), f"decode_b{b}_decode_only_tok_s": f(), f"decode_b{b}_peak_gib": f()}
        hf[f"decode_b{b}_tok_s"] = f()
    ours |= {f"decode_at_{c}_tok_s": f() for c in contexts} | {"context_ratio": f(), "prefill_4096_tok_s": f()}
    hf["prefill_4096_tok_s"] = f()
    peer = {"peer": "gpt-fast", "batch": 1, "tok_s_with_prefill": f(), "tok_s_decode_only": f()}
    spec = {"method": "ngram", "num_tokens": 3} | {f"b{b}": {"tok_s": f(), "decode_only_tok_s": f()} for b in batches}
    results = {"date": "2026-12-05", "device": "cpu", "preset": "tiny", "ours": ours, "hf": hf,
               "hf_compiled": {"decode_b1_tok_s": f()}, "peers": {"gpt-fast": peer}, "speculative": spec,
               "weights": {"format": "bf16", "bytes": 1}, "limit": {"b1": {"ours_tok_s": f(), "limit_tok_s": f()}}}
    want = {"batch": {"ours": {b: ours[f"decode_b{b}_tok_s"] for b in batches},
                      "HF default": {b: hf[f"decode_b{b}_tok_s"] for b in batches},
                      "HF static+compile": {1: results["hf_compiled"]["decode_b1_tok_s"]},
                      "ours, speculative ngram": {b: spec[f"b{b}"]["tok_s"] for b in batches},
                      "gpt-fast": {1: peer["tok_s_with_prefill"]}},
            "context": {"ours": {c: ours[f"decode_at_{c}_tok_s"] for c in contexts}}}
    return results, want


def test_series_gives_back_each_engines_figures():
    rng = random.Random()  # fresh figures each run: the series cannot match by accident
    for _ in range(5):
        results, want = random_results(rng)
        assert series(json.loads(json.dumps(results))) == want  # through JSON, as a results file reads back


def test_series_leaves_out_what_did_not_run():
    """No HF, a peer that failed, no context section: those engines and that panel are absent; no figures
    at all: nothing."""
    results, want = random_results(random.Random(0))
    results |= {"hf": {}, "hf_compiled": {}, "peers": {"gpt-fast": {"peer": "gpt-fast", "error": "boom"}}}
    del results["speculative"]
    results["ours"] = {k: v for k, v in results["ours"].items() if not k.startswith("decode_at_")}
    assert series(results) == {"batch": {"ours": want["batch"]["ours"]}}
    assert series({"ours": {"prefill_4096_tok_s": 1.0}, "hf": {}, "hf_compiled": {}}) == {}


def png_shape(path) -> tuple:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib_image.imread(path).shape


def test_draw_writes_a_png_per_panel_present(tmp_path):
    """Two panels side by side make an image as tall as one panel's and about twice as wide."""
    results, want = random_results(random.Random(1))
    both, one = tmp_path / "both.png", tmp_path / "one.png"
    draw(want, both, "title")
    draw({"batch": want["batch"]}, one)
    (h2, w2, c2), (h1, w1, _) = png_shape(both), png_shape(one)
    assert c2 in (3, 4) and h2 == h1 > 100 and 1.8 * w1 < w2 < 2.2 * w1


def test_nothing_to_plot_is_one_line(tmp_path, capsys):
    path = tmp_path / "none.png"
    assert plot_results({"ours": {}, "hf": {}, "hf_compiled": {}}, path) is False
    assert not path.exists()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "nothing to plot" in lines[0]


def test_bench_plot_end_to_end(tmp_path):
    """bench --json X.json --plot on the CPU: X.png beside the JSON, both panels (decode and context ran);
    matplotlib loads only then (the run without --plot is test_bench_runs_without_matplotlib)."""
    out = tmp_path / "figures.json"
    cmd = [sys.executable, "-m", "mistral7b.cli", "bench", "--device", "cpu", "--preset", "tiny", "--no-hf",
           "--sections", "decode,context", "--context", "256", "--prefill", "", "--batch", "2", "--prompt-len", "8",
           "--new-tokens", "4", "--runs", "1", "--json", str(out), "--plot"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "figures.png"
    assert f"plot: {png}" in result.stdout.splitlines()
    figures = json.loads(out.read_text())
    assert set(series(figures)) == {"batch", "context"}
    height, width, _ = png_shape(png)
    assert width > 1.8 * height  # two panels side by side


def test_bench_runs_without_matplotlib(monkeypatch, tmp_path):
    """Without --plot the benchmark never imports matplotlib: unimportable here, the run still passes."""
    from mistral7b.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.chdir(tmp_path)  # where a bare --plot would write bench.png
    assert main(["bench", "--device", "cpu", "--preset", "tiny", "--no-hf", "--sections", "decode", "--prefill", "",
                 "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--runs", "1",
                 "--json", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["ours"]["decode_b1_tok_s"] > 0
    assert not list(tmp_path.glob("*.png"))


def test_plot_without_matplotlib_is_one_line_before_any_work(monkeypatch, capsys):
    from mistral7b.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # the smallest run, so that a check that let it start fails in seconds
    assert main(["bench", "--device", "cpu", "--preset", "tiny", "--no-hf", "--sections", "decode", "--prefill", "",
                 "--batch", "1", "--prompt-len", "4", "--new-tokens", "2", "--runs", "1", "--plot"]) == 1
    captured = capsys.readouterr()
    assert not captured.out  # the benchmark never started ("building random ... weights" comes first)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"mistral7b: error: {INSTALL_HINT}"] and "pip install matplotlib" in lines[0]


def test_plot_path_defaults(tmp_path):
    """--plot PATH as given; bare --plot: --json's path with .png, else bench.png; never --json's own file."""
    from mistral7b.cli import build_parser
    from mistral7b.cli.bench import plot_of
    from mistral7b.cli.common import CLIError

    def path(*flags):
        return plot_of(build_parser().parse_args(["bench", *flags]))

    assert path() is None
    assert path("--plot") == Path("bench.png")
    assert path("--json", str(tmp_path / "a.json"), "--plot") == tmp_path / "a.png"
    assert path("--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "a.json")) == tmp_path / "p.png"
    with pytest.raises(CLIError, match="--json's file"):
        path("--json", str(tmp_path / "a.png"), "--plot")

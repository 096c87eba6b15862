"""The comparison study's files: Markdown and CSV tables, plotly figures (PNG), one HTML page.

Used by bench/comparison_study.py; every file here is generated, never edited by hand.
"""

from __future__ import annotations

import argparse
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from bench.common import pipe_table

# Columns of the summary, in order, with how they read in the tables.
COLUMNS = {
    "cpr": "CPR", "cmd": "CMD", "n_f": "n (f>=T)", "heads_f": "heads", "mlp_f": "MLP blocks",
    "neurons_f": "neurons", "kl_at_n_f": "KL there", "n_kl_0.3": "n (KL<=0.3)",
    "n_kl_0.1": "n (KL<=0.1)", "f_at_size": "f at NP size", "kl_at_size": "KL at NP size",
    "seconds": "seconds", "peak_mib": "peak MiB",
}  # fmt: skip
NEURON_COLUMNS = {"mlp_blocks": "MLP blocks", "coarse_neurons": "neurons run",
                  "coarse_f": "f", "needed": "NP needs", "f_needed": "f there",
                  "irrelevant": "irrelevant share"}  # fmt: skip
NP_SUFFIX = ": node pruning"  # irrelevant_neurons' name for node pruning's row of a circuit
LEVEL_TITLES = {"blocks_heads": "heads and MLP blocks (MIB's node level)",
                "neurons": "heads and neurons"}  # fmt: skip
# The summary the README quotes: (level, column, heading, format), one row per method.
SUMMARY = [
    ("blocks_heads", "cpr", "CPR", ".2f"), ("blocks_heads", "n_f", "n for f >= T", ",.0f"),
    ("blocks_heads", "heads_f", "heads", ",.0f"), ("blocks_heads", "mlp_f", "MLP blocks", ",.0f"),
    ("blocks_heads", "kl_at_n_f", "KL there", ".2f"),
    ("blocks_heads", "f_at_size", "f at NP size", ".2f"),
    ("blocks_heads", "kl_at_size", "KL at NP size", ".2f"),
    ("neurons", "n_f", "n for f >= T, neuron level", ",.0f"),
    ("blocks_heads", "seconds", "s", ",.0f"), ("blocks_heads", "peak_gib", "peak GiB", ".1f"),
]  # fmt: skip
SUMMARY_HEADING = "## Summary"


def spread(frame: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    """'mean ± std' over seeds of each column per `keys` (the mean alone for one seed; '-'
    where no seed has a value, with the count of seeds that have one when some lack it)."""
    cells = []
    for key, group in frame.groupby(keys, sort=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for c in columns:
            values = pd.to_numeric(group[c], errors="coerce").dropna()
            row[c] = _cell(values, len(group))
        cells.append(row)
    return pd.DataFrame(cells)


def _cell(values: pd.Series, n: int) -> str:
    if not len(values):
        return "-"
    mean, std = values.mean(), values.std()
    text = f"{mean:.0f}" if abs(mean) >= 100 else f"{mean:.3g}"  # counts of nodes in full
    if len(values) > 1:
        text += f" ± {std:.0f}" if std >= 100 else f" ± {std:.2g}"
    return text if len(values) == n else f"{text} ({len(values)}/{n} seeds)"


def summary_table(table: pd.DataFrame) -> str:
    """The README's table: per method, `SUMMARY`'s columns as the mean over seeds with
    [min, max] (the value alone for one seed)."""
    table = table.assign(peak_gib=pd.to_numeric(table.peak_mib, errors="coerce") / 1024)
    rows = []
    for method in dict.fromkeys(table.method):
        row = [method]
        for level, column, _, fmt in SUMMARY:
            part = table[(table.method == method) & (table.level == level)]
            values = pd.to_numeric(part[column], errors="coerce").dropna()
            row.append(_range(values, fmt))
        rows.append(row)
    return pipe_table(["method", *(heading for _, _, heading, _ in SUMMARY)], rows)


def _range(values: pd.Series, fmt: str) -> str:
    if not len(values):
        return "-"
    if len(values) == 1:
        return format(values.iloc[0], fmt)
    mean, low, high = (format(x, fmt) for x in (values.mean(), values.min(), values.max()))
    return f"{mean} [{low}, {high}]"


def curves_figure(curves: pd.DataFrame, target_f: float) -> go.Figure:
    """Held-out f against nodes kept, one panel per level, mean over seeds (bars: std)."""
    levels = list(dict.fromkeys(curves.level))
    fig = make_subplots(rows=1, cols=len(levels),
                        subplot_titles=[LEVEL_TITLES.get(x, x) for x in levels])  # fmt: skip
    palette = pio.templates["plotly"].layout.colorway
    methods = list(dict.fromkeys(curves.method))
    for col, level in enumerate(levels, start=1):
        part = curves[curves.level == level]
        for i, method in enumerate(methods):
            rows = part[part.method == method]
            mean = rows.groupby("n_nodes").faithfulness.agg(["mean", "std"])
            fig.add_trace(go.Scatter(
                x=[max(n, 0.5) for n in mean.index], y=mean["mean"], name=method,
                legendgroup=method,
                showlegend=col == 1, mode="lines+markers", line={"color": palette[i % 10]},
                error_y={"type": "data", "array": mean["std"].fillna(0), "visible": True},
            ), row=1, col=col)  # fmt: skip
        fig.add_hline(y=target_f, line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(type="log", title_text="nodes kept (0 drawn at 0.5)", row=1, col=col)
    fig.update_yaxes(title_text="held-out faithfulness", row=1, col=1)
    fig.update_layout(title="Faithfulness curves by method", height=450, width=1100)
    return fig


def neurons_figure(layers: pd.DataFrame) -> go.Figure:
    """Neurons kept per layer, one panel per coarse circuit and seed: the neurons it runs
    (every neuron of its kept MLP blocks, grey) and over them those node pruning needs inside
    them for the same faithfulness. Per seed, not a mean: on some seeds node pruning needs 1%
    of a circuit's neurons and on others all of them, and a mean would draw neither."""
    circuits = [str(n) for n in dict.fromkeys(layers.index) if not str(n).endswith(NP_SUFFIX)]
    seeds = sorted(set(layers.seed))
    panels = [(c, s) for c in circuits for s in seeds]
    per_layer = {(str(n), row.seed): row.drop("seed") for n, row in layers.iterrows()}

    def title(circuit: str, seed: int) -> str:
        runs, needs = per_layer.get((circuit, seed)), per_layer.get((circuit + NP_SUFFIX, seed))
        if runs is None:
            return f"{circuit}, seed {seed}: -"
        text = f"{circuit}, seed {seed}: runs {runs.sum():,.0f}"
        return text + ("" if needs is None else f", NP needs {needs.sum():,.0f}")

    fig = make_subplots(rows=len(circuits), cols=len(seeds), shared_xaxes=True,
                        shared_yaxes=True, subplot_titles=[title(*p) for p in panels],
                        vertical_spacing=0.3 / max(len(circuits), 1),
                        horizontal_spacing=0.03)  # fmt: skip
    palette = pio.templates["plotly"].layout.colorway
    top = max(1.0, float(layers.drop(columns="seed").to_numpy().max()))
    for i, (circuit, seed) in enumerate(panels):
        row, col = divmod(i, len(seeds))
        for name, colour, label in ((circuit, "lightgrey", "the circuit runs"),
                                    (circuit + NP_SUFFIX, palette[0], "node pruning needs")):
            values = per_layer.get((name, seed))
            if values is None:
                continue
            fig.add_trace(go.Bar(x=[int(c) for c in values.index], y=values.to_numpy(),
                                 name=label, marker_color=colour, legendgroup=label,
                                 showlegend=i == 0,
                                 hovertemplate=f"{name}, seed {seed}<br>layer %{{x}}: "
                                               "%{y:,.0f}<extra></extra>"),
                          row=row + 1, col=col + 1)  # fmt: skip
    fig.update_yaxes(type="log", dtick=1, range=[0, math.log10(top) + 0.1])
    fig.update_yaxes(title_text="neurons", col=1)
    fig.update_xaxes(title_text="layer", row=len(circuits))
    fig.update_annotations(font_size=11)
    fig.update_layout(title="MLP neurons per layer: each coarse circuit against node pruning "
                      "inside it, same faithfulness", barmode="overlay",
                      height=140 + 160 * len(circuits), width=420 * len(seeds) + 180)  # fmt: skip
    return fig


def markdown(args: argparse.Namespace, command: str, table: pd.DataFrame,
             neurons: pd.DataFrame, figures: dict[str, Path]) -> str:  # fmt: skip
    """comparison_<task>.md: the command, settings, the summary per level, per-seed rows."""
    seeds = " ".join(map(str, args.seeds))
    lines = [f"# Method comparison: {args.task} on {args.model}, seeds {seeds}", "",
             "Generated by `bench/comparison_study.py`; do not edit. Regenerate with", "",
             f"    {command}", "", _settings(args, table), ""]  # fmt: skip
    if "ablated" in table and (table.ablated == "edges").any():
        lines += [_EDGES_NOTE, ""]
    note = _SUMMARY_NOTE.format(t=args.target_f)
    lines += [SUMMARY_HEADING, "", note, "", summary_table(table), ""]
    for level in dict.fromkeys(table.level):
        part = table[table.level == level]
        at = spread(part.assign(key=0), ["key"], ["at_size"]).at_size.iloc[0]
        summary = spread(part, ["method"], list(COLUMNS))
        lines += [f"## {LEVEL_TITLES.get(level, level)}", "",
                  f"Mean ± std over seeds; T = {args.target_f}; node pruning's size (NP size) "
                  f"{at} nodes.", "",
                  pipe_table(["method", *COLUMNS.values()], summary.itertuples(index=False)),
                  ""]  # fmt: skip
    if len(neurons):
        summary = spread(neurons, ["circuit"], list(NEURON_COLUMNS))
        lines += ["## Irrelevant neurons", "", _NEURONS_NOTE + _neuron_seeds(args, neurons), "",
                  pipe_table(["circuit", *NEURON_COLUMNS.values()],
                             summary.itertuples(index=False)), ""]  # fmt: skip
    lines += [f"![{k}]({p.name})" for k, p in figures.items()] + [""]
    per_seed = pipe_table(list(table.columns), table.round(4).itertuples(index=False))
    lines += ["## Per seed", "", per_seed, ""]
    return "\n".join(lines)


_EDGES_NOTE = (
    "Rows '<method> (edges ablated)' keep the method's top edges by its edge scores (EAP, "
    "EAP-IG: |attribution|; edge pruning: log_alpha) and ablate every other edge "
    "(`tl_nodeprune.edge_curves`): CPR and CMD are over the fraction of edges kept, sizes count "
    "the heads, MLP blocks (and their neurons) those edges read from or write to. Every other "
    "row, the edge methods' included, ablates the nodes outside its top nodes (column "
    "`ablated` in the per-seed table)."
)
_SUMMARY_NOTE = (
    "Each cell: the mean over seeds [min, max]. n: the smallest circuit with held-out f >= "
    "T = {t} (heads, MLP blocks: its parts), and its KL; f and KL at node pruning's size; s and "
    "peak GiB: scoring the method (node and edge pruning: training). Heads-and-MLP-blocks level "
    "except the neuron-level n."
)
_NEURONS_NOTE = (
    "For each method's heads-and-MLP-blocks circuit at its f >= T size (and edge pruning's own "
    "circuit), the same heads with only the top-k neurons by node pruning's scores inside its "
    "MLP blocks: the smallest measured k with held-out f >= min(the circuit's own f, T) "
    "(`tl_nodeprune.irrelevant`). 'irrelevant share' = 1 - k / neurons the circuit runs."
)


def _neuron_seeds(args: argparse.Namespace, neurons: pd.DataFrame) -> str:
    """The seeds the irrelevant neurons span, said when some of the study's are missing."""
    have = sorted(set(neurons.seed))
    if have == sorted(args.seeds):
        return ""
    return (f" Seeds {' '.join(map(str, have))} only: the others' seed files come from an "
            "earlier irrelevant-neurons search and their method scores were not in the cache "
            "to recompute it.")


def _settings(args: argparse.Namespace, table: pd.DataFrame) -> str:
    """One line of settings, and the edge sparsity edge pruning reached against its target."""
    text = (f"Prompts per seed: {args.n_prompts}, train fraction {args.train_fraction}; node "
            f"pruning steps: {args.steps or 'default'}; fractions: "
            f"{', '.join(f'{f:g}' for f in args.fractions)}.")  # fmt: skip
    if args.refine:
        text += (f" Sizes for f >= {args.target_f} with nodes ablated are bisected between grid "
                 f"points to {args.refine:g} of the level's nodes (the irrelevant neurons to "
                 f"{args.refine:g} of a circuit's neurons); the KL budgets' sizes are read "
                 "off the same measured points, not bisected for, and the edges-ablated rows "
                 "stay on the grid.")
    if args.patching_prompts and "activation_patching" in args.methods:
        text += (f" Activation patching scored on the first {args.patching_prompts} training "
                 "prompts (the other methods on all of them).")
    if "edge_sparsity" in table:
        reached = table.edge_sparsity.dropna()
        if len(reached):
            text += (f" Edge pruning ({args.edge_steps} steps, target edge sparsity "
                     f"{args.edge_target}) reached edge sparsity "
                     f"{', '.join(f'{x:.3f}' for x in reached.unique())} (its own circuit).")
    return text


def page(title: str, body_md: list[tuple[str, Any]]) -> str:
    """One self-contained HTML page: plotly's JavaScript inlined once, then the parts
    (("h2", text), ("table", DataFrame), ("figure", go.Figure), ("p", text))."""
    parts = []
    for kind, value in body_md:
        if kind == "figure":
            parts.append(pio.to_html(value, full_html=False, include_plotlyjs=False))
        elif kind == "table":
            parts.append(value.to_html(index=False, border=0, na_rep="-"))
        else:
            parts.append(f"<{kind}>{html.escape(str(value))}</{kind}>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto}"
            "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:right}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head>"
            f"<body>{''.join(parts)}</body></html>")  # fmt: skip


def write_outputs(
    args: argparse.Namespace,
    command: str,
    table: pd.DataFrame,
    curves: pd.DataFrame,
    neurons: pd.DataFrame,
    layers: pd.DataFrame,
) -> dict[str, Path]:
    """Write every file of one task's study into `args.out`; returns them by kind."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = f"comparison_{args.task}"
    files = {"csv": out / f"{stem}.csv", "curves_csv": out / f"{stem}_curves.csv",
             "md": out / f"{stem}.md", "html": out / f"{stem}.html"}  # fmt: skip
    table.to_csv(files["csv"], index=False)
    curves.to_csv(files["curves_csv"], index=False)
    figures = {"curves": curves_figure(curves, args.target_f)}
    if len(neurons):
        files["neurons_csv"] = out / f"{stem}_neurons.csv"
        neurons.to_csv(files["neurons_csv"], index=False)
        layers.rename_axis("circuit").to_csv(out / f"{stem}_neurons_per_layer.csv")
        figures["neurons per layer"] = neurons_figure(layers)
    else:  # no seed has them now: an earlier run's files would read as this one's
        for name in ("neurons.csv", "neurons_per_layer.csv", "neurons_per_layer.png"):
            (out / f"{stem}_{name}").unlink(missing_ok=True)
    pngs = {}
    if args.png:
        for name, fig in figures.items():
            pngs[name] = files[f"png_{name}"] = out / f"{stem}_{name.replace(' ', '_')}.png"
            fig.write_image(pngs[name])
    files["md"].write_text(markdown(args, command, table, neurons, pngs), encoding="utf-8")
    title = f"Method comparison: {args.task} on {args.model}"
    parts: list[tuple[str, Any]] = [("h1", title), ("p", command)]
    for level in dict.fromkeys(table.level):
        summary = spread(table[table.level == level], ["method"], list(COLUMNS))
        parts += [("h2", LEVEL_TITLES.get(level, level)),
                  ("table", summary.rename(columns=COLUMNS))]  # fmt: skip
    if len(neurons):
        parts += [("h2", "Irrelevant neurons"), ("p", _NEURONS_NOTE + _neuron_seeds(args, neurons)),
                  ("table", spread(neurons, ["circuit"], list(NEURON_COLUMNS))
                   .rename(columns=NEURON_COLUMNS))]  # fmt: skip
    parts += [("figure", fig) for fig in figures.values()]
    files["html"].write_text(page(title, parts), encoding="utf-8")
    files["index"] = write_index(out)
    return files


def write_index(out: Path) -> Path:
    """comparison.md: a link to every task's comparison page in `out`."""
    pages = sorted(out.glob("comparison_*.md"))
    lines = ["# Method comparisons", "", "Generated by `bench/comparison_study.py` (`make "
             "compare`); do not edit.", ""]  # fmt: skip
    lines += [f"- [{p.stem.removeprefix('comparison_')}]({p.name}) "
              f"([page]({p.with_suffix('.html').name}))" for p in pages]  # fmt: skip
    path = out / "comparison.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


__all__ = ["write_outputs"]

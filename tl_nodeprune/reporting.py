"""`report`: one self-contained HTML page for a circuit or a run, openable offline.

Plotly's JavaScript is inlined once and every figure refers to it, so the page needs neither a
server nor a network; it holds the figures of `plot`, the summary tables, the held-out
evaluation and the run's settings.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from . import plot
from .certificate import Certificate
from .circuit import Circuit
from .evaluation import OVERSHOOT, Evaluation, overshoots
from .granularities import SPECS, node_name
from .pruner import PruneResult
from .references import HeadClasses, Reference

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; }
.tables { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.note { color: #666; font-size: 0.85em; }
"""


def report(
    result_or_circuit: PruneResult | Circuit,
    path: str | Path,
    evaluation: Evaluation | Mapping[str, Any] | None = None,
    reference: Reference | HeadClasses | None = None,
    title: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """Write the HTML report of a `PruneResult` (with its history) or a `Circuit` to `path`.

    `evaluation` defaults to the circuit's `meta["held_out"]` (what the CLI stores);
    `reference` (a `references.Reference` or {(layer, head): class}) colours heads by class;
    `settings` adds rows to the settings table (a `PruneResult`'s config is always listed).
    """
    circuit, hist, config = _unpack(result_or_circuit)
    if evaluation is None:
        evaluation = circuit.meta.get("held_out")
    if isinstance(evaluation, Evaluation):
        evaluation = evaluation.to_dict()
    meta = {k: v for k, v in circuit.meta.items() if k != "held_out"}
    all_settings = {**_flatten(meta), **config, **_flatten(dict(settings or {}))}
    figures = _figures(circuit, hist, reference)
    name = title or f"Circuit for {meta.get('task', 'a task')} on {circuit.shape.name}"
    body = [
        f"<h1>{html.escape(name)}</h1>",
        f"<p class='note'>{html.escape(repr(circuit))} &middot; written "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by tl_nodeprune</p>",
        "<h2>Summary</h2><div class='tables'>",
        _table("Kept nodes", circuit.summary().reset_index(), {"fraction": "{:.1%}"}),
    ]
    if evaluation:
        body.append(_table("Held-out evaluation", _pairs(evaluation), {"value": _number}))
    body.append("</div>")
    cert = getattr(result_or_circuit, "certificate", None)  # a PruneResult's, if any
    body += _overshoot_and_certificate(circuit, cert, evaluation)
    body += [f"<h2>{html.escape(_title(f))}</h2>{_figure_html(f)}" for f in figures]
    body.append("<h2>Kept heads</h2>")
    heads = ", ".join(node_name("head", h) for h in circuit.heads)
    body.append(f"<p>{html.escape(heads or '-')}</p>")
    body.append(_table("Settings", _pairs(all_settings), {"value": _number}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_page(name, body), encoding="utf-8")
    return path


def _overshoot_and_certificate(
    circuit: Circuit, cert: Certificate | None, evaluation: Mapping[str, Any] | None
) -> list[str]:
    """The overshoot warning, then the certificate's statement and the flips it made."""
    out = []
    if evaluation and overshoots(evaluation.get("faithfulness", 0)):
        out.append(
            f"<p><b>Overshoot:</b> faithfulness {evaluation['faithfulness']:.3f} &gt; "
            f"{OVERSHOOT}: the circuit does the task better than the model, so it leaves out "
            "nodes that work against the answer.</p>"
        )
    if "certificate" in circuit.meta:
        out.append(f"<h2>Certificate</h2><p>{html.escape(str(circuit.meta['certificate']))}</p>")
    if cert is not None and len(cert.flips):
        numbers = {c: _number for c in cert.flips.columns if c not in ("node", "granularity")}
        out.append(_table("Flips made on the validation prompts", cert.flips, numbers))
    return out


def _unpack(
    result_or_circuit: PruneResult | Circuit,
) -> tuple[Circuit, pd.DataFrame | None, dict[str, Any]]:
    """The circuit, its training history (None for a bare circuit) and its flattened config."""
    if isinstance(result_or_circuit, PruneResult):
        circuit, hist = result_or_circuit.circuit, result_or_circuit.history
        return circuit, hist, _flatten(dataclasses.asdict(result_or_circuit.config))
    if isinstance(result_or_circuit, Circuit):
        return result_or_circuit, None, {}
    raise TypeError(
        f"report takes a PruneResult or a Circuit, got {type(result_or_circuit).__name__}."
    )


def _figures(
    circuit: Circuit, hist: pd.DataFrame | None, reference: Reference | HeadClasses | None
) -> list[go.Figure]:
    """Heads (by position too, for a position-aware circuit), graph, one strip per gated (or
    default) many-unit granularity, then history."""
    figures = [plot.heads(circuit, reference=reference), plot.graph(circuit, reference=reference)]
    if circuit.positions is not None:
        figures[1:1] = [plot.by_position(circuit, g, reference=reference)
                        for g in ("head", "attn", "mlp") if g in circuit.gates]  # fmt: skip
    strips = [g for g, s in SPECS.items() if s.view == "strip" and circuit.shape.has(g)
              and (g in circuit.gates or s.default)]  # fmt: skip
    figures += [plot.units(circuit, g) for g in strips]
    if hist is not None and len(hist):
        figures.append(plot.history(hist))
    return figures


def _page(name: str, body: list[str]) -> str:
    """The whole HTML document: styles and plotly's JavaScript inlined, then the body."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(name)}</title><style>{_STYLE}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body>{''.join(body)}</body></html>"
    )


def _figure_html(fig: go.Figure) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _title(fig: go.Figure) -> str:
    return str(fig.layout.title.text or "")


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pairs(mapping: Mapping[str, Any]) -> pd.DataFrame:
    values = pd.Series(list(mapping.values()), dtype=object)  # keep ints, bools and str as given
    return pd.DataFrame({"name": list(mapping), "value": values})


def _table(caption: str, frame: pd.DataFrame, formats: Mapping[str, Any]) -> str:
    """An HTML table with escaped cells; numbers right-aligned, text left-aligned."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for col, value in row.items():
            fmt = formats.get(col)
            text = fmt(value) if callable(fmt) else fmt.format(value) if fmt else str(value)
            cls = "" if isinstance(value, (int, float)) else " class='text'"
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{''.join(rows)}</table>"


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys with JSON-able leaf values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ", ".join(map(str, value))
        elif value is None:
            out[name] = "default"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


__all__ = ["report"]

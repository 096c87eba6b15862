"""The HTML report: self-contained, holds every figure and table, and renders in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

import tl_nodeprune as tnp
from tl_nodeprune.planted import planted_problem

CHROMIUM = next((c for c in ("chromium", "chromium-browser") if shutil.which(c)), None)


@pytest.fixture(scope="module")
def run():
    problem = planted_problem("bridge-native", seed=0)
    train, held_out = problem.task.split(0.5, seed=0)
    config = tnp.PruneConfig(steps=40, seed=0, progress=False)
    result = tnp.NodePruner(problem.model, config).fit(train)
    evaluation = tnp.evaluate(problem.model, result.circuit, held_out)
    return result, evaluation


@pytest.fixture(scope="module")
def page(run, tmp_path_factory) -> Path:
    result, evaluation = run
    path = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    reference = {(1, 0): "planted <head>"}
    return tnp.report(result, path, evaluation=evaluation, reference=reference)


def test_report_is_self_contained_with_plotly_inlined_once(page):
    text = page.read_text()
    bundle = get_plotlyjs()
    assert text.count(bundle) == 1  # plotly's JavaScript, inlined once
    rest = text.replace(bundle, "")  # the bundle's own strings name plotly's website
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", rest)
    assert not re.search(r"@import|url\(|https?://", rest)
    assert rest.count("<script") == 1 + 4  # the emptied bundle tag and one per figure
    assert text.count("Plotly.newPlot(") == 4  # heads, graph, neurons, history


def test_report_holds_tables_settings_and_kept_heads(run, page):
    result, evaluation = run
    text = page.read_text()
    assert f"{evaluation.faithfulness:.4g}" in text and "Held-out evaluation" in text
    assert "steps</td><td>40</td>" in text and "hard_concrete.beta" in text
    for la, h in result.circuit.heads:
        assert f"a{la}.h{h}" in text


def test_report_of_a_saved_circuit_uses_its_stored_evaluation(run, tmp_path):
    result, evaluation = run
    circuit = result.circuit
    circuit.meta["held_out"] = evaluation.to_dict()
    saved = tnp.Circuit.load(circuit.save(tmp_path / "c.json"))
    text = tnp.report(saved, tmp_path / "c.html").read_text()
    assert "Held-out evaluation" in text and text.count("Plotly.newPlot(") == 3  # no history
    with pytest.raises(TypeError, match="PruneResult or a Circuit"):
        tnp.report({"gates": {}}, tmp_path / "x.html")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    # every host name fails to resolve: the page must render without a network
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--host-resolver-rules=MAP * ~NOTFOUND"]  # fmt: skip
    return subprocess.run(
        [CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")
def test_report_renders_every_figure_in_headless_chromium(page, tmp_path):
    dom = _chromium("--virtual-time-budget=15000", "--dump-dom", page.as_uri()).stdout
    # plotly replaces each figure's empty div by SVG layers once its JavaScript has run
    assert dom.count('class="main-svg"') >= 2 * 4
    assert dom.count('class="plot-container plotly"') == 4
    shot, blank = tmp_path / "report.png", tmp_path / "blank.png"
    empty = tmp_path / "blank.html"
    empty.write_text("<html><body></body></html>")
    for target, out in ((page, shot), (empty, blank)):
        _chromium("--window-size=1200,1600", f"--screenshot={out}", target.as_uri())
    # a blank page compresses to almost nothing; figures and tables do not
    assert shot.stat().st_size > 10 * blank.stat().st_size


def test_cli_discover_writes_the_report_next_to_the_circuit(tmp_path, capsys):
    from tl_nodeprune.cli import main

    out = tmp_path / "c.json"
    args = ["discover", "--model", "planted", "--task", "planted", "--n-prompts", "32"]
    assert main([*args, "--steps", "5", "--out", str(out), "--report"]) == 0
    assert f"wrote {tmp_path / 'c.html'}" in capsys.readouterr().out
    text = (tmp_path / "c.html").read_text()
    assert "Held-out evaluation" in text and "cli.n_prompts</td><td>32<" in text
    assert (
        main([*args, "--steps", "5", "--out", str(out), "--report", str(tmp_path / "r.html")]) == 0
    )
    assert (tmp_path / "r.html").exists()


def test_report_shows_the_certificate_and_flags_an_overshoot(tmp_path):
    problem = planted_problem("bridge-native", seed=0)
    # 3 steps leave every gate open; the certificate's removals are what make the circuit (the
    # default budgets are off: with them the selection along the gate order would make it)
    config = tnp.PruneConfig(steps=3, seed=0, progress=False, certify=True,
                             certify_candidates=128, target_kl=None,
                             target_faithfulness=None)  # fmt: skip
    result = tnp.NodePruner(problem.model, config).fit(problem.task)
    overshoot = {"faithfulness": 1.25, "kl": 0.1}
    text = tnp.report(result, tmp_path / "r.html", evaluation=overshoot).read_text()
    assert "<h2>Certificate</h2>" in text and "locally optimal" in text
    assert "Flips made on the validation prompts" in text
    assert text.count("<td class='text'>remove</td>") == len(result.certificate.flips) > 0
    assert "<b>Overshoot:</b> faithfulness 1.250" in text
    plain = tnp.report(result.circuit, tmp_path / "c.html", evaluation={"faithfulness": 1.05})
    assert "locally optimal" in plain.read_text() and "Overshoot" not in plain.read_text()

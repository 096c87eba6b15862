"""Helpers shared by the bench scripts: Linux memory readings, fresh-process points, tables.

Import as `from bench.common import ...`, with the repository root on the path
(`PYTHONPATH=. python bench/SCRIPT.py`, as every script's docstring shows).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

GIB = 2**30
GENERATED = Path("docs/generated")  # tables the scripts write; never edited by hand


def status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes: `VmRSS` (resident now), `VmHWM` (its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset this process's resident-set high-water mark (`VmHWM`) to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def run_fresh(cmd: Sequence[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run `cmd` in a new process; the JSON object on the last line it prints.

    A fresh process per point keeps one point's allocator high-water mark out of the next.
    Raises `subprocess.CalledProcessError` (with the captured stderr) when it fails.
    """
    done = subprocess.run(list(cmd), capture_output=True, text=True, env=dict(env), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_points(
    script: str, points: Sequence[str], modes: Sequence[str], threads: int, extra: Sequence[str]
) -> list[dict[str, Any]]:
    """Every (batch x seq, mode) point of a bench script, each in a fresh process (so its peak
    memory is its own): `script --point {"mode", "batch", "seq"} --threads T *extra`."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for point in points:
        batch, seq = (int(x) for x in point.split("x"))
        for mode in modes:
            spec = json.dumps({"mode": mode, "batch": batch, "seq": seq})
            cmd = [sys.executable, script, "--point", spec, "--threads", str(threads), *extra]
            rows.append(run_fresh(cmd, env))
            print(rows[-1], flush=True)
    return rows


def gpt2_small_problem(n_prompts: int, seq: int) -> tuple[Any, Any]:
    """A random GPT-2-small-shaped model (12 layers, 12 heads of 64, d_mlp 3072, GPT-2's
    vocabulary) and `n_prompts` random prompt pairs of `seq` tokens: the benches' workload."""
    import torch

    from tl_nodeprune.planted import tiny_model
    from tl_nodeprune.tasks.base import PromptTask

    model = tiny_model("bridge-native", n_layers=12, n_heads=12, d_head=64, d_mlp=3072,
                       d_vocab=50257, n_ctx=max(1024, seq))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50257, (2, n_prompts, seq), generator=gen)
    answers = torch.randint(0, 50257, (n_prompts,), generator=gen)
    return model, PromptTask.from_tokens(tokens[0], tokens[1], answers, (answers + 1) % 50257)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Points saved earlier: a CSV a script wrote (missing cells read as None) or JSON lines."""
    if path.suffix == ".csv":
        import pandas as pd

        rows = pd.read_csv(path).to_dict(orient="records")
        return [{k: _none_if_nan(v) for k, v in row.items()} for row in rows]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _none_if_nan(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def pipe_table(columns: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown pipe table of `str(cell)` (pandas' own `to_markdown` needs `tabulate`)."""
    head = "| " + " | ".join(map(str, columns)) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def saved_runs(paths: Sequence[str]) -> list[tuple[int, str]]:
    """(seed, path) for log_alphas saved as ..._N.pt by the quality benches (seed N)."""
    return [(int(re.findall(r"_(\d+)\.pt$", path)[0]), path) for path in paths]


def saved_circuit(model: Any, path: str) -> Any:
    """The circuit a quality bench saved beside its log_alphas (`.json`: the run's own
    selection, e.g. a KL budget's threshold), else the gates above 0 of the log_alphas."""
    import torch

    from tl_nodeprune.circuit import Circuit
    from tl_nodeprune.selection import circuit_at
    from tl_nodeprune.sites import ModelShape

    if (beside := Path(path).with_suffix(".json")).exists():
        return Circuit.load(beside)
    return circuit_at(ModelShape.from_model(model), torch.load(path), 0.0)

"""Execute notebooks top to bottom in place (outputs kept for the repository page).

Usage: python notebooks/execute.py [notebook.ipynb ...] [--set NAME=VALUE ...] [--to DIR]
`--set` overrides an assignment in the cell tagged `parameters` (e.g. --set STEPS=3 for a
smoke run); `--to` writes the executed copies elsewhere instead of in place.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path, overrides: dict[str, str], out: Path, timeout: int = 1200) -> float:
    """Run `path` with its own folder as working directory; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            for name, value in overrides.items():
                cell.source, n = re.subn(
                    rf"^{name} = [^#\n]*", f"{name} = {value}  ", cell.source, flags=re.M
                )
                if n != 1:
                    raise SystemExit(f"{path.name}: no parameter {name!r} to set.")
    start = time.perf_counter()
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--to", type=Path, default=None)
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    for path in args.notebooks or sorted(HERE.glob("[0-9]*.ipynb")):
        out = path if args.to is None else args.to / path.name
        print(f"{path.name}: {execute(path, overrides, out):.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()

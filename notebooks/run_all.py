"""Execute the notebooks top to bottom and store them with their outputs.

    python notebooks/run_all.py                 # all notebooks, in place, on artefacts.get()'s pick
    python notebooks/run_all.py 01_instance     # some of them
    HDOVD_ARTEFACTS=tiny python notebooks/run_all.py --out /tmp/nb   # tiny artefacts, copies elsewhere

The artefacts are found, or built, first (``notebooks/artefacts.py``, in its own process). Each
notebook then runs in a fresh Jupyter kernel started from this Python (nbclient, kernel
"python3"; jupyter_client launches it with this interpreter), with notebooks/ as its working
directory; the first error stops it with the failing cell's traceback. When a notebook is
stored in place, the output of its cell tagged ``readme-figure`` is also written to
``notebooks/figures/<notebook>.png`` (the README's pictures). tests/test_notebooks.py runs the
same ``execute`` on the tiny artefacts.
"""
from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))  # reading order
FIGURE_TAG = "readme-figure"


def execute(path: Path, timeout: int = 900) -> tuple[nbformat.NotebookNode, float]:
    """Run every cell of the notebook at ``path`` in a fresh kernel; returns (notebook, seconds)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}})
    start = time.time()
    client.execute()
    return nb, time.time() - start


def figure_png(nb: nbformat.NotebookNode) -> bytes | None:
    """The last PNG output of the cell tagged ``readme-figure``, if any."""
    for cell in nb.cells:
        if FIGURE_TAG in cell.get("metadata", {}).get("tags", []):
            pngs = [o["data"]["image/png"] for o in cell.get("outputs", [])
                    if "image/png" in o.get("data", {})]
            if pngs:
                return base64.b64decode(pngs[-1])
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 00_tour")
    parser.add_argument("--out", default=None, help="write executed copies here instead of in place")
    args = parser.parse_args(argv)
    paths = [p for p in NOTEBOOKS if not args.names or p.stem in args.names
             or p.name in args.names]
    if not paths:
        sys.exit(f"no notebook matches {args.names}; have {[p.stem for p in NOTEBOOKS]}")
    subprocess.run([sys.executable, str(HERE / "artefacts.py")], check=True)  # found or built
    for path in paths:
        nb, seconds = execute(path)
        out = Path(args.out) / path.name if args.out else path
        out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out)
        png = figure_png(nb)
        if png is not None and not args.out:
            (HERE / "figures").mkdir(exist_ok=True)
            (HERE / "figures" / f"{path.stem}.png").write_bytes(png)
        print(f"{path.name}: {seconds:.0f} s -> {out}")


if __name__ == "__main__":
    main()

"""Stack a few of `main.py --mode infer`'s pictures into doc/heatmap_example.png.

    python tools/make_doc_figure.py --infer_dir output/bottle/infer \
        --names missing_000 scratch_001 stain_000 good_000 --out doc/heatmap_example.png
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from report.pictures import stack_vertically  # noqa: E402
from utils.images import open_image  # noqa: E402


def _read(path: str):
    with open_image(path) as img:
        return img.convert("RGB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--infer_dir", required=True)
    p.add_argument("--names", nargs="+", required=True)
    p.add_argument("--out", default=os.path.join("doc", "heatmap_example.png"))
    a = p.parse_args()
    canvas = stack_vertically([_read(os.path.join(a.infer_dir, n + ".png")) for n in a.names])
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    canvas.save(a.out, optimize=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

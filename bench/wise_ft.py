"""A fine-tuned generator moved back towards the packaged one (WiSE-FT), saved for the benches.

    python bench/wise_ft.py --tuned PATH [--alpha A] [--base PATH] --out PATH

Writes ``(1 - A) * base + A * tuned`` (``services/trainer/soup.py``: ``interpolate``; A 0.5
by default, base the packaged SmolLM2) to ``--out``, a model folder that
``bench/trust.py --model`` and ``bench/handwritten.py --model`` then judge beside the base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.trainer.soup import interpolate
from shared.models.generator import packaged_model_dir
from shared.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuned", type=Path, required=True,
                        help="a fine-tuned generator's model folder")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="the fine-tuned model's share (0: the base, 1: the fine-tuned)")
    parser.add_argument("--base", type=Path, default=None,
                        help="default: the packaged generator")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = args.base or packaged_model_dir(Settings().model_cache_dir)
    out = interpolate(base, args.tuned, args.alpha, args.out)
    print(f"{out}: {1 - args.alpha:g} x {base} + {args.alpha:g} x {args.tuned}")


if __name__ == "__main__":
    main()

"""Copy a trained pipeline folder without checkpoints, logs and the feature cache, e.g. to embed it in the package.

    python -m invint_hub.export runs/mnist invint_hub/pretrained/mnist

The copy is loaded once to check that it is complete. A pipeline whose ``pipeline.json`` names a sibling's
autoencoder (``"../cifar10/autoencoder"``) keeps that reference: export the sibling first, under the name the
reference uses, next to it (``invint_hub/pretrained/cifar10``), so the two share one stored autoencoder.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def export(src: str | Path, dst: str | Path) -> Path:
    from .pipeline import InvariancePipeline

    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "logs", "cache", "*.log"))
    pipe = InvariancePipeline.from_pretrained(dst)
    size = sum(f.stat().st_size for f in dst.rglob("*.safetensors"))
    print(f"{pipe}\nweights: {size / 1e6:.2f} MB in {dst}")
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    a = p.parse_args(argv)
    export(a.src, a.dst)


if __name__ == "__main__":
    main()

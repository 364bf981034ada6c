"""Layer-sweep figure: for a few test images, samples D(t^-1(v|z)) at every layer of a pipeline.

    python -m eval.figures --pipeline mnist --out eval/results/figures/mnist_layers.png

Each block of rows is one input image; the first column is the input, the second its autoencoder
reconstruction, then ``--samples`` samples per layer (one row per layer, shallow to deep).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from invint_hub import InvariancePipeline
from invint_hub.data import ImageDataset, default_data_dir
from invint_hub.images import to_pil


def layer_sweep_figure(pipe: InvariancePipeline, x: torch.Tensor, n: int = 8, seed: int = 0, scale: int = 3) -> Image.Image:
    s = pipe.image_size * scale
    pad, label_w = 2, 70
    rows = len(x) * len(pipe.layers)
    cols = 2 + n
    fig = Image.new("RGB", (label_w + cols * (s + pad), rows * (s + pad) + 18), "white")
    draw = ImageDraw.Draw(fig)
    draw.text((label_w, 2), "input", fill="black")
    draw.text((label_w + s + pad, 2), "recon.", fill="black")
    draw.text((label_w + 2 * (s + pad), 2), f"{n} samples D(t^-1(v|z)), v ~ N(0, I)", fill="black")
    recon = pipe.reconstruct(x)
    r = 0
    for i in range(len(x)):
        for layer in pipe.layers:
            y = 18 + r * (s + pad)
            draw.text((2, y + s // 2 - 5), layer, fill="black")
            if layer == pipe.layers[0]:
                fig.paste(to_pil(x[i : i + 1])[0].convert("RGB").resize((s, s), Image.NEAREST), (label_w, y))
                fig.paste(to_pil(recon[i : i + 1])[0].convert("RGB").resize((s, s), Image.NEAREST), (label_w + s + pad, y))
            samples = pipe.sample_invariances(x[i : i + 1], layer, n=n, seed=seed)[0]
            for j, im in enumerate(to_pil(samples)):
                fig.paste(im.convert("RGB").resize((s, s), Image.NEAREST), (label_w + (2 + j) * (s + pad), y))
            r += 1
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=None, help="embedded name, folder or Hub id (default: the embedded default)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=3, help="number of test images")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    pipe = InvariancePipeline.from_pretrained(a.pipeline)
    if default_data_dir() is None:
        raise SystemExit("no data folder found: set INVINT_DATA_DIR")
    ds = ImageDataset(pipe.info["dataset"], "test", pipe.image_size, pipe.channels, limit=a.images, seed=a.seed)
    x = ds.images.float() / 127.5 - 1
    fig = layer_sweep_figure(pipe, x, a.samples, a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

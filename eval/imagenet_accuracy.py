"""ImageNet top-1 / top-5 of a pretrained backbone on the AnimalFaces-10 images (their true ImageNet classes).

    python -m eval.imagenet_accuracy --out eval/results/imagenet_animalfaces.json

Preprocessing is the usual evaluation transform: the shorter side resized to ``size / crop_pct`` (bicubic), a
centre crop of ``size``; the backbone then normalises with its own mean/std. Reads
``<data-dir>/animalfaces10/train-*.parquet`` (all 898 images; column ``imagenet_index`` is the true class).
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from invint_hub import Backbone
from invint_hub.data import default_data_dir


def load_animalfaces(data_dir: Path, limit: int | None = None) -> tuple[list[Image.Image], torch.Tensor]:
    import pyarrow.parquet as pq

    files = sorted((data_dir / "animalfaces10").glob("train-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no animalfaces10/train-*.parquet under {data_dir} (pass --data-dir)")
    rows = [r for f in files for r in pq.read_table(f, columns=["image", "imagenet_index"]).to_pylist()]
    rows = rows[:limit] if limit else rows
    images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in rows]
    return images, torch.tensor([r["imagenet_index"] for r in rows])


def eval_transform(img: Image.Image, size: int, crop_pct: float) -> torch.Tensor:
    """Resize the shorter side to size / crop_pct (bicubic), centre-crop ``size``: (3, size, size) in [-1, 1]."""
    scale = round(size / crop_pct) / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


@torch.no_grad()
def accuracy(backbone: Backbone, images, labels, crop_pct: float, batch_size: int = 32) -> dict:
    size = backbone.input_size
    correct1 = correct5 = 0
    preds = []
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = torch.stack([eval_transform(im, size, crop_pct) for im in images[i:i + batch_size]])
        top5 = backbone(x).topk(5, dim=1).indices
        y = labels[i:i + batch_size]
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(1).sum().item()
        preds += top5[:, 0].tolist()
    n = len(images)
    return {"images": n, "top1": correct1 / n, "top5": correct5 / n, "seconds": time.perf_counter() - start,
            "predictions": preds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", default="tf_efficientnet_lite0", help="timm model name (pretrained=True)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="timm's data config for the model: 0.875")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the result (JSON) here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = Backbone.from_timm(args.timm, pretrained=True)
    images, labels = load_animalfaces(args.data_dir or default_data_dir(), args.limit)
    res = accuracy(backbone, images, labels, args.crop_pct)
    res.update(model=f"timm {args.timm}", crop_pct=args.crop_pct, input_size=backbone.input_size,
               interpolation=backbone.interpolation, torch=torch.__version__, threads=torch.get_num_threads())
    print(f"{args.timm}: top-1 {100 * res['top1']:.1f} %, top-5 {100 * res['top5']:.1f} % on {res['images']} "
          f"AnimalFaces images ({res['seconds']:.0f} s, {res['threads']} threads)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()

import os
import struct
import zlib

import pytest
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds (almost) no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bad_image_files(tmp_path_factory):
    """Files that must be refused with a clear ValueError."""
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    (d / "not_an_image.png").write_bytes(b"this is plain text, not a PNG")
    (d / "empty.png").write_bytes(b"")
    buf = d / "ok.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf)
    data = buf.read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    (d / "huge_header.png").write_bytes(png_with_header_size(20000, 20000))
    return {p.stem: p for p in d.iterdir() if p.stem != "ok"}


@pytest.fixture(scope="session")
def odd_image_files(tmp_path_factory):
    """Unusual but valid images that must be converted: 16-bit, CMYK, RGBA, palette, grayscale, animated, tiny, wide."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(d / "gray16.png")
    Image.new("CMYK", (40, 40), (0, 128, 128, 0)).save(d / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(d / "rgba.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    Image.new("L", (40, 40), 200).save(d / "gray.png")
    frames = [Image.new("RGB", (30, 30), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("RGB", (1, 1), (255, 255, 255)).save(d / "one_pixel.png")
    Image.new("RGB", (300, 20), (5, 5, 5)).save(d / "wide.png")
    return {p.stem: p for p in d.iterdir()}


class BranchyNet(nn.Module):
    """A classifier of one's own: a residual add and a ModuleDict; its constructor arguments are required
    (importable as ``conftest:BranchyNet``, which is what ``Backbone.from_module`` records)."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleDict({"a": nn.Conv2d(width, width, 3, padding=1),
                                   "b": nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, stride=2, padding=1))})
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = self.body["b"](h + self.body["a"](h))
        return self.fc(self.pool(h).flatten(1))


TINY = {
    "data": {"name": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4},
    "classifier": {"model": {"arch": "mnist_cnn", "width": 4},
                   "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "eval_samples": 32}},
    "autoencoder": {"model": {"latent_dim": 8, "width": 4, "n_down": 2},
                    "loss": {"perceptual": "backbone", "perceptual_layers": ["conv1"]},
                    "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "eval_samples": 32}},
    "cinn": {"layers": ["conv1", "logits"],
             "model": {"embed_dim": 8, "n_flows": 2, "hidden": 16, "depth": 1, "embedder_depth": 2, "embedder_width": 4},
             "train": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "eval_samples": 32,
                       "schedule": "cosine"}},
}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """A tiny config on synthetic 16 px data (trains in seconds)."""
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tiny_config, tmp_path_factory):
    """A complete (untrained-quality) pipeline folder made by the real training command on synthetic data."""
    from invint_hub.train import main

    out = tmp_path_factory.mktemp("tiny_pipeline")
    for stage in ("classifier", "autoencoder", "cinn"):
        main([stage, "--config", str(tiny_config), "--output-dir", str(out), "--quiet"])
    return out


@pytest.fixture(scope="session")
def concept_pipeline_dir(tiny_pipeline_dir, tiny_config, tmp_path_factory):
    """The tiny pipeline plus a concept INN trained by `python -m invint_hub.train concepts` (class pairs)."""
    import shutil

    import yaml

    from invint_hub.train import main

    out = tmp_path_factory.mktemp("concept_pipeline")
    shutil.copytree(tiny_pipeline_dir, out, dirs_exist_ok=True)
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["concepts"] = {"estimate_pairs": 64, "model": {"n_flows": 2, "hidden": 16, "depth": 1},
                       "train": {"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 1, "eval_samples": 32}}
    path = out / "concepts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["concepts", "--config", str(path), "--output-dir", str(out), "--quiet"])
    return out


@pytest.fixture(scope="session")
def cpipe(concept_pipeline_dir):
    from invint_hub.pipeline import InvariancePipeline

    return InvariancePipeline.from_pretrained(concept_pipeline_dir)


def _tiny_cinn(backbone, layer: str, seed: int):
    from invint_hub import ConditionalINN

    return ConditionalINN(latent_dim=8, cond_shape=list(backbone.feature_shapes[layer]), embed_dim=8, n_flows=2,
                          hidden=16, depth=1, embedder_depth=2, embedder_width=4, seed=seed, layer=layer)


@pytest.fixture(scope="session")
def shared_ae_pipelines(tmp_path_factory):
    """Pipelines on one autoencoder, stored once (random init, 3x16px, 4 classes), in one folder ``root``:

    * ``a``: the project's cifar_resnet (width 4), cINNs at layer2 and logits; holds the autoencoder;
    * ``b``: a module of one's own (BranchyNet, input resized to 24 px, another normalisation), cINNs at body.b and
      logits; its pipeline.json names ``../a/autoencoder``;
    * ``a_twin``: a's backbone and cINNs, the autoencoder by reference (the same networks in another folder);
    * ``other_ae``: a's backbone and cINNs with an autoencoder of its own (other weights, same sizes).
    """
    import json
    import shutil

    import torch

    from invint_hub import Autoencoder, Backbone, InvariancePipeline

    root = tmp_path_factory.mktemp("shared_ae")
    torch.manual_seed(0)
    ae = Autoencoder(image_size=16, channels=3, latent_dim=8, width=4, n_down=2)
    ae.latent_var.fill_(4.0)
    names = ["cat", "dog", "ship", "truck"]
    res = Backbone("cifar_resnet", num_classes=4, in_channels=3, image_size=16, width=4, class_names=names)
    branchy = Backbone.from_module(BranchyNet(width=6, num_classes=4), layers=["body.a", "body.b", "logits"],
                                   image_size=16, input_size=24, mean=[0.4, 0.45, 0.5], std=[0.25, 0.2, 0.3],
                                   class_names=names, module_kwargs={"width": 6, "num_classes": 4})
    a = InvariancePipeline(res, ae, {l: _tiny_cinn(res, l, i) for i, l in enumerate(["layer2", "logits"])},
                           {"dataset": "synthetic", "domain": "synthetic 16 px test images"})
    a.save_pretrained(root / "a")
    b = InvariancePipeline(branchy, ae, {l: _tiny_cinn(branchy, l, 5 + i) for i, l in enumerate(["body.b", "logits"])},
                           {"dataset": "synthetic", "domain": "synthetic 16 px test images"})
    for name, pipe in (("b", b), ("a_twin", a)):
        pipe.save_pretrained(root / name)
        shutil.rmtree(root / name / "autoencoder")
        info = json.loads((root / name / "pipeline.json").read_text())
        info["autoencoder"] = "../a/autoencoder"
        (root / name / "pipeline.json").write_text(json.dumps(info, indent=2))
    torch.manual_seed(1)
    other = Autoencoder(image_size=16, channels=3, latent_dim=8, width=4, n_down=2)
    other.latent_var.fill_(4.0)
    InvariancePipeline(res, other, a.cinns, dict(a.info)).save_pretrained(root / "other_ae")
    return root

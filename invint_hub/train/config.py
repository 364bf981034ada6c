"""Every training default, and the functions that fill a YAML config in with them.

A config (``configs/*.yaml``) has a ``data`` section and one section per stage (``classifier``,
``autoencoder``, ``cinn``, ``concepts``). Anything a section leaves out takes the value below; the
stages read settings only through the functions of this module, so this file is the one place to
look up (or change) a default.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..concepts import DEFAULT_RHO, RESIDUAL

# ``<stage>.train``: the optimisation of every stage (for a cINN, ``cinn.train_overrides.<layer>`` on top)
TRAIN = dict(
    steps=1000, batch_size=64, lr=1e-3, betas=[0.9, 0.999], weight_decay=0.0, schedule="constant", warmup=0,
    clip_grad=0.0, log_every=50, eval_every=0, checkpoint_every=500, keep_checkpoints=2, eval_samples=2000,
    # adamw (betas) or sgd (Nesterov, momentum betas[0]: the usual choice for ResNets on CIFAR)
    optimizer="adamw",
)
# ``data``: the keys the training code reads besides name, image_size and channels (all required);
# the same defaults as ``invint_hub.data.build_dataset``
DATA = dict(train_split="train", test_split="test", seed=0, num_classes=10)
# ``classifier.pretrained``: a published classifier (``name`` required; the paper's configs say ``arch``).
# source torchvision: weights DEFAULT, a weights name (IMAGENET1K_V1) or a file; source timm: weights true or a file.
# layers: null = the backbone's default layers; input_size: null = the weights' own.
PRETRAINED = dict(source="torchvision", weights="DEFAULT", layers=None, input_size=None)
# ``cinn``: cache the frozen networks' outputs for the training split on disk (small data sets, large backbones)
CINN_CACHE = dict(cache_features=False, cache_dtype="float16", cache_max_gb=8.0, augment=[], augment_copies=1)
# ``autoencoder.loss``
AUTOENCODER_LOSS = dict(
    perceptual="backbone", perceptual_weight=1.0, perceptual_layers=None, lpips_weights=None,
    # perceptual: backbone at this input side instead of the backbone's own (null): e.g. an ImageNet network's early
    # blocks on 32 px CIFAR images as they are, not upsampled to the side the cINNs condition on (cheaper)
    perceptual_input_size=None,
    kl_weight=1e-5, disc_weight=0.0, disc_start=0, disc_lr_factor=1.0,
    # ColorMNIST only: train on pairs of one digit image painted twice with fresh colours, and ask the first
    # ``invariant_dims`` latent dimensions (posterior means) not to change between the two paintings
    recolor_invariance=0.0, invariant_dims=None,
)
# ``concepts.model``: the concept INN e (the paper's 12 blocks of width 512, depth 2)
CONCEPT_MODEL = dict(n_flows=12, hidden=512, depth=2)
# ``concepts``: how pairs are made and how the factors are sized (``pairs`` and ``factors`` depend on the data,
# see ``concept_settings``). Optional ``pair_weights: {concept: weight}``: how often each concept is the shared one in
# the training pairs (default: uniform, as IIN); test pairs are always uniform.
CONCEPTS = dict(factor_sizes="estimate", rho=DEFAULT_RHO, estimate_pairs=5000)
COLORMNIST_FACTORS = ["digit", "fg", "bg"]
LABEL_FACTORS = ["class"]
# command-line flags (``python -m invint_hub.train --help``)
SEED = 0
SAVE_DTYPE = "fp32"
OUTPUT_ROOT = "runs"  # --output-dir defaults to runs/<config file name without .yaml>
# fixed evaluation settings (not configurable)
EVAL_BATCH = 256  # images per batch of a stage's test-split evaluation
EVAL_SEED = 12345  # posterior noise of the cINN / concept evaluations
LATENT_VAR_IMAGES = 5000  # training images whose z_bar variance the autoencoder records
CARD_SAMPLES = 16  # samples per image of the variance-explained measures in the cards
CONCEPT_VARIANCE_IMAGES = 512  # test images of the concept stage's per-layer variance measure


def load_config(path: str | Path) -> dict:
    """Read and validate a YAML config (``validate_config``): every mistake is a ``ValueError`` naming the file and
    the key, raised before any training starts."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from err
    validate_config(cfg, path)
    return cfg


# --- validation ----------------------------------------------------------------------------------------------
# A rule is a type (int, float, str, bool, list), a tuple of allowed values, or a dict of sub-rules. float accepts
# ints and YAML's unquoted exponents ("1e-3" is a string to YAML 1.1); a callable checks a range.
def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


TRAIN_RULES = dict(
    steps=(int, _non_negative), batch_size=(int, _positive), lr=(float, _positive), betas=(list, None),
    weight_decay=(float, _non_negative), schedule=(("constant", "cosine"), None), warmup=(int, _non_negative),
    clip_grad=(float, _non_negative), log_every=(int, _positive), eval_every=(int, _non_negative),
    checkpoint_every=(int, _non_negative), keep_checkpoints=(int, _positive), eval_samples=(int, _positive),
    optimizer=(("adamw", "sgd"), None),
)
# ``classifier.train.augment``: batch augmentations of the classifier stage (CIFAR's standard pair)
AUGMENTATIONS = ("crop", "flip")  # crop: pad 4 px (reflect) and take a random crop of the image size; flip: horizontal
# label_smoothing: of the classifier's cross-entropy (0 = none)
CLASSIFIER_TRAIN_RULES = dict(TRAIN_RULES, augment=(list, None), label_smoothing=(float, lambda v: 0 <= v < 1))
DATA_RULES = dict(
    name=(str, None), image_size=(int, lambda v: v >= 4), channels=((1, 3), None), train_split=(str, None),
    test_split=(str, None), seed=(int, None), num_classes=(int, _positive), label_column=(str, None),
    domain=(str, None),  # what inputs the pipeline understands, in plain words (pipeline.json "domain", the Space)
)
PRETRAINED_RULES = dict(source=(("torchvision", "timm"), None), name=(str, None), arch=(str, None), weights=(None, None),
                        weights_path=(str, None), layers=(list, None), input_size=(int, _positive))
LOSS_RULES = dict(
    perceptual=(("backbone", "lpips", "none"), None), perceptual_weight=(float, _non_negative),
    perceptual_layers=(list, None), lpips_weights=(str, None), perceptual_input_size=(int, lambda v: v >= 8),
    kl_weight=(float, _non_negative),
    disc_weight=(float, _non_negative), disc_start=(int, _non_negative), disc_lr_factor=(float, _positive),
    recolor_invariance=(float, _non_negative), invariant_dims=(int, _positive),
)
CONCEPT_RULES = dict(pairs=(("colormnist", "labels", "attributes"), None), factors=(list, None), attributes=(dict, None),
                     factor_sizes=(None, None), pair_weights=(dict, None), rho=(float, lambda v: 0 <= v < 1), estimate_pairs=(int, _positive))
# augment: crop / flip of the training images before both frozen networks (so z_bar and z stay paired); with the
# cache, augment_copies copies of the training split are cached (copy 0 as is, the others augmented)
CINN_CACHE_RULES = dict(cache_features=(bool, None), cache_dtype=(("float16", "float32"), None),
                        cache_max_gb=(float, _positive), augment=(list, None), augment_copies=(int, _positive))
SECTIONS = {  # section -> allowed keys (model sections are checked against the model class)
    "data": set(DATA_RULES), "classifier": {"model", "train", "pretrained", "init_from"},
    "autoencoder": {"model", "loss", "train", "from"},
    "cinn": {"layers", "model", "layer_overrides", "train", "train_overrides"} | set(CINN_CACHE_RULES),
    "concepts": {"model", "train"} | set(CONCEPT_RULES),
}


def _check_value(value, rule, key: str, where: str) -> None:
    kind, check = rule
    if isinstance(kind, tuple):  # one of a few allowed values
        if value not in kind:
            raise ValueError(f"{where}: {key} = {value!r}; allowed values: {', '.join(map(repr, kind))}")
        return
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{where}: {key} = {value!r} is not a number") from None
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        hint = f" (write {value} without quotes)" if kind in (int, float) and isinstance(value, str) else ""
        raise ValueError(f"{where}: {key} = {value!r} ({type(value).__name__}); expected {kind.__name__}{hint}")
    if check is not None and not check(value):
        raise ValueError(f"{where}: {key} = {value!r} is out of range")


def _check_section(values, rules: dict, prefix: str, where: str) -> None:
    if values is None:
        return
    if not isinstance(values, dict):
        raise ValueError(f"{where}: {prefix} must be a mapping, got {values!r}")
    for key, value in values.items():
        if key not in rules:
            raise ValueError(f"{where}: unknown key {prefix}.{key}; allowed: {', '.join(sorted(rules))}")
        rule = rules[key]
        if rule[0] is None or value is None:  # free-form (validated where it is used) or explicitly unset
            continue
        _check_value(value, rule, f"{prefix}.{key}", where)


def _check_model(values, cls, prefix: str, where: str) -> None:
    from ..hub import check_config

    if values is None:
        return
    if not isinstance(values, dict):
        raise ValueError(f"{where}: {prefix} must be a mapping, got {values!r}")
    check_config(cls, values, f"{where}: {prefix}")


def validate_config(cfg, path: str | Path) -> None:
    """``ValueError`` naming ``path`` and the key for an unknown section or key, a value of the wrong type, or one
    outside its allowed values or range. Model sections take exactly their model's constructor arguments."""
    from ..autoencoder import Autoencoder
    from ..backbones import Backbone
    from ..cinn import ConditionalINN
    from ..concepts import FactorINN

    where = str(path)
    if not isinstance(cfg, dict) or "data" not in cfg:
        raise ValueError(f"{where}: a config needs a 'data' section")
    for name in cfg:
        if name not in SECTIONS:
            raise ValueError(f"{where}: unknown section {name!r}; allowed: {', '.join(SECTIONS)}")
    for key in ("name", "image_size", "channels"):
        if key not in (cfg["data"] or {}):
            raise ValueError(f"{where}: data.{key} is missing")
    _check_section(cfg["data"], DATA_RULES, "data", where)
    models = {"classifier": Backbone, "autoencoder": Autoencoder, "cinn": ConditionalINN, "concepts": FactorINN}
    for name, cls in models.items():
        sec = cfg.get(name)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise ValueError(f"{where}: section {name} must be a mapping, got {sec!r}")
        for key in sec:
            if key not in SECTIONS[name]:
                raise ValueError(f"{where}: unknown key {name}.{key}; allowed: {', '.join(sorted(SECTIONS[name]))}")
        _check_model(sec.get("model"), cls, f"{name}.model", where)
        _check_section(sec.get("train"), CLASSIFIER_TRAIN_RULES if name == "classifier" else TRAIN_RULES,
                       f"{name}.train", where)
    _check_section((cfg.get("classifier") or {}).get("pretrained"), PRETRAINED_RULES, "classifier.pretrained", where)
    init_from = (cfg.get("classifier") or {}).get("init_from")
    if init_from is not None:  # a second training stage: start from a trained Backbone (train_classifier loads it)
        if not isinstance(init_from, str):
            raise ValueError(f"{where}: classifier.init_from = {init_from!r}; expected the path of a backbone or "
                             "pipeline folder")
        if (cfg.get("classifier") or {}).get("pretrained"):
            raise ValueError(f"{where}: classifier.init_from and classifier.pretrained exclude each other")
    for key, ops in (("classifier.train.augment", ((cfg.get("classifier") or {}).get("train") or {}).get("augment")),
                     ("cinn.augment", (cfg.get("cinn") or {}).get("augment"))):
        for op in ops or []:
            if op not in AUGMENTATIONS:
                raise ValueError(f"{where}: {key} has {op!r}; allowed entries: {', '.join(AUGMENTATIONS)}")
    _check_section((cfg.get("autoencoder") or {}).get("loss"), LOSS_RULES, "autoencoder.loss", where)
    aloss = (cfg.get("autoencoder") or {}).get("loss") or {}
    if (aloss.get("recolor_invariance") or 0) > 0:
        if cfg["data"]["name"] != "colormnist":
            raise ValueError(f"{where}: autoencoder.loss.recolor_invariance needs data.name colormnist (it repaints "
                             f"ColorMNIST digits), got {cfg['data']['name']!r}")
        latent = ((cfg.get("autoencoder") or {}).get("model") or {}).get("latent_dim", 64)
        dims = aloss.get("invariant_dims")
        if dims is None or not 0 < dims < latent:
            raise ValueError(f"{where}: autoencoder.loss.invariant_dims must be set between 1 and latent_dim - 1 "
                             f"({latent - 1}) when recolor_invariance > 0, got {dims!r}")
    ae_from = (cfg.get("autoencoder") or {}).get("from")
    if ae_from is not None:
        if not isinstance(ae_from, str) or not ae_from.strip():
            raise ValueError(f"{where}: autoencoder.from = {ae_from!r}; expected the path of another pipeline folder")
        unused = sorted(k for k in ("model", "loss", "train") if (cfg.get("autoencoder") or {}).get(k) is not None)
        if unused:
            raise ValueError(f"{where}: autoencoder.from reuses the autoencoder of {ae_from}, so autoencoder."
                             f"{', autoencoder.'.join(unused)} would not be used: remove them")
    concepts = cfg.get("concepts") or {}
    _check_section({k: v for k, v in concepts.items() if k not in ("model", "train")}, CONCEPT_RULES, "concepts", where)
    cinn = cfg.get("cinn") or {}
    for layer, override in (cinn.get("layer_overrides") or {}).items():
        _check_model(override, ConditionalINN, f"cinn.layer_overrides.{layer}", where)
    for layer, override in (cinn.get("train_overrides") or {}).items():
        _check_section(override, TRAIN_RULES, f"cinn.train_overrides.{layer}", where)
    _check_section({k: v for k, v in cinn.items() if k in CINN_CACHE_RULES}, CINN_CACHE_RULES, "cinn", where)
    if (cinn.get("augment_copies") or 1) > 1 and not (cinn.get("augment") and cinn.get("cache_features")):
        raise ValueError(f"{where}: cinn.augment_copies = {cinn['augment_copies']} needs cinn.augment and "
                         f"cinn.cache_features: true (without the cache every batch is augmented afresh)")
    if cinn.get("layers") is not None and not isinstance(cinn["layers"], list):
        raise ValueError(f"{where}: cinn.layers must be a list of layer names, got {cinn['layers']!r}")


def section(cfg: dict, name: str) -> dict:
    """A stage's section (``{}`` when absent or empty)."""
    return dict(cfg.get(name) or {})


def data_settings(cfg: dict) -> dict:
    """The ``data`` section over ``DATA``."""
    return {**DATA, **cfg["data"]}


def split_name(cfg: dict, split_key: str) -> str:
    """``data.train_split`` / ``data.test_split``."""
    if split_key not in ("train_split", "test_split"):
        raise ValueError(f"split_key must be train_split or test_split, got {split_key!r}")
    return data_settings(cfg)[split_key]


def train_settings(cfg: dict, stage: str, args, layer: str | None = None) -> dict:
    """The stage's ``train`` section over ``TRAIN``; for a cINN, ``train_overrides.<layer>`` on top; CLI flags last."""
    s = section(cfg, stage)
    t = dict(TRAIN)
    t.update(s.get("train") or {})
    if layer is not None:
        t.update((s.get("train_overrides") or {}).get(layer) or {})
    if args.steps is not None:
        t["steps"] = args.steps
    if args.batch_size is not None:
        t["batch_size"] = args.batch_size
    for k in ("checkpoint_every", "keep_checkpoints"):
        if getattr(args, k, None) is not None:
            t[k] = getattr(args, k)
    for k in ("lr", "weight_decay", "clip_grad"):
        t[k] = float(t[k])
    return t


def pretrained_settings(cfg: dict) -> dict | None:
    """``classifier.pretrained`` over ``PRETRAINED``, or None for a classifier trained from scratch."""
    pre = dict(section(cfg, "classifier").get("pretrained") or {})
    if not pre:
        return None
    if "arch" in pre:  # the paper's configs: {arch: alexnet, weights: ..., weights_path: ...}
        pre.setdefault("name", pre.pop("arch"))
    if pre.get("weights_path"):
        pre["weights"] = pre.pop("weights_path")
    pre.pop("weights_path", None)
    if "name" not in pre:
        raise ValueError("classifier.pretrained needs a name (a torchvision or timm model name)")
    out = {**PRETRAINED, **pre}
    if out["source"] not in ("torchvision", "timm"):
        raise ValueError(f"classifier.pretrained.source must be torchvision or timm, got {out['source']!r}")
    if out["source"] == "timm" and "weights" not in pre:
        out["weights"] = True
    return out


def model_settings(cfg: dict, stage: str) -> dict:
    """``<stage>.model``: constructor arguments of the stage's model (its own defaults fill the rest)."""
    model = section(cfg, stage).get("model") or {}
    return {**CONCEPT_MODEL, **model} if stage == "concepts" else dict(model)


def cinn_model_settings(cfg: dict, layer: str) -> dict:
    """``cinn.model`` with ``cinn.layer_overrides.<layer>`` on top."""
    kwargs = model_settings(cfg, "cinn")
    kwargs.update((section(cfg, "cinn").get("layer_overrides") or {}).get(layer) or {})
    return kwargs


def cinn_layers(cfg: dict) -> list[str]:
    """``cinn.layers`` (default: none; then ``--layer`` is needed)."""
    return list(section(cfg, "cinn").get("layers") or [])


def cinn_cache_settings(cfg: dict) -> dict:
    """``cinn.cache_features`` / ``cache_dtype`` / ``cache_max_gb`` / ``augment`` / ``augment_copies`` over
    ``CINN_CACHE``."""
    s = section(cfg, "cinn")
    return {k: s.get(k, v) for k, v in CINN_CACHE.items()}


def autoencoder_from(cfg: dict) -> str | None:
    """``autoencoder.from``: another pipeline folder whose autoencoder this one uses by reference (None: train one)."""
    value = section(cfg, "autoencoder").get("from")
    return str(value) if value else None


def autoencoder_loss(cfg: dict) -> dict:
    """``autoencoder.loss`` over ``AUTOENCODER_LOSS``."""
    return {**AUTOENCODER_LOSS, **(section(cfg, "autoencoder").get("loss") or {})}


def concept_settings(cfg: dict) -> dict:
    """The ``concepts`` section with every default filled in: pairs, factors, factor_sizes, rho, estimate_pairs.

    ``pairs`` defaults to ``colormnist`` on ColorMNIST and to ``labels`` (one concept ``class``) elsewhere;
    ``attributes`` pairs need ``attributes: {concept name: attribute column}`` and default to all of them.
    """
    c = section(cfg, "concepts")
    data_name = cfg["data"]["name"]
    c.setdefault("pairs", "colormnist" if data_name == "colormnist" else "labels")
    if c["pairs"] == "colormnist":
        c.setdefault("factors", list(COLORMNIST_FACTORS))
    elif c["pairs"] == "labels":
        c.setdefault("factors", list(LABEL_FACTORS))
    elif c["pairs"] == "attributes":
        attrs = c.get("attributes")
        if not isinstance(attrs, dict) or not attrs:
            raise ValueError("concepts.pairs: attributes needs concepts.attributes: {concept name: attribute column}")
        c.setdefault("factors", list(attrs))
        unknown = [f for f in c["factors"] if f not in attrs]
        if unknown:
            raise ValueError(f"concepts.factors {unknown} have no column in concepts.attributes")
    else:
        raise ValueError(f"concepts.pairs must be colormnist, labels or attributes, got {c['pairs']!r}")
    if c["pairs"] == "labels" and len(c["factors"]) != 1:
        raise ValueError(f"label pairs have one concept, got factors {c['factors']}")
    if RESIDUAL in c["factors"]:
        raise ValueError(f"{RESIDUAL!r} is added automatically as the last factor; do not list it in concepts.factors")
    for k, v in CONCEPTS.items():
        c.setdefault(k, v)
    c["model"] = model_settings(cfg, "concepts")
    return c


__all__ = [
    "SEED", "SAVE_DTYPE", "OUTPUT_ROOT", "TRAIN", "AUGMENTATIONS", "DATA", "PRETRAINED", "AUTOENCODER_LOSS", "CONCEPT_MODEL", "CONCEPTS", "load_config", "data_settings",
    "split_name", "train_settings", "pretrained_settings", "model_settings", "cinn_model_settings", "cinn_layers",
    "autoencoder_loss", "autoencoder_from", "concept_settings", "cinn_cache_settings", "validate_config",
]

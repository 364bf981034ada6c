"""The command line: ``main(argv)`` parses the flags, makes the Accelerator and runs one stage."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path


from .autoencoder import train_autoencoder
from .cinn import train_cinns
from .classifier import train_classifier
from ..pipeline import PIPELINE_FILE
from .common import has_autoencoder, load_backbone, push, write_pipeline_card
from .concepts import train_concepts
from .config import (OUTPUT_ROOT, SAVE_DTYPE, SEED, autoencoder_from, autoencoder_loss, cinn_layers, load_config, pretrained_settings,
                     train_settings)

STAGES = ("classifier", "autoencoder", "cinn", "concepts")


def parse_args(argv=None):
    doc = sys.modules[__package__].__doc__  # the package docstring: the usage examples
    p = argparse.ArgumentParser(prog="python -m invint_hub.train", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--output-dir", default=None, help=f"pipeline folder (default {OUTPUT_ROOT}/<config name>)")
    p.add_argument("--layer", default=None, help="cinn stage: one layer, a comma list, or 'all' (default: the config's layers)")
    p.add_argument("--data-dir", default=None, help="folder with <name>/<split>-*.parquet (default $INVINT_DATA_DIR or ../shared/data)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the pipeline folder to this Hub repo")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size (global)")
    p.add_argument("--limit-train", type=int, default=None, help="use only N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only N test images")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default=SAVE_DTYPE, help="dtype of saved weights")
    p.add_argument("--log-with", default=None, help="also log to an Accelerate tracker, e.g. tensorboard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="override train.checkpoint_every")
    p.add_argument("--keep-checkpoints", type=int, default=None, metavar="K", help="override train.keep_checkpoints")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def cpu_bf16_fallback(args) -> str | None:
    """``--mixed-precision bf16`` on a CPU without native bf16 kernels (AVX2 only: no AVX-512, or oneDNN capped below
    it by ``ONEDNN_MAX_CPU_ISA``) runs in fp32.

    There oneDNN emulates bf16: a cifar_resnet step took 16.5 s instead of 1.3 s in fp32 (2 threads, AVX2 EPYC;
    ``eval/results/bench_classifier_step.md``). The
    setting comes from ``--mixed-precision`` or from ``accelerate launch --mixed_precision``
    (``ACCELERATE_MIXED_PRECISION``). Returns the one-line warning, or None where nothing changes.
    """
    import torch

    asked = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    on_cpu = args.cpu or not torch.cuda.is_available()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith(("AVX2", "AVX ", "SSE"))  # oneDNN told to stay below AVX-512
    if asked != "bf16" or not on_cpu or (torch.ops.mkldnn._is_mkldnn_bf16_supported() and not capped):
        return None
    args.mixed_precision = "no"
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    return (f"--mixed-precision bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 kernels "
            "and would emulate them about 12x slower; training in fp32 instead")


def make_accelerator(args, out: Path):
    """A new Accelerator for this run.

    accelerate keeps one process-wide state (device, mixed precision) that its public API cannot reset, so
    ``main()`` can run again in one process (tests, notebooks) only with the same ``--mixed-precision`` and
    ``--cpu``; a different setting is refused with a clear error (run that stage in a new process).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import ProjectConfiguration

    fallback = cpu_bf16_fallback(args)
    if fallback:
        warnings.warn(fallback, stacklevel=2)
    if is_initialized():
        state = AcceleratorState()
        if args.mixed_precision is not None and args.mixed_precision != state.mixed_precision:
            raise ValueError(f"--mixed-precision {args.mixed_precision}: this process already trained with mixed precision "
                             f"{state.mixed_precision!r} (accelerate keeps one setting per process); run this stage in a new process")
        if args.cpu and state.device.type != "cpu":
            raise ValueError(f"--cpu: this process already trained on {state.device} (accelerate keeps one device per "
                             "process); run this stage in a new process")
    return Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        log_with=args.log_with, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def uses_published_classifier(cfg: dict, args) -> bool:
    """``classifier.pretrained`` with no classifier training (``classifier.train.steps: 0``)."""
    return pretrained_settings(cfg) is not None and train_settings(cfg, "classifier", argparse.Namespace(
        steps=None, batch_size=None, checkpoint_every=None, keep_checkpoints=None))["steps"] == 0


def main(argv=None):
    from accelerate.utils import set_seed

    args = parse_args(argv)
    cfg = load_config(args.config)
    out = Path(args.output_dir or Path(OUTPUT_ROOT) / Path(args.config).stem)
    acc = make_accelerator(args, out)
    set_seed(args.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if args.log_with:
        acc.init_trackers(f"{args.stage}", config={"stage": args.stage, "config": args.config})
    results = {}
    if args.stage != "classifier" and not (out / "backbone").is_dir() and uses_published_classifier(cfg, args):
        print(f"{out}/backbone: the published classifier of classifier.pretrained (no classifier stage to run)")
        train_classifier(acc, cfg, args, out)
        acc.wait_for_everyone()
    if args.stage in ("cinn", "concepts") and autoencoder_from(cfg) and not has_autoencoder(out):
        print(f"{out}/{PIPELINE_FILE}: the autoencoder of autoencoder.from (no autoencoder stage to run)")
        train_autoencoder(acc, cfg, args, out)
        acc.wait_for_everyone()
    if args.stage == "classifier":
        results["classifier"] = train_classifier(acc, cfg, args, out)
    elif args.stage == "autoencoder":
        if (not autoencoder_from(cfg) and not (out / "backbone").is_dir()
                and autoencoder_loss(cfg)["perceptual"] == "backbone"):
            raise SystemExit(f"{out}/backbone not found: train the classifier stage first (its features give the perceptual loss)")
        results["autoencoder"] = train_autoencoder(acc, cfg, args, out)
    elif args.stage == "concepts":
        if not has_autoencoder(out):
            raise SystemExit(f"{out}/autoencoder not found: train the autoencoder stage first")
        results["concepts"] = train_concepts(acc, cfg, args, out)
    else:
        if not (out / "backbone").is_dir() or not has_autoencoder(out):
            needed = "backbone" if not (out / "backbone").is_dir() else "autoencoder"
            raise SystemExit(f"{out}/{needed} not found: train the classifier and autoencoder stages first")
        layers = args.layer or ",".join(cinn_layers(cfg))
        if layers == "all":
            layers = ",".join(load_backbone(out).layers)
        if not layers:
            raise SystemExit("no layers: pass --layer or list cinn.layers in the config")
        results.update(train_cinns(acc, cfg, args, out, [layer.strip() for layer in layers.split(",")]))
        if acc.is_main_process and all(r is not None for r in results.values()):
            write_pipeline_card(out, cfg)
    acc.wait_for_everyone()
    if args.push_to_hub and all(r is not None for r in results.values()):
        push(out, args.push_to_hub, acc)
    acc.end_training()
    return results

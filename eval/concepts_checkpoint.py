"""Turn a concepts-stage training checkpoint into a pipeline folder, to measure e part-way through training.

    python -m eval.concepts_checkpoint --run runs/<run> --config <config> --out <folder> [--step N]
    python -m eval.concepts_report --pipeline <folder> --config <config> --out <report folder> --sections pairs,response,transfer

``<folder>`` gets the run's backbone, autoencoder and cINNs and a ``concepts/`` component built from the model weights of
``runs/<run>/checkpoints/concepts/step_N`` (default: the newest complete checkpoint), with the factor sizes and e's
settings of ``<config>`` (which must be fixed sizes: an estimate is not stored in the checkpoint). The weights load with
strict key checks and are saved in fp32.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from invint_hub.concepts import RESIDUAL, FactorINN
from invint_hub.pipeline import PIPELINE_FILE
from invint_hub.train.common import check_checkpoint, checkpoints
from invint_hub.train.config import concept_settings, load_config


def checkpoint_pipeline(run: Path, config: Path, out: Path, step: int | None = None) -> Path:
    """Write ``out`` (a loadable pipeline folder) from ``run`` and one of its concepts checkpoints; returns the checkpoint."""
    from safetensors.torch import load_file

    found = [d for d in checkpoints(run / "checkpoints" / "concepts") if check_checkpoint(d) is None]
    if step is not None:
        found = [d for d in found if d.name == f"step_{step}"]
    if not found:
        raise FileNotFoundError(f"{run}/checkpoints/concepts: no complete checkpoint" + (f" step_{step}" if step is not None else ""))
    ckpt = found[-1]
    c = concept_settings(load_config(config))
    if c["factor_sizes"] == "estimate":
        raise ValueError(f"{config}: concepts.factor_sizes must be fixed sizes to rebuild e from a checkpoint")
    e = FactorINN(dim=sum(c["factor_sizes"]), factor_sizes=[int(s) for s in c["factor_sizes"]],
                  factor_names=list(c["factors"]) + [RESIDUAL], rho=float(c["rho"]), **c["model"])
    e.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    info = json.loads((run / PIPELINE_FILE).read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for part in [info["backbone"], info["autoencoder"], *sorted({p.split("/")[0] for p in (info.get("cinn") or {}).values()})]:
        shutil.copytree(run / part, out / part)
    e.save_pretrained(out / "concepts")
    info["concepts"] = "concepts"
    (out / PIPELINE_FILE).write_text(json.dumps(info, indent=2))
    return ckpt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="the concepts stage's --output-dir")
    p.add_argument("--config", required=True, type=Path, help="the config the run was trained with")
    p.add_argument("--out", required=True, type=Path, help="pipeline folder to write (replaced if it exists)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    a = p.parse_args(argv)
    ckpt = checkpoint_pipeline(a.run, a.config, a.out, a.step)
    print(f"wrote {a.out} from {ckpt}")


if __name__ == "__main__":
    main()

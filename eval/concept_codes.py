"""How a ColorMNIST concept INN e codes the digit, on train and test pairs (eval/results/concepts_diagnosis.md).

    python -m eval.concept_codes --pipeline colormnist [--pairs 6000]

Per split (``ColorMNISTPairs`` seed 0 for train, 1 for test, as the concepts stage draws them; uniform concepts):
the normalised pair correlations of the shared factors (``pair_correlations``, posterior means), and on the pairs'
first images the digit factor's per-dimension variance, its within-class share of that variance, and how often the
nearest class mean of the digit factor, and of the residual, gives the image's class.
"""
from __future__ import annotations

import argparse

import torch

from invint_hub.concepts import ColorMNISTPairs, pair_correlations
from invint_hub.data import ColorMNIST
from invint_hub.pipeline import InvariancePipeline
from invint_hub.train.concepts import latents_of_pairs


def nearest_mean_accuracy(codes: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose nearest class mean (means from the same rows) is their own class."""
    classes = labels.unique()
    means = torch.stack([codes[labels == c].mean(0) for c in classes])
    return (classes[torch.cdist(codes, means).argmin(1)] == labels).float().mean().item()


@torch.no_grad()
def code_statistics(pipe, split: str, seed: int, n: int, data_dir=None) -> dict:
    e = pipe.concepts.eval()
    sizes, names = list(e.factor_sizes), list(e.factor_names)
    if names[0] != "digit":
        raise ValueError(f"the concept INN's first factor must be 'digit', got {names}")
    pairs = ColorMNISTPairs.from_dataset(ColorMNIST(split=split, data_dir=data_dir), names[:-1], seed)
    za, zb, fs = latents_of_pairs(pipe.autoencoder.eval(), pairs, n, "cpu")
    ea, eb = e(za)[0], e(zb)[0]
    stats = pair_correlations(ea, eb, fs, sizes, names)
    labels = pairs.sample(torch.arange(len(za)))["digit_a"]
    digit, residual = ea[:, : sizes[0]], ea[:, -sizes[-1]:]
    total = digit.var(0)
    within = torch.stack([digit[labels == c].var(0) for c in labels.unique()]).mean(0)
    return {"correlation": {k: v["correlation"][k] for k, v in stats.items()},
            "digit_profile": stats["digit"]["profile"], "digit_variance": total.tolist(),
            "digit_within_class_share": (within / total).tolist(),
            "nearest_mean_class_accuracy": {"digit": nearest_mean_accuracy(digit, labels),
                                            "residual": nearest_mean_accuracy(residual, labels)}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="colormnist", help="ColorMNIST pipeline folder or name, with a concepts/ model")
    p.add_argument("--pairs", type=int, default=6000, help="pairs per split")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    pipe = InvariancePipeline.from_pretrained(a.pipeline)
    for split, seed in (("train", 0), ("test", 1)):
        s = code_statistics(pipe, split, seed, a.pairs, a.data_dir)
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"{split}: correlation {', '.join(f'{k} {v:.3f}' for k, v in s['correlation'].items())}; "
              f"digit profile {fmt(s['digit_profile'])}; digit variance {fmt(s['digit_variance'])}; "
              f"within-class share {fmt(s['digit_within_class_share'])}; nearest class mean: digit "
              f"{100 * s['nearest_mean_class_accuracy']['digit']:.1f} %, residual {100 * s['nearest_mean_class_accuracy']['residual']:.1f} %")


if __name__ == "__main__":
    main()

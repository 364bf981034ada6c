"""Evaluation package: reproduce the paper's quantitative claims on an ``InvariancePipeline``.

    python -m eval.report --pipeline mnist --out eval/results/mnist

``eval.metrics``    Inception features (offline TorchScript), FID/KID, cosine and pixel metrics.
``eval.baselines``  deterministic inverse decoders (Dosovitskiy & Brox style) and the
                    autoencoder + unconditional INN generative model (IIN).
``eval.report``     the command that writes report.md, results.json and plots.
"""

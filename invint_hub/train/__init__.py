"""Train the stages of a pipeline with Accelerate, into one pipeline folder.

    accelerate launch -m invint_hub.train classifier  --config configs/mnist.yaml --output-dir runs/mnist
    accelerate launch -m invint_hub.train autoencoder --config configs/mnist.yaml --output-dir runs/mnist
    accelerate launch -m invint_hub.train cinn        --config configs/mnist.yaml --output-dir runs/mnist [--layer fc]
    accelerate launch -m invint_hub.train concepts    --config configs/colormnist.yaml --output-dir runs/colormnist

Each stage writes its model to ``<output-dir>/{backbone,autoencoder,cinn/<layer>,concepts}`` (config.json,
model.safetensors, model card) and updates ``<output-dir>/pipeline.json``, so after the first three
commands ``InvariancePipeline.from_pretrained("<output-dir>")`` works. Checkpoints for
``--resume`` go to ``<output-dir>/checkpoints/<stage>/step_<n>``; metrics to
``<output-dir>/logs/<stage>.jsonl`` (and TensorBoard with ``--log-with tensorboard``).
``python -m invint_hub.train ...`` runs the same on one process. From Python, ``train_pipeline(backbone,
train_set, test_set, output_dir)`` trains the autoencoder and the cINNs for your own classifier and data.

Modules: ``config`` (every default), ``common`` (loop, checkpoints, logs, cards), one per stage
(``classifier``, ``autoencoder``, ``cinn``, ``concepts``), ``cli`` (``main``). Needs the ``[train]`` extra
(accelerate, datasets, pyyaml, tqdm).
"""
from .api import train_pipeline
from .cli import STAGES, main, parse_args
from .common import batch_indices
from .config import concept_settings, load_config, train_settings

__all__ = ["STAGES", "main", "parse_args", "train_pipeline", "batch_indices", "load_config", "train_settings",
           "concept_settings"]

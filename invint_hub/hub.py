"""Hugging Face Hub I/O: one mixin for every model, and model cards.

Every model directory holds ``config.json`` (the constructor arguments) and
``model.safetensors``. Loading is strict (a missing or extra key is an error) and never
unpickles anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download

REPO_URL = "https://github.com/invint-hub/invint_hub"
PAPER_URL = "https://arxiv.org/abs/2008.01777"
HUB_KWARGS: dict[str, Any] = dict(
    library_name="invint_hub",
    repo_url=REPO_URL,
    paper_url=PAPER_URL,
    license="mit",
    tags=["interpretability", "invertible-neural-network", "invint_hub"],
)
WEIGHTS_NAME = "model.safetensors"

BIBTEX = """@inproceedings{rombach2020making,
  title     = {Making Sense of CNNs: Interpreting Deep Representations and Their Invariances with INNs},
  author    = {Rombach, Robin and Esser, Patrick and Ommer, Bj{\\"o}rn},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2020}
}"""


class HubMixin(PyTorchModelHubMixin):
    """``PyTorchModelHubMixin`` with strict, safetensors-only loading and optional fp16 saving."""

    _save_dtype: torch.dtype | None = None

    def save_pretrained(self, save_directory, *, dtype: torch.dtype | None = None, **kwargs):  # type: ignore[override]
        """Save ``config.json`` + ``model.safetensors``; ``dtype=torch.float16`` halves the file."""
        self._save_dtype = dtype
        try:
            return super().save_pretrained(save_directory, **kwargs)
        finally:
            self._save_dtype = None

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        state = {}
        for k, v in self.state_dict().items():
            v = v.detach().cpu()
            if self._save_dtype is not None and v.is_floating_point():
                v = v.to(self._save_dtype)
            state[k] = v.contiguous().clone()
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, strict: bool = True, **kwargs):  # type: ignore[override]
        """Load from a local directory or a Hub repo id. Strict key checks by default."""
        return super().from_pretrained(pretrained_model_name_or_path, strict=strict, **kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ):
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(model_file):
                raise FileNotFoundError(f"{model_id} has no {WEIGHTS_NAME}")
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        load_weights(model, model_file, strict=strict, map_location=map_location)
        return model.eval()


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True, map_location: str = "cpu") -> None:
    """Load a safetensors file into ``model``; with ``strict`` a missing or extra key raises ``RuntimeError``."""
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(map_location))
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise RuntimeError(
                f"weights in {path} do not match {type(model).__name__}: "
                f"missing keys {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"unexpected keys {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
            )
    for k, v in state.items():  # keep each tensor's own dtype (fp16 files load into fp32 models)
        if k in own and own[k].is_floating_point():
            state[k] = v.to(own[k].dtype)
    model.load_state_dict(state, strict=strict)
    model.to(map_location)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_model_card(
    directory: str | Path,
    title: str,
    summary: str,
    details: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    command: str | None = None,
    notes: str | None = None,
    tags: list[str] | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Write a README.md model card with Hub metadata, details, metrics, the training command and the BibTeX."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        library_name="invint_hub",
        license="mit",
        tags=sorted(set(HUB_KWARGS["tags"] + (tags or []))),
        datasets=datasets or None,
    )
    lines = [f"# {title}", "", summary, "", "## Details", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in details.items()]
    if metrics:
        lines += ["", "## Metrics (measured)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    if command:
        lines += ["", "## How it was made", "", "```bash", command, "```"]
    if notes:
        lines += ["", "## Notes", "", notes]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from invint_hub import InvariancePipeline",
        "pipe = InvariancePipeline.from_pretrained()  # or a Hub repo id / local folder",
        "```",
        "",
        f"Code: {REPO_URL} · Paper: {PAPER_URL}",
        "",
        "## Citation",
        "",
        "```bibtex",
        BIBTEX,
        "```",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")

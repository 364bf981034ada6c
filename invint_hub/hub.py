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
    """``PyTorchModelHubMixin`` with strict, checked, safetensors-only loading and optional fp16 saving.

    Saving writes ``config.json`` (the constructor arguments) and ``model.safetensors`` whose header records the
    sha256 of its tensor data. Loading checks, and names the file in every error: ``config.json`` exists and has
    only known keys of the right types; the weights file is a complete safetensors file whose tensors hash to the
    recorded sha256 (files written before hashes were recorded load without that check); its keys and shapes are
    exactly the model's.
    """

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
        save_file(state, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt", "sha256": tensors_sha256(state)})

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
        config: dict | None = None,  # the raw config.json (huggingface_hub passes it when this parameter exists)
        **model_kwargs,
    ):
        where = os.path.join(model_id, "config.json") if os.path.isdir(model_id) else f"config.json of {model_id}"
        if config is None:
            raise FileNotFoundError(f"{model_id} has no config.json: not a saved {cls.__name__}")
        check_config(cls, config, where)
        try:
            model = cls(**model_kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: cannot build {cls.__name__} from it: {err}") from err
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


def check_config(cls: type, config: dict, where: str) -> None:
    """``ValueError`` naming ``where`` and the key for a key that ``cls.__init__`` does not take, or a value whose
    type its annotation rules out (int / float / bool / str / list / dict and their ``| None`` forms)."""
    import inspect
    import typing

    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; it takes {sorted(params)}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that cannot be resolved: nothing to check against
        return
    for key, value in config.items():
        allowed = _allowed_types(hints.get(key))
        # (bool is an int in Python: true/false must not pass for a number)
        if allowed and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = sorted({t.__name__ for t in allowed} - {"NoneType"}) + (["null"] if type(None) in allowed else [])
            raise ValueError(f"{where}: {key} = {value!r} ({type(value).__name__}); expected {' or '.join(names)}")


def _allowed_types(hint) -> tuple[type, ...] | None:
    """JSON-level types a config value may have for an annotation, or None when it cannot be told."""
    import types
    import typing

    if hint is None:
        return None
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    out: list[type] = []
    for a in args:
        base = typing.get_origin(a) or a
        if a is type(None):
            out.append(type(None))
        elif base in (list, tuple):
            out += [list, tuple]
        elif base is float:
            out += [float, int]
        elif base is int:
            out.append(int)
        elif base in (str, bool, dict):
            out.append(base)
        else:
            return None  # some other type (a module, a dtype): not checked here
    return tuple(out)


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the keys and raw bytes of a state dict's tensors, in key order (what a safetensors file stores)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked: a damaged or truncated file, or tensor data that does not hash
    to the sha256 its header records, is a ``ValueError`` that names the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("sha256")
        state = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types (SafetensorError, OSError, ...)
        raise ValueError(f"{path} is not a complete safetensors file ({err}); re-download or re-save it") from err
    if recorded is not None and tensors_sha256(state) != recorded:
        raise ValueError(f"{path} is damaged: its tensor data does not match the sha256 recorded in its header; "
                         f"re-download or re-save it")
    return {k: v.to(device) for k, v in state.items()} if device != "cpu" else state


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = True, map_location: str = "cpu") -> None:
    """Load a safetensors file into ``model``; with ``strict`` a missing or extra key or a shape that differs from
    the model's raises ``RuntimeError`` naming the file (a damaged file: ``ValueError``, see ``read_safetensors``)."""
    state = read_safetensors(path, device=str(map_location))
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
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise RuntimeError(f"weights in {path} do not fit the model that its config.json describes: {k} has shape {got}, "
                         f"the model needs {want} ({len(wrong)} tensor(s) differ; config.json and weights disagree)")
    file_dtypes = {k: v.dtype for k, v in state.items()}
    recorded = safetensors_sha256(path) or tensors_sha256(state)  # files written before hashes: hash them now
    for k, v in state.items():  # keep each tensor's own dtype (fp16 files load into fp32 models)
        if k in own and own[k].is_floating_point():
            state[k] = v.to(own[k].dtype)
    model.load_state_dict(state, strict=strict)
    model.to(map_location)
    # what was loaded, for ``weights_sha256``: the file's hash holds while the tensors are the ones loaded here
    model._loaded_weights = {"path": str(path), "sha256": recorded, "dtypes": file_dtypes,
                             "versions": _tensor_versions(model)}


def safetensors_sha256(path: str | Path) -> str | None:
    """The sha256 of the tensor data that a safetensors file's header records (``HubMixin`` writes it), read from the
    header alone; None for a file written without one. ``ValueError`` naming the file if it is not safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("sha256")
    except Exception as err:
        raise ValueError(f"{path} is not a complete safetensors file ({err}); re-download or re-save it") from err


def _tensor_versions(model: torch.nn.Module) -> tuple:
    """Identity and in-place version counter of every tensor of ``model`` (changes when any of them is written)."""
    return tuple((k, id(v), v._version, v.dtype) for k, v in model.state_dict(keep_vars=True).items())


def weights_sha256(model: torch.nn.Module) -> str:
    """A stable id of a model's weights: ``tensors_sha256`` of its tensors in the dtypes of the file they were loaded
    from. For a model loaded by ``load_weights`` (every ``from_pretrained``) whose tensors were not written since,
    this is the sha256 the file's header records, read without hashing anything; a model changed since, or built
    in memory, is hashed (and the result cached until a tensor is written). The same weights give the same id
    whichever folder they were loaded from; an fp16 and an fp32 file of one model give different ids."""
    versions = _tensor_versions(model)
    loaded = getattr(model, "_loaded_weights", None)
    if loaded is not None and loaded["versions"] == versions:
        return loaded["sha256"]
    cached = getattr(model, "_weights_sha256_cache", None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    dtypes = loaded["dtypes"] if loaded is not None else {}
    state = {k: (v.to(dtypes[k]) if k in dtypes and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    sha = tensors_sha256(state)
    model._weights_sha256_cache = (versions, sha)
    return sha


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

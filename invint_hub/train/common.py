"""What every stage shares: data batches, the step loop with checkpoints and exact resume, logs, the
command history, saving, the pipeline folder's ``pipeline.json`` and model cards, and the Hub upload."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path

import torch
import yaml

from ..data import SyntheticDataset, build_dataset
from ..hub import write_model_card
from ..pipeline import PIPELINE_FILE
from .config import EVAL_BATCH, data_settings

STATE_FILE = "train_state.json"  # the step counter of a checkpoint, next to accelerate's files


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def make_dataset(cfg: dict, split_key: str, args, limit: int | None):
    """The ``data`` section's train or test split (``name: synthetic`` for tests and dry runs)."""
    data = data_settings(cfg)
    if data["name"] == "synthetic":
        n = limit or (512 if split_key == "train_split" else 128)
        return SyntheticDataset(n, data["image_size"], data["channels"], data["num_classes"],
                                seed=0 if split_key == "train_split" else 1)
    return build_dataset(data, split_key, args.data_dir, limit)


def get_batch(ds, idx: torch.Tensor):
    if hasattr(ds, "get_batch"):
        return ds.get_batch(idx)
    items = [ds[int(i)] for i in idx]
    return torch.stack([it[0] for it in items]), torch.stack([torch.as_tensor(it[1]) for it in items])


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Indices of this rank's share of global batch ``step``; a pure function of the step, so resuming is exact."""
    per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = perm[pos * batch_size : (pos + 1) * batch_size]
    if len(idx) < batch_size:  # dataset smaller than a batch
        idx = perm[torch.arange(batch_size) % n]
    return idx[rank::world]


# ---------------------------------------------------------------------------------------
# checkpoints, logs, command history
# ---------------------------------------------------------------------------------------
# A checkpoint is written into a hidden temporary folder, its files' sha256 go into train_state.json (the
# completeness marker, written last and fsynced), and only then is the folder renamed to step_N: a kill at any
# moment leaves either the previous checkpoints untouched or a complete new one. --resume takes the newest
# checkpoint whose marker and files check out, and names every one it skips and why.
def checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``step_N`` folders, oldest first (temporary folders excluded)."""
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fault_point(phase: str, step: int) -> None:
    """Tests only: ``INVINT_TEST_KILL=<phase>:<step>`` kills this process with SIGKILL here (tests/test_resume.py)."""
    if os.environ.get("INVINT_TEST_KILL") == f"{phase}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(acc, directory: Path, step: int) -> None:
    """accelerate's state (model, optimizer, RNG) plus the marker, written atomically (see above)."""
    tmp = directory.parent / f".{directory.name}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        _fault_point("state-written", step)
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        _fault_point("hashed", step)
        with (tmp / STATE_FILE).open("w") as f:
            json.dump({"step": step, "files": files}, f)
            f.flush()
            os.fsync(f.fileno())
        _fault_point("marked", step)
        if directory.exists():  # the same step written again (a resumed run): replace it
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        _fault_point("renamed", step)
    acc.wait_for_everyone()


def check_checkpoint(directory: Path) -> str | None:
    """Why ``directory`` is not a complete checkpoint (missing or damaged marker, a missing or changed file), or None."""
    marker = directory / STATE_FILE
    if not marker.is_file():
        return f"no {STATE_FILE} (not written completely, or by an older invint_hub)"
    try:
        state = json.loads(marker.read_text())
        step, files = int(state["step"]), dict(state["files"])
    except (ValueError, KeyError, TypeError) as err:
        return f"damaged {STATE_FILE} ({err})"
    if step != int(directory.name[5:]):
        return f"{STATE_FILE} says step {step}"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} is damaged (sha256 differs from the one recorded)"
    return None


def resume(acc, ckpt_dir: Path, name: str) -> int:
    """Load the newest complete checkpoint (skipping, and reporting, damaged ones); its step, or 0."""
    for directory in reversed(checkpoints(ckpt_dir)):
        reason = check_checkpoint(directory)
        if reason is not None:
            acc.print(f"--resume: skipping checkpoint {directory}: {reason}")
            continue
        acc.load_state(str(directory))
        step = int(json.loads((directory / STATE_FILE).read_text())["step"])
        acc.print(f"resumed {name} from {directory} (step {step}, the newest complete checkpoint)")
        return step
    acc.print(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")
    return 0


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones, damaged ones and leftover temporary folders."""
    complete = [d for d in checkpoints(ckpt_dir) if check_checkpoint(d) is None]
    for d in checkpoints(ckpt_dir) if complete else []:
        if d not in complete[-keep:] and (d in complete or int(d.name[5:]) < int(complete[-1].name[5:])):
            shutil.rmtree(d, ignore_errors=True)
    for tmp in ckpt_dir.glob(".step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


class JsonlLogger:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def launcher() -> str:
    """How this process was started: ``python -m``, or ``accelerate launch`` with its own arguments (read from the
    launching process's command line where the OS shows it, else rebuilt from the variables accelerate sets)."""
    if not any(k.startswith("ACCELERATE_") for k in os.environ):
        return "python -m"
    try:  # accelerate launch -> (torch's elastic agent, same process) -> this worker: the parent is the launcher
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
        words = [w.decode() for w in parent if w]
        i = next(i for i, w in enumerate(words) if w.endswith("accelerate.commands.launch")
                 or (w == "launch" and i > 0 and "accelerate" in words[i - 1]))
        rest = words[i + 1:]
        rest = rest[: rest.index("-m")] if "-m" in rest else [w for w in rest if w.startswith("-")]
        return " ".join(["accelerate launch"] + [shlex.quote(w) for w in rest] + ["-m"])
    except (OSError, StopIteration, ValueError):
        pass
    parts = ["accelerate launch"]
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        parts.append("--cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parts.append(f"--num_processes {os.environ['WORLD_SIZE']}")
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        parts.append(f"--mixed_precision {os.environ['ACCELERATE_MIXED_PRECISION']}")
    return " ".join(parts + ["-m"])


def command_line(stage: str, args) -> str:
    """The command as it was run, launcher and its arguments included."""
    return f"{launcher()} invint_hub.train " + " ".join(shlex.quote(a) for a in args.argv)


def record_command(out: Path, name: str, args, from_step: int, steps: int, main_process: bool) -> None:
    """Keep the commands that produced a model (a resumed run has several) for its model card."""
    if not main_process:
        return
    path = out / "logs" / f"{name}.commands.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if from_step > 0 else "w"
    with path.open(mode) as f:
        f.write(json.dumps({"command": command_line(name, args), "from_step": from_step, "steps": steps}) + "\n")


def command_history(out: Path, name: str, args) -> str:
    """The command(s) that trained ``name``, for the model card."""
    path = out / "logs" / f"{name}.commands.jsonl"
    if not path.exists():
        return command_line(name, args)
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(runs) == 1:
        return runs[0]["command"]
    lines = []
    for r in runs:
        lines.append(f"# from step {r['from_step']} (train.steps = {r['steps']})")
        lines.append(r["command"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the generic loop
# ---------------------------------------------------------------------------------------
def lr_factor(step: int, t: dict) -> float:
    if t["warmup"] and step < t["warmup"]:
        return (step + 1) / t["warmup"]
    if t["schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step / max(t["steps"], 1), 1.0)))
    return 1.0


def make_optimizer(params, t: dict):
    if t.get("optimizer", "adamw") == "sgd":
        return torch.optim.SGD(params, lr=t["lr"], momentum=t["betas"][0], nesterov=True, weight_decay=t["weight_decay"])
    return torch.optim.AdamW(params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])


def run_training(acc, name: str, optimizers, step_fn, eval_fn, train_ds, t: dict, args, out: Path):
    """Step-indexed training with checkpoints every ``checkpoint_every`` steps and exact resume.

    ``step_fn(x, y, step) -> dict of scalars`` does one optimisation step; ``eval_fn() -> dict of floats``
    evaluates on the test split. Returns the final evaluation, or None when ``--stop-after`` stopped early.
    """
    from tqdm.auto import tqdm

    step = 0
    ckpt_dir = out / "checkpoints" / name
    # the schedule's base learning rates come from the config, before a resume loads the optimizer's last lr
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    if args.resume:
        step = resume(acc, ckpt_dir, name)
    logger = JsonlLogger(out / "logs" / f"{name}.jsonl", acc.is_main_process)
    record_command(out, name, args, step, t["steps"], acc.is_main_process)
    bar = tqdm(total=t["steps"], initial=step, desc=name, disable=not acc.is_main_process or args.quiet, dynamic_ncols=True)
    t0, running = time.time(), {}
    while step < t["steps"]:
        for opt, lrs in zip(optimizers, base_lrs):
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr * lr_factor(step, t)
        idx = batch_indices(len(train_ds), step, t["batch_size"], args.seed, acc.process_index, acc.num_processes)
        x, y = get_batch(train_ds, idx)
        metrics = step_fn(x.to(acc.device), y.to(acc.device), step)
        for k, v in metrics.items():
            running.setdefault(k, []).append(float(v))
        step += 1
        bar.update(1)
        if step % t["log_every"] == 0 or step == t["steps"]:
            rec = {k: sum(v) / len(v) for k, v in running.items()}
            rec = {k: acc.reduce(torch.tensor(v, device=acc.device), "mean").item() for k, v in rec.items()}
            rec.update(step=step, lr=optimizers[0].param_groups[0]["lr"], time=round(time.time() - t0, 2))
            logger.log({"split": "train", **rec})
            if args.log_with:
                acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k not in ("step", "time", "lr")})
            running = {}
        if t["eval_every"] and step % t["eval_every"] == 0 and step < t["steps"]:
            ev = eval_fn()
            logger.log({"split": "test", "step": step, **ev})
            acc.print(f"[{name}] step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))
        if t["checkpoint_every"] and (step % t["checkpoint_every"] == 0 or step == t["steps"]):
            acc.wait_for_everyone()
            save_checkpoint(acc, ckpt_dir / f"step_{step}", step)
            if acc.is_main_process:
                prune_checkpoints(ckpt_dir, t["keep_checkpoints"])
        if args.stop_after is not None and step >= args.stop_after:  # simulate a kill (tests)
            acc.wait_for_everyone()
            acc.print(f"stopping after step {step} (--stop-after)")
            return None
    bar.close()
    ev = eval_fn()
    logger.log({"split": "test", "step": step, **ev})
    acc.print(f"[{name}] final: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))
    return ev


def eval_loop(acc, test_ds, limit: int, fn, batch_size: int = EVAL_BATCH) -> dict:
    """Run ``fn(x, y) -> dict of per-sample-summed tensors`` over this rank's share; reduce; average."""
    n = min(limit, len(test_ds))
    idx = torch.arange(n)[acc.process_index :: acc.num_processes]
    sums: dict[str, torch.Tensor] = {}
    count = torch.tensor(0.0, device=acc.device)
    with torch.no_grad():
        for i in range(0, len(idx), batch_size):
            x, y = get_batch(test_ds, idx[i : i + batch_size])
            x, y = x.to(acc.device), y.to(acc.device)
            with acc.autocast():
                res = fn(x, y)
            for k, v in res.items():
                sums[k] = sums.get(k, torch.tensor(0.0, device=acc.device)) + v.float().sum()
            count += x.shape[0]
    count = acc.reduce(count, "sum")
    return {k: (acc.reduce(v, "sum") / count).item() for k, v in sums.items()}


def frozen(model):
    return model.eval().requires_grad_(False)


# Backbones given as objects (train_pipeline): the stages of this process use them instead of rebuilding them from
# <output-dir>/backbone, which for a module of your own needs its class importable and its constructor arguments.
BACKBONES: dict = {}  # resolved output dir -> Backbone


def load_backbone(out: Path):
    """The pipeline folder's backbone: the object ``train_pipeline`` registered for it, else the saved one."""
    from ..backbones import Backbone

    return BACKBONES.get(str(Path(out).resolve())) or Backbone.from_pretrained(Path(out) / "backbone")


# ---------------------------------------------------------------------------------------
# the pipeline folder: saved models, pipeline.json, model cards, Hub upload
# ---------------------------------------------------------------------------------------
def save_component(acc, model, directory: Path, args) -> None:
    if acc.is_main_process:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_dtype]
        acc.unwrap_model(model).save_pretrained(directory, dtype=dtype)


def saved_config(directory: Path) -> dict:
    """The constructor arguments a saved model was written with (its ``config.json``), defaults included."""
    return json.loads((Path(directory) / "config.json").read_text())


def autoencoder_dir(out: Path) -> Path:
    """The pipeline folder's autoencoder: the folder its ``pipeline.json`` names (``<out>/autoencoder``, or a
    sibling pipeline's, ``../<pipeline>/autoencoder``), checked as ``pipeline.component_dir`` checks it."""
    from ..pipeline import component_dir

    path = Path(out) / PIPELINE_FILE
    info = json.loads(path.read_text()) if path.exists() else {}
    if "autoencoder" not in info:
        return Path(out) / "autoencoder"
    return component_dir(out, info, "autoencoder")


def has_autoencoder(out: Path) -> bool:
    try:
        return autoencoder_dir(out).is_dir()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _locked(lock: Path):
    """An exclusive lock on the file ``lock`` (POSIX; elsewhere none): stages of one folder run side by side."""
    try:
        import fcntl
    except ImportError:  # Windows: no concurrent stages there
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_pipeline_json(out: Path, cfg: dict, **changes) -> None:
    """Read, change and rewrite ``<out>/pipeline.json`` under a lock, written atomically (a temporary file, then
    ``os.replace``): two stages of one folder started together (e.g. two ``--layer`` groups of the cINN stage) neither
    read a half-written file nor lose each other's entries."""
    path = out / PIPELINE_FILE
    with _locked(out / "logs" / f"{PIPELINE_FILE}.lock"):  # logs/: not exported, not pushed
        _update_pipeline_json(path, cfg, changes)


def _update_pipeline_json(path: Path, cfg: dict, changes: dict) -> None:
    info = json.loads(path.read_text()) if path.exists() else {}
    info.setdefault("format", "invint_hub.pipeline/1")
    info.update(dataset=cfg["data"]["name"], image_size=cfg["data"]["image_size"], channels=cfg["data"]["channels"])
    if cfg["data"].get("domain"):
        info["domain"] = cfg["data"]["domain"]
    info.setdefault("backbone", "backbone")
    info.setdefault("autoencoder", "autoencoder")
    info.setdefault("cinn", {})
    for k, v in changes.items():
        if k == "cinn_layer":
            info["cinn"][v] = f"cinn/{v}"
        else:
            info[k] = v
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_pipeline_card(out: Path, cfg: dict) -> None:
    """Pipeline README from the component cards' metrics (metrics.json per cINN)."""
    info = json.loads((out / PIPELINE_FILE).read_text())
    rows = []
    for layer, sub in info.get("cinn", {}).items():
        mpath = out / sub / "metrics.json"
        if mpath.exists():
            m = json.loads(mpath.read_text())
            ceil = m.get("reconstruction_agreement")
            rows.append(f"| {layer} | {m['bpd']:.3f} | {m['class_agreement']:.4f} | "
                        + (f"{ceil:.4f} | {m['class_agreement'] / ceil:.3f} | " if ceil else "— | — | ")
                        + f"{m['variance_explained']:.4f} |")
    lines = [
        f"Interpretation pipeline for `{info.get('dataset')}`: classifier, autoencoder and one cINN per layer.",
        "",
        "Layer metrics on the test split (written by the cINN stage of `invint_hub.train`):",
        "",
        "| layer | test NLL (bits/dim) | class agreement of samples | of reconstructions D(E(x)) (ceiling) "
        "| samples / ceiling | variance of z_bar explained by v |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    cfg_text = yaml.safe_dump(cfg, sort_keys=False)
    write_model_card(out, f"invint_hub pipeline: {info.get('dataset')}", "\n".join(lines),
                     {"layers": list(info.get("cinn", {})), "image": f"{info['channels']}x{info['image_size']}px"},
                     notes="Training config:\n\n```yaml\n" + cfg_text + "```", datasets=[cfg["data"]["name"]])


def push(out: Path, repo_id: str, acc) -> None:
    if not acc.is_main_process:
        return
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(out), ignore_patterns=["checkpoints/*", "logs/*"])
    acc.print(f"pushed {out} to https://huggingface.co/{repo_id}")

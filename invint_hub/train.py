"""Train the three stages of a pipeline with Accelerate, into one pipeline folder.

    accelerate launch -m invint_hub.train classifier  --config configs/mnist.yaml --output-dir runs/mnist
    accelerate launch -m invint_hub.train autoencoder --config configs/mnist.yaml --output-dir runs/mnist
    accelerate launch -m invint_hub.train cinn        --config configs/mnist.yaml --output-dir runs/mnist [--layer fc]
    accelerate launch -m invint_hub.train concepts    --config configs/colormnist.yaml --output-dir runs/colormnist

Each stage writes its model to ``<output-dir>/{backbone,autoencoder,cinn/<layer>}`` (config.json,
model.safetensors, model card) and updates ``<output-dir>/pipeline.json``, so after the three
commands ``InvariancePipeline.from_pretrained("<output-dir>")`` works. Checkpoints for
``--resume`` go to ``<output-dir>/checkpoints/<stage>/step_<n>``; metrics to
``<output-dir>/logs/<stage>.jsonl`` (and TensorBoard with ``--log-with tensorboard``).
``python -m invint_hub.train ...`` runs the same on one process.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from .autoencoder import Autoencoder, FeaturePerceptualLoss, PatchDiscriminator, adaptive_weight, hinge_d_loss, lpips_loss, psnr
from .backbones import Backbone
from .cinn import ConditionalINN
from .data import SyntheticDataset, build_dataset
from .flows import bits_per_dim
from .hub import write_model_card
from .pipeline import PIPELINE_FILE, InvariancePipeline

STAGES = ("classifier", "autoencoder", "cinn", "concepts")
DEFAULT_TRAIN = dict(
    steps=1000, batch_size=64, lr=1e-3, betas=[0.9, 0.999], weight_decay=0.0, schedule="constant", warmup=0,
    clip_grad=0.0, log_every=50, eval_every=0, checkpoint_every=500, keep_checkpoints=2, eval_samples=2000,
)


# ---------------------------------------------------------------------------------------
# config and data
# ---------------------------------------------------------------------------------------
def load_config(path: str | Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    if not isinstance(cfg, dict) or "data" not in cfg:
        raise ValueError(f"{path}: a config needs a 'data' section")
    for key in ("name", "image_size", "channels"):
        if key not in cfg["data"]:
            raise ValueError(f"{path}: data.{key} is missing")
    return cfg


def train_settings(cfg: dict, stage: str, args, layer: str | None = None) -> dict:
    """The stage's ``train`` section over the defaults; for a cINN, ``train_overrides.<layer>`` on top; CLI flags last."""
    t = dict(DEFAULT_TRAIN)
    t.update(cfg.get(stage, {}).get("train", {}) or {})
    if layer is not None:
        t.update((cfg.get(stage, {}).get("train_overrides", {}) or {}).get(layer, {}) or {})
    if args.steps is not None:
        t["steps"] = args.steps
    if args.batch_size is not None:
        t["batch_size"] = args.batch_size
    for k in ("lr", "weight_decay", "clip_grad"):
        t[k] = float(t[k])
    return t


def make_dataset(cfg: dict, split_key: str, args, limit: int | None):
    data = cfg["data"]
    if data["name"] == "synthetic":  # tests and dry runs
        n = limit or (512 if split_key == "train_split" else 128)
        return SyntheticDataset(n, data["image_size"], data["channels"], data.get("num_classes", 10),
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
# bookkeeping
# ---------------------------------------------------------------------------------------
class TrainState:
    """The step counter, saved with every checkpoint."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, d):
        self.step = int(d["step"])


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    steps = sorted(ckpt_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    return steps[-1] if steps else None


class JsonlLogger:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def lr_factor(step: int, t: dict) -> float:
    if t["warmup"] and step < t["warmup"]:
        return (step + 1) / t["warmup"]
    if t["schedule"] == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step / max(t["steps"], 1), 1.0)))
    return 1.0


def update_pipeline_json(out: Path, cfg: dict, **changes) -> None:
    path = out / PIPELINE_FILE
    info = json.loads(path.read_text()) if path.exists() else {}
    info.setdefault("format", "invint_hub.pipeline/1")
    info.update(dataset=cfg["data"]["name"], image_size=cfg["data"]["image_size"], channels=cfg["data"]["channels"])
    info.setdefault("backbone", "backbone")
    info.setdefault("autoencoder", "autoencoder")
    info.setdefault("cinn", {})
    for k, v in changes.items():
        if k == "cinn_layer":
            info["cinn"][v] = f"cinn/{v}"
        else:
            info[k] = v
    path.write_text(json.dumps(info, indent=2, sort_keys=True))


def command_line(stage: str, args) -> str:
    """The command as it was run (``accelerate launch`` sets ACCELERATE_* variables in its processes)."""
    import os

    launcher = "accelerate launch -m" if any(k.startswith("ACCELERATE_") for k in os.environ) else "python -m"
    return f"{launcher} invint_hub.train " + " ".join(shlex.quote(a) for a in args.argv)


# ---------------------------------------------------------------------------------------
# the generic loop
# ---------------------------------------------------------------------------------------
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


def run_training(acc, name: str, model, optimizers, step_fn, eval_fn, train_ds, t: dict, args, out: Path, extra_objects=()):
    """Step-indexed training with checkpoints every ``checkpoint_every`` steps and exact resume."""
    from tqdm.auto import tqdm

    state = TrainState()
    acc.register_for_checkpointing(state)
    ckpt_dir = out / "checkpoints" / name
    # the schedule's base learning rates come from the config, before a resume loads the optimizer's last lr
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
    if args.resume:
        last = latest_checkpoint(ckpt_dir)
        if last is not None:
            acc.load_state(str(last))
            acc.print(f"resumed {name} from {last} (step {state.step})")
        else:
            acc.print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
    logger = JsonlLogger(out / "logs" / f"{name}.jsonl", acc.is_main_process)
    record_command(out, name, args, state.step, t["steps"], acc.is_main_process)
    bar = tqdm(total=t["steps"], initial=state.step, desc=name, disable=not acc.is_main_process or args.quiet, dynamic_ncols=True)
    seed = args.seed
    t0, running = time.time(), {}
    while state.step < t["steps"]:
        step = state.step
        for opt, lrs in zip(optimizers, base_lrs):
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr * lr_factor(step, t)
        idx = batch_indices(len(train_ds), step, t["batch_size"], seed, acc.process_index, acc.num_processes)
        x, y = get_batch(train_ds, idx)
        metrics = step_fn(x.to(acc.device), y.to(acc.device), step)
        for k, v in metrics.items():
            running.setdefault(k, []).append(float(v))
        state.step += 1
        bar.update(1)
        if state.step % t["log_every"] == 0 or state.step == t["steps"]:
            rec = {k: sum(v) / len(v) for k, v in running.items()}
            rec = {k: acc.reduce(torch.tensor(v, device=acc.device), "mean").item() for k, v in rec.items()}
            rec.update(step=state.step, lr=optimizers[0].param_groups[0]["lr"], time=round(time.time() - t0, 2))
            logger.log({"split": "train", **rec})
            if args.log_with:
                acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=state.step)
            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k not in ("step", "time", "lr")})
            running = {}
        if t["eval_every"] and state.step % t["eval_every"] == 0 and state.step < t["steps"]:
            ev = eval_fn()
            logger.log({"split": "test", "step": state.step, **ev})
            acc.print(f"[{name}] step {state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))
        if t["checkpoint_every"] and (state.step % t["checkpoint_every"] == 0 or state.step == t["steps"]):
            acc.wait_for_everyone()
            acc.save_state(str(ckpt_dir / f"step_{state.step}"))
            if acc.is_main_process:
                for old in sorted(ckpt_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[: -t["keep_checkpoints"]]:
                    shutil.rmtree(old, ignore_errors=True)
        if args.stop_after is not None and state.step >= args.stop_after:  # simulate a kill (tests)
            acc.wait_for_everyone()
            acc.print(f"stopping after step {state.step} (--stop-after)")
            return None
    bar.close()
    ev = eval_fn()
    logger.log({"split": "test", "step": state.step, **ev})
    acc.print(f"[{name}] final: " + ", ".join(f"{k}={v:.4g}" for k, v in ev.items()))
    return ev


def make_optimizer(params, t: dict):
    return torch.optim.AdamW(params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])


def eval_loop(acc, test_ds, limit: int, batch_size: int, fn) -> dict:
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


def save_component(acc, model, directory: Path, args):
    if acc.is_main_process:
        dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.save_dtype]
        acc.unwrap_model(model).save_pretrained(directory, dtype=dtype)


def frozen(model):
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------
def train_classifier(acc, cfg, args, out: Path):
    scfg = cfg.get("classifier", {})
    t = train_settings(cfg, "classifier", args)
    data = cfg["data"]
    pre = scfg.get("pretrained")
    if pre:  # a torchvision classifier with ImageNet weights (the paper's setups)
        model = Backbone.from_torchvision(
            pre["arch"], weights=pre.get("weights", "DEFAULT"), weights_path=pre.get("weights_path"),
            in_channels=data["channels"], image_size=data["image_size"], **scfg.get("model", {}),
        )
        if t["steps"] == 0:
            save_component(acc, model, out / "backbone", args)
            if acc.is_main_process:
                update_pipeline_json(out, cfg)
                write_model_card(out / "backbone", f"{model.arch} (torchvision, pretrained)",
                                 "A torchvision classifier with its published weights, split into named layers.",
                                 {"architecture": model.arch, "layers": model.layers, "weights": pre.get("weights", "DEFAULT")},
                                 command=command_line("classifier", args))
            return {}
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    names = getattr(train_ds, "class_names", None)
    if not pre:
        kwargs = dict(in_channels=data["channels"], image_size=data["image_size"])
        kwargs.update(scfg.get("model", {}))
        kwargs.setdefault("num_classes", len(names) if names else data.get("num_classes", 10))
        if names and len(names) == kwargs["num_classes"]:
            kwargs.setdefault("class_names", names)
        torch.manual_seed(args.seed)
        model = Backbone(**kwargs)
    opt = make_optimizer(model.parameters(), t)
    model, opt = acc.prepare(model, opt)

    def step_fn(x, y, step):
        model.train()
        with acc.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    def eval_fn():
        model.eval()

        def fn(x, y):
            logits = model(x).float()
            return {"accuracy": (logits.argmax(1) == y).float(), "loss": F.cross_entropy(logits, y, reduction="none")}

        return eval_loop(acc, test_ds, t["eval_samples"], 256, fn)

    ev = run_training(acc, "classifier", model, [opt], step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    save_component(acc, model, out / "backbone", args)
    if acc.is_main_process:
        m = acc.unwrap_model(model)
        update_pipeline_json(out, cfg)
        write_model_card(
            out / "backbone", f"{m.arch} classifier on {data['name']}",
            "The classifier f = Psi o Phi whose layers the pipeline interprets.",
            {"architecture": m.arch, "dataset": data["name"], "layers": m.layers,
             "feature shapes": "; ".join(f"{k}: {list(v)}" for k, v in m.feature_shapes.items()),
             "parameters": sum(p.numel() for p in m.parameters()), "steps": t["steps"], "batch size": t["batch_size"]},
            metrics={f"test accuracy ({min(t['eval_samples'], len(test_ds))} test images)": ev["accuracy"],
                     "test loss": ev["loss"]},
            command=command_history(out, "classifier", args), datasets=[data["name"]],
        )
    return ev


def train_autoencoder(acc, cfg, args, out: Path):
    scfg = cfg.get("autoencoder", {})
    lcfg = dict(perceptual="backbone", perceptual_weight=1.0, perceptual_layers=None, lpips_weights=None,
                kl_weight=1e-5, disc_weight=0.0, disc_start=0, disc_lr_factor=1.0)
    lcfg.update(scfg.get("loss", {}) or {})
    t = train_settings(cfg, "autoencoder", args)
    data = cfg["data"]
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    kwargs = dict(image_size=data["image_size"], channels=data["channels"])
    kwargs.update(scfg.get("model", {}))
    torch.manual_seed(args.seed)
    model = Autoencoder(**kwargs)

    perceptual, perceptual_desc = None, "none"
    if lcfg["perceptual"] == "lpips":
        perceptual = lpips_loss(lcfg["lpips_weights"]).to(acc.device)
        perceptual_desc = f"LPIPS (alex, local weights {lcfg['lpips_weights']})"
    elif lcfg["perceptual"] == "backbone":
        backbone = frozen(Backbone.from_pretrained(out / "backbone")).to(acc.device)
        layers = lcfg["perceptual_layers"] or [l for l in backbone.layers if len(backbone.feature_shapes[l]) == 3][:3]
        perceptual = FeaturePerceptualLoss(lambda x: list(backbone.forward_layers(x, layers).values()))
        perceptual_desc = f"normalised feature distance at {', '.join(layers)} of the pipeline's own classifier ({backbone.arch}); LPIPS backbone weights were not available"
    elif lcfg["perceptual"] not in (None, "none"):
        raise ValueError(f"autoencoder.loss.perceptual must be lpips, backbone or none, got {lcfg['perceptual']!r}")

    opt = make_optimizer(model.parameters(), t)
    optimizers = [opt]
    disc = None
    if lcfg["disc_weight"] > 0:
        disc = PatchDiscriminator(data["channels"])
        dt = dict(t, lr=t["lr"] * lcfg["disc_lr_factor"])
        opt_d = make_optimizer(disc.parameters(), dt)
        disc, opt_d = acc.prepare(disc, opt_d)
        optimizers.append(opt_d)
    model, opt = acc.prepare(model, opt)
    optimizers[0] = opt
    last_layer = acc.unwrap_model(model).decoder[-2].weight

    def rec_loss(x, xr):
        l1 = (x - xr).abs().flatten(1).mean(1)
        p = perceptual(x, xr) if perceptual is not None else torch.zeros_like(l1)
        return l1, p

    def step_fn(x, y, step):
        model.train()
        with acc.autocast():
            xr, post = model(x)
            l1, p = rec_loss(x, xr)
            rec = (l1 + lcfg["perceptual_weight"] * p).mean()
            kl = post.kl().mean()
            loss = rec + lcfg["kl_weight"] * kl
            logs = {"loss": loss.detach(), "l1": l1.mean().detach(), "perceptual": p.mean().detach(), "kl": kl.detach()}
            use_gan = disc is not None and step >= lcfg["disc_start"]
            if use_gan:
                g_loss = -disc(xr).mean()
                w = adaptive_weight(rec, g_loss, last_layer) * lcfg["disc_weight"]
                loss = loss + w * g_loss
                logs["g_loss"] = g_loss.detach()
        acc.backward(loss)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if use_gan:
            with acc.autocast():
                d_loss = hinge_d_loss(disc(x), disc(xr.detach()))
            acc.backward(d_loss)
            optimizers[1].step()
            optimizers[1].zero_grad(set_to_none=True)
            logs["d_loss"] = d_loss.detach()
        return logs

    def eval_fn():
        model.eval()

        def fn(x, y):
            xr = model(x, sample=False)[0]
            return {"l1": (x - xr).abs().flatten(1).mean(1), "psnr": psnr(x, xr)}

        return eval_loop(acc, test_ds, t["eval_samples"], 256, fn)

    ev = run_training(acc, "autoencoder", model, optimizers, step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    # record the data variance of z_bar (posterior samples, as the cINN sees them)
    m = acc.unwrap_model(model).eval()
    with torch.no_grad():
        n = min(len(train_ds), 5000)
        x, _ = get_batch(train_ds, torch.arange(n))
        zs = torch.cat([m.encode(x[i : i + 500].to(acc.device)).sample() for i in range(0, n, 500)])
        m.latent_var.fill_(zs.float().var(0).sum().item())
    ev["latent_var"] = float(m.latent_var)
    save_component(acc, model, out / "autoencoder", args)
    if acc.is_main_process:
        update_pipeline_json(out, cfg)
        write_model_card(
            out / "autoencoder", f"Autoencoder (latent {m.latent_dim}) on {data['name']}",
            "The autoencoder (E, D) whose latent z_bar the cINNs translate into invariances v.",
            {"image": f"{m.channels}x{m.image_size}px in [-1, 1]", "latent": m.latent_dim,
             "parameters": sum(p.numel() for p in m.parameters()), "loss": f"L1 + {lcfg['perceptual_weight']} x perceptual + {lcfg['kl_weight']} x KL"
             + (f" + {lcfg['disc_weight']} x adaptive hinge GAN (from step {lcfg['disc_start']})" if disc is not None else ""),
             "perceptual term": perceptual_desc, "steps": t["steps"], "batch size": t["batch_size"]},
            metrics={"test L1 (posterior mean)": ev["l1"], "test PSNR dB": ev["psnr"], "latent variance (sum over dims)": ev["latent_var"]},
            command=command_history(out, "autoencoder", args), datasets=[data["name"]],
        )
    return ev


def train_cinn(acc, cfg, args, out: Path, layer: str):
    scfg = cfg.get("cinn", {})
    t = train_settings(cfg, "cinn", args, layer)
    data = cfg["data"]
    backbone = frozen(Backbone.from_pretrained(out / "backbone")).to(acc.device)
    ae = frozen(Autoencoder.from_pretrained(out / "autoencoder")).to(acc.device)
    backbone._check_layer(layer)
    train_ds = make_dataset(cfg, "train_split", args, args.limit_train)
    test_ds = make_dataset(cfg, "test_split", args, args.limit_test)
    kwargs = dict(scfg.get("model", {}))
    kwargs.update((scfg.get("layer_overrides", {}) or {}).get(layer, {}))
    kwargs.update(latent_dim=ae.latent_dim, cond_shape=list(backbone.feature_shapes[layer]), layer=layer)
    torch.manual_seed(args.seed)
    model = ConditionalINN(**kwargs)

    def inputs(x, gen=None):
        with torch.no_grad(), acc.autocast():
            zbar = ae.encode(x).sample(gen)
            z = backbone.representation(x, layer)
        return zbar.float(), z.float()

    # Data-dependent ActNorm initialisation on one global batch before wrapping: every rank
    # draws the same batch and the same posterior noise, so all ranks start identical.
    init_idx = batch_indices(len(train_ds), 0, t["batch_size"], args.seed + 1, 0, 1)
    xi, _ = get_batch(train_ds, init_idx)
    zbar0, z0 = inputs(xi.to(acc.device), torch.Generator(device=acc.device).manual_seed(args.seed))
    model.to(acc.device).train()
    with torch.no_grad():
        model(zbar0, z0)
    opt = make_optimizer(model.parameters(), t)
    model, opt = acc.prepare(model, opt)
    dim = ae.latent_dim

    def step_fn(x, y, step):
        model.train()
        zbar, z = inputs(x)
        with acc.autocast():
            v, logdet = model(zbar, z)
        nll = (0.5 * v.float().pow(2).sum(1) - logdet).mean()  # the paper's loss (constant dropped)
        acc.backward(nll)
        if t["clip_grad"]:
            acc.clip_grad_norm_(model.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        full = nll.detach() + 0.5 * dim * math.log(2 * math.pi)
        return {"loss": nll.detach(), "bpd": bits_per_dim(full, dim)}

    def eval_fn():
        model.eval()
        g = torch.Generator(device=acc.device).manual_seed(12345)

        def fn(x, y):
            zbar, z = inputs(x, g)
            v, logdet = model(zbar, z)
            full = 0.5 * v.float().pow(2).sum(1) - logdet + 0.5 * dim * math.log(2 * math.pi)
            return {"bpd": bits_per_dim(full, dim)}

        return eval_loop(acc, test_ds, t["eval_samples"], 256, fn)

    name = f"cinn_{layer}"
    ev = run_training(acc, name, model, [opt], step_fn, eval_fn, train_ds, t, args, out)
    if ev is None:
        return None
    save_component(acc, model, out / "cinn" / layer, args)
    acc.wait_for_everyone()
    if acc.is_main_process:
        m = acc.unwrap_model(model).eval()
        pipe = InvariancePipeline(backbone, ae, {layer: m})
        n_eval = min(t["eval_samples"], len(test_ds))
        xs, _ = get_batch(test_ds, torch.arange(n_eval))
        agree, var = [], []
        for i in range(0, n_eval, 250):
            xb = xs[i : i + 250].to(acc.device)
            agree.append(pipe.class_agreement(xb, layer, n=1, seed=i))
            var.append(pipe.variance_explained(xb, layer, n=16, seed=i))
        ev["class_agreement"] = torch.cat(agree).mean().item()
        ev["variance_explained"] = torch.cat(var).mean().item()
        update_pipeline_json(out, cfg, cinn_layer=layer)
        write_model_card(
            out / "cinn" / layer, f"cINN t for layer {layer} of {backbone.arch} on {data['name']}",
            "Conditional INN mapping the autoencoder latent z_bar to the invariances v of the layer's representation z = Phi(x).",
            {"backbone": backbone.arch, "layer": layer, "representation shape": list(backbone.feature_shapes[layer]),
             "latent dim": m.latent_dim, "flows": kwargs.get("n_flows"), "subnet width": kwargs.get("hidden"),
             "subnet depth": kwargs.get("depth"), "parameters": sum(p.numel() for p in m.parameters()),
             "steps": t["steps"], "batch size": t["batch_size"], "lr": t["lr"]},
            metrics={f"test NLL (bits/dim, first {n_eval} test images)": ev["bpd"],
                     "class agreement of samples D(t^-1(v|z)) with the input (1 sample per image)": ev["class_agreement"],
                     "share of z_bar variance explained by v (16 samples per image)": ev["variance_explained"]},
            command=command_history(out, name, args), datasets=[data["name"]],
        )
        (out / "cinn" / layer / "metrics.json").write_text(json.dumps(ev, indent=2))
    acc.free_memory()  # forget this layer's model, optimizer and step counter before the next layer
    acc._custom_objects.clear()
    return ev


def write_pipeline_card(out: Path, cfg: dict) -> None:
    """Pipeline README from the component cards' metrics (metrics.json per cINN)."""
    info = json.loads((out / PIPELINE_FILE).read_text())
    rows = []
    for layer, sub in info.get("cinn", {}).items():
        mpath = out / sub / "metrics.json"
        if mpath.exists():
            m = json.loads(mpath.read_text())
            rows.append(f"| {layer} | {m['bpd']:.3f} | {m['class_agreement']:.4f} | {m['variance_explained']:.4f} |")
    lines = [
        f"Interpretation pipeline for `{info.get('dataset')}`: classifier, autoencoder and one cINN per layer.",
        "",
        "Layer metrics on the test split (written by the cINN stage of `invint_hub.train`):",
        "",
        "| layer | test NLL (bits/dim) | class agreement of samples | variance of z_bar explained by v |",
        "|---|---|---|---|",
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


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m invint_hub.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--output-dir", default=None, help="pipeline folder (default runs/<config name>)")
    p.add_argument("--layer", default=None, help="cinn stage: one layer, a comma list, or 'all' (default: the config's layers)")
    p.add_argument("--data-dir", default=None, help="folder with <name>/<split>-*.parquet (default $INVINT_DATA_DIR or ../shared/data)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the pipeline folder to this Hub repo")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size (global)")
    p.add_argument("--limit-train", type=int, default=None, help="use only N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None)
    p.add_argument("--cpu", action="store_true", help="force the CPU")
    p.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of saved weights")
    p.add_argument("--log-with", default=None, help="also log to an Accelerate tracker, e.g. tensorboard")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv=None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    args = parse_args(argv)
    cfg = load_config(args.config)
    out = Path(args.output_dir or Path("runs") / Path(args.config).stem)
    if not torch.distributed.is_initialized():  # main() called again in one process (tests, notebooks)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision,
        log_with=args.log_with, project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(args.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if args.log_with:
        acc.init_trackers(f"{args.stage}", config={"stage": args.stage, "config": args.config})
    results = {}
    if args.stage == "classifier":
        results["classifier"] = train_classifier(acc, cfg, args, out)
    elif args.stage == "autoencoder":
        if not (out / "backbone").is_dir() and cfg.get("autoencoder", {}).get("loss", {}).get("perceptual", "backbone") == "backbone":
            raise SystemExit(f"{out}/backbone not found: train the classifier stage first (its features give the perceptual loss)")
        results["autoencoder"] = train_autoencoder(acc, cfg, args, out)
    elif args.stage == "concepts":  # the concept INN e (invint_hub.concepts)
        from .concepts import train_concepts

        if not (out / "autoencoder").is_dir():
            raise SystemExit(f"{out}/autoencoder not found: train the autoencoder stage first")
        results["concepts"] = train_concepts(acc, cfg, args, out)
    else:
        for needed in ("backbone", "autoencoder"):
            if not (out / needed).is_dir():
                raise SystemExit(f"{out}/{needed} not found: train the classifier and autoencoder stages first")
        layers = args.layer or ",".join(cfg.get("cinn", {}).get("layers", []))
        if layers == "all":
            layers = ",".join(Backbone.from_pretrained(out / "backbone").layers)
        if not layers:
            raise SystemExit("no layers: pass --layer or list cinn.layers in the config")
        for layer in layers.split(","):
            results[layer] = train_cinn(acc, cfg, args, out, layer.strip())
        if acc.is_main_process and all(r is not None for r in results.values()):
            write_pipeline_card(out, cfg)
    acc.wait_for_everyone()
    if args.push_to_hub and all(r is not None for r in results.values()):
        push(out, args.push_to_hub, acc)
    acc.end_training()
    return results


if __name__ == "__main__":
    main()

"""Training smoke tests on tiny synthetic data: every stage, resume after a kill, two processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invint_hub import ConditionalINN
from invint_hub.pipeline import InvariancePipeline
from invint_hub.train import batch_indices, main

@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir):
    return tiny_pipeline_dir


def test_all_stages_produce_a_loadable_pipeline(trained):
    info = json.loads((trained / "pipeline.json").read_text())
    assert set(info["cinn"]) == {"conv1", "logits"}
    pipe = InvariancePipeline.from_pretrained(trained)
    assert pipe.layers == ["conv1", "logits"]
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert pipe.sample_invariances(x, "logits", n=3, seed=0).shape == (2, 3, 1, 16, 16)
    for sub in ("backbone", "autoencoder", "cinn/conv1", "cinn/logits"):
        card = (trained / sub / "README.md").read_text()
        assert "-m invint_hub.train" in card and "Metrics" in card
    assert "| conv1 |" in (trained / "README.md").read_text()
    # the two layers share their training settings: trained together, one backbone pass per batch
    logs = [json.loads(line) for line in (trained / "logs" / "cinn_conv1+logits.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["split"] == "train"] == [1, 2]
    assert all("bpd_conv1" in r and "bpd_logits" in r for r in logs)
    assert "trained together with logits" in (trained / "cinn" / "conv1" / "README.md").read_text()
    assert float(pipe.autoencoder.latent_var) > 0
    # the cards hold the ceiling of the class agreement: plain reconstructions D(E(x)) classified like the input
    for layer in ("conv1", "logits"):
        m = json.loads((trained / "cinn" / layer / "metrics.json").read_text())
        assert 0.0 <= m["reconstruction_agreement"] <= 1.0 and 0.0 <= m["class_agreement"] <= 1.0
        assert "reconstructions D(E(x)) (the ceiling)" in (trained / "cinn" / layer / "README.md").read_text()
    assert "samples / ceiling" in (trained / "README.md").read_text()


def test_perceptual_term_at_its_own_input_size(tiny_config, trained, tmp_path, monkeypatch):
    """autoencoder.loss.perceptual_input_size runs the backbone's layers at that side for the perceptual term only:
    the loss differs from the one at the backbone's own size, and the saved backbone keeps its input size."""
    import shutil

    import yaml

    from invint_hub.autoencoder import FeaturePerceptualLoss

    cfg = yaml.safe_load(tiny_config.read_text())
    seen = []
    orig = FeaturePerceptualLoss.forward

    def spy(self, x, y):
        out = orig(self, x, y)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(FeaturePerceptualLoss, "forward", spy)
    losses = {}
    for side in (None, 32):
        out = tmp_path / f"side{side}"
        shutil.copytree(trained / "backbone", out / "backbone")
        cfg["autoencoder"]["loss"]["perceptual_input_size"] = side
        path = tmp_path / f"side{side}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        seen.clear()
        main(["autoencoder", "--config", str(path), "--output-dir", str(out), "--quiet"])
        losses[side] = seen[0]
        card = (out / "autoencoder" / "README.md").read_text()
        assert f"run at {side or 16} px" in card
        assert json.loads((out / "backbone" / "config.json").read_text())["input_size"] == 16
    assert not torch.allclose(losses[None], losses[32])
    cfg["autoencoder"]["loss"]["perceptual_input_size"] = 4
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="perceptual_input_size"):
        main(["autoencoder", "--config", str(path), "--output-dir", str(tmp_path / "bad"), "--quiet"])


def test_batch_indices_are_a_function_of_the_step():
    a = batch_indices(100, 7, 16, seed=3, rank=0, world=1)
    assert torch.equal(a, batch_indices(100, 7, 16, seed=3, rank=0, world=1))
    ranks = torch.cat([batch_indices(100, 7, 16, 3, r, 2) for r in range(2)])
    assert sorted(ranks.tolist()) == sorted(a.tolist())  # two ranks split the same global batch


def test_resume_after_kill_matches_uninterrupted(trained, tiny_config, tmp_path):
    """Stop after step 1 (as a kill would, right after a checkpoint), resume, and land on the same weights."""
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / "a" / d)
        shutil.copytree(trained / d, tmp_path / "b" / d)
    # 3 steps with a cosine schedule, killed after step 2: the resumed step must use the schedule's lr
    common = ["cinn", "--config", str(tiny_config), "--layer", "conv1", "--quiet", "--steps", "3"]
    main(common + ["--output-dir", str(tmp_path / "a")])
    r = main(common + ["--output-dir", str(tmp_path / "b"), "--stop-after", "2"])
    assert r["conv1"] is None and not (tmp_path / "b" / "cinn" / "conv1").exists()
    assert (tmp_path / "b" / "checkpoints" / "cinn_conv1" / "step_2").is_dir()
    main(common + ["--output-dir", str(tmp_path / "b"), "--resume"])
    a = ConditionalINN.from_pretrained(tmp_path / "a" / "cinn" / "conv1")
    b = ConditionalINN.from_pretrained(tmp_path / "b" / "cinn" / "conv1")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-6), k


def test_classifier_resume(tiny_config, tmp_path):
    main(["classifier", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--quiet", "--stop-after", "1"])
    main(["classifier", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--quiet", "--resume"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "logs" / "classifier.jsonl").read_text().splitlines()]
    assert steps.count(2) >= 1 and (tmp_path / "backbone" / "model.safetensors").is_file()


def test_missing_prerequisite_stage_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(SystemExit, match="classifier"):
        main(["cinn", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--quiet"])


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(trained, tiny_config, tmp_path):
    """`accelerate launch --cpu --num_processes 2` trains a cINN; both ranks start from the same ActNorm init."""
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / d)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "invint_hub.train", "cinn",
           "--config", str(tiny_config), "--output-dir", str(tmp_path), "--layer", "logits", "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "cinn" / "logits" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "cinn_logits" / "step_2").is_dir()
    card = (tmp_path / "cinn" / "logits" / "README.md").read_text()  # the full launch command, launcher args included
    assert "accelerate launch --cpu --num_processes 2 --num_machines 1" in card and "-m invint_hub.train cinn" in card


def test_bf16_cinn_stage_keeps_fp32_weights_and_logdet(trained, tiny_config, tmp_path):
    """In a fresh process: accelerate keeps one mixed-precision setting per process."""
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / d)
    cmd = [sys.executable, "-m", "invint_hub.train", "cinn", "--config", str(tiny_config), "--output-dir", str(tmp_path),
           "--layer", "fc", "--quiet", "--mixed-precision", "bf16", "--cpu"]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and not os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2")
    assert ("has no native bf16 kernels" in res.stderr) == (not native), res.stderr[-3000:]  # AVX2 only: fp32, one line
    metrics = json.loads((tmp_path / "cinn" / "fc" / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["bpd"]))
    t = ConditionalINN.from_pretrained(tmp_path / "cinn" / "fc")
    assert next(t.parameters()).dtype == torch.float32


@pytest.mark.parametrize("native, isa, asked, env, falls_back", [
    (False, "", "bf16", None, True),       # AVX2 only: fp32, with the warning
    (True, "", "bf16", None, False),       # AVX-512: bf16 as asked
    (True, "AVX2", "bf16", None, True),    # AVX-512, but oneDNN capped at AVX2
    (False, "", None, "bf16", True),       # accelerate launch --mixed_precision bf16
    (False, "", "fp16", None, False),      # only bf16 is touched
])
def test_bf16_on_a_cpu_without_native_kernels_falls_back_to_fp32(monkeypatch, native, isa, asked, env, falls_back):
    import argparse

    from invint_hub.train.cli import cpu_bf16_fallback

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    if env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args = argparse.Namespace(mixed_precision=asked, cpu=True)
    msg = cpu_bf16_fallback(args)
    assert (msg is not None) == falls_back, msg
    if falls_back:
        assert "\n" not in msg and "training in fp32" in msg
        assert args.mixed_precision == "no" and "ACCELERATE_MIXED_PRECISION" not in os.environ
    else:
        assert args.mixed_precision == asked and os.environ.get("ACCELERATE_MIXED_PRECISION") == env


def test_another_mixed_precision_in_the_same_process_is_a_clear_error(trained, tiny_config, tmp_path):
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / d)
    with pytest.raises(ValueError, match="--mixed-precision fp16: this process already trained with mixed precision 'no'"):
        main(["cinn", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--layer", "fc", "--quiet",
              "--mixed-precision", "fp16"])


def test_checkpoints_hold_the_step_and_their_files_hashes_as_json(trained):
    from invint_hub.train.common import check_checkpoint

    ckpt = trained / "checkpoints" / "cinn_conv1+logits" / "step_2"
    marker = json.loads((ckpt / "train_state.json").read_text())
    assert marker["step"] == 2 and "model.safetensors" in marker["files"] and len(marker["files"]["model.safetensors"]) == 64
    assert check_checkpoint(ckpt) is None
    assert not list(ckpt.glob("custom_checkpoint_*"))  # nothing that loading would unpickle
    assert not list(ckpt.parent.glob(".*.tmp"))  # no temporary folder left behind


def test_cards_record_the_saved_config_where_the_yaml_uses_defaults(trained, tiny_config, tmp_path):
    """A cINN section without n_flows / hidden / depth: the card shows the model's defaults, read from config.json."""
    import shutil

    import yaml

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / d)
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["cinn"]["model"] = {"embed_dim": 8, "embedder_depth": 2, "embedder_width": 4}
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    main(["cinn", "--config", str(path), "--output-dir", str(tmp_path), "--layer", "logits", "--quiet", "--steps", "1"])
    saved = json.loads((tmp_path / "cinn" / "logits" / "config.json").read_text())
    card = (tmp_path / "cinn" / "logits" / "README.md").read_text()
    assert "None" not in card
    for key, row in (("n_flows", "flows"), ("hidden", "subnet width"), ("depth", "subnet depth")):
        assert f"| {row} | {saved[key]} |" in card


def test_every_default_comes_from_the_config_module(tiny_config):
    from invint_hub.train import config, parse_args

    cfg = config.load_config(tiny_config)
    args = parse_args(["cinn", "--config", str(tiny_config)])
    assert args.seed == config.SEED and args.save_dtype == config.SAVE_DTYPE
    t = config.train_settings({"data": cfg["data"]}, "cinn", args)
    assert t == config.TRAIN
    assert config.autoencoder_loss({"data": cfg["data"]}) == config.AUTOENCODER_LOSS
    c = config.concept_settings({"data": cfg["data"]})
    assert c["pairs"] == "labels" and c["factors"] == config.LABEL_FACTORS and c["model"] == config.CONCEPT_MODEL
    assert {k: c[k] for k in config.CONCEPTS} == config.CONCEPTS
    assert config.cinn_model_settings(cfg, "conv1") == cfg["cinn"]["model"]
    with pytest.raises(ValueError, match="split_key"):
        config.split_name(cfg, "val_split")


def test_resume_skips_a_checkpoint_without_its_marker_and_says_why(trained, tiny_config, tmp_path, capsys):
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / d)
    old = tmp_path / "checkpoints" / "cinn_conv1" / "step_1"
    old.mkdir(parents=True)
    (old / "custom_checkpoint_0.pkl").write_bytes(b"")  # the layout of checkpoints before train_state.json
    main(["cinn", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--layer", "conv1", "--quiet", "--resume"])
    out = capsys.readouterr().out
    assert f"skipping checkpoint {old}: no train_state.json" in out and "starting from scratch" in out
    assert (tmp_path / "cinn" / "conv1" / "model.safetensors").is_file()


def test_layers_trained_together_equal_layers_trained_alone(trained, tiny_config, tmp_path):
    """One backbone pass per batch for several layers: each layer's cINN starts as it would alone and sees the
    same batches; only the posterior noise is shared, so the joint NLLs stay close to the separate ones."""
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / "joint" / d)
        shutil.copytree(trained / d, tmp_path / "alone" / d)
    common = ["cinn", "--config", str(tiny_config), "--quiet", "--steps", "1"]
    joint = main(common + ["--output-dir", str(tmp_path / "joint"), "--layer", "conv1,logits"])
    alone = main(common + ["--output-dir", str(tmp_path / "alone"), "--layer", "conv1"])
    assert set(joint) == {"conv1", "logits"} and abs(joint["conv1"]["bpd"] - alone["conv1"]["bpd"]) < 0.05
    # before any step (ActNorm initialised on the same batch) the joint models equal the lone ones exactly
    zero = ["cinn", "--config", str(tiny_config), "--quiet", "--steps", "0"]
    main(zero + ["--output-dir", str(tmp_path / "joint"), "--layer", "conv1,logits"])
    for layer in ("conv1", "logits"):
        main(zero + ["--output-dir", str(tmp_path / "alone"), "--layer", layer])
        a = ConditionalINN.from_pretrained(tmp_path / "joint" / "cinn" / layer).state_dict()
        b = ConditionalINN.from_pretrained(tmp_path / "alone" / "cinn" / layer).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), layer


def test_cached_features_train_the_same_models(trained, tiny_config, tmp_path):
    """cinn.cache_features: the frozen networks run once over the training split; steps read the cache."""
    import shutil

    import yaml

    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["cinn"].update(cache_features=True, cache_dtype="float32")
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / "cached" / d)
        shutil.copytree(trained / d, tmp_path / "direct" / d)
    common = ["cinn", "--quiet", "--layer", "conv1,logits"]
    cached = main(common + ["--config", str(path), "--output-dir", str(tmp_path / "cached")])
    direct = main(common + ["--config", str(tiny_config), "--output-dir", str(tmp_path / "direct")])
    files = list((tmp_path / "cached" / "cache").glob("features_*.float32"))
    assert len(files) == 1
    for layer in ("conv1", "logits"):  # same batches, same noise: equal up to float rounding of batched passes
        a = ConditionalINN.from_pretrained(tmp_path / "cached" / "cinn" / layer)
        b = ConditionalINN.from_pretrained(tmp_path / "direct" / "cinn" / layer)
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(va, vb, atol=1e-4), (layer, k)
        assert abs(cached[layer]["bpd"] - direct[layer]["bpd"]) < 1e-3
    mtime = files[0].stat().st_mtime
    main(common + ["--config", str(path), "--output-dir", str(tmp_path / "cached")])  # reused, not rebuilt
    assert files[0].stat().st_mtime == mtime


def test_augmented_cache_holds_the_plain_copy_and_augmented_pairs(trained, tiny_config, tmp_path):
    """cinn.augment + augment_copies: the cache holds copy 0 as the plain cache does, then augmented copies whose
    z_bar and z both come from the same augmented image."""
    import shutil

    import numpy as np
    import yaml

    from invint_hub.autoencoder import Autoencoder
    from invint_hub.train.classifier import augment_batch
    from invint_hub.train.common import get_batch, make_dataset

    def run(name, **extra):
        cfg = yaml.safe_load(tiny_config.read_text())
        cfg["cinn"].update(cache_features=True, cache_dtype="float32", **extra)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        for d in ("backbone", "autoencoder"):
            shutil.copytree(trained / d, tmp_path / name / d)
        main(["cinn", "--quiet", "--layer", "logits", "--steps", "1", "--config", str(path),
              "--output-dir", str(tmp_path / name)])
        [f] = (tmp_path / name / "cache").glob("features_*.float32")
        return np.load(f)

    plain = run("plain")
    aug = run("aug", augment=["flip", "crop"], augment_copies=3)
    n = plain.shape[0]
    assert aug.shape == (3 * n, plain.shape[1])
    assert np.allclose(aug[:n], plain, atol=1e-5)  # copy 0 is the plain cache
    assert not np.allclose(aug[n:2 * n], plain, atol=1e-3) and not np.allclose(aug[n:2 * n], aug[2 * n:], atol=1e-3)
    # copy 1, first rows: recompute from the augmented images (the cache seeds copy k, position i with k * 1000003 + i)
    pipe = InvariancePipeline.from_pretrained(trained)
    ae = Autoencoder.from_pretrained(trained / "autoencoder")
    x, _ = get_batch(make_dataset(yaml.safe_load(tiny_config.read_text()), "train_split", _Args(), None), torch.arange(min(n, 256)))
    xa = augment_batch(x, ["flip", "crop"], torch.Generator().manual_seed(1 * 1_000_003 + 0))
    with torch.no_grad():
        mean = ae.encode(xa).mean
        logits = pipe.backbone.forward_layers(xa, ["logits"])["logits"]
    d = ae.latent_dim
    assert np.allclose(aug[n:n + len(x), :d], mean.numpy(), atol=1e-4)
    assert np.allclose(aug[n:n + len(x), 2 * d:], logits.numpy(), atol=1e-4)
    card = (tmp_path / "aug" / "cinn" / "logits" / "README.md").read_text()
    assert "flip, crop (3 cached copies)" in card


class _Args:
    data_dir = None


def test_augment_copies_need_the_cache_and_known_ops(tmp_path):
    from invint_hub.train.config import validate_config

    base = {"data": {"name": "cifar10", "image_size": 32, "channels": 3}}
    with pytest.raises(ValueError, match="cinn.augment_copies = 4 needs cinn.augment and cinn.cache_features"):
        validate_config({**base, "cinn": {"augment": ["flip"], "augment_copies": 4}}, "x.yaml")
    with pytest.raises(ValueError, match="x.yaml: cinn.augment has 'rotate'"):
        validate_config({**base, "cinn": {"augment": ["rotate"]}}, "x.yaml")
    validate_config({**base, "cinn": {"augment": ["flip"], "augment_copies": 4, "cache_features": True}}, "x.yaml")


def test_recolor_invariance_needs_colormnist_and_invariant_dims(tmp_path):
    from invint_hub.train.config import validate_config

    cfg = {"data": {"name": "mnist", "image_size": 32, "channels": 1},
           "autoencoder": {"model": {"latent_dim": 16}, "loss": {"recolor_invariance": 1.0, "invariant_dims": 10}}}
    with pytest.raises(ValueError, match="recolor_invariance needs data.name colormnist"):
        validate_config(cfg, "x.yaml")
    cfg["data"] = {"name": "colormnist", "image_size": 32, "channels": 3}
    validate_config(cfg, "x.yaml")
    for bad in (None, 16, 0):
        cfg["autoencoder"]["loss"]["invariant_dims"] = bad
        with pytest.raises(ValueError, match="x.yaml: autoencoder.loss.invariant_dims"):
            validate_config(cfg, "x.yaml")


def test_recolor_invariance_is_scale_free_and_zero_for_equal_codes():
    from invint_hub.autoencoder import recolor_invariance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
    assert recolor_invariance(a, a).item() == 0.0
    assert abs(recolor_invariance(a, b).item() - 1.0) < 0.2  # independent codes: about 1
    assert abs(recolor_invariance(10 * a, 10 * b).item() - recolor_invariance(a, b).item()) < 1e-4
    assert recolor_invariance(a, a + 0.1 * b).item() < 0.02


def test_data_domain_goes_into_pipeline_json(tmp_path):
    """``data.domain`` (plain words on what the pipeline understands) is written by every stage into pipeline.json,
    where ``pipe.domain`` and the Space read it; a non-string is a config error naming the key."""
    from invint_hub.train.common import update_pipeline_json
    from invint_hub.train.config import validate_config

    cfg = {"data": {"name": "cifar10", "image_size": 32, "channels": 3, "domain": "small photos of ten classes"}}
    update_pipeline_json(tmp_path, cfg)
    assert json.loads((tmp_path / "pipeline.json").read_text())["domain"] == "small photos of ten classes"
    cfg["data"]["domain"] = 3
    with pytest.raises(ValueError, match="x.yaml: data.domain"):
        validate_config(cfg, "x.yaml")


def test_export_leaves_out_checkpoints_logs_and_the_feature_cache(trained, tmp_path):
    import shutil

    from invint_hub.export import export

    src = tmp_path / "run"
    shutil.copytree(trained, src)
    (src / "cache").mkdir(exist_ok=True)
    (src / "cache" / "features_x.float16").write_bytes(b"\0" * 64)
    dst = export(src, tmp_path / "exported")
    assert not any((dst / d).exists() for d in ("cache", "checkpoints", "logs"))
    assert InvariancePipeline.from_pretrained(dst).layers == ["conv1", "logits"]


def _stage_two_config(tmp_path, init_from, **model):
    import yaml

    from conftest import TINY

    cfg = {"data": TINY["data"], "classifier": {
        "model": {**TINY["classifier"]["model"], **model}, "init_from": str(init_from),
        "train": {**TINY["classifier"]["train"], "steps": 1, "lr": 1e-12, "optimizer": "sgd"}}}
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_classifier_init_from_starts_from_a_trained_backbone(trained, tmp_path):
    """classifier.init_from (a second stage, e.g. configs/cifar10.yaml): the run starts from the folder's weights."""
    from invint_hub.backbones import Backbone

    cfg = _stage_two_config(tmp_path, trained)  # a pipeline folder; its backbone/ is used
    main(["classifier", "--config", str(cfg), "--output-dir", str(tmp_path / "out"), "--quiet"])
    src = Backbone.from_pretrained(trained / "backbone").state_dict()
    new = Backbone.from_pretrained(tmp_path / "out" / "backbone").state_dict()
    assert set(src) == set(new)
    for k in src:  # one step at lr 1e-12: the weights are the source's (a fresh init would differ everywhere)
        assert torch.allclose(src[k].float(), new[k].float(), atol=1e-5), k
    assert f"initialised from | {trained}" in (tmp_path / "out" / "backbone" / "README.md").read_text()


def test_classifier_init_from_mistakes_are_one_line_errors(trained, tmp_path):
    cfg = _stage_two_config(tmp_path, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"classifier\.init_from: .*nowhere holds no backbone"):
        main(["classifier", "--config", str(cfg), "--output-dir", str(tmp_path / "a"), "--quiet"])
    cfg = _stage_two_config(tmp_path, trained / "backbone", width=6)  # the config builds another width
    with pytest.raises(ValueError, match=r"classifier\.init_from: the weights in .*backbone do not fit") as e:
        main(["classifier", "--config", str(cfg), "--output-dir", str(tmp_path / "b"), "--quiet"])
    assert "\n" not in str(e.value)


def _add_layers(out, names):
    from invint_hub.train.common import update_pipeline_json

    cfg = {"data": {"name": "synthetic", "image_size": 16, "channels": 1}}
    for name in names:
        update_pipeline_json(Path(out), cfg, cinn_layer=name)


def test_pipeline_json_survives_stages_writing_it_at_once(tmp_path):
    """Two --layer groups of the cINN stage started together both write pipeline.json: a reader never sees a
    half-written file and no entry is lost (a lock around read-modify-write, an atomic replace)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    groups = [[f"g{g}_{i}" for i in range(40)] for g in range(4)]
    procs = [ctx.Process(target=_add_layers, args=(tmp_path, names)) for names in groups]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        path = tmp_path / "pipeline.json"
        if path.exists():
            json.loads(path.read_text())  # raises on a half-written file
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    info = json.loads((tmp_path / "pipeline.json").read_text())
    assert set(info["cinn"]) == {n for names in groups for n in names} and reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "pipeline.json"]  # no temporary file left

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
    logs = [json.loads(line) for line in (trained / "logs" / "cinn_conv1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["split"] == "train"] == [1, 2]
    assert all("bpd" in r for r in logs)
    assert float(pipe.autoencoder.latent_var) > 0


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


def test_bf16_cinn_stage_keeps_fp32_weights_and_logdet(trained, tiny_config, tmp_path):
    import shutil

    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, tmp_path / d)
    r = main(["cinn", "--config", str(tiny_config), "--output-dir", str(tmp_path), "--layer", "fc", "--quiet",
              "--mixed-precision", "bf16", "--cpu"])
    assert r["fc"] is not None and torch.isfinite(torch.tensor(r["fc"]["bpd"]))
    t = ConditionalINN.from_pretrained(tmp_path / "cinn" / "fc")
    assert next(t.parameters()).dtype == torch.float32


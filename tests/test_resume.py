"""Training survives kill -9: during a step, and at every point of writing a checkpoint (issue 14).

Each killed run is resumed with ``--resume`` and must end on the same weights as an uninterrupted run: batches are
a pure function of the step, and a checkpoint restores model, optimizer and RNG state, so the tolerance is float
rounding of one and the same computation (here they come out bit-identical; the assertion allows 1e-6).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from invint_hub import ConditionalINN
from invint_hub.train import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir):
    return tiny_pipeline_dir


def prepare(trained, folder: Path) -> Path:
    for d in ("backbone", "autoencoder"):
        shutil.copytree(trained / d, folder / d)
    return folder


def command(tiny_config, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "invint_hub.train", "cinn", "--config", str(tiny_config), "--output-dir", str(out),
            "--layer", "conv1", "--quiet", "--steps", str(STEPS), "--checkpoint-every", "1", "--keep-checkpoints", "2",
            *extra]


def run(cmd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def assert_same_weights(a: Path, b: Path) -> None:
    ma, mb = ConditionalINN.from_pretrained(a / "cinn" / "conv1"), ConditionalINN.from_pretrained(b / "cinn" / "conv1")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-6), k


@pytest.fixture(scope="module")
def reference(trained, tiny_config, tmp_path_factory):
    out = prepare(trained, tmp_path_factory.mktemp("reference"))
    res = run(command(tiny_config, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# every point of writing a checkpoint (accelerate's files written / hashed / marker written / renamed), at several steps
KILL_POINTS = ["state-written:1", "hashed:2", "marked:2", "renamed:3", "state-written:4"]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_while_writing_a_checkpoint_then_resume(point, trained, tiny_config, reference, tmp_path):
    out = prepare(trained, tmp_path)
    killed = run(command(tiny_config, out), INVINT_TEST_KILL=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    step = int(point.split(":")[1])
    ckpts = out / "checkpoints" / "cinn_conv1"
    complete = sorted(p.name for p in ckpts.glob("step_*") if (p / "train_state.json").is_file())
    # killed before the rename: step N is not there (or only as a temporary folder); after: it is complete
    assert (f"step_{step}" in complete) == (point.startswith("renamed"))
    resumed = run(command(tiny_config, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_from = step if point.startswith("renamed") else step - 1
    if expected_from > 0:
        assert f"(step {expected_from}, the newest complete checkpoint)" in resumed.stdout + resumed.stderr
    assert_same_weights(reference, out)
    assert not list(ckpts.glob(".*.tmp"))  # the leftover temporary folder was cleaned up


@pytest.mark.slow
def test_kill_9_during_training_then_resume(trained, tiny_config, reference, tmp_path):
    out = prepare(trained, tmp_path)
    cmd = command(tiny_config, out)
    cmd[cmd.index("--steps") + 1] = "40"  # long enough to be killed in the middle
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckpts = out / "checkpoints" / "cinn_conv1"
    def steps_done() -> int:
        return max([int(p.name[5:]) for p in ckpts.glob("step_*") if p.name[5:].isdigit()], default=0)

    while time.time() < deadline and steps_done() < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    resumed = run(command(tiny_config, out, "--resume", "--steps", "40"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "the newest complete checkpoint" in resumed.stdout + resumed.stderr
    full = prepare(trained, tmp_path / "full")
    ref = command(tiny_config, full)
    ref[ref.index("--steps") + 1] = "40"
    assert run(ref).returncode == 0
    assert_same_weights(full, out)


def test_a_damaged_newest_checkpoint_is_reported_and_skipped(trained, tiny_config, tmp_path, capsys):
    out = prepare(trained, tmp_path)
    args = ["cinn", "--config", str(tiny_config), "--output-dir", str(out), "--layer", "conv1", "--quiet",
            "--steps", "3", "--checkpoint-every", "1", "--keep-checkpoints", "3"]
    main(args + ["--stop-after", "3"])
    ckpts = out / "checkpoints" / "cinn_conv1"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_1", "step_2", "step_3"]
    weights = ckpts / "step_3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (ckpts / "step_2" / "train_state.json").write_text("{not json")  # damaged marker
    capsys.readouterr()
    main(args + ["--resume"])
    said = capsys.readouterr().out
    assert f"skipping checkpoint {ckpts / 'step_3'}: model.safetensors is damaged" in said
    assert f"skipping checkpoint {ckpts / 'step_2'}: damaged train_state.json" in said
    assert f"resumed cinn_conv1 from {ckpts / 'step_1'} (step 1" in said
    marker = json.loads((ckpts / "step_3" / "train_state.json").read_text())  # step 3 written again, complete
    assert marker["step"] == 3


def test_keep_the_last_k_checkpoints(trained, tiny_config, tmp_path):
    out = prepare(trained, tmp_path)
    main(["cinn", "--config", str(tiny_config), "--output-dir", str(out), "--layer", "conv1", "--quiet",
          "--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "2"])
    assert sorted(p.name for p in (out / "checkpoints" / "cinn_conv1").glob("step_*")) == ["step_4", "step_5"]

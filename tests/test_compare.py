"""One autoencoder shared by reference (pipeline.json "autoencoder": "../<pipeline>/autoencoder"), autoencoder_id,
``autoencoder.from`` in the training CLI, and ``InvariancePipeline.compare`` (issue 12)."""
import json
import shutil

import pytest
import torch
import yaml

from conftest import TINY
from invint_hub import InvariancePipeline
from invint_hub.hub import safetensors_sha256
from invint_hub.pipeline import Comparison


@pytest.fixture(scope="module")
def pipes(shared_ae_pipelines):
    root = shared_ae_pipelines
    return {n: InvariancePipeline.from_pretrained(root / n) for n in ("a", "b", "a_twin", "other_ae")}


def image(seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def copy_pipeline(src, dst, autoencoder):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    info = json.loads((dst / "pipeline.json").read_text())
    info["autoencoder"] = autoencoder
    (dst / "pipeline.json").write_text(json.dumps(info))
    return dst


# --- the autoencoder by reference -----------------------------------------------------------------------------
def test_a_pipeline_loads_its_autoencoder_from_a_sibling(shared_ae_pipelines, pipes):
    root = shared_ae_pipelines
    assert not (root / "b" / "autoencoder").exists()
    assert json.loads((root / "b" / "pipeline.json").read_text())["autoencoder"] == "../a/autoencoder"
    a, b = pipes["a"], pipes["b"]
    assert b.backbone.arch.endswith(":BranchyNet") and a.backbone.arch == "cifar_resnet"
    for (ka, va), (kb, vb) in zip(a.autoencoder.state_dict().items(), b.autoencoder.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = image()
    assert torch.equal(a.reconstruct(x), b.reconstruct(x))


def test_autoencoder_id_is_the_recorded_sha256_and_tells_shared_from_not(shared_ae_pipelines, pipes):
    root = shared_ae_pipelines
    recorded = safetensors_sha256(root / "a" / "autoencoder" / "model.safetensors")
    assert len(recorded) == 64
    assert pipes["a"].autoencoder_id == pipes["b"].autoencoder_id == pipes["a_twin"].autoencoder_id == recorded
    assert pipes["other_ae"].autoencoder_id != recorded


def test_autoencoder_id_follows_the_weights(pipes):
    from invint_hub.hub import tensors_sha256

    a = InvariancePipeline.from_pretrained(pipes["a"].root)
    before = a.autoencoder_id
    assert before == tensors_sha256(a.autoencoder.state_dict())  # fp32 file: the in-memory tensors hash the same
    with torch.no_grad():
        a.autoencoder.decoder[-2].weight.add_(0.01)
    assert a.autoencoder_id != before
    a.autoencoder.load_state_dict(pipes["a"].autoencoder.state_dict())  # the loaded weights again: the same id
    assert a.autoencoder_id == before


def test_save_pretrained_of_a_referencing_pipeline_copies_the_autoencoder(pipes, tmp_path):
    b = pipes["b"]
    out = b.save_pretrained(tmp_path / "b_alone")
    assert json.loads((out / "pipeline.json").read_text())["autoencoder"] == "autoencoder"
    assert (out / "autoencoder" / "model.safetensors").is_file()
    again = InvariancePipeline.from_pretrained(out)
    assert again.autoencoder_id == b.autoencoder_id  # loaded from another folder: still the same autoencoder
    x = image(3)
    assert torch.equal(again.sample_invariances(x, "body.b", n=3, seed=2), b.sample_invariances(x, "body.b", n=3, seed=2))
    half = InvariancePipeline.from_pretrained(b.save_pretrained(tmp_path / "b_half", dtype=torch.float16))
    assert half.autoencoder_id != b.autoencoder_id  # other weights (fp16): another id


@pytest.mark.parametrize("entry, error, match", [
    ("/tmp/elsewhere/autoencoder", ValueError, r"pipeline.json: autoencoder = '/tmp/elsewhere/autoencoder' must be a path relative"),
    ("../../autoencoder", ValueError, r"pipeline.json: autoencoder = '../../autoencoder' leaves the folder that holds"),
    ("../a/../../x/autoencoder", ValueError, r"pipeline.json: autoencoder = .* leaves the folder"),
    ("..", ValueError, r"pipeline.json: autoencoder = '..' leaves the folder"),
    ("../missing/autoencoder", FileNotFoundError, r"pipeline.json: autoencoder names the folder '../missing/autoencoder', which does not exist"),
    ("", ValueError, r"pipeline.json: autoencoder = ''; expected a folder name"),
])
def test_bad_autoencoder_references_are_named(shared_ae_pipelines, tmp_path, entry, error, match):
    copy = copy_pipeline(shared_ae_pipelines / "b", shared_ae_pipelines / f"bad_{abs(hash(entry))}", entry)
    try:
        with pytest.raises(error, match=match):
            InvariancePipeline.from_pretrained(copy)
    finally:
        shutil.rmtree(copy)


def test_a_hub_snapshot_cannot_reference_a_sibling(shared_ae_pipelines, tmp_path, monkeypatch):
    """A Hub download holds one repository: "../a/autoencoder" is refused with a message saying so."""
    import huggingface_hub

    snap = tmp_path / "models--org--b" / "snapshots" / "abc123"
    shutil.copytree(shared_ae_pipelines / "b", snap)
    shutil.copytree(shared_ae_pipelines / "a", snap.parent / "a")  # even a folder there must not be used
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(snap))
    with pytest.raises(ValueError, match=r"names a folder of another pipeline, which a Hub repository cannot reference"):
        InvariancePipeline.from_pretrained("org/b")


# --- the training CLI: autoencoder.from --------------------------------------------------------------------------
def test_training_cli_records_autoencoder_from_instead_of_training(tiny_pipeline_dir, tmp_path):
    from invint_hub.train import main

    a = tmp_path / "a"
    shutil.copytree(tiny_pipeline_dir, a)
    cfg = json.loads(json.dumps(TINY))
    cfg["classifier"]["model"] = {"arch": "mnist_cnn", "width": 6}
    cfg["autoencoder"] = {"from": str(a)}
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(cfg))
    b = tmp_path / "b"
    main(["classifier", "--config", str(path), "--output-dir", str(b), "--quiet"])
    main(["cinn", "--config", str(path), "--output-dir", str(b), "--quiet"])  # records the reference by itself
    info = json.loads((b / "pipeline.json").read_text())
    assert info["autoencoder"] == "../a/autoencoder" and not (b / "autoencoder").exists()
    pa, pb = InvariancePipeline.from_pretrained(a), InvariancePipeline.from_pretrained(b)
    assert pa.autoencoder_id == pb.autoencoder_id and pb.layers == ["conv1", "logits"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pa.backbone) != count(pb.backbone)  # another classifier (width 6, not 4)
    res = main(["autoencoder", "--config", str(path), "--output-dir", str(b), "--quiet"])  # the stage itself: the same
    assert res == {"autoencoder": {"autoencoder": "../a/autoencoder"}}


def test_training_cli_refuses_bad_autoencoder_from(tiny_pipeline_dir, tmp_path):
    from invint_hub.train import main
    from invint_hub.train.config import validate_config

    cfg = json.loads(json.dumps(TINY))
    with pytest.raises(ValueError, match=r"x.yaml: autoencoder.from reuses the autoencoder of runs/a, so autoencoder.loss, "
                                         r"autoencoder.model, autoencoder.train would not be used"):
        validate_config({**cfg, "autoencoder": {**cfg["autoencoder"], "from": "runs/a"}}, "x.yaml")
    with pytest.raises(ValueError, match=r"x.yaml: autoencoder.from = 3; expected the path of another pipeline folder"):
        validate_config({**cfg, "autoencoder": {"from": 3}}, "x.yaml")
    far = tmp_path / "a"  # not next to the output folder tmp_path/sub/b: "../../a/autoencoder" would climb out
    shutil.copytree(tiny_pipeline_dir, far)
    for src, match in ((tmp_path / "nothing", "not a pipeline folder"), (far, "is not inside .* the folder that holds")):
        cfg["autoencoder"] = {"from": str(src)}
        path = tmp_path / "b.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ValueError, match=r"autoencoder.from = .*" + match):
            main(["autoencoder", "--config", str(path), "--output-dir", str(tmp_path / "sub" / "b"), "--quiet"])
    assert not (tmp_path / "sub" / "b" / "pipeline.json").exists()


# --- compare ------------------------------------------------------------------------------------------------------
def test_compare_decodes_the_same_v_with_each_network(pipes):
    a, b = pipes["a"], pipes["b"]
    x = image(1)
    c = a.compare(b, x, "layer2", "body.b", n=6, seed=3, temperature=0.8)
    assert isinstance(c, Comparison) and c.autoencoder_id == a.autoencoder_id
    assert c.v.shape == (6, 8) and c.a.samples.shape == c.b.samples.shape == (6, 3, 16, 16)
    assert (c.a.layer, c.b.layer) == ("layer2", "body.b")
    assert c.a.network == "cifar_resnet" and c.b.network.endswith(":BranchyNet")
    # side A is interpret's samples with the same seed; side B is the other pipeline's, with the same v
    r = a.interpret(x, "layer2", n=6, temperature=0.8, seed=3)
    assert torch.allclose(c.a.samples, r.samples, atol=1e-6)
    assert c.a.variance_ratio == pytest.approx(r.variance_ratio, rel=1e-6)
    rb = b.interpret(x, "body.b", n=6, temperature=0.8, seed=3)
    assert torch.allclose(c.b.samples, rb.samples, atol=1e-6)
    assert c.b.variance_ratio == pytest.approx(rb.variance_ratio, rel=1e-6)
    assert not torch.allclose(c.a.samples, c.b.samples)  # other networks, other z: other decodes of one v
    for side, pipe in ((c.a, a), (c.b, b)):
        probs = pipe.predict(x)[0]
        assert torch.allclose(side.probs, probs, atol=1e-6)
        assert side.class_name == pipe.class_names[int(probs.argmax())] and side.probability == pytest.approx(float(probs.max()))
        assert torch.equal(side.sample_pred, pipe.backbone(side.samples).argmax(1))
        assert side.class_agreement == pytest.approx(float((side.sample_pred == probs.argmax()).float().mean()))
        assert 0.0 <= side.variance_explained <= 1.0
    assert torch.allclose(c.recon, a.reconstruct(x), atol=1e-5)  # (decoded in one batch with the samples)


def test_compare_with_the_same_networks_gives_the_same_samples(pipes):
    c = pipes["a"].compare(pipes["a_twin"], image(2), "logits", n=5, seed=0)
    # equal up to float round-off (oneDNN may pick other kernels for the two sides' batches, e.g. under AVX2 only)
    assert torch.allclose(c.a.samples, c.b.samples, atol=1e-5) and c.a.class_name == c.b.class_name
    assert abs(c.a.variance_ratio - c.b.variance_ratio) < 1e-4 * max(1.0, abs(c.a.variance_ratio))
    d = pipes["a"].compare(pipes["a_twin"], image(2), "logits", "layer2", n=5, seed=0)  # another layer: other samples
    assert not torch.allclose(d.a.samples, d.b.samples, atol=1e-3)


def test_compare_refuses_pipelines_on_other_autoencoders_and_bad_arguments(pipes):
    a = pipes["a"]
    with pytest.raises(ValueError, match=r"^the two pipelines do not share an autoencoder \(autoencoder_id [0-9a-f]{12} vs "):
        a.compare(pipes["other_ae"], image(), "logits")
    with pytest.raises(ValueError, match=r"no cINN for layer 'body.b'; this pipeline has \['layer2', 'logits'\]"):
        a.compare(pipes["b"], image(), "body.b")
    with pytest.raises(ValueError, match="compare takes one image, got a batch of 2"):
        a.compare(pipes["b"], torch.zeros(2, 3, 16, 16), "logits")
    with pytest.raises(ValueError, match="number of samples must be >= 1"):
        a.compare(pipes["b"], image(), "logits", n=0)
    with pytest.raises(TypeError, match="compare needs another InvariancePipeline"):
        a.compare("b", image(), "logits")


# --- the Space: registry, handler ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compare_app(shared_ae_pipelines, tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import app
    from invint_hub.space import ModelRegistry

    root = shared_ae_pipelines
    registry = ModelRegistry([str(root / n) for n in ("a", "b", "other_ae", "a_twin")], include_embedded=False,
                             examples_per_model=2, example_dir=tmp_path_factory.mktemp("cmp_examples"))
    return app, app.SpaceApp(registry), registry


def test_registry_lists_the_models_that_share_an_autoencoder(compare_app, shared_ae_pipelines, pipes):
    _, space_app, registry = compare_app
    a, b, other, twin = registry.names
    assert registry.autoencoder_id(b) == pipes["b"].autoencoder_id  # read from the file header: b is not loaded
    assert registry._entries[b].pipe is None
    assert registry.compare_partners(a) == [b, twin]
    assert registry.compare_partners(other) == []
    choices, note = space_app.compare_partners(a)
    assert choices == [(registry.label(b), b), (registry.label(twin), twin)] and "2 models here share" in note
    choices, note = space_app.compare_partners(other)
    assert choices == [] and note.startswith("No other model here shares") and "nothing to compare it with" in note
    assert space_app.compare_layers(b, "logits") == (["body.b", "logits"], "logits")
    assert space_app.compare_layers(b, "layer2") == (["body.b", "logits"], space_app.default_layer(b))


def test_compare_handler_shows_both_networks(compare_app, pipes):
    from PIL import Image

    _, space_app, registry = compare_app
    a, b = registry.names[:2]
    ex = registry.get(a).examples[0]
    img_a, img_b, summary = space_app.compare(a, b, str(ex), False, "layer2", "body.b", 8, 1.0, 4)
    assert isinstance(img_a, Image.Image) and isinstance(img_b, Image.Image)
    # a title band of three lines (62 px) over a captioned grid of the 8 samples: one row of 8 cells of 64 px
    assert img_a.height == 62 + (64 + 16 + 4) + 4 and img_a.width == 8 * 68 + 4
    lib = pipes["a"].compare(pipes["b"], pipes["a"].preprocess(Image.open(ex)), "layer2", "body.b", n=8, seed=4)
    for tag, side, name in (("A", lib.a, a), ("B", lib.b, b)):
        assert (f"**{tag}: {registry.label(name)}** (`{side.network}`, layer `{side.layer}`) predicts "
                f"**{side.class_name}** ({100 * side.probability:.0f}%)") in summary
    assert "**same 8 invariance samples v** (seed 4, temperature 1)" in summary
    # each grid draws the library's comparison; the two show other decodes (other networks)
    import functools

    from invint_hub import space
    for img, side, name, pipe in ((img_a, lib.a, a, pipes["a"]), (img_b, lib.b, b, pipes["b"])):
        tag = "A" if side is lib.a else "B"
        want = space.compare_grid(side, functools.partial(space.class_name, pipe),
                                  f"{tag}: {side.network} · layer {side.layer}", registry.label(name))
        assert img.size == want.size and img.tobytes() == want.tobytes()
    assert img_a.tobytes() != img_b.tobytes()


def test_compare_handler_errors_are_one_line(compare_app):
    import gradio as gr

    app, space_app, registry = compare_app
    a, b, other, _ = registry.names
    ex = str(registry.get(a).examples[0])
    handler = app.ui_errors(space_app.compare)
    for args, match in (((other, None, ex, False, "layer2", "layer2", 4, 1.0, 0), "No other model here shares"),
                        ((a, other, ex, False, "layer2", "layer2", 4, 1.0, 0), "do not share an autoencoder"),
                        ((a, b, None, False, "layer2", "body.b", 4, 1.0, 0), "give an image to compare"),
                        ((a, b, ex, False, "layer2", "conv9", 4, 1.0, 0), r"no cINN for layer 'conv9'"),
                        ((a, b, ex, False, "layer2", "body.b", 0, 1.0, 0), "number of samples must be between")):
        with pytest.raises(gr.Error, match=match) as err:
            handler(*args)
        assert "\n" not in str(err.value.message)


def test_export_keeps_the_reference_when_the_sibling_is_exported_next_to_it(shared_ae_pipelines, tmp_path):
    from invint_hub.export import export

    with pytest.raises(FileNotFoundError, match=r"autoencoder names the folder '../a/autoencoder', which does not exist"):
        export(shared_ae_pipelines / "b", tmp_path / "alone" / "b")
    export(shared_ae_pipelines / "a", tmp_path / "pretrained" / "a")
    export(shared_ae_pipelines / "b", tmp_path / "pretrained" / "b")
    assert not (tmp_path / "pretrained" / "b" / "autoencoder").exists()  # stored once
    pa, pb = (InvariancePipeline.from_pretrained(tmp_path / "pretrained" / n) for n in ("a", "b"))
    assert pa.autoencoder_id == pb.autoencoder_id

"""classifier.train.augment: crop (pad 4 reflect + random crop) and flip on the classifier stage's batches."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY
from invint_hub.train.classifier import augment_batch
from invint_hub.train.config import validate_config


def batch(b=6, c=3, s=12):
    return torch.arange(b * c * s * s, dtype=torch.float32).view(b, c, s, s) / (b * c * s * s)


def test_flip_mirrors_some_images_and_keeps_the_others():
    x = batch(64)
    y = augment_batch(x, ["flip"], torch.Generator().manual_seed(0))
    same = [torch.equal(y[i], x[i]) for i in range(64)]
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(64)]
    assert all(a or b for a, b in zip(same, flipped))
    assert 10 < sum(flipped) < 54  # about half


def test_crop_takes_a_window_of_the_reflect_padded_image():
    x = batch()
    y = augment_batch(x, ["crop"], torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = []
    for k in range(x.shape[0]):
        hits = [(i, j) for i in range(9) for j in range(9) if torch.equal(y[k], xp[k, :, i:i + 12, j:j + 12])]
        assert len(hits) == 1  # (the values are all distinct, so the window is unique)
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # random windows, not one fixed shift


def test_augmentation_is_a_function_of_the_generator_seed():
    x = batch()
    ops = ["crop", "flip"]
    a = augment_batch(x, ops, torch.Generator().manual_seed(5))
    assert torch.equal(a, augment_batch(x, ops, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, augment_batch(x, ops, torch.Generator().manual_seed(6)))
    assert torch.equal(augment_batch(x, [], torch.Generator().manual_seed(5)), x)


def test_config_accepts_crop_and_flip_and_names_anything_else():
    cfg = json.loads(json.dumps(TINY))
    cfg["classifier"]["train"]["augment"] = ["crop", "flip"]
    validate_config(cfg, "c.yaml")
    cfg["classifier"]["train"]["augment"] = ["crop", "rotate"]
    with pytest.raises(ValueError, match=r"^c.yaml: classifier.train.augment has 'rotate'; allowed entries: crop, flip$"):
        validate_config(cfg, "c.yaml")
    cfg["classifier"]["train"]["augment"] = "crop"
    with pytest.raises(ValueError, match=r"c.yaml: classifier.train.augment = 'crop' \(str\); expected list"):
        validate_config(cfg, "c.yaml")
    cfg["classifier"]["train"].pop("augment")
    cfg["cinn"]["train"]["augment"] = ["flip"]  # only the classifier stage augments
    with pytest.raises(ValueError, match=r"c.yaml: unknown key cinn.train.augment"):
        validate_config(cfg, "c.yaml")


def test_the_classifier_stage_trains_on_augmented_batches(tmp_path):
    from invint_hub import Backbone
    from invint_hub.train import main

    weights = {}
    for name, ops in (("plain", []), ("augmented", ["crop", "flip"]), ("again", ["crop", "flip"])):
        cfg = json.loads(json.dumps(TINY))
        cfg["classifier"]["train"]["augment"] = ops
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        main(["classifier", "--config", str(path), "--output-dir", str(tmp_path / name), "--quiet"])
        weights[name] = Backbone.from_pretrained(tmp_path / name / "backbone").state_dict()
        card = (tmp_path / name / "backbone" / "README.md").read_text()
        assert f"| augmentation | {', '.join(ops) or 'none'} |" in card
    differ = lambda a, b: any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert differ("plain", "augmented")  # the batches were augmented
    assert not differ("augmented", "again")  # and the same way in a second run (seeded by the step)


def test_a_resumed_augmented_run_ends_on_the_same_weights(tmp_path):
    from invint_hub import Backbone
    from invint_hub.train import main

    cfg = json.loads(json.dumps(TINY))
    cfg["classifier"]["train"].update(augment=["crop", "flip"], steps=4)
    path = tmp_path / "aug.yaml"
    path.write_text(yaml.safe_dump(cfg))
    flags = ["--config", str(path), "--quiet", "--checkpoint-every", "1"]
    main(["classifier", *flags, "--output-dir", str(tmp_path / "whole")])
    assert main(["classifier", *flags, "--output-dir", str(tmp_path / "cut"), "--stop-after", "2"])["classifier"] is None
    main(["classifier", *flags, "--output-dir", str(tmp_path / "cut"), "--resume"])
    a = Backbone.from_pretrained(tmp_path / "whole" / "backbone").state_dict()
    b = Backbone.from_pretrained(tmp_path / "cut" / "backbone").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k

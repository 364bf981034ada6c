"""Damaged or inconsistent model folders end in one-line errors that name the file and the fault (issue 14)."""
import json

import pytest
import torch

from invint_hub import ConditionalINN


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ConditionalINN(latent_dim=8, cond_shape=[4], embed_dim=8, n_flows=2, hidden=16, depth=1, embedder_depth=2)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def corrupt(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = value if value is not None else data[offset] ^ 0xFF
    path.write_bytes(bytes(data))


def test_a_saved_model_loads_and_records_its_hash(saved):
    from safetensors import safe_open

    model, folder = saved
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert len(f.metadata()["sha256"]) == 64
    loaded = ConditionalINN.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("damage", ["truncated", "empty", "not safetensors"])
def test_damaged_weights_name_the_file(saved, damage):
    _, folder = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "not safetensors": b"PK\x03\x04" * 100}[damage])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a complete safetensors file"):
        ConditionalINN.from_pretrained(folder)


def test_flipped_byte_in_tensor_data_is_caught(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    corrupt(path, len(path.read_bytes()) - 3)  # inside the last tensor's data
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged.*sha256"):
        ConditionalINN.from_pretrained(folder)


def test_flipped_byte_in_the_header_is_caught(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    for offset in (8, 8 + header_len // 2, 8 + header_len - 2):  # the header's JSON: start, middle, end
        original = path.read_bytes()
        corrupt(path, offset)
        with pytest.raises((ValueError, RuntimeError), match=r"model\.safetensors"):
            ConditionalINN.from_pretrained(folder)
        path.write_bytes(original)


def test_config_mistakes_name_the_key_and_the_file(saved):
    _, folder = saved
    cfg_path = folder / "config.json"
    good = json.loads(cfg_path.read_text())
    cases = [
        ({**good, "hiden": 16}, r"config\.json: unknown key\(s\) \['hiden'\]"),
        ({**good, "hidden": "big"}, r"config\.json: hidden = 'big' \(str\); expected int"),
        ({**good, "n_flows": True}, r"config\.json: n_flows = True"),
        ({**good, "hidden": 32}, r"model\.safetensors do not fit the model that its config\.json describes"),
    ]
    for cfg, message in cases:
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises((ValueError, RuntimeError), match=message):
            ConditionalINN.from_pretrained(folder)
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ConditionalINN.from_pretrained(folder)


def test_every_embedded_weights_file_records_its_sha256_and_matches_it():
    from safetensors import safe_open

    from invint_hub.hub import read_safetensors
    from invint_hub.pipeline import PRETRAINED_DIR

    files = sorted(PRETRAINED_DIR.rglob("model.safetensors"))
    assert len(files) >= 13
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            assert len((h.metadata() or {}).get("sha256", "")) == 64, f
        read_safetensors(f)  # raises if the data does not hash to it

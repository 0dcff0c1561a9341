"""Loader on synthetic checkpoints: every key consumed, every parameter filled, and each corrupt case
fails up front with a clear error naming the tensor and the file."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_local.checkpoint import CheckpointError, CheckpointReader, load_model
from kimi_local.config import ConfigError
from kimi_local.tiny import make_tiny

SMALL = {"n_routed_experts": 16, "num_experts_per_tok": 4}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("small"))
    return make_tiny(d, seed=5, overrides=SMALL)


@pytest.fixture
def bad(small_dir, tmp_path):
    d = str(tmp_path / "m")
    shutil.copytree(small_dir, d)
    return d


def _index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def _edit_shard_of(d, name, fn):
    shard = _index(d)["weight_map"][name]
    path = os.path.join(d, shard)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)
    return shard


def _load(d):
    return load_model(d, dtype=torch.float32, expert_backend="torch")


def test_all_keys_consumed_all_params_filled(small_dir):
    m = _load(small_dir)
    assert not any(p.is_meta for p in m.parameters())
    reader = CheckpointReader(small_dir)
    n_expert_weights = sum(1 for n in reader.tensors if ".experts." in n and n.endswith(".weight"))
    assert n_expert_weights == 2 * 16 * 3
    assert sum(len(v) for v in m.experts.layers.values()) == 2 * 16
    # At least one layer is split across shards, as in the real checkpoints.
    wm = _index(small_dir)["weight_map"]
    by_layer = {}
    for n, f in wm.items():
        if n.startswith("model.layers."):
            by_layer.setdefault(n.split(".")[2], set()).add(f)
    assert any(len(f) > 1 for f in by_layer.values())
    assert len(set(wm.values())) >= 2


def test_single_file_checkpoint(small_dir, tmp_path):
    d = str(tmp_path / "single")
    shutil.copytree(small_dir, d)
    tensors = {}
    for shard in sorted(set(_index(d)["weight_map"].values())):
        tensors.update(load_file(os.path.join(d, shard)))
        os.remove(os.path.join(d, shard))
    os.remove(os.path.join(d, "model.safetensors.index.json"))
    save_file(tensors, os.path.join(d, "model.safetensors"))
    a, b = _load(small_dir), _load(d)
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(a(x), b(x))


NAME = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"


def test_missing_tensor(bad):
    _edit_shard_of(bad, NAME, lambda t: t.pop(NAME))
    idx = _index(bad)
    del idx["weight_map"][NAME]
    json.dump(idx, open(os.path.join(bad, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.kv_a_proj_with_mqa\.weight'"):
        _load(bad)


def test_missing_shard(bad):
    shard = _index(bad)["weight_map"][NAME]
    os.remove(os.path.join(bad, shard))
    with pytest.raises(CheckpointError, match=f"missing shard {shard}"):
        _load(bad)


def test_index_points_to_wrong_shard(bad):
    idx = _index(bad)
    shards = sorted(set(idx["weight_map"].values()))
    other = next(s for s in shards if s != idx["weight_map"][NAME])
    idx["weight_map"][NAME] = other
    json.dump(idx, open(os.path.join(bad, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=f"'{NAME}' is mapped to {other}"):
        _load(bad)


def test_unexpected_tensor(bad):
    extra = "model.layers.1.self_attn.mystery.weight"
    shard = _edit_shard_of(bad, NAME, lambda t: t.__setitem__(extra, torch.zeros(3)))
    idx = _index(bad)
    idx["weight_map"][extra] = shard
    json.dump(idx, open(os.path.join(bad, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}' in {shard}"):
        _load(bad)


def test_wrong_shape(bad):
    name = "model.layers.0.input_layernorm.weight"
    shard = _edit_shard_of(bad, name, lambda t: t.__setitem__(name, torch.ones(7, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"'{name}' in {shard}: shape \[7\], expected \[192\]"):
        _load(bad)


def test_wrong_dtype(bad):
    name = "model.norm.weight"
    _edit_shard_of(bad, name, lambda t: t.__setitem__(name, torch.ones(192, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*dtype I32"):
        _load(bad)


def test_fp8_without_scale(bad):
    scale = NAME + "_scale_inv"
    _edit_shard_of(bad, scale, lambda t: t.pop(scale))
    idx = _index(bad)
    del idx["weight_map"][scale]
    json.dump(idx, open(os.path.join(bad, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match=f"'{NAME}' in .* is FP8 .* but has no '{scale}'"):
        _load(bad)


def test_wrong_scale_shape(bad):
    scale = NAME + "_scale_inv"
    _edit_shard_of(bad, scale, lambda t: t.__setitem__(scale, torch.ones(2, 2)))
    with pytest.raises(CheckpointError, match=rf"'{scale}'.*shape \[2, 2\], expected \[1, 2\]"):
        _load(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_scale(bad, value):
    name = "model.layers.2.mlp.experts.3.down_proj.weight_scale_inv"

    def poison(t):
        s = t[name].clone()
        s[0, 0] = value
        t[name] = s
    _edit_shard_of(bad, name, poison)
    with pytest.raises(CheckpointError, match=f"'{name}' in .* NaN or inf"):
        _load(bad)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("name", ["model.layers.2.mlp.experts.3.down_proj.weight",
                                  "model.layers.1.self_attn.o_proj.weight"])
def test_fp8_nan_codes_rejected_at_load(bad, name, backend):
    def poison(t):
        q = t[name].view(torch.uint8).clone()
        q[1, 2] = 0x7F
        t[name] = q.view(torch.float8_e4m3fn)
    _edit_shard_of(bad, name, poison)
    expert = ".experts." in name
    where = name.rsplit(".weight", 1)[0].rsplit(".", 1)[0] if expert and backend == "numba" else name
    with pytest.raises(CheckpointError, match=re.escape(where) + ".*NaN code"):
        load_model(bad, dtype=torch.float32, expert_backend=backend)


def test_truncated_shard(bad):
    shard = _index(bad)["weight_map"][NAME]
    path = os.path.join(bad, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(CheckpointError, match=f"in {shard}: file is truncated"):
        _load(bad)


def test_corrupt_header(bad):
    shard = _index(bad)["weight_map"][NAME]
    with open(os.path.join(bad, shard), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=f"{shard}: corrupt safetensors header"):
        _load(bad)


def test_malformed_index(bad):
    with open(os.path.join(bad, "model.safetensors.index.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: malformed JSON"):
        _load(bad)
    with open(os.path.join(bad, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": ["a"]}, f)
    with pytest.raises(CheckpointError, match="'weight_map' must be an object"):
        _load(bad)


def test_malformed_config(bad):
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write("{")
    with pytest.raises(ConfigError, match="config.json: malformed JSON"):
        _load(bad)


@pytest.mark.parametrize("field,value,match", [
    ("topk_method", "aux_loss", "topk_method"),
    ("scoring_func", "relu", "scoring_func"),
    ("hidden_size", "big", "'hidden_size' must be an integer"),
    ("quantization_config", {"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors'"),
    ("rope_scaling", {"type": "longrope", "factor": 2}, "rope_scaling.type 'longrope'"),
])
def test_unsupported_config_values(bad, field, value, match):
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg[field] = value
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    with pytest.raises(ConfigError, match=match):
        _load(bad)


def test_mtp_layer_tensors_are_skipped(tmp_path):
    d = make_tiny(str(tmp_path / "ds"), seed=2, variant="deepseek-v3", overrides={"n_routed_experts": 16})
    assert any(n.startswith("model.layers.3.") for n in CheckpointReader(d).tensors)
    m = _load(d)
    assert len(m.model.layers) == 3


def test_unknown_config_keys_ignored(bad):
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["some_future_key"] = {"x": 1}
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    _load(bad)

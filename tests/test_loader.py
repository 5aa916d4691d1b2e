"""Checkpoint loading: sharded safetensors, fused-expert checkpoints, errors that name what is wrong,
the architecture registry, and KV-cache sizing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynserve.config import EngineConfig, default_model_dir
from dynserve.model.base import ForwardBatch
from dynserve.model.kv_cache import allocate_kv_caches, kv_cache_bytes_per_block
from dynserve.model.loader import load_model
from dynserve.model.registry import get_model_class, supported_architectures


def _logits(model, cfg: EngineConfig, ids: list[int]) -> torch.Tensor:
    T, bs = len(ids), 4
    kv = allocate_kv_caches(cfg.model, -(-T // bs), bs, "cpu", cfg.model.dtype)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(T),
        slot_mapping=torch.arange(T),
        query_start_loc=torch.tensor([0, T]),
        seq_lens=torch.tensor([T]),
        block_tables=torch.arange(-(-T // bs))[None],
        max_query_len=T,
        max_seq_len=T,
        block_size=bs,
        logits_indices=torch.arange(T),
        query_start_loc_host=[0, T],
        seq_lens_host=[T],
    )
    with torch.inference_mode():
        return model.compute_logits(model(batch, kv))


IDS = [5, 17, 42, 99, 7, 250, 3, 64, 128, 11, 300]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_same_weights(checkpoint_factory):
    single = checkpoint_factory("mixtral")
    sharded = checkpoint_factory("mixtral", num_shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    cfg1, cfg3 = EngineConfig.create(single), EngineConfig.create(sharded)
    m1, m3 = load_model(cfg1), load_model(cfg3)
    torch.testing.assert_close(_logits(m3, cfg3, IDS), _logits(m1, cfg1, IDS), rtol=0, atol=0)
    for name, p in m3.named_parameters():
        assert not p.is_meta and p.is_contiguous() and not p.requires_grad, name


def test_missing_tensor_error_names_it(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("mixtral"), tmp_path / "broken")
    tensors = load_file(path / "model.safetensors")
    victim = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    del tensors[victim]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(KeyError, match=victim.replace(".", r"\.")):
        load_model(EngineConfig.create(path))


def test_missing_shard_file_error_names_it(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("mixtral", num_shards=3), tmp_path / "noshard")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(EngineConfig.create(path))


def test_wrong_shape_error_names_module(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("llama"), tmp_path / "badshape")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight' has shape \(7,\)"):
        load_model(EngineConfig.create(path))


def test_unknown_architecture_error_names_it(checkpoint_factory, tmp_path):
    path = _copy(checkpoint_factory("llama"), tmp_path / "unknown")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FrobnicatorForCausalLM") as err:
        load_model(EngineConfig.create(path))
    assert "MixtralForCausalLM" in str(err.value)  # lists what is supported
    with pytest.raises(ValueError, match="Nope"):
        get_model_class("Nope")


def test_registry_covers_test_families():
    for arch in [
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "OlmoeForCausalLM",
        "LlamaForCausalLM",
        "Qwen3ForCausalLM",
    ]:
        assert arch in supported_architectures()
        assert get_model_class(arch).__name__ == arch


def test_fused_expert_tensors_load(checkpoint_factory, tmp_path):
    """A checkpoint that stores experts stacked (mlp.experts.gate_up_proj / down_proj) loads to the same model."""
    src = checkpoint_factory("qwen3_moe")
    path = _copy(src, tmp_path / "fused")
    tensors = load_file(path / "model.safetensors")
    cfg = EngineConfig.create(src)
    E = cfg.model.num_experts
    for layer in range(cfg.model.num_layers):
        ex = f"model.layers.{layer}.mlp.experts"
        gate = [tensors.pop(f"{ex}.{e}.gate_proj.weight") for e in range(E)]
        up = [tensors.pop(f"{ex}.{e}.up_proj.weight") for e in range(E)]
        down = [tensors.pop(f"{ex}.{e}.down_proj.weight") for e in range(E)]
        tensors[f"{ex}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up, strict=True)])
        tensors[f"{ex}.down_proj"] = torch.stack(down)
    save_file(tensors, path / "model.safetensors")
    fused_cfg = EngineConfig.create(path)
    torch.testing.assert_close(
        _logits(load_model(fused_cfg), fused_cfg, IDS), _logits(load_model(cfg), cfg, IDS), rtol=0, atol=0
    )


def test_transformers5_state_dict_names_load(checkpoint_factory, tmp_path):
    """Mixtral saved from transformers' in-memory state dict (mlp.gate, fused mlp.experts.*) loads too."""
    import transformers

    src = checkpoint_factory("mixtral")
    path = tmp_path / "sd"
    path.mkdir()
    shutil.copy(src / "config.json", path / "config.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, path / "model.safetensors")
    cfg, cfg_src = EngineConfig.create(path), EngineConfig.create(src)
    torch.testing.assert_close(
        _logits(load_model(cfg), cfg, IDS), _logits(load_model(cfg_src), cfg_src, IDS), rtol=0, atol=0
    )


def test_bfloat16_weights(checkpoint_factory):
    cfg = EngineConfig.create(checkpoint_factory("qwen2_moe"), dtype="bfloat16")
    model = load_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = _logits(model, cfg, IDS)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_kv_cache_helpers(checkpoint_factory):
    mc = EngineConfig.create(checkpoint_factory("qwen3_moe")).model
    caches = allocate_kv_caches(mc, num_blocks=6, block_size=8, device="cpu", dtype="bfloat16")
    assert len(caches) == mc.num_layers
    for c in caches:
        assert c.shape == (2, 6, 8, mc.num_kv_heads, mc.head_dim) and c.dtype == torch.bfloat16
        assert not c.any()
    total = sum(c.numel() * c.element_size() for c in caches)
    assert kv_cache_bytes_per_block(mc, 8, "bfloat16") * 6 == total
    assert kv_cache_bytes_per_block(mc, 8, torch.float32) == 2 * kv_cache_bytes_per_block(mc, 8, "bfloat16")


def test_default_model_dir_is_inside_package():
    import dynserve

    path = Path(default_model_dir())
    assert path == Path(dynserve.__file__).parent / "assets" / "default_model"

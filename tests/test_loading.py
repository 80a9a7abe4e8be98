"""Checkpoint layouts, config.json forms, saving back to transformers, hub-cache ids, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kaki
from kaki.config import read_config
from kaki.errors import CheckpointError, KakiError

from helpers import copy_tokenizer, generate_positions, hf_model_dir, left_pad, random_prompts

FAMILIES = ["persimmon", "gpt_neox", "llama", "gptj"]
# Non-default flags, so a save that dropped one of them would show in the logits.
SAVE_CASES = [
    ("persimmon", {"partial_rotary_factor": 1.0, "rope_theta": 5000.0}),
    ("persimmon", {"qk_layernorm": False}),
    ("gpt_neox", {"rotary_pct": 1.0, "use_parallel_residual": False}),
    ("gpt_neox", {"rotary_pct": 0.5, "rope_theta": 20000.0}),
    ("llama", {"num_key_value_heads": 1, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("gptj", {"rotary_dim": 16, "n_inner": 160}),
    ("gptj", {"tie_word_embeddings": True}),
]


def _batch():
    ids, mask = left_pad(random_prompts([7, 3, 5], seed=11))
    return ids, mask, generate_positions(mask)


def kaki_logits(path, dtype="float32") -> torch.Tensor:
    model = kaki.load(path, dtype=dtype, device="cpu").model
    ids, mask, pos = _batch()
    with torch.inference_mode():
        return model(ids, pos, None, mask.bool())[mask.bool()]


def hf_logits(model) -> torch.Tensor:
    ids, mask, pos = _batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]


def hf_load(path, dtype=torch.float32):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def write_bin(state: dict, out: Path, shards: int = 1) -> None:
    """pytorch_model.bin, or pytorch_model-0000i-of-0000n.bin + index, as transformers 4 wrote them
    (transformers 5 no longer writes .bin, but Persimmon's published checkpoints are exactly this)."""
    keys = list(state)
    if shards == 1:
        torch.save(state, out / "pytorch_model.bin")
        return
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i * per:(i + 1) * per]}
        torch.save(part, out / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def bin_dir(hf, src: Path, out: Path, shards: int, dtype=torch.float32) -> Path:
    out.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("model"):  # config, generation config, tokenizer files
            (out / f.name).write_bytes(f.read_bytes())
    write_bin({k: v.to(dtype).contiguous() for k, v in hf.state_dict().items()}, out, shards)
    return out


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_and_single_safetensors_give_the_same_model(tmp_path, spm_dir, family):
    hf, single = hf_model_dir(family, tmp_path / "single", spm_dir)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    copy_tokenizer(spm_dir, sharded)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = kaki_logits(single), kaki_logits(sharded)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, hf_logits(hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_load(tmp_path, spm_dir, shards):
    hf, src = hf_model_dir("persimmon", tmp_path / "src", spm_dir)
    d = bin_dir(hf, src, tmp_path / "bin", shards)
    assert not list(d.glob("*.safetensors"))
    assert torch.equal(kaki_logits(d), kaki_logits(src))
    # transformers reads the same files to the same model: the layout is the real one.
    torch.testing.assert_close(kaki_logits(d), hf_logits(hf_load(d)), atol=1e-5, rtol=0)


def test_persimmon_published_layout_bf16_sharded_bin(tmp_path, spm_dir):
    """adept/persimmon-8b-*: sharded pytorch_model-0000x-of-00002.bin of bf16 tensors + index,
    a transformers-4 config.json (torch_dtype bfloat16, no partial_rotary_factor) and only a
    sentencepiece tokenizer.model."""
    hf, src = hf_model_dir("persimmon", tmp_path / "src", spm_dir)
    d = bin_dir(hf, src, tmp_path / "adept", 2, dtype=torch.bfloat16)
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("dtype")
    cfg.update(rope_theta=rope["rope_theta"], torch_dtype="bfloat16", rope_scaling=None,
               num_key_value_heads=cfg["num_attention_heads"], rms_norm_eps=1e-6, hidden_dropout=0.6)
    (d / "config.json").write_text(json.dumps(cfg))
    assert sorted(p.name for p in d.glob("pytorch_model*")) == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    assert not (d / "tokenizer.json").exists()
    llm = kaki.load(d, dtype="float32", device="cpu")
    assert llm.tokenizer.kind == "sentencepiece"
    torch.testing.assert_close(kaki_logits(d), hf_logits(hf_load(d, torch.float32)), atol=1e-5, rtol=0)
    got16 = kaki_logits(d, "bfloat16")
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16, hf_logits(hf_load(d, torch.bfloat16)), atol=0.1, rtol=0)


# ----------------------------------------------------------------------------- saving


@pytest.mark.parametrize("family,overrides", SAVE_CASES, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_save_then_transformers_loads_the_same_model(tmp_path, spm_dir, family, overrides):
    hf, path = hf_model_dir(family, tmp_path / "m", spm_dir, **overrides)
    llm = kaki.load(path, dtype="float32", device="cpu")
    out = llm.save(tmp_path / "saved")
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
    assert not list(tmp_path.glob(".saved.tmp-*")), "temporary directory left behind"
    reloaded = hf_load(out)
    assert type(reloaded) is type(hf)
    expected = hf_logits(hf)
    torch.testing.assert_close(hf_logits(reloaded), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(kaki_logits(out), expected, atol=1e-5, rtol=0)


def test_save_in_bfloat16_records_dtype(tmp_path, family_dirs):
    _, path = family_dirs["llama"]
    out = kaki.load(path, dtype="float32", device="cpu").save(tmp_path / "bf16", dtype="bfloat16")
    assert read_config(out).torch_dtype == "bfloat16"
    reloaded = hf_load(out, torch.bfloat16)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(kaki_logits(out, "bfloat16"), hf_logits(reloaded), atol=0.1, rtol=0)


# ----------------------------------------------------------------------------- config.json forms


def _to_v4(cfg: dict, family: str) -> dict:
    """A transformers-4 config.json: top-level rotary keys and torch_dtype, no rope_parameters."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.34.0.dev0"
    if family == "gpt_neox":
        cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    else:
        cfg["rope_theta"] = rope["rope_theta"]
        if family == "persimmon":
            cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    return cfg


V4_CASES = [("persimmon", {"partial_rotary_factor": 1.0, "rope_theta": 5000.0}),
            ("gpt_neox", {"rotary_pct": 0.5, "rope_theta": 20000.0}),
            ("llama", {"rope_theta": 50000.0, "rope_scaling": {"rope_type": "linear", "factor": 3.0}})]


@pytest.mark.parametrize("family,overrides", V4_CASES, ids=[c[0] for c in V4_CASES])
def test_transformers4_and_transformers5_configs_read_the_same(tmp_path, spm_dir, family, overrides):
    hf, path = hf_model_dir(family, tmp_path / "m", spm_dir, **overrides)
    v5 = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in v5 and "dtype" in v5  # what transformers 5 writes
    c5 = read_config(path)
    (path / "config.json").write_text(json.dumps(_to_v4(v5, family)))
    c4 = read_config(path)
    for c in (c4, c5):
        assert c.torch_dtype == "float32"
        assert c.rope_theta == hf.config.rope_parameters["rope_theta"]
        assert c.partial_rotary_factor == hf.config.rope_parameters.get("partial_rotary_factor", 1.0)
    assert (c4.rope_scaling or {}).get("factor") == (c5.rope_scaling or {}).get("factor")
    assert (c4.rope_scaling or {}).get("rope_type") == (c5.rope_scaling or {}).get("rope_type")
    torch.testing.assert_close(kaki_logits(path), hf_logits(hf), atol=1e-5, rtol=0)


def test_persimmon_hub_config_defaults(tmp_path, spm_dir):
    """Persimmon's hub config.json has no partial_rotary_factor (0.5 applies); a config without
    rope_theta means Persimmon's 25000, not transformers 5's regressed 10000."""
    hf, path = hf_model_dir("persimmon", tmp_path / "m", spm_dir)  # rotary 0.5, theta 25000
    cfg = _to_v4(json.loads((path / "config.json").read_text()), "persimmon")
    del cfg["partial_rotary_factor"], cfg["rope_theta"]
    (path / "config.json").write_text(json.dumps(cfg))
    c = read_config(path)
    assert (c.partial_rotary_factor, c.rope_theta) == (0.5, 25000.0)
    torch.testing.assert_close(kaki_logits(path), hf_logits(hf), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- bad input


def test_directory_without_config_json(tmp_path, family_dirs):
    _, src = family_dirs["persimmon"]
    d = tmp_path / "noconfig"
    d.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="config.json"):
        kaki.load(d, dtype="float32", device="cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(KakiError, match="does not exist"):
        kaki.load(tmp_path / "nowhere", device="cpu")


def test_truncated_safetensors(tmp_path, spm_dir):
    _, path = hf_model_dir("llama", tmp_path / "m", spm_dir)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated.*fetch it again"):
        kaki.load(path, dtype="float32", device="cpu")


def test_garbage_safetensors(tmp_path, spm_dir):
    _, path = hf_model_dir("llama", tmp_path / "m", spm_dir)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        kaki.load(path, dtype="float32", device="cpu")


def test_config_shapes_that_do_not_match_the_weights(tmp_path, spm_dir):
    _, path = hf_model_dir("persimmon", tmp_path / "m", spm_dir)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        kaki.load(path, dtype="float32", device="cpu")
    msg = str(e.value)
    assert "mis-shaped" in msg and "mlp.dense_h_to_4h.weight [256, 64]" in msg
    assert "config.json implies [128, 64]" in msg and "config.json belongs to these weights" in msg


def test_missing_and_unexpected_keys_listed_in_one_error(tmp_path, spm_dir):
    from safetensors.torch import load_file, save_file

    _, path = hf_model_dir("llama", tmp_path / "m", spm_dir)
    state = load_file(path / "model.safetensors")
    state.pop("model.norm.weight")
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        kaki.load(path, dtype="float32", device="cpu")
    msg = str(e.value)
    assert "missing model.final_layernorm.weight" in msg
    assert "unexpected model.layers.0.mlp.extra.weight" in msg


def test_unknown_model_type(tmp_path, family_dirs):
    _, src = family_dirs["llama"]
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'mamba' is not supported; kaki runs gpt_neox, gptj, llama, persimmon"):
        read_config(tmp_path)


def test_bad_dtype_and_device_named(family_dirs):
    _, path = family_dirs["llama"]
    with pytest.raises(KakiError, match="dtype must be one of"):
        kaki.load(path, dtype="float8", device="cpu")
    with pytest.raises(KakiError, match="device must be"):
        kaki.load(path, dtype="float32", device="tpu")


# ----------------------------------------------------------------------------- hub ids


def _run_kaki(args, env_extra):
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kaki", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_hub_id_resolves_from_local_cache(tmp_path, family_dirs):
    _, src = family_dirs["persimmon"]
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--kaki-test--tiny-persimmon"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    r = _run_kaki(["info", "kaki-test/tiny-persimmon", "--json"], env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert Path(info["path"]).resolve() == snap.resolve()
    assert info["family"] == "persimmon"

    missing = _run_kaki(["info", "kaki-test/absent-model"], env)
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in missing.stderr
    assert "hf download kaki-test/absent-model" in lines[0]


# ----------------------------------------------------------------------------- dtype "auto"


@pytest.mark.parametrize("stored,device,fast_bf16,memory,expected", [
    ("float32", "cpu", False, 1 << 40, torch.float32),
    ("bfloat16", "cpu", False, 1 << 40, torch.float32),  # bf16 GEMMs are slow here: fp32 fits
    ("bfloat16", "cpu", False, 1 << 10, torch.bfloat16),  # fp32 would not fit: keep the checkpoint's
    ("bfloat16", "cpu", True, 1 << 40, torch.bfloat16),  # native bf16: no reason to double the bytes
    ("float16", "cpu", False, 1 << 40, torch.float32),
    ("bfloat16", "cuda", False, 1 << 40, torch.bfloat16),  # on a GPU the checkpoint's own
    ("float16", "cuda", False, 1 << 40, torch.float16),
])
def test_auto_dtype(monkeypatch, family_dirs, stored, device, fast_bf16, memory, expected):
    import kaki.device

    monkeypatch.setattr(kaki.device, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(kaki.device, "available_memory", lambda: memory)
    cfg = read_config(family_dirs["persimmon"][1]).replace(torch_dtype=stored)
    assert kaki.device.pick_dtype("auto", cfg, torch.device(device)) == expected


def test_auto_dtype_loads_a_bf16_checkpoint_as_float32_on_a_cpu_without_bf16(monkeypatch, tmp_path, spm_dir):
    import kaki.device

    monkeypatch.setattr(kaki.device, "cpu_has_fast_bf16", lambda: False)
    hf, src = hf_model_dir("persimmon", tmp_path / "src", spm_dir)
    d = bin_dir(hf, src, tmp_path / "bf16", 2, dtype=torch.bfloat16)
    cfg = json.loads((d / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (d / "config.json").write_text(json.dumps(cfg))
    llm = kaki.load(d, device="cpu")
    assert llm.model.dtype == torch.float32
    # bf16 weights widened to fp32 exactly: same logits as transformers in fp32 on those weights
    torch.testing.assert_close(kaki_logits(d), hf_logits(hf_load(d, torch.float32)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["copy", "distinct"])
def test_legacy_buffers_and_a_stored_tied_head_are_accepted(tmp_path, spm_dir, head):
    """Older exports carry rotary inv_freq buffers, and some tied models store lm_head.weight as
    well: transformers loads both (tying an identical copy, untying a distinct head), so kaki
    must too."""
    from safetensors.torch import load_file, save_file

    hf, path = hf_model_dir("llama", tmp_path / "m", spm_dir, tie_word_embeddings=True)
    state = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in state
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed.clone() if head == "copy" else torch.randn_like(embed)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    model = kaki.load(path, dtype="float32", device="cpu").model
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (head == "copy")
    torch.testing.assert_close(kaki_logits(path), hf_logits(hf_load(path)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("remove,message", [
    (("tokenizer.model", "tokenizer_config.json"), "has no tokenizer"),
    (("model.safetensors",), "has no weights"),
])
def test_incomplete_directories(tmp_path, family_dirs, remove, message):
    _, src = family_dirs["gpt_neox"]
    d = tmp_path / "partial"
    d.mkdir()
    for f in src.iterdir():
        if f.name not in remove:
            (d / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match=message):
        kaki.load(d, dtype="float32", device="cpu")


def test_shard_index_naming_a_missing_shard(tmp_path, family_dirs):
    hf, _ = family_dirs["gpt_neox"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are not there: {victim.name}"):
        kaki.load(tmp_path, dtype="float32", device="cpu")

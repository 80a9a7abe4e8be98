"""Model directories from someone else: every malicious or broken one is refused quickly with a
KakiError naming what is wrong (the CLI: one line, exit 2), before any file outside the directory
is opened, any layer is built or any weight is used.

Directories are copies of the session's tiny Llama (conftest's family_dirs) with one thing changed.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kaki
from kaki.errors import CheckpointError, KakiError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "KAKI_MODEL": ""}
# The CLI runs under an address-space limit, so a regression that allocates without bound
# fails its test instead of taking the machine down; its peak RSS is asserted lower still.
AS_LIMIT = 4 << 30
RSS_LIMIT_KB = 1 << 20


def copy_model(src: Path, dst: Path, config: dict | None = None, drop_config: tuple[str, ...] = ()) -> Path:
    """A copy of `src` with config.json keys set (`config`) or removed (`drop_config`)."""
    shutil.copytree(src, dst)
    if config is not None or drop_config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config or {})
        for k in drop_config:
            cfg.pop(k, None)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def run_cli(*args, timeout: float = 120) -> tuple[int, str, list[str], int]:
    """(exit code, stdout, stderr lines, peak RSS in KB) of `kaki ARGS` in a fresh interpreter."""
    # The interpreter's own high-water mark (VmHWM), not getrusage's ru_maxrss: Linux keeps the
    # forking parent's peak in ru_maxrss across exec, so a pytest worker grown past the limit by
    # earlier tests failed this check for a CLI that peaked at ~240 MB.
    code = ("import sys; from kaki.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')]; "
            "print(hwm[0] if hwm else -1, file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=ENV,
                       timeout=timeout, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT)))
    *lines, rss = r.stderr.strip().splitlines() or ["0"]
    return r.returncode, r.stdout, lines, int(rss) if rss.isdigit() else -1


def assert_one_line_error(model: Path, *patterns: str) -> str:
    t = time.monotonic()
    code, out, lines, rss = run_cli("generate", "--model", model, "--device", "cpu", "-n", "2", "hello")
    assert time.monotonic() - t < 60
    assert code == 2 and out == "", (code, out, lines)
    assert len(lines) == 1 and lines[0].startswith("kaki generate: error: "), lines
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    assert 0 < rss < RSS_LIMIT_KB, rss
    return lines[0]


@pytest.fixture(scope="module")
def llama(family_dirs) -> Path:
    return family_dirs["llama"][1]


# ----------------------------------------------------------------------------- weight files


def index_dir(llama: Path, dst: Path, shard_for: dict[str, str]) -> Path:
    """A copy of `llama` whose weights are named by model.safetensors.index.json; `shard_for`
    overrides the file of some tensors (the rest stay in model.safetensors)."""
    d = copy_model(llama, dst)
    keys = list(load_file(d / "model.safetensors"))
    weight_map = {k: shard_for.get(k, "model.safetensors") for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../elsewhere.safetensors"])
def test_index_naming_a_file_outside_the_model_directory_is_refused_before_it_is_opened(llama, tmp_path, name):
    d = index_dir(llama, tmp_path / "m", {"model.norm.weight": name})
    with pytest.raises(CheckpointError, match=r"outside the model directory") as e:
        kaki.load(d, dtype="float32", device="cpu")
    assert repr(name) in str(e.value) and "model.safetensors.index.json" in str(e.value)


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_index_naming_another_models_weights_does_not_load_them(llama, tmp_path, how):
    """Today's failure was silent: the other model's file loaded as if it were this one's."""
    other = copy_model(llama, tmp_path / "other")
    d = index_dir(llama, tmp_path / "m", {})
    (d / "model.safetensors").unlink()
    name = str(other / "model.safetensors") if how == "absolute" else "../other/model.safetensors"
    weight_map = {k: name for k in load_file(other / "model.safetensors")}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        kaki.load(d, dtype="float32", device="cpu")


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"model.norm.weight": 7}, "x", None])
def test_index_whose_weight_map_is_not_names_is_refused(llama, tmp_path, weight_map):
    d = index_dir(llama, tmp_path / "m", {})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        kaki.load(d, dtype="float32", device="cpu")


def test_hugging_face_cache_snapshots_with_symlinked_blobs_still_load(llama, tmp_path):
    """The hub cache keeps files in blobs/ and links them from snapshots/REV/ as ../../blobs/HASH:
    links that leave the directory are the normal case there, and must keep working."""
    repo = tmp_path / "models--someone--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(llama.iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    want = kaki.load(llama, dtype="float32", device="cpu").generate("the", max_new_tokens=4)[0].token_ids
    assert kaki.load(snap, dtype="float32", device="cpu").generate("the", max_new_tokens=4)[0].token_ids == want


def test_legacy_pickle_bin_with_a_forbidden_global_gets_kakis_message(llama, tmp_path):
    """torch.load's legacy (non-zip) path raised a bare UnpicklingError through kaki."""
    d = copy_model(llama, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    state["model.norm.weight"] = Exploit()  # pickles as a call to os.system
    with open(d / "pytorch_model.bin", "wb") as f:
        torch.save(state, f, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"refusing to load .*pytorch_model\.bin.*posix\.system|"
                                              r"refusing to load .*pytorch_model\.bin.*os\.system") as e:
        kaki.load(d, dtype="float32", device="cpu")
    assert "safetensors" in str(e.value)  # how to fix it
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __reduce__(self):
        return os.system, ("touch /nonexistent-kaki-test-pwned",)


def test_legacy_pickle_bin_that_is_plain_tensors_still_loads(llama, tmp_path):
    d = copy_model(llama, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        torch.save(state, f, _use_new_zipfile_serialization=False)
    kaki.load(d, dtype="float32", device="cpu").generate("the", max_new_tokens=2)


def test_bin_that_is_not_a_pickle_at_all(llama, tmp_path):
    d = copy_model(llama, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" + pickle.dumps([1]) * 3)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        kaki.load(d, dtype="float32", device="cpu")


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("change,patterns", [
    ({"hidden_size": "64"}, ["hidden_size must be a positive integer", "'64'"]),
    ({"num_attention_heads": 0}, ["num_attention_heads must be a positive integer", "not 0"]),
    ({"num_key_value_heads": 0}, ["num_key_value_heads must be a positive integer"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads (4) must be a multiple of num_key_value_heads (3)"]),
    ({"vocab_size": -5}, ["vocab_size must be a positive integer", "not -5"]),
    ({"num_hidden_layers": True}, ["num_hidden_layers must be a positive integer", "not True"]),
    ({"intermediate_size": 160.0}, ["intermediate_size must be a positive integer", "not 160.0"]),
    ({"rms_norm_eps": "1e-6"}, ["rms_norm_eps must be a positive number"]),
    ({"rms_norm_eps": 0}, ["rms_norm_eps must be a positive number"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     ["rope_parameters.rope_theta must be a positive number"]),
    ({"max_position_embeddings": None, "head_dim": "16"}, ["head_dim must be a positive integer"]),
    ({"tie_word_embeddings": "false"}, ["tie_word_embeddings must be true or false"]),
    ({"hidden_act": ["silu"]}, ["hidden_act must be a string"]),
    ({"eos_token_id": "2"}, ["eos_token_id must be an integer or a list of integers"]),
    ({"rope_scaling": [2.0]}, ["rope_scaling must be an object"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, ["rope_scaling.factor must be a positive number"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope_scaling.low_freq_factor must be"]),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, ["high_freq_factor must be greater than"]),
    ({"model_type": ["llama"]}, ["model_type ['llama'] is not supported"]),
])
def test_bad_config_values_are_named(llama, tmp_path, change, patterns):
    d = copy_model(llama, tmp_path / "m", change)
    with pytest.raises(CheckpointError) as e:
        kaki.load(d, dtype="float32", device="cpu")
    for p in patterns:
        assert p in str(e.value), (p, str(e.value))


@pytest.mark.parametrize("family,change,pattern", [
    ("gpt_neox", {"hidden_size": 66}, "hidden_size (66) must be a multiple of num_attention_heads (4)"),
    ("persimmon", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}},
     "partial_rotary_factor must be a number in (0, 1]"),
    ("persimmon", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.3125}},
     "rotary dimensions per head (5) must be even"),
    ("gptj", {"rotary_dim": 32}, "rotary_dim (32) must be at most the head dimension (16)"),
    ("gptj", {"n_embd": "64"}, "n_embd must be a positive integer"),
])
def test_bad_config_values_of_other_families(family_dirs, tmp_path, family, change, pattern):
    d = copy_model(family_dirs[family][1], tmp_path / "m", change)
    with pytest.raises(CheckpointError) as e:
        kaki.load(d, dtype="float32", device="cpu")
    assert pattern in str(e.value)


@pytest.mark.parametrize("content,pattern", [
    (b"[1, 2, 3]", "holds a JSON list, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"model_type": "llama", \xff}', "not valid JSON .*utf-8"),
    (b'{"model_type": "llama",', "not valid JSON"),
])
def test_config_json_that_is_not_an_object(llama, tmp_path, content, pattern):
    d = copy_model(llama, tmp_path / "m")
    (d / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=pattern):
        kaki.load(d, dtype="float32", device="cpu")


@pytest.mark.parametrize("content", [b"[0.7]", b"[" * 100_000])
def test_generation_config_that_is_not_an_object(llama, tmp_path, content):
    d = copy_model(llama, tmp_path / "m")
    (d / "generation_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"generation_config\.json (must hold a JSON object|is not valid JSON)"):
        kaki.load(d, dtype="float32", device="cpu")


def test_absurd_layer_count_is_refused_at_once_with_the_memory_it_implies(llama, tmp_path):
    """Building 1,000,000 layers, even on the meta device, took tens of minutes."""
    d = copy_model(llama, tmp_path / "m", {"num_hidden_layers": 1_000_000})
    t = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        kaki.load(d, dtype="float32", device="cpu")
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert "num_hidden_layers is 1,000,000" in msg and "parameters" in msg and "GB" in msg, msg


def test_absurd_widths_are_refused_with_the_memory_they_imply(llama, tmp_path):
    d = copy_model(llama, tmp_path / "m", {"hidden_size": 4_000_000, "head_dim": 1_000_000})
    with pytest.raises(CheckpointError, match=r"implies [\d.]+e\+\d+ parameters \([\d.,]+ TB in float32\)"):
        kaki.load(d, dtype="float32", device="cpu")


def test_float_layer_count_from_1e6_is_refused_as_not_an_integer(llama, tmp_path):
    d = copy_model(llama, tmp_path / "m")
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1e6'))
    assert "1e6" in (d / "config.json").read_text()
    with pytest.raises(CheckpointError, match="num_hidden_layers must be a positive integer, not 1000000.0"):
        kaki.load(d, dtype="float32", device="cpu")


def test_cli_refuses_bad_configs_in_one_line(llama, tmp_path):
    assert_one_line_error(copy_model(llama, tmp_path / "a", {"num_hidden_layers": 1_000_000}), "1,000,000")
    assert_one_line_error(copy_model(llama, tmp_path / "b", {"hidden_size": "64"}), "hidden_size")
    d = index_dir(llama, tmp_path / "c", {"model.norm.weight": "../../../../etc/passwd"})
    assert_one_line_error(d, "outside the model directory")


# ----------------------------------------------------------------------------- NaN and inf weights


def poisoned(llama: Path, dst: Path, key: str, value: float, dtype=torch.float32) -> Path:
    d = copy_model(llama, dst)
    state = load_file(d / "model.safetensors")
    state = {k: v.to(dtype) for k, v in state.items()}
    state[key].view(-1)[3] = value
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("value,word", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_weights_with_nan_or_inf_are_refused_at_load_naming_the_tensor(llama, tmp_path, value, word):
    d = poisoned(llama, tmp_path / "m", "model.layers.1.mlp.down_proj.weight", value)
    with pytest.raises(CheckpointError) as e:
        kaki.load(d, dtype="float32", device="cpu")
    msg = str(e.value)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "model.safetensors" in msg and word in msg, msg


def test_nan_weights_are_refused_when_quantizing_while_loading(llama, tmp_path):
    d = poisoned(llama, tmp_path / "m", "model.layers.0.self_attn.q_proj.weight", float("nan"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN"):
        kaki.load(d, dtype="float32", device="cpu", quantize="int8")


def test_weights_that_overflow_the_chosen_dtype_say_so(llama, tmp_path):
    d = poisoned(llama, tmp_path / "m", "model.layers.0.mlp.up_proj.weight", 1e6)
    kaki.load(d, dtype="float32", device="cpu")  # finite in the checkpoint's own dtype
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*overflow.*float16.*--dtype"):
        kaki.load(d, dtype="float16", device="cpu")


def test_cli_generate_with_nan_weights_is_one_line_not_a_sampling_traceback(llama, tmp_path):
    d = poisoned(llama, tmp_path / "m", "model.embed_tokens.weight", float("nan"))
    assert_one_line_error(d, "model.embed_tokens.weight", "NaN")

"""Tensor parallelism on CPU (gloo): `torchrun --nproc-per-node 2` ranks of tiny random models of
every family give the logits of the one-process model (within float summation-order noise: the
all-reduce adds the ranks' partial sums in another order), the same greedy tokens, the same
sampled tokens on every rank, and hold about half the weights each. A 2-rank Adept release
written by kaki loads at 2 ranks and at 1. Quantized and LoRA-adapted models split the same way.

One torchrun launch (tests/tensor_parallel_worker.py) runs every case: each start costs seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import hf_model_dir
from tensor_parallel_worker import state_bytes

import kaki
from kaki.cli import main
from kaki.errors import KakiError
from kaki.tp import TensorParallel, local_config
from kaki.tp.shard import placement
from kaki.lora import apply_lora, save_adapter

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
PROMPTS = [[5, 17, 33, 101, 7, 5, 17, 33, 101], [250, 4, 9]]  # the first repeats: n-gram drafts
BATCH = [[5, 17, 33, 101, 7, 250, 11], [3, 99, 140, 12, 8, 64, 200]]
NEW_TOKENS = 6
FLOAT_CASES = ("persimmon", "gpt_neox", "llama", "gptj")  # llama: 4 heads over 2 KV heads (GQA)


def torchrun(spec: dict, tmp: Path, ranks: int = 2) -> list[dict]:
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    # A bug must fail, not hang: collectives give up after 60 s, the launch after 180 s.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KAKI_COLLECTIVE_TIMEOUT": "60"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(ranks), str(WORKER), str(spec_file)], env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    return [torch.load(tmp / f"rank{r}.pt") for r in range(ranks)]


@pytest.fixture(scope="module")
def models(tmp_path_factory, family_dirs, spm_dir):
    root = tmp_path_factory.mktemp("tp")
    paths = {f: family_dirs[f][1] for f in FLOAT_CASES}
    # A 2-rank Adept release, as `kaki convert` writes it.
    paths["release2"] = root / "release2"
    assert main(["convert", str(paths["persimmon"]), str(paths["release2"]), "--to", "adept",
                 "--tensor-parallel", "2", "-q"]) == 0
    paths["llama_int8_stored"] = root / "llama-int8"
    assert main(["convert", str(paths["llama"]), str(paths["llama_int8_stored"]), "--quantize", "int8", "-q"]) == 0
    # A LoRA adapter with nonzero B on every linear layer of the GQA Llama.
    llm = kaki.load(paths["llama"], dtype="float32", device="cpu")
    apply_lora(llm.model, r=4, alpha=8.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    paths["adapter"] = root / "adapter"
    save_adapter(llm.model, paths["adapter"], base_model=str(paths["llama"]))
    # 6 heads over 3 KV heads: the KV heads do not split over 2 ranks.
    paths["odd_kv"] = hf_model_dir("llama", root / "odd-kv", spm_dir, hidden_size=48, num_attention_heads=6,
                                   num_key_value_heads=3)[1]
    return paths


@pytest.fixture(scope="module")
def ranks(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-out")
    cases = [{"name": f, "path": str(models[f])} for f in FLOAT_CASES]
    cases += [
        {"name": "release2", "path": str(models["release2"])},
        {"name": "int8_stored", "path": str(models["llama_int8_stored"])},
        {"name": "int8_loading", "path": str(models["llama"]), "quantize": "int8"},
        {"name": "lora", "path": str(models["llama"]), "adapter": str(models["adapter"])},
        {"name": "odd_kv", "path": str(models["odd_kv"])},  # last: it fails before any collective
    ]
    spec = {"cases": cases, "batch": BATCH, "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, "out": str(out)}
    return torchrun(spec, out)


@pytest.fixture(scope="module")
def ranks4(models, tmp_path_factory):
    """4 ranks where the heads divide (4 heads each); the 2-rank release is split further."""
    out = tmp_path_factory.mktemp("tp4-out")
    cases = [{"name": n, "path": str(models[n])} for n in ("persimmon", "gpt_neox", "release2", "llama")]
    spec = {"cases": cases, "batch": BATCH, "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS, "out": str(out)}
    return torchrun(spec, out, ranks=4)


def one_process(path, quantize=None, adapter=None) -> dict:
    from kaki.lora import apply_adapter

    llm = kaki.load(path, dtype="float32", device="cpu", quantize=quantize)
    if adapter:
        apply_adapter(llm, adapter)
    with torch.inference_mode():
        logits = llm.model(torch.tensor(BATCH))
    greedy = llm.generate(PROMPTS, temperature=0, max_new_tokens=NEW_TOKENS)
    return {"llm": llm, "logits": logits, "greedy": [c.token_ids for c in greedy]}


def assert_ranks_agree(ranks: list[dict], name: str) -> None:
    """Every rank holds the same full logits and so samples the same tokens."""
    a = ranks[0][name]
    for b in ranks[1:]:
        assert torch.equal(a["logits"], b[name]["logits"])
        assert a["greedy"] == b[name]["greedy"] and a["sampled"] == b[name]["sampled"]
        assert a["unseeded"] == b[name]["unseeded"]  # ranks draw the same seed for unseeded requests


@pytest.mark.parametrize("family", FLOAT_CASES)
def test_two_ranks_equal_one_process(ranks, models, family):
    ref = one_process(models[family])
    assert_ranks_agree(ranks, family)
    got = ranks[0][family]
    assert got["logits"].shape == ref["logits"].shape
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=2e-5)
    assert got["greedy"] == ref["greedy"]
    # The engine's prefix cache and speculative decoding run unchanged over the ranks.
    assert got["speculated"] == got["greedy"]
    cfg = ref["llm"].config
    # Each rank computed its own heads and KV groups.
    assert (got["heads"], got["kv_heads"]) == (cfg.num_attention_heads // 2, cfg.num_key_value_heads // 2)


@pytest.mark.parametrize("family", FLOAT_CASES)
def test_each_rank_holds_half_the_weights_plus_the_replicated(ranks, models, family):
    state = kaki.load(models[family], dtype="float32", device="cpu").model.state_dict()
    seen, split, whole, first = set(), 0, 0, 0
    for key, t in state.items():
        if t.data_ptr() in seen:  # a tied lm_head is the embedding
            continue
        seen.add(t.data_ptr())
        n = t.numel() * t.element_size()
        how, _ = placement(key, t.dim())
        if how in ("split", "vocab"):
            split += n
        elif how == "first":
            first += n
        else:
            whole += n
    total = split + whole + first
    for rank in (0, 1):
        held = ranks[rank][family]["bytes"]
        expected = split / 2 + whole + (first if rank == 0 else 0)
        assert abs(held - expected) <= 0.01 * total, (rank, held, expected)
        assert held <= 0.55 * total + whole


def test_adept_release_written_at_two_ranks_loads_at_two_and_at_one(ranks, models):
    rank_dirs = sorted(p.name for p in models["release2"].glob("iter_*/mp_rank_*"))
    assert rank_dirs == ["mp_rank_00", "mp_rank_01"]
    assert_ranks_agree(ranks, "release2")
    one = one_process(models["release2"])  # the two rank files joined into one model
    source = one_process(models["persimmon"])
    torch.testing.assert_close(one["logits"], source["logits"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["release2"]["logits"], one["logits"], rtol=0, atol=2e-5)
    assert ranks[0]["release2"]["greedy"] == one["greedy"]


def test_adept_release_converts_back_to_one_transformers_directory(models, tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", str(models["release2"]), str(out), "--to", "hf", "-q"]) == 0
    torch.testing.assert_close(one_process(out)["logits"], one_process(models["persimmon"])["logits"],
                               rtol=0, atol=0)


def test_stored_int8_splits_its_codes_and_scales(ranks, models):
    ref = one_process(models["llama_int8_stored"])
    assert_ranks_agree(ranks, "int8_stored")
    got = ranks[0]["int8_stored"]
    assert got["down_proj"] == ["Int8Linear"]
    # The codes and scales are the one-process model's; the int8 kernel quantizes each rank's
    # slice of the activations with its own scale, hence more than float noise.
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=5e-3)
    assert got["greedy"] == ref["greedy"]


def test_quantizing_while_loading_quantizes_each_slice(ranks, models):
    # Row-parallel slices get their own per-channel scales, so the codes differ from a one-process
    # int8 load; the error against the float model must stay the size of int8's own.
    assert_ranks_agree(ranks, "int8_loading")
    got = ranks[0]["int8_loading"]
    assert got["down_proj"] == ["Int8Linear"]
    float_logits = one_process(models["llama"])["logits"]
    int8_error = (one_process(models["llama"], quantize="int8")["logits"] - float_logits).abs().max()
    tp_error = (got["logits"] - float_logits).abs().max()
    assert 0 < tp_error <= 2 * int8_error + 1e-3, (tp_error, int8_error)


def test_lora_adapter_splits_with_its_layers(ranks, models):
    ref = one_process(models["llama"], adapter=models["adapter"])
    plain = one_process(models["llama"])
    assert (ref["logits"] - plain["logits"]).abs().max() > 0.1  # the adapter matters
    assert_ranks_agree(ranks, "lora")
    torch.testing.assert_close(ranks[0]["lora"]["logits"], ref["logits"], rtol=0, atol=2e-5)
    assert ranks[0]["lora"]["greedy"] == ref["greedy"]


@pytest.mark.parametrize("name", ["persimmon", "gpt_neox", "release2"])
def test_four_ranks_equal_one_process(ranks4, models, name):
    ref = one_process(models[name])
    assert_ranks_agree(ranks4, name)
    got = ranks4[0][name]
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=2e-5)
    assert got["greedy"] == ref["greedy"]
    assert got["heads"] == 1
    full = state_bytes(ref["llm"].model)
    assert all(r[name]["bytes"] < 0.4 * full for r in ranks4)


def test_four_ranks_refuse_two_kv_heads(ranks4):
    assert all("num_key_value_heads (grouped-query KV heads) (2) does not divide by the tensor-parallel size (4)"
               in r["llama"]["error"] for r in ranks4)


def test_kv_heads_that_do_not_divide_fail_clearly(ranks):
    for rank in ranks:
        assert "num_key_value_heads" in rank["odd_kv"]["error"]
        assert "(3) does not divide by the tensor-parallel size (2)" in rank["odd_kv"]["error"]


def test_heads_that_do_not_divide_are_named(family_dirs):
    cfg = kaki.load(family_dirs["persimmon"][1], device="cpu").config
    with pytest.raises(KakiError, match=r"num_attention_heads \(4\) does not divide by the tensor-parallel size "
                                        r"\(3\); use a size that divides it \(1, 2, 4\)"):
        local_config(cfg, TensorParallel(0, 3))


def test_tensor_parallel_outside_torchrun_says_how_to_start(family_dirs, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(KakiError, match=r"torchrun --nproc-per-node 2"):
        kaki.load(family_dirs["llama"][1], device="cpu", tensor_parallel=2)

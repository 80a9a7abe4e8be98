"""The training loop on tiny models: gradients equal transformers', loss goes down, full and LoRA
fine-tuning, merge == unmerged == --adapter, checkpoints load in transformers, fp16 refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import FAMILIES, corpus, hf_model_dir, write_chat_jsonl

import kaki
from kaki.checkpoint import renamer
from kaki.cli import main
from kaki.config import read_config
from kaki.errors import KakiError
from kaki.loading import load_model
from kaki.train.loop import Trainer, token_loss_sum
from kaki.train.options import TrainOptions

COMMON = ["--seq-len", "32", "--batch-size", "4", "--no-progress", "--eval-every", "0", "--save-every", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    lines = corpus(300)
    path.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 5])}) + "\n" for i in range(0, 300, 5)))
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", 120, seed=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory, spm_dir) -> Path:
    return hf_model_dir("persimmon", tmp_path_factory.mktemp("base"), spm_dir)[1]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_transformers(family, tmp_path, spm_dir):
    hf, path = hf_model_dir(family, tmp_path, spm_dir)
    hf.train()
    model = load_model(path, read_config(path), torch.float32, torch.device("cpu")).train()
    for p in model.parameters():
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, 320, (2, 24), generator=g)
    targets = torch.randint(3, 320, (2, 24), generator=g)
    targets[0, :7] = -100  # a masked prompt
    count = int((targets != -100).sum())
    (token_loss_sum(model, inputs, targets) / count).backward()
    logits = hf(inputs).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    hf_grads = dict(hf.named_parameters())
    to_ckpt = renamer(family, to_checkpoint=True)
    checked = 0
    for name, p in model.named_parameters():
        # transformers 5 calls NeoX's head lm_head in memory (embed_out on disk).
        ref = hf_grads.get(to_ckpt(name), hf_grads.get(name)).grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(hf_grads)


def test_pretraining_lowers_loss_and_writes_a_loadable_model(tmp_path, spm_dir, data):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "persimmon", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4,
                               "max_position_embeddings": 128}))
    out = tmp_path / "run"
    assert main(["train", "--init-from-config", str(cfg), "--tokenizer", str(spm_dir), "--data", str(data),
                 "--out", str(out), "--max-steps", "40", "--lr", "3e-3", "--eval-fraction", "0.1",
                 *COMMON, "--eval-every", "10", "--save-every", "20", "--keep-last", "1"]) == 0
    r = rows(out)
    train = [x["loss"] for x in r if "loss" in x]
    evals = [x["eval_loss"] for x in r if "eval_loss" in x]
    assert len(train) == 40 and len(evals) == 4
    assert sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 1.0
    assert evals[-1] < evals[0]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval loss" in (out / "train.log").read_text()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000040"]  # keep-last 1
    llm = kaki.load(out, dtype="float32", device="cpu")
    assert llm.config.vocab_size == 320 and llm.eos_ids == [2]
    assert len(llm.generate("the", max_new_tokens=5, temperature=0)[0].token_ids) >= 1


def test_checkpoint_loads_in_transformers(tmp_path, base, data):
    import transformers

    out = tmp_path / "ft"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "3",
                 *COMMON]) == 0
    ckpt = out / "checkpoints" / "step-00000003"
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    ours = kaki.load(ckpt, dtype="float32", device="cpu").model
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        before = kaki.load(base, dtype="float32", device="cpu").model(ids)
    assert not torch.allclose(before, ours(ids))  # it did train


def test_full_finetune_trains_on_replies(tmp_path, base, chat_data):
    out = tmp_path / "chat"
    assert main(["train", "--model", str(base), "--data", str(chat_data), "--out", str(out),
                 "--max-steps", "15", "--lr", "3e-3", *COMMON]) == 0
    train = [x["loss"] for x in rows(out) if "loss" in x]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3


def test_lora_trains_only_adapters_and_merges(tmp_path, base, chat_data):
    out = tmp_path / "lora"
    o = TrainOptions(model=str(base), data=str(chat_data), out=str(out), max_steps=6, lr=1e-2, seq_len=32,
                     batch_size=4, progress=False, eval_every=0, save_every=0, lora=True, lora_r=4,
                     merge=True)
    t = Trainer(o)
    t.run()
    assert all(".lora_" in n for n, _ in t.named) and len(t.named) == 2 * 4 * 2  # 4 linears x 2 layers
    original = load_model(base, read_config(base), torch.float32, torch.device("cpu")).state_dict()
    trained = t.model.state_dict()
    for k, v in original.items():
        assert torch.equal(trained[k], v), k  # base weights untouched
    assert any(trained[k].abs().sum() > 0 for k in trained if k.endswith("lora_B"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    assert sorted(cfg["target_modules"]) == ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]

    # merged == unmerged (adapter applied on the fly)
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(out), "--out", str(merged), "--dtype", "float32"]) == 0
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    from kaki.lora import apply_adapter
    unmerged = apply_adapter(kaki.load(base, dtype="float32", device="cpu"), out)
    m = kaki.load(merged, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(m.model(ids), unmerged.model(ids), rtol=1e-5, atol=1e-5)
        plain = kaki.load(base, dtype="float32", device="cpu").model(ids)
    assert not torch.allclose(plain, m.model(ids), atol=1e-4)
    # The README's spelling, `--adapter A`, writes the same model; two different adapters are refused.
    flagged = tmp_path / "merged-flag"
    assert main(["merge-lora", "--model", str(base), "--adapter", str(out), "--out", str(flagged),
                 "--dtype", "float32"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(kaki.load(flagged, dtype="float32", device="cpu").model(ids), m.model(ids))
    assert main(["merge-lora", str(out), "--adapter", str(tmp_path), "--out", str(flagged)]) == 2
    assert main(["merge-lora", "--out", str(flagged)]) == 2
    # --merge at the end of training wrote the same weights
    from safetensors.torch import load_file
    a, b = load_file(merged / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_flag_equals_merged_model(tmp_path, base, chat_data, capsys):
    out = tmp_path / "lora"
    assert main(["train", "--model", str(base), "--data", str(chat_data), "--out", str(out), "--max-steps", "4",
                 "--lr", "1e-2", "--lora", "--lora-targets", "query_key_value,dense", "--merge", *COMMON]) == 0
    capsys.readouterr()

    def gen(*model_args):
        assert main(["generate", *model_args, "--dtype", "float32", "-n", "8", "-t", "0", "--json", "the man"]) == 0
        return json.loads(capsys.readouterr().out)["token_ids"]

    assert gen("--model", str(base), "--adapter", str(out)) == gen("--model", str(out / "merged"))


def test_fp16_is_refused_for_persimmon(tmp_path, base, data):
    o = TrainOptions(model=str(base), data=str(data), out=str(tmp_path / "x"), precision="fp16", progress=False)
    with pytest.raises(KakiError, match="NaN"):
        Trainer(o).run()


def test_activation_checkpointing_gives_the_same_weights(tmp_path, base, data):
    def run(name, *extra):
        o = TrainOptions(model=str(base), data=str(data), out=str(tmp_path / name), max_steps=2, seq_len=32,
                         batch_size=2, progress=False, eval_every=0, save_every=0, **dict(extra))
        t = Trainer(o)
        t.run()
        return t.model.state_dict()

    plain = run("plain")
    ckpt = run("ckpt", ("activation_checkpointing", True))
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)


def test_epochs_set_the_step_count_and_bf16_autocast_runs_on_cpu(tmp_path, base, data):
    o = TrainOptions(model=str(base), data=str(data), out=str(tmp_path / "e"), epochs=0.5, seq_len=32,
                     batch_size=8, progress=False, eval_every=0, save_every=0, precision="bf16")
    t = Trainer(o)
    t.run()
    windows = t.data.train.windows_per_epoch
    assert t.total == -(-windows // 2 // 8) and t.step == t.total
    losses = [x["loss"] for x in rows(tmp_path / "e") if "loss" in x]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert t.model.lm_head.weight.dtype == torch.float32  # autocast: fp32 master weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_and_8bit_adam_on_cuda(tmp_path, base, data):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "cuda"
    assert main(["train", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", "4",
                 "--device", "cuda", "--optimizer", "adamw8bit", *COMMON]) == 0
    assert all(torch.isfinite(torch.tensor([x["loss"] for x in rows(out) if "loss" in x])))

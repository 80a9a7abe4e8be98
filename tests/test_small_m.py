"""kaki.small_m: each small-M path gives F.linear's logits, the tuner picks the faster candidate,
its choices are cached, reused and re-timed on request, and bad settings say what is valid.
Also the machine report (`kaki info`, the test header) and the bf16 note."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from loguru import logger

import kaki
from kaki import kernels, native, small_m
from kaki.errors import KakiError

from helpers import hf_model_dir

LARGE = dict(vocab_size=16384, hidden_size=256, intermediate_size=512, num_hidden_layers=1)  # a 4M lm_head


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KAKI_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("KAKI_SMALL_M", "KAKI_SMALL_M_RETUNE", "KAKI_PLAIN_LINEAR"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / small_m.CACHE_NAME


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory, spm_dir):
    return hf_model_dir("persimmon", tmp_path_factory.mktemp("large"), spm_dir, **LARGE)[1]


def _logits(model, rows: int) -> torch.Tensor:
    ids = torch.arange(1, rows + 1)[None] * 37 % 1000
    with torch.inference_mode():
        return model(ids)


@pytest.mark.parametrize("path", small_m.PATHS)
def test_each_forced_path_gives_f_linear_logits(path, family_dirs, monkeypatch):
    """KAKI_SMALL_M=<path> sends every layer's 1-8 row products down that path (counted), and
    the logits at 1, 2, 3, 4 and 8 rows equal plain F.linear's (KAKI_PLAIN_LINEAR)."""
    if path == "native" and native.variant() is None:  # no native library here: a clear error instead
        monkeypatch.setenv("KAKI_SMALL_M", path)
        with pytest.raises(KakiError, match="KAKI_SMALL_M=native"):
            _logits(kaki.load(family_dirs["llama"][1], dtype="float32", device="cpu").model, 2)
        return
    calls = []
    for name in ("mm_rows", "split_rows", "native_rows"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    monkeypatch.setenv("KAKI_SMALL_M", path)
    model = kaki.load(family_dirs["llama"][1], dtype="float32", device="cpu").model
    got = {rows: _logits(model, rows) for rows in (1, 2, 3, 4, 8)}
    plan = model._kaki_small_m
    assert plan.source == "KAKI_SMALL_M" and plan.paths
    assert all(set(p.values()) == {path} for p in plan.paths.values())
    assert all(m.small_m is not None for m in small_m._layers(model))
    assert {"linear": set(), "mm": {"mm_rows"}, "split": {"split_rows"}, "native": {"native_rows"}}[path] == set(calls) or \
        (path == "split" and torch.get_num_threads() < 2)
    monkeypatch.setenv("KAKI_PLAIN_LINEAR", "1")
    for rows, logits in got.items():
        torch.testing.assert_close(logits, _logits(model, rows), rtol=1e-5, atol=1e-5)


def _fake(costs: dict[str, float]):
    """Candidates that each advance a fake clock by their cost, and that clock."""
    now, order = [0.0], []

    def make(name):
        def product(x, w, b):
            order.append(name)
            now[0] += costs[name] * x.shape[0]
        return product
    return {n: make(n) for n in costs}, (lambda: now[0]), order


def test_tuner_picks_the_faster_candidate():
    candidates, clock, order = _fake({"linear": 2.0, "mm": 1.0})
    w = torch.zeros(64, 32)
    entry = small_m.choose(w, None, 2, clock, candidates)
    assert entry["paths"] == {"1": "mm", "2": "mm", "4": "mm", "8": "mm"}
    assert entry["ms"]["4"] == {"linear": 8000.0, "mm": 4000.0}
    # Per row count: one warm-up call each, then ROUNDS interleaved rounds, the order rotated.
    per_bucket = 2 * (1 + small_m.ROUNDS)
    assert len(order) == len(small_m.BUCKETS) * per_bucket
    assert order[:per_bucket] == ["linear", "mm", "linear", "mm", "mm", "linear", "linear", "mm"]


def test_tuner_keeps_f_linear_unless_clearly_faster():
    candidates, clock, _ = _fake({"linear": 1.0, "mm": 1.0 / (small_m.MIN_GAIN - 0.01), "split": 1.0})
    entry = small_m.choose(torch.zeros(64, 32), torch.zeros(64), 2, clock, candidates)
    assert set(entry["paths"].values()) == {"linear"}  # a tie, and a gain under MIN_GAIN


def test_large_fp32_decode_products_keep_split_unless_clearly_slower():
    """1-4 rows of a 16 MB fp32 weight keep split (its whole-step gain is not in one layer's
    time) unless F.linear or mm is SPLIT_KEEP_GAIN faster; 8 rows start from F.linear."""
    w = torch.zeros(16384, 256)
    one_core = small_m.one_core_buckets({(16384, 256, torch.float32): 1, (256, 256, torch.float32): 4}, 2)
    assert one_core == {1, 2, 4}
    candidates, clock, _ = _fake({"linear": 1.0, "mm": 1.02, "split": 1.03})
    assert small_m.choose(w, None, 2, clock, candidates, one_core)["paths"] == \
        {"1": "split", "2": "split", "4": "split", "8": "linear"}
    candidates, clock, _ = _fake({"linear": 1.0, "mm": 1.02, "split": 1.4})  # under SPLIT_KEEP_GAIN
    assert set(small_m.choose(w, None, 2, clock, candidates, one_core)["paths"].values()) == {"split", "linear"}
    candidates, clock, _ = _fake({"linear": 1.0, "mm": 1.02, "split": 1.6})
    assert set(small_m.choose(w, None, 2, clock, candidates, one_core)["paths"].values()) == {"linear"}
    candidates, clock, _ = _fake({"linear": 1.0, "mm": 1.02, "split": 1.03})
    assert set(small_m.choose(w, None, 2, clock, candidates)["paths"].values()) == {"linear"}  # not one-core
    assert set(small_m.choose(w.bfloat16(), None, 2, clock, candidates, one_core)["paths"].values()) == {"linear"}
    # One-core steps only where large fp32 weights are most of the bytes, with 2+ threads, and
    # with KAKI_SMALL_M=split or auto.
    assert small_m.one_core_buckets({(16384, 256, torch.float32): 1}, 1) == set()
    assert small_m.one_core_buckets({(16384, 256, torch.bfloat16): 1}, 2) == set()
    assert small_m.one_core_buckets({(16384, 256, torch.float32): 1, (4096, 512, torch.float32): 3}, 2) == set()
    assert small_m.one_core_buckets({(256, 256, torch.float32): 1}, 2, "split") == {1, 2, 4}
    assert small_m.one_core_buckets({(16384, 256, torch.float32): 1}, 2, "mm") == set()


def test_measure_takes_the_median_of_interleaved_runs():
    costs = iter([5, 5, 1, 9, 2, 3, 7, 4])  # warm-ups a, b; then a 1, b 9, b 2, a 3, a 7, b 4
    now, calls = [0.0], {}

    def call(name):
        def f():
            now[0] += next(costs)
        calls[name] = f
        return f
    med = small_m.measure({"a": call("a"), "b": call("b")}, lambda: now[0], rounds=3)
    assert med == {"a": 3, "b": 4}


def test_cache_written_reused_and_retuned(large_dir, private_cache, monkeypatch):
    timed = []
    real = small_m.choose
    monkeypatch.setattr(small_m, "choose", lambda w, *a, **k: timed.append(tuple(w.shape)) or real(w, *a, **k))
    model = kaki.load(large_dir, dtype="float32", device="cpu").model
    _logits(model, 1)
    assert (16384, 256) in timed
    raw = json.loads(private_cache.read_text())
    key = next(k for k in raw["entries"] if "16384x256" in k)
    assert raw["version"] == small_m.CACHE_VERSION and key in raw["entries"]
    assert set(raw["entries"][key]["paths"]) == {"1", "2", "4", "8"}
    assert not [p for p in private_cache.parent.iterdir() if p.name != small_m.CACHE_NAME]  # no temporaries left

    # A second load uses the cache, as it says: here, edited to say mm everywhere.
    raw["entries"][key]["paths"] = {b: "mm" for b in ("1", "2", "4", "8")}
    private_cache.write_text(json.dumps(raw))
    timed.clear()
    model = kaki.load(large_dir, dtype="float32", device="cpu").model
    _logits(model, 1)
    assert timed == [] and model._kaki_small_m.source.startswith("cached")
    assert model._kaki_small_m.paths[(16384, 256, torch.float32)] == {1: "mm", 2: "mm", 4: "mm", 8: "mm"}
    assert model.lm_head.small_m[3] is kernels.mm_rows
    two = torch.get_num_threads() > 1
    assert model._kaki_small_m.one_thread_rows == ({1, 2, 3, 4} if two else set())  # the model's 16 MB fp32 head
    # Split chosen at 8 rows for most of the bytes: those steps run on one core too.
    raw["entries"][key]["paths"]["8"] = "split"
    private_cache.write_text(json.dumps(raw))
    model = kaki.load(large_dir, dtype="float32", device="cpu").model
    _logits(model, 1)
    assert model._kaki_small_m.one_thread_rows == (set(range(1, 9)) if two else set())

    # The re-tune switch times it again and rewrites the entry.
    monkeypatch.setenv("KAKI_SMALL_M_RETUNE", "1")
    model = kaki.load(large_dir, dtype="float32", device="cpu").model
    _logits(model, 1)
    assert (16384, 256) in timed
    assert json.loads(private_cache.read_text())["entries"][key]["ms"] != raw["entries"][key]["ms"]


def test_a_damaged_cache_is_timed_again(large_dir, private_cache):
    private_cache.parent.mkdir(parents=True)
    key = small_m.cache_key((16384, 256), torch.float32, torch.get_num_threads(),
                            small_m.one_core_buckets({(16384, 256, torch.float32): 1}, torch.get_num_threads()))
    for bad in ("{not json", json.dumps({"version": 1, "entries": {key: {"paths": {"1": "os.system"}}}}),
                json.dumps([1, 2])):
        private_cache.write_text(bad)
        model = kaki.load(large_dir, dtype="float32", device="cpu").model
        _logits(model, 1)
        assert model._kaki_small_m.source.startswith("timed")
        assert small_m._valid(json.loads(private_cache.read_text())["entries"][key])


def test_the_thread_count_is_part_of_the_choice(large_dir, private_cache):
    before = torch.get_num_threads()
    model = kaki.load(large_dir, dtype="float32", device="cpu").model
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _logits(model, 1)
            assert model._kaki_small_m.key == (threads, None)
    finally:
        torch.set_num_threads(before)
    entries = json.loads(private_cache.read_text())["entries"]
    assert {k.split(" | ")[4] for k in entries} == {"1 threads", "2 threads"}
    one = entries[small_m.cache_key((16384, 256), torch.float32, 1)]
    assert "split" not in one["ms"]["1"]  # nothing to split over with one thread


def test_timing_is_capped_per_model_and_resumed_at_a_later_load(tmp_path, spm_dir, private_cache):
    """A clock that runs out the budget during the first shape: the largest is timed and cached,
    the other two run F.linear, and the next load times just those two."""
    _, path = hf_model_dir("persimmon", tmp_path / "m", spm_dir, **{**LARGE, "intermediate_size": 4096})
    ticks = iter(range(10**6))
    model = kaki.load(path, dtype="float32", device="cpu").model
    with torch.inference_mode():
        plan = small_m.prepare(model, clock=lambda: float(next(ticks)))
    assert list(plan.paths) == [(16384, 256, torch.float32)] and "2 shape(s) left" in plan.source
    assert model.model.layers[0].mlp.dense_h_to_4h.small_m is None
    assert len(json.loads(private_cache.read_text())["entries"]) == 1
    model = kaki.load(path, dtype="float32", device="cpu").model
    _logits(model, 1)
    assert set(model._kaki_small_m.paths) == {(16384, 256, torch.float32), (4096, 256, torch.float32),
                                             (256, 4096, torch.float32)}
    assert len(json.loads(private_cache.read_text())["entries"]) == 3


def test_bad_small_m_value_is_a_clear_error(family_dirs, monkeypatch):
    monkeypatch.setenv("KAKI_SMALL_M", "fastest")
    model = kaki.load(family_dirs["llama"][1], dtype="float32", device="cpu").model
    with pytest.raises(KakiError, match="KAKI_SMALL_M must be one of auto, linear, mm, split, native, not 'fastest'"):
        _logits(model, 1)
    r = subprocess.run([sys.executable, "-m", "kaki", "info"], capture_output=True, text=True,
                       env={**os.environ, "KAKI_SMALL_M": "fastest"}, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "kaki info: error: KAKI_SMALL_M must be one of auto, linear, mm, split, native, not 'fastest'"


def test_training_and_small_layers_take_f_linear(family_dirs):
    model = kaki.load(family_dirs["llama"][1], dtype="float32", device="cpu").model
    _logits(model, 2)
    assert model._kaki_small_m.paths == {}  # the tiny model's layers are under TUNE_MIN_NUMEL
    assert all(m.small_m is None for m in small_m._layers(model))


# ----------------------------------------------------------------------------- reports


def test_kaki_info_names_the_machine_without_a_model(tmp_path):
    """`kaki info` with no DIR: the bundled model (or $KAKI_MODEL) after the machine part."""
    env = {**os.environ, "KAKI_MODEL": ""}
    r = subprocess.run([sys.executable, "-m", "kaki", "info", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    m = info["machine"]
    assert m["capability"] == str(torch.backends.cpu.get_cpu_capability())
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    assert m["flags"]["avx2"] == ("avx2" in flags) and m["flags"]["avx512_bf16"] == ("avx512_bf16" in flags)
    assert m["int8_kernel"].split()[0] in ("native", "fbgemm", "weight-only") and m["small_m"] == "auto"
    from kaki.paths import bundled_model
    if bundled_model() is not None:
        assert info["family"] == "persimmon" and set(info["small_m"]["shapes"]) == {"8192x256"}
    text = subprocess.run([sys.executable, "-m", "kaki", "info"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert text.returncode == 0, text.stderr
    assert "machine" in text.stdout and f"torch dispatch {m['capability']}" in text.stdout
    assert "int8 kernel" in text.stdout and "small-M         auto" in text.stdout
    forced = subprocess.run([sys.executable, "-m", "kaki", "info", "--json"], capture_output=True, text=True,
                            env={**env, "KAKI_NO_NATIVE": "1", "KAKI_SMALL_M": "mm"}, timeout=120)
    m = json.loads(forced.stdout)["machine"]
    assert m["int8_kernel"] == "fbgemm" and m["int8_kernel_why"] == "KAKI_NO_NATIVE is set" and m["small_m"] == "mm"


def test_pytest_header_names_the_machine(request, monkeypatch):
    from conftest import pytest_report_header
    line = pytest_report_header(request.config)
    assert line.startswith("cpu: ") and str(torch.backends.cpu.get_cpu_capability()) in line
    assert "int8 kernel" in line and "small-M auto" in line
    monkeypatch.setenv("KAKI_SMALL_M", "mm")
    assert "small-M mm" in pytest_report_header(request.config)
    monkeypatch.setenv("KAKI_SMALL_M", "bogus")  # a run that sets a bad value still gets its header
    assert "small-M invalid (KAKI_SMALL_M must be one of" in pytest_report_header(request.config)


def test_bfloat16_on_a_cpu_without_native_bf16_gets_one_note(family_dirs, monkeypatch):
    notes = []
    handler = logger.add(lambda m: notes.append(m.record["message"]), level="INFO",
                         filter=lambda r: r["message"].startswith("note: this CPU has no native bf16"))
    kernels.note_slow_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        path = family_dirs["llama"][1]
        kaki.load(path, dtype="auto", device="cpu")
        assert notes == []
        for _ in range(2):
            assert kaki.load(path, dtype="bfloat16", device="cpu").model.lm_head.weight.dtype == torch.bfloat16
        assert len(notes) == 1 and "--dtype auto would pick float32" in notes[0]
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        kernels.note_slow_bf16.cache_clear()
        kaki.load(path, dtype="bfloat16", device="cpu")
        assert len(notes) == 1  # native bf16: nothing to say
    finally:
        logger.remove(handler)
        kernels.note_slow_bf16.cache_clear()

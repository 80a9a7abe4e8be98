"""One rank of tests/test_tensor_parallel.py, run under `torchrun --nproc-per-node N`: loads every
case of the spec with kaki.load(..., tensor_parallel=N) and writes what the test compares to
OUT/rank{R}.pt. One launch runs all cases, since each torchrun start costs seconds.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tensor_parallel_worker.py SPEC.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import kaki
from kaki.errors import KakiError
from kaki.lora import apply_adapter


def state_bytes(model) -> int:
    """Bytes of the tensors the model holds (parameters and buffers; a tied one counted once)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_case(case: dict, spec: dict, size: int) -> dict:
    try:
        llm = kaki.load(case["path"], tensor_parallel=size, dtype="float32", device="cpu",
                        quantize=case.get("quantize"))
    except KakiError as e:
        return {"error": str(e)}
    if case.get("adapter"):
        apply_adapter(llm, case["adapter"])
    ids = torch.tensor(spec["batch"])
    with torch.inference_mode():
        logits = llm.model(ids)
    greedy = llm.generate(spec["prompts"], temperature=0, max_new_tokens=spec["max_new_tokens"])
    # The same prompts again: their prefixes now come from the prefix cache.
    sampled = llm.generate(spec["prompts"], temperature=1.0, seed=7, max_new_tokens=spec["max_new_tokens"])
    unseeded = llm.generate(spec["prompts"], temperature=1.0, max_new_tokens=spec["max_new_tokens"])
    speculated = llm.generate(spec["prompts"], temperature=0, speculative="ngram:3",
                              max_new_tokens=spec["max_new_tokens"])
    kinds = sorted({type(m).__name__ for n, m in llm.model.named_modules() if n.endswith("mlp.dense_4h_to_h")})
    return {"logits": logits, "greedy": [c.token_ids for c in greedy], "sampled": [c.token_ids for c in sampled],
            "speculated": [c.token_ids for c in speculated], "unseeded": [c.token_ids for c in unseeded],
            "bytes": state_bytes(llm.model), "heads": llm.model.config.num_attention_heads,
            "kv_heads": llm.model.config.num_key_value_heads, "down_proj": kinds}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    size = int(os.environ["WORLD_SIZE"])
    results = {case["name"]: run_case(case, spec, size) for case in spec["cases"]}
    torch.save(results, Path(spec["out"]) / f"rank{os.environ['RANK']}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

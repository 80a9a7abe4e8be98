"""Training: tokenizer training, data packing, the one training loop (full and LoRA), checkpoints.

Modules: `tokenizer_train` (sentencepiece Unigram), `options` (flags = YAML keys), `base` (what
the options mean before loading: base format, sequence length and batch), `data` (JSONL, chat
rendering, loss masks, packing, mixing, resumable position), `optim` (AdamW groups, LR schedule),
`checkpointing` (atomic resumable checkpoints that are model directories), `logs` (loguru,
metrics.jsonl, loss.png), `memory` (the memory table), `loop` (the trainer), `classify_loop`
(classifier heads), `run` (`train(options)`), `fsdp` (sharded training; joining torchrun's
process group is kaki.distributed's). LoRA adapters are kaki.lora's (inference applies and merges
them too).
"""

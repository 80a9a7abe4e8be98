#!/usr/bin/env bash
# Rebuild kaki-tiny, the bundled demo model, from scratch with kaki's own commands:
#   data (Python 3.11 docs) -> tokenizer -> pretraining -> chat tuning -> grounding drills
#   -> lookup drills -> [user-style questions: USER_STEPS=300] -> bf16 export -> model card.
#
#   recipes/kaki-tiny.sh            full run (~2 h on 2 CPU cores); needs `apt-get install python3.11-doc`
#   recipes/kaki-tiny.sh --smoke    a few steps on the committed data/smoke subset (CI runs this)
#
# Every stage is resumable: run the same command again after an interruption and it continues
# from the newest checkpoint (finished stages are skipped).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
KAKI=("$PY" -m kaki)
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi

if [ "$SMOKE" = 1 ]; then
  WORK=${KAKI_WORK:-$(mktemp -d)}
  SRC=$ROOT/data/smoke
  OUT=${KAKI_OUT:-$WORK/kaki-tiny}
  VOCAB=600; PT_STEPS=4; PT_STOP=4; CHAT_STEPS=3; GROUND_STEPS=2; LOOKUP_STEPS=2; USER_STEPS=2; SEQ=128; CHAT_SEQ=128; BATCH=2; EVAL_LIMIT=4
  CONFIG=$WORK/smoke.config.json
  mkdir -p "$WORK"
  # The same architecture, shrunk so the smoke run takes seconds.
  "$PY" - "$ROOT/recipes/kaki-tiny.config.json" "$CONFIG" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256)
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
PYEOF
else
  WORK=${KAKI_WORK:-$ROOT/work/kaki-tiny}
  SRC=${KAKI_DOCS:-/usr/share/doc/python3.11/html/_sources}
  OUT=${KAKI_OUT:-$ROOT/models/kaki-tiny}
  VOCAB=8192
  # What the shipped model ran (see its card): 6.6 M pretraining tokens, 4.9 M chat tokens, then
  # the grounding drills. PT_STOP < PT_STEPS stops early on the same schedule (a short session).
  PT_STEPS=${PT_STEPS:-800}; PT_STOP=${PT_STOP:-$PT_STEPS}; CHAT_STEPS=${CHAT_STEPS:-1200}
  GROUND_STEPS=${GROUND_STEPS:-2000}; LOOKUP_STEPS=${LOOKUP_STEPS:-800}; SEQ=1024; BATCH=8; EVAL_LIMIT=0
  # The user-style stage is off in the shipped build: 300 steps of it (3e-4, 1.2 M tokens) from
  # the shipped weights left the user-question figures where they were (reply 30% -> 30%, end to
  # end 54% -> 55%, that one question a chance key-term match), so the model was not replaced.
  # USER_STEPS=300 runs it; the smoke run always does, so it keeps working.
  USER_STEPS=${USER_STEPS:-0}
  CHAT_SEQ=512  # 97% of the chat examples (passages included) fit in 512 tokens
  CONFIG=$ROOT/recipes/kaki-tiny.config.json
  if [ ! -d "$SRC" ]; then
    echo "kaki-tiny: $SRC not found; install the corpus with: apt-get install -y python3.11-doc" >&2
    exit 2
  fi
fi
mkdir -p "$WORK"
# bf16 autocast halves training time on CPUs with native bf16 (AVX512-BF16/AMX); fp32 elsewhere.
PRECISION=$("$PY" -c "from kaki.kernels import cpu_has_fast_bf16 as f; print('bf16' if f() else 'fp32')")
COMMON=(--batch-size "$BATCH" --precision "$PRECISION" --save-every 100 --keep-last 2)
[ "$SMOKE" = 1 ] && COMMON+=(--no-progress)
log() { echo "[kaki-tiny $(date +%H:%M:%S)] $*"; }
resume_flag() { if [ -d "$1/checkpoints" ]; then echo --resume; fi; }
START=$(date +%s)

log "1/10 data from $SRC"
if [ ! -f "$WORK/data/.done" ]; then
  "$PY" "$ROOT/recipes/prepare_data.py" --src "$SRC" --out "$WORK/data"
  touch "$WORK/data/.done"
fi

log "2/10 tokenizer (sentencepiece Unigram, byte fallback, $VOCAB pieces)"
if [ ! -f "$WORK/tokenizer/tokenizer.model" ]; then
  "${KAKI[@]}" train-tokenizer "$WORK/data/pretrain.jsonl" "$WORK/data/chat.jsonl" --vocab-size "$VOCAB" --out "$WORK/tokenizer"
fi
cp "$ROOT/recipes/generation_config.json" "$WORK/tokenizer/generation_config.json"

log "3/10 pretraining ($PT_STOP of $PT_STEPS scheduled steps, $PRECISION)"
if [ ! -f "$WORK/pretrain/model.safetensors" ]; then
  "${KAKI[@]}" train --init-from-config "$CONFIG" --tokenizer "$WORK/tokenizer" \
    --data "$WORK/data/pretrain.jsonl" --out "$WORK/pretrain" --max-steps "$PT_STEPS" --stop-at-step "$PT_STOP" \
    --lr 2e-3 --warmup-steps $((PT_STEPS / 20 + 1)) --eval-every 100 --seq-len "$SEQ" "${COMMON[@]}" \
    $(resume_flag "$WORK/pretrain")
fi

# tune FROM OUT STEPS LR DATA: one fine-tuning stage (chat-sized sequences), skipped once done.
tune() {
  if [ ! -f "$WORK/$2/model.safetensors" ]; then
    "${KAKI[@]}" train --model "$WORK/$1" --data "$5" --out "$WORK/$2" --max-steps "$3" --lr "$4" \
      --warmup-steps $(($3 / 20 + 1)) --eval-every 100 --seq-len "$CHAT_SEQ" "${COMMON[@]}" $(resume_flag "$WORK/$2")
  fi
}
D=$WORK/data

log "4/10 chat tuning ($CHAT_STEPS steps; loss on replies only)"
# Some pretraining text stays in the mix so the model keeps its general docs knowledge.
tune pretrain chat "$CHAT_STEPS" 1e-3 "$D/chat.jsonl:4,$D/pretrain.jsonl:1"

log "5/10 grounding drills ($GROUND_STEPS steps: answers copied out of the passages in the prompt)"
# After chat tuning the model still ignored the passages (same reply loss with and without
# them); these drills (recipes/prepare_data.py: grounding_examples) teach it to copy from them.
# A quarter of the mix is the chat data again, so questions without passages stay answered.
tune chat ground "$GROUND_STEPS" 1e-3 "$D/ground.jsonl:3,$D/chat.jsonl:1"

log "6/10 lookup drills ($LOOKUP_STEPS steps: \"which function does X?\" answered with the name)"
# Every earlier question asks from a name to its description; users as often ask the other way
# (recipes/prepare_data.py: lookup_drills). The grounding and chat data stay in the mix, at a
# lower learning rate, so what the model learnt there is kept.
tune ground lookup "$LOOKUP_STEPS" 5e-4 "$D/lookup.jsonl:2,$D/ground.jsonl:1,$D/chat.jsonl:1"

log "7/10 user-style questions grounded as \`make chat\` grounds them"
# Every earlier question is phrased like the docs; people type "python square root" or "how do
# i check if a path exists" (data/eval/user-questions.jsonl), and the model garbled the names it
# copied for those. recipes/user_drills.py rewrites each passage's description in those forms and
# puts the passage the demo index retrieves for it in the prompt, as `make chat` does. The
# evaluation sets' questions are excluded (and tests/test_user_questions.py checks).
if [ "$USER_STEPS" -gt 0 ] && [ ! -f "$D/user.jsonl" ]; then
  if [ "$SMOKE" = 1 ]; then
    # BM25 over the smoke subset: seconds, and the pipeline is what the smoke run checks.
    "${KAKI[@]}" index build "$D/passages.jsonl" --out "$WORK/index" --no-chunk --rebuild --embedder none --quiet
  else
    # The index `make chat` searches: all passages, their shipped vectors, dense search.
    gunzip -c "$ROOT/data/pydocs/passages.jsonl.gz" > "$WORK/pydocs-passages.jsonl"
    "${KAKI[@]}" index build "$WORK/pydocs-passages.jsonl" --out "$WORK/index" --no-chunk --rebuild \
      --vectors "$ROOT/data/pydocs/vectors.npz" --search-mode dense --quiet
  fi
  "$PY" "$ROOT/recipes/user_drills.py" --src "$SRC" --index "$WORK/index" --out "$D/user.jsonl" \
    --exclude "$ROOT/data/eval/user-questions.jsonl" "$ROOT/data/eval/questions.jsonl"
fi

log "8/10 user-style questions ($USER_STEPS steps; 0 skips the stage)"
# The lookup and grounding drills stay in the mix (two fifths), so those skills are kept.
FINAL=lookup
if [ "$USER_STEPS" -gt 0 ]; then
  tune lookup user "$USER_STEPS" 3e-4 "$D/user.jsonl:3,$D/lookup.jsonl:1,$D/ground.jsonl:1"
  FINAL=user
fi

log "9/10 export bf16 to $OUT"
"$PY" - "$WORK/$FINAL" "$OUT" <<'PYEOF'
import sys
import kaki
llm = kaki.load(sys.argv[1], dtype="float32", device="cpu")
llm.save(sys.argv[2], dtype="bfloat16")
PYEOF

log "10/10 evaluation and model card"
"$PY" "$ROOT/recipes/model_card.py" --model "$OUT" --work "$WORK" --seconds $(( $(date +%s) - START )) \
  --limit "$EVAL_LIMIT" --precision "$PRECISION"
log "done: $OUT ($(du -sh "$OUT" | cut -f1))"

#!/usr/bin/env bash
# The real-data comparisons (README, "JMLR on real text"): none / RAG / JMLR x 3 seeds, each row
# trained by train.py and scored by eval.py on the 500 held-out questions, as 9 independent
# single-thread jobs on 2 lanes (two 1-thread processes beat one 2-thread process on 2 cores).
# Needs: the setting's files (benchmarks/real_data.py SETTING ../shared/data/... runs/SETTING-DIR)
# and the converted SmolLM2 weights in checkpoints/smollm2-135m. Then: python benchmarks/paired.py $OUT
#   MedMCQA explanations:  bash benchmarks/real_data_compare.sh                       (runs/cmp)
#   PubMedQA sections:     PRESET=smollm2-pubmedqa-sections OUT=runs/cmp-pubmedqa bash benchmarks/real_data_compare.sh
#   a variant:             OUT=runs/cmp-letter TRAIN_ARGS="--jmlr.doc_loss=letter" bash benchmarks/real_data_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${PRESET:-smollm2-medmcqa}
OUT=${OUT:-runs/cmp}
LANES=${LANES:-2}
TRAIN_ARGS=${TRAIN_ARGS:-}   # more train.py settings for every row, e.g. --jmlr.doc_loss=letter
export OMP_NUM_THREADS=1 OUT TRAIN_ARGS PRESET
mkdir -p "$OUT"
read -r TEST CORPUS QLEN DLEN < <(python -c "import train_config as c; x = c.parse_args(['--preset=$PRESET']); print(x.test_file, x.corpus, x.query_maxlen, x.doc_maxlen)")
export TEST CORPUS
[ -d "$OUT/initial-retriever" ] || python -c "import retriever as rt; rt.ColBERT.from_pretrained(rt.default_model_dir(), query_maxlen=$QLEN, doc_maxlen=$DLEN).save_pretrained('$OUT/initial-retriever')"   # the "before" retriever, as train.py loads it
[ -f "$OUT/candidates.jsonl" ] || OMP_NUM_THREADS=2 python -c "import train; train.prepare(train.parse_args(['--preset=$PRESET', '--out_dir=$OUT', '--candidates=$OUT/candidates.jsonl']), 0)"   # once, before the lanes start
job() {   # objective seed: train, then accuracy on all 500 test questions, then (JMLR) helpfulness on 100
  set -euo pipefail
  local obj=$1 seed=$2 dir="$OUT/seed$2-$1"
  python train.py --preset="$PRESET" "--compare=('$obj',)" --seed="$seed" --test_file= \
      --out_dir="$dir" --candidates="$OUT/candidates.jsonl" $TRAIN_ARGS > "$dir.train.log" 2>&1
  local ret=none
  [ "$obj" != none ] && ret=trained
  python eval.py "$TEST" --llm "$dir/$obj" --retriever $ret --corpus "$CORPUS" \
      --candidates "$OUT/candidates.jsonl" --score letter sum mean --dtype bfloat16 --out "$dir.eval.json" \
      > "$dir.eval.log" 2>&1
  if [ "$obj" = jmlr ]; then   # RAG's retriever is the initial one: its helpfulness is JMLR's "before"
    python eval.py "$TEST" --llm "$dir/$obj" --retriever trained "$OUT/initial-retriever" --corpus "$CORPUS" \
        --candidates "$OUT/candidates.jsonl" --helpfulness --limit 100 --dtype bfloat16 \
        --out "$dir.helpful.json" > "$dir.helpful.log" 2>&1
  fi
  echo "$(date +%T) done $obj seed $seed"
}
export -f job
# the longest jobs first, so that the two lanes finish together; or the jobs given ("jmlr 2" "rag 0" ...)
[ $# -gt 0 ] || set -- "jmlr 0" "jmlr 1" "jmlr 2" "rag 0" "rag 1" "rag 2" "none 0" "none 1" "none 2"
printf '%s\n' "$@" | xargs -P "$LANES" -L 1 bash -c 'job $0 $1'

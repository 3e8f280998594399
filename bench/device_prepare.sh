#!/usr/bin/env bash
# What bench/device_check.sh needs carried to the GPU machine, prepared here (both folders are
# git-ignored; name them in the device tool's `carry`):
#   .whl/       wheels of the packages the machine's image lacks (it has torch, transformers, peft,
#               triton, safetensors, numpy, pytest), at the versions this venv runs, for its Python 3.12
#   .devmodel/  SmolLM2-135M-Instruct's config and tokenizer, from the converted base in the cache
#               (the weights stay: bench.random_base draws random ones there)
#
#   bash bench/device_prepare.sh   # after `make setup`
#
# The device tool sends the tracked files too, at most 64 MiB with the carried folders; the shipped
# adapters' weights are over 200 MB and the check needs none of them (it draws its own synthetic
# adapters). For the call, take them out of the index and keep git from listing them; after it,
# `git reset -q` and the saved exclude file put both back:
#   git ls-files | grep -E '\.(safetensors|bin)$' | grep -v '^adapters_store/gate/' > /tmp/untrack
#   git rm -q --cached --pathspec-from-file=/tmp/untrack && cp .git/info/exclude /tmp/exclude.bak
#   sed 's|^|/|' /tmp/untrack >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MISSING=(pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types llguidance faiss-cpu)
pins=$("$PY" -c "import sys, importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" \
       "${MISSING[@]}")
platforms=()
for tag in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086  # pins: one word per package
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl $pins
base=$("$PY" -c "from mole_serve.config import Settings; from mole_serve.engine.loader import resolve_base_model;
print(resolve_base_model(Settings()))")
rm -rf .devmodel && mkdir -p ".devmodel/$(basename "$base")"
find "$base" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} ".devmodel/$(basename "$base")/" \;
du -sh .whl .devmodel

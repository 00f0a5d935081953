#!/usr/bin/env bash
# The test command. Installs what the tests need, then runs the whole suite:
#   - the openssl CLI (the tests check certificates with it), via apt-get if absent;
#   - a Python venv in target/py-venv with the clients pinned in
#     tests/python/requirements.txt (py-spiffe, grpcio), from PyPI.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v openssl >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq openssl
fi

venv=target/py-venv
requirements=tests/python/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null \
    || ! "$venv/bin/python" -c 'import spiffe, grpc' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi

cargo test --workspace "$@"

#!/usr/bin/env bash
# The test command. Installs what the tests need, then runs the whole suite:
#   - the openssl CLI (the tests check certificates with it), via apt-get if absent;
#   - make, if absent (jemalloc, every binary's allocator, builds from source
#     with the C compiler Rust's linker already needs and make);
#   - a Python venv in target/py-venv with the clients pinned in
#     tests/python/requirements.txt (py-spiffe, grpcio), from PyPI;
#   - the PostgreSQL server from the distribution's packages (postgresql),
#     via apt-get if absent. The tests start their own private cluster in a
#     temp dir on a free port (common/pg_cluster.rs) and stop it afterwards;
#     nothing is started here and the package's own cluster is not used.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v openssl >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq openssl
fi

if ! command -v make >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${TESSERA_PG_BIN:-}" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
    # The package may start its own cluster; the tests do not use it.
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        for c in $(pg_lsclusters -h 2>/dev/null | awk '{print $1"/"$2}'); do
            pg_ctlcluster "${c%/*}" "${c#*/}" stop 2>/dev/null || true
        done
    fi
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
# The patched HPACK crate (vendor/loona-hpack/PATCHED.md) against its own tests.
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" cargo test --manifest-path vendor/loona-hpack/Cargo.toml

#!/usr/bin/env bash
# Install what the benchmarks need beyond the test bootstrap (scripts/_bootstrap):
#   - the `bench` extra of pyproject.toml (redis-py, matplotlib) into .venv;
#   - redis-server from the system packages, for the Redis peer of `python -m bench peers`
#     (Debian/Ubuntu: apt-get; needs root, or run the printed command yourself).
# Idempotent: does nothing that is already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/_bootstrap"
"$root/.venv/bin/python" -c "import redis, matplotlib" 2>/dev/null \
    || "$root/.venv/bin/python" -m pip install --quiet -e "$root[dev,bench]"
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
    else
        echo "redis-server is missing: install it (e.g. sudo apt-get install -y redis-server," >&2
        echo "or brew install redis); until then the Redis peer of 'peers' is skipped." >&2
    fi
fi
echo "bench dependencies ready: $("$root/.venv/bin/python" -c 'import redis, matplotlib; print("redis-py", redis.__version__, "matplotlib", matplotlib.__version__)'), $(redis-server --version 2>/dev/null | cut -d' ' -f1-3 || echo 'no redis-server')"

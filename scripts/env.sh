# Sourced by scripts/demo and scripts/test: create or reuse .venv and install
# routelens with what the tests need. Re-installs only when pyproject.toml
# changed since the last install, so the second run starts at once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ROUTELENS_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "routelens needs Python >= 3.10 (found: $("$PYTHON" --version 2>&1))." >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating a virtualenv in $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.routelens-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "Installing routelens and its dependencies into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

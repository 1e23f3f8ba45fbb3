# Sourced by the commands in scripts/: makes sure .venv holds what keygate needs
# (installing it on first use, and again when pyproject.toml changes), then sets
#   ROOT        the checkout
#   KEYGATE_PY  the venv's python
#   PATH        with the venv's bin first (mitmdump)
#   PYTHONPATH  with addons/ first, so `python -m keygate.<tool>` works
# Set KEYGATE_EXTRAS=test before sourcing to install the test dependencies too.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${KEYGATE_VENV:-$ROOT/.venv}"

_keygate_python() {
    local p
    for p in python3.11 python3.12 python3.13 python3; do
        if command -v "$p" >/dev/null 2>&1 &&
            "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "keygate needs Python 3.11 or newer (python3.11 not found)" >&2
    return 1
}

_keygate_install() {
    local extras="${KEYGATE_EXTRAS:-}"
    local stamp="$VENV/.keygate-installed${extras:+-$extras}"
    local want
    want="$(cat "$ROOT/pyproject.toml" | cksum)"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(_keygate_python)" || return 1
        echo "keygate: creating $VENV" >&2
        "$py" -m venv "$VENV" || return 1
    fi
    echo "keygate: installing dependencies into $VENV" >&2
    # The requirement list lives in pyproject.toml alone; read it from there.
    "$VENV/bin/python" - "$ROOT/pyproject.toml" "$extras" >"$VENV/.keygate-requirements.txt" <<'PY' || return 1
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = list(project["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    reqs += project["optional-dependencies"][extra]
print("\n".join(reqs))
PY
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        -r "$VENV/.keygate-requirements.txt" >&2 || return 1
    echo "$want" >"$stamp"
}

_keygate_install || { echo "keygate: could not install dependencies" >&2; exit 1; }
KEYGATE_PY="$VENV/bin/python"
PATH="$VENV/bin:$PATH"
PYTHONPATH="$ROOT/addons${PYTHONPATH:+:$PYTHONPATH}"
export KEYGATE_PY PATH PYTHONPATH ROOT

# Sourced by the commands in scripts/: makes sure .venv holds keygate, installed from this
# checkout (`pip install -e`, on first use and again when pyproject.toml changes), then sets
#   ROOT        the checkout
#   KEYGATE_PY  the venv's python
#   PATH        with the venv's bin first (keygate, mitmdump)
#   PYTHONPATH  with addons/ first, so the checkout's own code runs even in a venv that a
#               keygate from elsewhere was installed into (KEYGATE_VENV)
# Set KEYGATE_EXTRAS=test before sourcing to install the test dependencies too.

# The physical path: the install stamp holds it, and a checkout reached through a symlink
# (/opt/keygate under systemd) must not look like another checkout and be installed again.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
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

_keygate_stamped() {  # STAMP WANT: STAMP records WANT
    [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]
}

_keygate_install() {
    local extras="${KEYGATE_EXTRAS:-}"
    local stamp="$VENV/.keygate-installed${extras:+-$extras}"
    local want
    # What an install depends on: the checkout it points at (editable) and pyproject.toml.
    want="$ROOT $(cksum <"$ROOT/pyproject.toml")"
    # An install with the test extras has everything a plain one has.
    if [ -x "$VENV/bin/keygate" ] && { _keygate_stamped "$stamp" "$want" ||
        { [ -z "$extras" ] && _keygate_stamped "$VENV/.keygate-installed-test" "$want"; }; }; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(_keygate_python)" || return 1
        echo "keygate: creating $VENV" >&2
        "$py" -m venv "$VENV" || return 1
    fi
    echo "keygate: installing keygate${extras:+ with its $extras extras} into $VENV" >&2
    # The project itself: its dependencies (pyproject.toml alone lists them), the `keygate`
    # command, and addons/ on the venv's path.
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        -e "$ROOT${extras:+[$extras]}" >&2 || return 1
    echo "$want" >"$stamp"
}

_keygate_install || { echo "keygate: could not install keygate into $VENV" >&2; exit 1; }
KEYGATE_PY="$VENV/bin/python"
PATH="$VENV/bin:$PATH"
PYTHONPATH="$ROOT/addons${PYTHONPATH:+:$PYTHONPATH}"
export KEYGATE_PY PATH PYTHONPATH ROOT

# Sourced by the scripts beside it (not run on its own): the project's .venv, from `make setup`,
# goes first on PATH when there is one, so a script runs without activating it.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -x "$root/.venv/bin/python" ]; then
    export PATH="$root/.venv/bin:$PATH"
fi
unset root

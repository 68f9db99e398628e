#!/usr/bin/env bash
# Run the test suite against the current megatron-core release (0.19.x), besides the 0.16.1 that pip
# resolves on Python 3.11.
#
# megatron-core >= 0.17 declares Python >= 3.12, but its cp311 wheel imports and runs on 3.11 when
# installed with --no-deps --ignore-requires-python. So this script keeps a second virtual environment
# (.venv-mcore-latest in the repository root, gitignored; reused when present) holding torch, the
# project's other dependencies, that megatron-core, and triton (0.19 imports it at import time), with
# this checkout installed editable, and runs `python -m pytest tests -q` in it.
#
# Environment: MCORE_LATEST_VERSION (default 0.19.2), MCORE_LATEST_VENV (default .venv-mcore-latest).
set -euo pipefail
cd "$(dirname "$0")/.."

MCORE_VERSION="${MCORE_LATEST_VERSION:-0.19.2}"
VENV="${MCORE_LATEST_VENV:-.venv-mcore-latest}"
TORCH_PIN="torch==2.13.0"   # pinned first: pip takes the local CPU wheel, not a multi-GB CUDA build
TRITON_PIN="triton==3.8.0"  # imported by megatron-core 0.19 at import time; CPU use only (no kernels run)

# What the environment was built from; a change rebuilds its packages (the venv itself is kept).
stamp="$MCORE_VERSION $TORCH_PIN $TRITON_PIN $(sha256sum pyproject.toml | cut -c1-16)"
stamp_file="$VENV/.specbridge-stamp"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
py="$VENV/bin/python"

if [[ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]]; then
    echo "test-mcore-latest: building $VENV (megatron-core $MCORE_VERSION)"
    "$py" -m pip install -q "$TORCH_PIN"
    # numpy and packaging before megatron-core: resolving them under --ignore-requires-python would pick
    # releases that need Python 3.12.
    "$py" -m pip install -q numpy packaging
    # The project's dependencies and test extras, except megatron-core (pip would resolve 0.16.1 here).
    mapfile -t deps < <("$py" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = project["dependencies"] + project.get("optional-dependencies", {}).get("test", [])
for req in reqs:
    name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]
    if name.lower().replace("_", "-") != "megatron-core":
        print(req)
EOF
    )
    "$py" -m pip install -q "${deps[@]}"
    "$py" -m pip install -q --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION"
    "$py" -m pip install -q "$TRITON_PIN"
    "$py" -m pip install -q --no-deps -e .
    echo "$stamp" > "$stamp_file"
else
    # Reused: make sure this checkout is the one installed (cheap; no dependency resolution).
    "$py" -m pip install -q --no-deps -e .
fi

"$py" -c "import megatron.core as m; print('test-mcore-latest: megatron-core', m.__version__)"
# The runtime's tests (single-process and CLI) and a representative multi-rank set (TP x PP, TP x EP, virtual
# pipeline, Gemma 4 EP, a fault); the full multi-rank matrix runs once, against the main suite's 0.16.1.
matrix=tests/multirank/test_multirank.py::test_parallel_layout_matches_single_rank
"$py" -m pytest -q tests/runtime tests/test_cli.py tests/test_api_example.py \
    "$matrix[tp2_pp2]" "$matrix[tp2_ep2]" "$matrix[pp2_vpp2]" "$matrix[gemma4_ep2]" \
    tests/multirank/test_faults.py::test_missing_key_fails_on_every_rank "$@"

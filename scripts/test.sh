#!/usr/bin/env bash
# Install fxbundle and its test dependencies into .venv, the oldest ONNX Runtime the bundle
# must load in (1.15.0, which needs numpy<2) into .venv-ort115, then run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# The pinned CPU build first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]'

python3 -m venv .venv-ort115
.venv-ort115/bin/pip install --quiet --disable-pip-version-check 'onnxruntime==1.15.0' 'numpy<2'

export FXBUNDLE_ORT115_PYTHON="$PWD/.venv-ort115/bin/python"
exec .venv/bin/python -m pytest "$@"

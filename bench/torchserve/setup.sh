#!/usr/bin/env bash
# Installs TorchServe 0.12 into its own venv (bench/torchserve/.venv), idempotently.
# torch, numpy and opencv come from the project venv through a .pth file appended
# after the venv's own site-packages: no second 5 GB torch install, and the
# handler runs the very same torch build as detserve's workers.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
MAIN_PY="${MAIN_PY:-$ROOT/.venv/bin/python}"
STAMP="$VENV/.installed-0.12.0"

if [[ -f "$STAMP" ]]; then
  echo "torchserve venv ready: $VENV"
  exit 0
fi
command -v java >/dev/null || { echo "java (17+) is required for TorchServe" >&2; exit 1; }
BASE_PY="$("$MAIN_PY" -c 'import sys; print(sys._base_executable)')"
test -x "$VENV/bin/python" || "$BASE_PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torchserve==0.12.0" "torch-model-archiver==0.12.0" psutil pyyaml
MAIN_SITE="$("$MAIN_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VENV_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# zz_ sorts last, so packages installed in this venv win over the project's.
echo "$MAIN_SITE" > "$VENV_SITE/zz_detserve_main.pth"
echo "$ROOT" >> "$VENV_SITE/zz_detserve_main.pth"
"$VENV/bin/python" -c 'import ts, torch, cv2, service.pipeline.predictor; print("torchserve venv ok: torch", torch.__version__)'
touch "$STAMP"

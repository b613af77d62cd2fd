#!/usr/bin/env bash
# Install, with apt-get when we are root, what building and testing cnnx needs from the system:
# a C compiler, Python headers and venv, and the Fashion-MNIST files (Debian: dataset-fashion-mnist).
# Without root it only warns: the build then needs those already present, and training falls back
# to the Fashion-MNIST sample shipped inside the package.
set -uo pipefail
PYTHON=${PYTHON:-python3}

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
"$PYTHON" -c "import venv, ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
"$PYTHON" - <<'PY' >/dev/null 2>&1 || need+=(python3-dev)
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "note: missing ${need[*]} and no root to apt-get install them" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: missing ${need[*]}; install them with your system's package manager" >&2
  exit 0
fi
echo "== apt-get install ${need[*]}"
$sudo apt-get update -qq >/dev/null || true
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null \
  || echo "note: apt-get install ${need[*]} failed" >&2
exit 0

#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, only what is missing (idempotent).
set -euo pipefail
APT_PACKAGES="libopenmpi-dev openmpi-bin libopenblas-dev libhdf5-dev hdf5-tools dataset-fashion-mnist"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing apt packages:$missing"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
# Python packages for the evaluation script and the reference tests.
PIP_PACKAGES="numpy scipy pillow matplotlib pytest h5py"
need=""
for p in $PIP_PACKAGES; do
  mod=$p; [ "$p" = "pillow" ] && mod=PIL
  python3 -c "import $mod" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
  echo "setup: installing pip packages:$need"
  python3 -m pip install -q $need
fi
echo "setup: ok"

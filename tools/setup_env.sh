#!/usr/bin/env bash
# Set up the full mae-transfer stack in .venv: torch, timm, MMEngine/MMCV(ops)/MMSeg, Detectron2.
#
# Unattended and idempotent: every step checks what is already there.  Facts behind each pin and
# each fix: shared/STACK.md (torch 2.14.1 + torchvision 0.29.1; mmcv 2.1.0 only as an sdist that
# needs C++20 with torch 2.14 headers; detectron2 0.6 python-only from the pb1-detectron2 sdist).
#
# Environment:
#   MAE_TRANSFER_VENV   the venv to create/use            (default: <repo>/.venv)
#   MAE_TRANSFER_CACHE  wheel/sdist cache outside the repo (default: ~/.cache/mae-transfer)
#   SYSTEM_SITE_PACKAGES=1  create the venv with --system-site-packages, so an existing
#                       torch / detectron2 (e.g. a CUDA build) is used and never replaced
#   PYTHON              the interpreter for the venv       (default: python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAE_TRANSFER_VENV:-$ROOT/.venv}"
CACHE="${MAE_TRANSFER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mae-transfer}"
PY="$VENV/bin/python"

TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
BUILD_PINS="setuptools==81.0.0 wheel ninja"
MMENGINE_PIN="mmengine==0.10.7"
MMSEG_PIN="mmsegmentation==1.2.2"
MMCV_VERSION="2.1.0"
MMCV_SHA256="d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f"
D2_SDIST="pb1-detectron2"
D2_VERSION="0.6"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

T0=$(date +%s)
CURRENT=""
on_error() { echo "setup_env: FAILED at step: $CURRENT (after $(( $(date +%s) - T0 )) s)" >&2; }
trap on_error ERR

step() {  # step "description" command...
    CURRENT="$1"; shift
    local t=$(date +%s)
    echo "==> [$(( t - T0 ))s] $CURRENT"
    "$@"
    echo "    done in $(( $(date +%s) - t )) s"
}

pip_q() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

make_venv() {
    if [ -x "$PY" ]; then echo "    $VENV exists"; return; fi
    local base="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    local flags=()
    [ "${SYSTEM_SITE_PACKAGES:-0}" = "1" ] && flags+=(--system-site-packages)
    "$base" -m venv "${flags[@]}" "$VENV"
}

install_torch() {
    if "$PY" -c "import torch, torchvision" 2>/dev/null; then
        echo "    keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
        pip_q $BUILD_PINS
    else
        pip_q $TORCH_PIN $BUILD_PINS
    fi
}

# The mmcv wheel is tied to the torch version and the python ABI: cache it under that key.
mmcv_cache_dir() {
    "$PY" -c "import sys, torch; print('$CACHE/wheels/py%d%d-torch%s' % (sys.version_info[0], sys.version_info[1], torch.__version__.replace('+', '_')))"
}

mmcv_ops_ok() { "$PY" -c "import mmcv; assert mmcv.__version__ == '$MMCV_VERSION'; from mmcv.ops import nms, roi_align, point_sample" 2>/dev/null; }

install_mmcv() {
    if mmcv_ops_ok; then echo "    mmcv $MMCV_VERSION with ops already installed"; return; fi
    local wheels; wheels="$(mmcv_cache_dir)"
    local whl; whl="$(ls "$wheels"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$whl" ]; then
        echo "    no cached wheel in $wheels: building mmcv $MMCV_VERSION with ops (about 11 min on 2 cores)"
        local src="$CACHE/src"
        "$PY" "$ROOT/tools/fetch_sdist.py" mmcv "$MMCV_VERSION" "$MMCV_SHA256" "$src" >/dev/null
        local work; work="$(mktemp -d)"
        tar -xzf "$src/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
        # torch 2.14 headers need C++20; mmcv 2.1.0 asks for c++14/17.
        sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$work/mmcv-$MMCV_VERSION/setup.py"
        mkdir -p "$wheels"
        MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip wheel --disable-pip-version-check -q \
            --no-build-isolation --no-deps -w "$work/dist" "$work/mmcv-$MMCV_VERSION" > "$work/build.log" 2>&1 &
        local pid=$! t=$(date +%s)
        while kill -0 "$pid" 2>/dev/null; do  # a heartbeat, so an 11-minute build does not look hung
            sleep 30
            kill -0 "$pid" 2>/dev/null && echo "    ... still compiling mmcv ops ($(( $(date +%s) - t )) s)"
        done
        if ! wait "$pid"; then
            tail -n 40 "$work/build.log" >&2
            echo "    mmcv build failed; full log: $work/build.log" >&2
            return 1
        fi
        # move into the cache only when complete, so an interrupted build is never reused
        whl="$wheels/$(basename "$work"/dist/mmcv-*.whl)"
        mv "$work"/dist/mmcv-*.whl "$whl.part" && mv "$whl.part" "$whl"
        rm -rf "$work"
    else
        echo "    reusing $whl"
    fi
    pip_q "$MMENGINE_PIN" "$whl"
    mmcv_ops_ok || { echo "    mmcv installed but 'from mmcv.ops import nms' fails" >&2; return 1; }
}

d2_ok() {
    "$PY" - <<'PY' 2>/dev/null
import detectron2
from packaging.version import Version
assert Version(detectron2.__version__.split("+")[0]) >= Version("0.6")
PY
}

install_detectron2() {
    if d2_ok; then
        echo "    keeping installed detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
        return
    fi
    local src="$CACHE/src"
    "$PY" "$ROOT/tools/fetch_sdist.py" "$D2_SDIST" "$D2_VERSION" "$D2_SHA256" "$src" >/dev/null
    local work; work="$(mktemp -d)"
    tar -xzf "$src/$D2_SDIST-$D2_VERSION.tar.gz" -C "$work"
    "$PY" "$ROOT/tools/detectron2_compat.py" "$work/$D2_SDIST-$D2_VERSION"
    pip_q --no-build-isolation "$work/$D2_SDIST-$D2_VERSION"
    rm -rf "$work"
    d2_ok
}

install_project() {
    pip_q --no-build-isolation -e "$ROOT[all,dev]"
}

check_stack() {
    "$PY" -m mae_transfer env
}

step "create venv $VENV" make_venv
step "torch + build tools" install_torch
step "mmcv $MMCV_VERSION with compiled ops + $MMENGINE_PIN" install_mmcv
step "detectron2 (keep an existing >= 0.6, else v0.6 python-only)" install_detectron2
step "mae-transfer (editable) + timm, mmseg, test tools" install_project
step "check the stack" check_stack
echo "setup_env: complete in $(( $(date +%s) - T0 )) s; venv at $VENV ($(du -sh "$VENV" | cut -f1))"

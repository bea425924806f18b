#!/usr/bin/env bash
# Screenshot a synclone report at laptop width with headless Chromium (Debian package `chromium`).
# Usage: scripts/screenshot_report.sh runs/demo/report.html [out.png] [width] [height]
set -euo pipefail
report="$(realpath "${1:?usage: $0 REPORT.html [OUT.png] [WIDTH] [HEIGHT]}")"
out="${2:-${report%.html}.png}"
width="${3:-1280}"
height="${4:-8000}"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=5000 \
  --window-size="${width},${height}" --screenshot="$(realpath -m "$out")" "file://${report}" 2>/dev/null
echo "$out"

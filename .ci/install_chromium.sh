#!/usr/bin/env bash
# The browser test's Chromium: Debian's package, installed only when /usr/bin/chromium is absent (needs root).
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq
  apt-get install -y -qq chromium
fi

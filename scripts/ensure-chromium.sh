#!/usr/bin/env bash
# The report test opens report.html in headless Chromium (Debian's package). Install it when missing
# and when we are allowed to (root, apt reachable); the test skips with a reason otherwise.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
[ "$(id -u)" = "0" ] || { echo "chromium missing and not root: report browser test will skip"; exit 0; }
command -v apt-get >/dev/null 2>&1 || exit 0
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
  || echo "could not install chromium: report browser test will skip"

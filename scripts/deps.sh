#!/usr/bin/env bash
# Install the Debian packages that the build, tests and benchmarks need.
# Idempotent and quiet when nothing is missing. Each part of the project
# lists its packages in scripts/deps.d/*.list (one a line, # comments).
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t want < <(cat deps.d/*.list | sed -e 's/#.*//' -e 's/[[:space:]]//g' | grep -v '^$' | sort -u)
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "deps: installing ${missing[*]}"
SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null || true
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

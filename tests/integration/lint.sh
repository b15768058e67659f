#!/usr/bin/env bash
# Static analysis: cppcheck finds no warning in the C sources.
source "$(dirname "$0")/../lib.sh"
cd "$VDISK_ROOT"
dirs=$(ls -d block formats tools nbd vmm-glue export snapshot dedup qos migrate 2>/dev/null)
out=$(cppcheck --quiet --enable=warning,portability --inline-suppr --std=c11 -D_GNU_SOURCE \
      -Iinclude -I. --suppress=missingIncludeSystem --error-exitcode=1 $dirs 2>&1)
if [ $? -eq 0 ]; then ok "cppcheck: no warnings in $(echo $dirs)"
else fail "cppcheck: no warnings" "$(echo "$out" | head -5 | tr '\n' ' ')"; fi

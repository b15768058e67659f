#!/usr/bin/env bash
# Crash consistency of dynamic VHD (block allocation: footer moved, bitmap,
# BAT) under ~20 SIGKILLs of a writer (tests/crash/crash.sh).
# Writeback only: with cache=none the killed writer's io_uring may keep its
# file (and image lock) open a moment after it is reaped.
here=$(dirname "$0")
bash "$here/../crash/crash.sh" vhd -t writeback "${CRASH_POINTS:-12}"
bash "$here/../crash/crash.sh" vhd -o block_size=64k -t writeback "${CRASH_POINTS:-8}" | sed -E 's/^(not )?ok [0-9]+/&-64k/'

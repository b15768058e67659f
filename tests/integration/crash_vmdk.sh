#!/usr/bin/env bash
# Crash consistency of sparse VMDK (monolithicSparse: grain allocation, the
# redundant directory) under ~20 SIGKILLs of a writer (tests/crash/crash.sh).
# Writeback only: with cache=none the killed writer's io_uring may keep its
# file (and image lock) open a moment after it is reaped.
here=$(dirname "$0")
bash "$here/../crash/crash.sh" vmdk -t writeback "${CRASH_POINTS:-12}"
bash "$here/../crash/crash.sh" vmdk -o zeroed_grain=on -t writeback "${CRASH_POINTS:-8}" | sed -E 's/^(not )?ok [0-9]+/&-zg/'

#!/usr/bin/env bash
# Crash consistency of raw images: 20 SIGKILLs of a writer, for both cache
# modes (tests/crash/crash.sh does the work).
here=$(dirname "$0")
bash "$here/../crash/crash.sh" raw -t writeback -s 32M "${CRASH_POINTS:-12}"
bash "$here/../crash/crash.sh" raw -t none -s 32M "${CRASH_POINTS:-8}" | sed -E 's/^(not )?ok [0-9]+/&-none/'

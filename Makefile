# vdisk — the one build entry point. Everything is found by wildcard, so a new
# source file, format, tool, test or fuzz target needs no edit here:
#   library:   block/ formats/ formats/*/ snapshot/ dedup/ qos/ nbd/ vmm-glue/ migrate/  (*.c)
#   programs:  tools/NAME/*.c            -> $(BUILD)/bin/NAME
#   unit tests tests/unit/test_NAME.c    -> $(BUILD)/tests/test_NAME   (cmocka)
#   fuzzers:   fuzz/fuzz_NAME.c          -> build/fuzz/fuzz_NAME       (libFuzzer)
#   nbdkit:    nbd/plugin/*.c            -> $(BUILD)/lib/nbdkit-vdisk-plugin.so
# `make check` builds everything again with ASan + UBSan into build/check.

BUILD   ?= build
SAN     ?= 0
CC      ?= gcc
PREFIX  ?= /usr/local
DESTDIR ?=
VERSION := 0.1.0

LIB_DIRS := block formats $(wildcard formats/*/) snapshot dedup qos nbd vmm-glue migrate export
LIB_SRCS := $(sort $(foreach d,$(LIB_DIRS),$(wildcard $(d:/=)/*.c)))
PROGS    := $(notdir $(patsubst %/,%,$(wildcard tools/*/)))
UNIT_SRCS:= $(wildcard tests/unit/test_*.c)
HELPER_SRCS := $(wildcard tests/helpers/*.c)
FUZZ_SRCS:= $(wildcard fuzz/fuzz_*.c)
PLUGIN_SRCS := $(wildcard nbd/plugin/*.c)

WARN    := -Wall -Wextra -Werror -Wno-unused-parameter -Wshadow -Wno-missing-field-initializers
CFLAGS  ?= -O2 -g
BASE_CFLAGS := -std=gnu11 $(WARN) -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -Iinclude -I. -fPIC -pthread \
               -DVDISK_VERSION=\"$(VERSION)\"
LIBS    := -luring -laio -lzstd -lz -ldeflate -ljansson -lcrypto -lssl -lnbd -lpthread -lm
# librbd / librados (block/proto_rbd.c) are opened on first use by block/rbd_dl.c
ifeq ($(SAN),1)
  CFLAGS  := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
  LDFLAGS += -fsanitize=address,undefined
endif

LIB_OBJS := $(LIB_SRCS:%.c=$(BUILD)/obj/%.o)
LIB_A    := $(BUILD)/lib/libvdisk.a
LIB_SO   := $(BUILD)/lib/libvdisk.so
BINS     := $(PROGS:%=$(BUILD)/bin/%)
UNITS    := $(UNIT_SRCS:tests/unit/%.c=$(BUILD)/tests/%)
HELPERS  := $(HELPER_SRCS:tests/helpers/%.c=$(BUILD)/tests/helpers/%)
PLUGIN   := $(if $(PLUGIN_SRCS),$(BUILD)/lib/nbdkit-vdisk-plugin.so)

.PHONY: all tests check run bench fuzz fuzz-long crash-long crash-power install clean deps
all: $(LIB_A) $(LIB_SO) $(BINS) $(PLUGIN)
tests: all $(UNITS) $(HELPERS)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(BASE_CFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(LIB_A): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(LIB_SO): $(LIB_OBJS)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $^ $(LIBS)

# Programs link the whole archive so that constructors (format and protocol
# registration) are always kept.
.SECONDEXPANSION:
# Objects of programs are intermediate files to make: keep them (no relinking of everything).
.PRECIOUS: $(BUILD)/obj/%.o
# (no % inside the functions: make replaces it with the stem before expanding them)
$(BUILD)/bin/%: $$(addprefix $(BUILD)/obj/,$$(addsuffix .o,$$(basename $$(wildcard tools/$$*/*.c)))) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $(filter %.o,$^) -Wl,--whole-archive $(LIB_A) -Wl,--no-whole-archive $(LIBS)

$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< -Wl,--whole-archive $(LIB_A) -Wl,--no-whole-archive $(LIBS) -lcmocka

# Test helper programs (tests/helpers/NAME.c -> $(BUILD)/tests/helpers/NAME).
$(BUILD)/tests/helpers/%: $(BUILD)/obj/tests/helpers/%.o $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< -Wl,--whole-archive $(LIB_A) -Wl,--no-whole-archive $(LIBS)

# plfs, the power-loss file system of tests/crash, is a FUSE daemon (libfuse3).
$(BUILD)/tests/helpers/plfs: $(BUILD)/obj/tests/helpers/plfs.o
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< -lfuse3 -lpthread

$(BUILD)/lib/nbdkit-vdisk-plugin.so: $(PLUGIN_SRCS:%.c=$(BUILD)/obj/%.o) $(LIB_A)
	@mkdir -p $(dir $@)
	$(CC) -shared $(LDFLAGS) -o $@ $(filter %.o,$^) -Wl,--whole-archive $(LIB_A) -Wl,--no-whole-archive $(LIBS)

-include $(LIB_OBJS:.o=.d) $(wildcard $(BUILD)/obj/tools/*/*.d $(BUILD)/obj/tests/unit/*.d $(BUILD)/obj/tests/helpers/*.d)

deps:
	@scripts/deps.sh

# The main job: a thin image in ./run, served or shown (scripts/run.sh).
run: deps
	@$(MAKE) --no-print-directory all
	@scripts/run.sh

# Every test, with ASan + UBSan; the last line is "N passed, N failed".
check: deps
	@$(MAKE) --no-print-directory BUILD=build/check SAN=1 tests
	@$(MAKE) --no-print-directory all
	@$(MAKE) --no-print-directory fuzz
	@VDISK_BUILD=build/check VDISK_FUZZ=build/fuzz tests/run.sh

# libFuzzer targets, built with clang against the library sources.
FUZZ_CFLAGS := -std=gnu11 -D_GNU_SOURCE -D_FILE_OFFSET_BITS=64 -Iinclude -I. -pthread -g -O1 \
               -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer -DVDISK_VERSION=\"$(VERSION)\"
FUZZ_LIB_OBJS := $(LIB_SRCS:%.c=build/fuzz/obj/%.o)
FUZZERS := $(FUZZ_SRCS:fuzz/%.c=build/fuzz/%)
fuzz: $(FUZZERS)
build/fuzz/obj/%.o: %.c
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -MMD -MP -c $< -o $@
build/fuzz/fuzz_%: build/fuzz/obj/fuzz/fuzz_%.o $(FUZZ_LIB_OBJS)
	clang -fsanitize=fuzzer,address,undefined -o $@ $^ $(LIBS)
-include $(FUZZ_LIB_OBJS:.o=.d)
# A long campaign (not part of check): FUZZ_SECONDS per target.
fuzz-long: fuzz
	@mkdir -p build/fuzz-artifacts; for f in $(FUZZERS); do n=$$(basename $$f); mkdir -p build/fuzz/corpus-$$n; \
	  $$f -max_total_time=$${FUZZ_SECONDS:-600} -artifact_prefix=build/fuzz-artifacts/ build/fuzz/corpus-$$n fuzz/corpus/$${n#fuzz_} || exit 1; done

# Crash-consistency campaign with many kill points (check runs a short one).
crash-long: all
	@CRASH_POINTS=$${CRASH_POINTS:-1000} tests/crash/run-all.sh

# The same campaign under a simulated power loss (tests/crash/crash.sh -P):
# writes not covered by a completed flush may be lost, each independently.
crash-power: all
	@CRASH_POWER=1 CRASH_POINTS=$${CRASH_POINTS:-200} tests/crash/run-all.sh

bench: deps all
	@bench/run.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include/vdisk $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 755 $(BINS) $(DESTDIR)$(PREFIX)/bin/
	install -m 644 $(LIB_A) $(DESTDIR)$(PREFIX)/lib/
	install -m 755 $(LIB_SO) $(DESTDIR)$(PREFIX)/lib/
	install -m 644 include/vdisk/*.h $(DESTDIR)$(PREFIX)/include/vdisk/
	$(if $(PLUGIN),install -d $(DESTDIR)$(PREFIX)/lib/nbdkit/plugins && install -m 755 $(PLUGIN) $(DESTDIR)$(PREFIX)/lib/nbdkit/plugins/)
	$(if $(wildcard man/*.1),install -m 644 $(wildcard man/*.1) $(DESTDIR)$(PREFIX)/share/man/man1/)
	$(if $(wildcard man/*.8),install -d $(DESTDIR)$(PREFIX)/share/man/man8 && install -m 644 $(wildcard man/*.8) $(DESTDIR)$(PREFIX)/share/man/man8/)
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' vdisk.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/vdisk.pc

clean:
	rm -rf build

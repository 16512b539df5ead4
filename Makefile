# Husk: the two commands a fresh machine needs are `make demo` and `make test`.
# Both set everything up first (idempotent; the guest kernel is cached).

.PHONY: setup build demo test lint fuzz

# Seconds per fuzz target in `make test`; longer runs: make fuzz FUZZ_SECONDS=600
FUZZ_SECONDS ?= 60

setup:
	tools/setup

build:
	cargo build --workspace --all-targets
	tools/build-guest

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fuzz:
	vmm/fuzz/run.sh $(FUZZ_SECONDS)

demo: setup build
	tools/demo

# Fuzzing first, so that cargo test's summary is the last thing printed.
test: setup build lint fuzz
	cargo test --workspace --no-fail-fast

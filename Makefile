# Husk: the two commands a fresh machine needs are `make demo` and `make test`.
# Both set everything up first (idempotent; the guest kernel is cached).

.PHONY: setup build demo test lint

setup:
	tools/setup

build:
	cargo build --workspace --all-targets
	tools/build-guest

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

demo: setup build
	tools/demo

test: setup build lint
	cargo test --workspace --no-fail-fast

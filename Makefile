# Everything runs from a fresh clone: `make serve` (set-up, build, run) and `make test` (set-up, build, test).
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
# tch finds libtorch through the venv's torch package; build.rs bakes its path into the binary's rpath.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)

LISTEN ?= 127.0.0.1:8080
DEVICE ?= auto

.PHONY: setup contract-tools build serve test lint openapi bench bench-serve clean-data

setup:
	bash tools/setup.sh

build: setup
	cargo build --release

serve: build
	./target/release/editserve serve --models-dir models --listen $(LISTEN) --device $(DEVICE)

# The clients the contract tests drive (tests/open_inference.rs, tests/contract.rs) in .venv-contract.
contract-tools:
	bash tools/contract_tools.sh

test: setup contract-tools lint
	cargo test --release

# Formatting (rustfmt.toml) and clippy, warnings as errors: part of `make test`, so CI runs them.
lint: setup
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings

# openapi.yaml is generated from the handlers and types (tests/openapi.rs fails when it is stale).
openapi: build
	./target/release/editserve openapi > openapi.yaml

bench: build
	cargo bench --bench http_throughput

# editserve beside TorchServe 0.12 under the same load (needs the Debian package wrk; sets up TorchServe's venv).
bench-serve: build
	python3 benches/serve_compare.py

clean-data:
	rm -rf models data

# The two commands of the README: `make demo` and `make test`. Both start the local services
# first (PostgreSQL and the AWS emulator), installing them where they are missing.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
ENV := source scripts/env.sh

.PHONY: demo test services lint fmt vectors-check fuzz fuzz-ci

services:
	scripts/services up

## Set everything up and ingest the 100 sample messages, then show what landed.
demo: services
	$(ENV); cargo build --locked --bins
	$(ENV); target/debug/rotate-keys init
	$(ENV); target/debug/loadgen --file tests/data/sample_data.jsonl
	$(ENV); target/debug/ingest --drain
	$(ENV); psql "$$DATABASE_URL" -c "SELECT user_id, device_type, left(masked_ip, 16) AS masked_ip, left(masked_device_id, 16) AS masked_device_id, locale, app_version, create_date FROM user_logins ORDER BY id DESC LIMIT 10" \
	  -c "SELECT count(*) AS logins, count(DISTINCT masked_ip) AS distinct_ips, count(*) FILTER (WHERE locale IS NULL) AS null_locales FROM user_logins" \
	  -c "SELECT message_id, reason FROM quarantine ORDER BY id DESC LIMIT 5"

## Run the whole test suite against the real services.
test: services
	$(ENV); cargo test --locked --no-fail-fast --lib --bins --tests

## Rust formatting and lints; cfn-lint on the CloudFormation templates, and their policies held
## to keys/ (deploy/policies.py).
lint:
	cargo fmt --check
	cargo clippy --locked --all-targets -- -D warnings
	scripts/check-compose --static
	test -x .venv-lint/bin/python || python3 -m venv .venv-lint
	.venv-lint/bin/pip install --quiet --disable-pip-version-check -r deploy/requirements-lint.txt
	.venv-lint/bin/cfn-lint deploy/*.yaml
	.venv-lint/bin/python deploy/policies.py --check

## Re-derive tests/data/vectors/ with the independent Python implementation of docs/FORMAT.md
## and compare; also opens and verifies the fixtures an earlier version wrote.
vectors-check:
	test -x .venv-vectors/bin/python || python3 -m venv .venv-vectors
	.venv-vectors/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements-vectors.txt
	.venv-vectors/bin/python scripts/format-vectors.py --check

## Fuzz every target for 60 s each (FUZZ_SECONDS to change); needs nightly and cargo-fuzz.
FUZZ_SECONDS ?= 60
fuzz:
	scripts/fuzz $(FUZZ_SECONDS)

## The short run for CI: 15 s per target, fails on a crash or a missing tool.
fuzz-ci:
	scripts/fuzz --ci

# The two commands of the README: `make demo` and `make test`. Both start the local services
# first (PostgreSQL and the AWS emulator), installing them where they are missing.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
ENV := source scripts/env.sh

.PHONY: demo test test-unit services lint fmt vectors-check fuzz fuzz-ci

services:
	scripts/services up

# Local debug builds of the binaries are made as `cargo test` makes them, with the test kit
# (the `testing` feature, Cargo.toml) on: one build of this crate serves both, so `make test`
# after `make demo` compiles only the test harnesses. Release builds never turn it on.
AS_TESTS_BUILD := --features testing

## Set everything up and ingest the 100 sample messages, then show what landed.
demo: services
	$(ENV); cargo build --locked --bins $(AS_TESTS_BUILD)
	$(ENV); target/debug/rotate-keys init
	$(ENV); target/debug/loadgen --file tests/data/sample_data.jsonl
	$(ENV); target/debug/ingest --drain
	$(ENV); psql "$$DATABASE_URL" -c "SELECT user_id, device_type, left(masked_ip, 16) AS masked_ip, left(masked_device_id, 16) AS masked_device_id, locale, app_version, create_date FROM user_logins ORDER BY id DESC LIMIT 10" \
	  -c "SELECT count(*) AS logins, count(DISTINCT masked_ip) AS distinct_ips, count(*) FILTER (WHERE locale IS NULL) AS null_locales FROM user_logins" \
	  -c "SELECT message_id, reason FROM quarantine ORDER BY id DESC LIMIT 5"

## Run the whole test suite against the real services.
test: services
	$(ENV); cargo test --locked --no-fail-fast --lib --bins --tests

## Every test that needs no service, in under a minute after a build: the library's and the
## binaries' unit tests, and the KMS and IAM policies held claim by claim (the integration
## tests' `keys` module). PostgreSQL and AWS point at a closed port, so that a test that needs
## a service fails here instead of finding one.
CLOSED := 127.0.0.1:1
NO_SERVICES := DATABASE_URL=postgres://pii_vault:pii_vault@$(CLOSED)/pii_vault \
	ROLE_ADMIN_DATABASE_URL=postgres://pii_vault_roleadmin:pii_vault_roleadmin@$(CLOSED)/pii_vault \
	AWS_ENDPOINT_URL=http://$(CLOSED) AWS_EC2_METADATA_DISABLED=true AWS_REGION=us-east-1 \
	AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
test-unit:
	@if (: </dev/tcp/$(subst :,/,$(CLOSED))) 2>/dev/null; then echo "$(CLOSED) is open: test-unit needs it closed"; exit 1; fi
	$(NO_SERVICES) cargo test --locked --no-fail-fast --lib --bins
	$(NO_SERVICES) cargo test --locked --no-fail-fast --test integration keys::

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

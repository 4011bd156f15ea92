# syntax=docker/dockerfile:1
# pii-vault's four binaries (ingest, rotate-keys, unmask, loadgen) on Debian slim, as a non-root
# user, with `ingest` as the entrypoint:
#
#   docker build -t pii-vault .
#   docker run --rm pii-vault --help
#   docker run --rm --entrypoint rotate-keys -e DATABASE_URL=... pii-vault init
#
# The cache mounts below need BuildKit, the default builder of Docker 23+ and of docker compose.

# Base images are pinned by digest as well as by tag, so that a rebuilt tag upstream cannot
# change what is built. To move to a newer one, take the digest of its tag (the index digest,
# which covers every platform):
#   docker buildx imagetools inspect rust:1.95.0-bookworm     (the "Digest:" line)
#
# The toolchain the project is built and tested with (rust-version in Cargo.toml is the
# oldest that compiles it), on the same Debian release as the runtime stage, so the binaries
# link against the glibc they run on.
FROM rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
WORKDIR /app

# Only what `cargo build --bins` reads. migrations/ is compiled into the binaries
# (sqlx::migrate!), and benches/ is needed because Cargo.toml declares a [[bench]] target:
# cargo refuses a manifest whose target file is missing, even when not building it. .sqlx/
# holds what the checked queries (`sqlx::query_as!`) are checked against, and .cargo/ says to
# read it instead of connecting to a database.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY .sqlx ./.sqlx
COPY benches ./benches
COPY migrations ./migrations
COPY src ./src

# Dependencies are cached in BuildKit cache mounts (registry and target/) instead of a layer
# built from dummy sources: no stub files to keep in step with the four binaries and the
# bench, and a source change rebuilds only this crate. target/ exists only during this RUN,
# so the binaries are copied out of it here.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/app/target,sharing=locked \
    cargo build --release --locked --bins \
    && install -D -m 0755 -t /out \
        target/release/ingest target/release/rotate-keys target/release/unmask target/release/loadgen

# A dated bookworm-slim: the same Debian point release on every build until this line moves.
FROM debian:bookworm-20260918-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

# ca-certificates: the AWS SDK's HTTPS client trusts the system's root certificates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid, so volume permissions and Kubernetes' runAsNonRoot (which needs a numeric
# USER to verify) do not depend on the order users were created in.
RUN groupadd --system --gid 10001 pii-vault \
    && useradd --system --uid 10001 --gid pii-vault --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pii-vault

COPY --from=builder /out/ /usr/local/bin/

# Numeric form of pii-vault:pii-vault (see above).
USER 10001:10001

# Exec form: ingest is PID 1 and receives `docker stop`'s SIGTERM itself, which starts its
# graceful shutdown (commit and delete what was received, within --shutdown-deadline).
ENTRYPOINT ["ingest"]

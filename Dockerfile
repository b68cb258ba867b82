# syntax=docker/dockerfile:1
#
# letro-server container image: a release build on the official Rust image, run as a
# non-root user on distroless (glibc, libgcc and CA certificates, no shell).
#
#   docker build --build-arg LETRO_BUILD_COMMIT=$(git rev-parse --short=12 HEAD) -t letro-server .
#   docker run -p 8080:8080 -v letro-data:/var/lib/letro letro-server
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts. This file is
# checked by `cargo test --test it deploy` (parsed, not built); see deploy/README.md.

# The toolchain: at least Cargo.toml's rust-version (edition 2024).
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
# The commit the image is built from, for `letro_build_info{commit}`: build.rs reads it
# from the environment (the context has no .git, so without it the metric says
# "unknown").
ARG LETRO_BUILD_COMMIT=unknown
WORKDIR /build
# What the release binary needs, and the workspace's other members (the veraid crate, the
# test kit and the benchmark: cargo reads every member's manifest and targets, and builds only the
# server); tests/ and fuzz/ are not part of it.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY testkit ./testkit
COPY veraid/Cargo.toml ./veraid/
COPY veraid/src ./veraid/src
COPY bench/Cargo.toml ./bench/
COPY bench/src ./bench/src
# The registry and target directory live in BuildKit caches, so a source change
# recompiles only this crate; the binary is copied out of the cache mount, which is not
# part of the image.
RUN --mount=type=cache,id=letro-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=letro-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=letro-target,target=/build/target,sharing=locked \
    LETRO_BUILD_COMMIT="${LETRO_BUILD_COMMIT}" \
    cargo build --release --locked --bin letro-server \
    && install -D -m 0755 target/release/letro-server /out/letro-server
# The SQLite data directory, created here because the runtime image has no shell; it is
# copied with the runtime user as owner.
RUN mkdir -p /out/data/letro

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="letro-server" \
      org.opencontainers.image.description="Contact-pairing broker for Letro, the messaging app of the Awala network" \
      org.opencontainers.image.licenses="MIT"
COPY --from=builder /out/letro-server /usr/local/bin/letro-server
COPY --from=builder --chown=65532:65532 /out/data/ /var/lib/
# The default database is a SQLite file in a volume that the runtime user owns (the
# binary's own default, sqlite://letro.db, is relative to the working directory, which
# is not writable here). Several replicas need PostgreSQL instead: set DATABASE_URL.
ENV DATABASE_URL=sqlite:///var/lib/letro/letro.db
ENV LETRO_LOG_FORMAT=json
VOLUME ["/var/lib/letro"]
# The server listens on 0.0.0.0:$PORT, 8080 by default.
EXPOSE 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/letro-server"]
CMD ["serve"]

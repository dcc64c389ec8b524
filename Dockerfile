# cluster-store: a multi-stage build of the `node` binary.
# The base images are arguments so that machines without a registry can
# point them at images they built themselves (scripts/docker-base-images.sh).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source change. Stubs stand
# in for the targets Cargo.toml declares (the library, `node`, and every
# `name = "..."` there as a bench: cargo wants each declared target's file
# to exist, and a stub too many is harmless).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches \
    && touch src/lib.rs \
    && echo 'fn main() {}' > src/bin/node.rs \
    && for bench in $(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml); do echo 'fn main() {}' > "benches/$bench.rs"; done \
    && cargo build --release --locked --bin node \
    && rm -rf src benches
COPY src ./src
# Declared in Cargo.toml; not built here.
COPY benches ./benches
# COPY keeps the files' own times, which may be older than the stubs' build:
# touch the crate roots so cargo rebuilds this crate (and only this crate).
RUN touch src/lib.rs src/bin/node.rs \
    && cargo build --release --locked --bin node

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cluster-store --create-home cluster-store \
    && mkdir -p /data /certs /shared_data \
    && chown cluster-store:cluster-store /data /certs /shared_data
COPY --from=builder /src/target/release/node /usr/local/bin/node
USER cluster-store
ENV NODE_DATA=/data NODE_CERTS=/certs
# 7000: QUIC (peers, clients) and TLS over TCP (clients, the default); 8000: HTTP.
EXPOSE 7000/udp 7000/tcp 8000
VOLUME ["/data"]
ENTRYPOINT ["/usr/local/bin/node"]

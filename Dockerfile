# cluster-store: a multi-stage build of the `node` binary.
# The base images are arguments so that machines without a registry can
# point them at images they built themselves (scripts/docker-base-images.sh).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Declared in Cargo.toml; not built here.
COPY benches ./benches
RUN cargo build --release --locked --bin node

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cluster-store --create-home cluster-store \
    && mkdir -p /data /certs /shared_data \
    && chown cluster-store:cluster-store /data /certs /shared_data
COPY --from=builder /src/target/release/node /usr/local/bin/node
USER cluster-store
ENV NODE_DATA=/data NODE_CERTS=/certs
EXPOSE 7000 8000
VOLUME ["/data"]
ENTRYPOINT ["/usr/local/bin/node"]

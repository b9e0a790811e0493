# Build stage: a release binary from the locked dependencies.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin weir

# Run stage: a small image, a non-root user, data on a volume.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/weir --shell /usr/sbin/nologin weir \
    && mkdir -p /var/lib/weir /etc/weir \
    && chown weir:weir /var/lib/weir
COPY --from=build /src/target/release/weir /usr/local/bin/weir
COPY broker.toml /etc/weir/broker.toml
USER weir
VOLUME ["/var/lib/weir"]
# 7451: the cluster listener, used only with a [cluster] table.
EXPOSE 7450 7451 9464
# `weir serve` stops gracefully on SIGTERM (docker stop).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve", "--config", "/etc/weir/broker.toml", "--data-dir", "/var/lib/weir", "--listen", "0.0.0.0:7450", "--metrics-addr", "0.0.0.0:9464"]

# A small image of the `hello` example (any binary built on the cluster crate works the same).
#   docker build -t hello .
#   docker run --rm -p 8080:8080 -p 9100:9100 hello
# The master runs as PID 1: it then reaps orphaned processes and forwards signals through an
# init of its own, so no tini is needed; `docker stop` (SIGTERM) is a graceful stop.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p examples --bin hello -p cluster-cli \
 && strip target/release/hello target/release/clusterctl

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --user-group --no-create-home hello
COPY --from=build /src/target/release/hello /usr/local/bin/hello
COPY --from=build /src/target/release/clusterctl /usr/local/bin/clusterctl
USER hello
ENV HOST=0.0.0.0 PORT=8080 CLUSTER_ADMIN_ADDR=0.0.0.0:9100 CLUSTER_LOG_FORMAT=json
EXPOSE 8080 9100
ENTRYPOINT ["/usr/local/bin/hello"]

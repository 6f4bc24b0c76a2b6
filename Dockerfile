# protloc: `docker run IMAGE serve` answers /ping and /invocations on port 8080 with the model
# in /opt/ml/model (the bring-your-own-container convention of managed ML endpoints).
#
#   docker build -t protloc .
#   docker run -p 8080:8080 -v $PWD/run:/opt/ml/model:ro protloc serve
#   docker run protloc train --help            # every other subcommand works too
#
# Settings come from flags after `serve` or from the environment (PROTLOC_MODEL,
# PROTLOC_HOST, PROTLOC_PORT, PROTLOC_API_KEY, PROTLOC_THREADS, PROTLOC_LOG).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      pkg-config libfontconfig1-dev libfreetype-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so edits to src/ reuse the cached dependency layer. Cargo parses every
# target Cargo.toml declares, so each one needs a file here: the library and binary, every
# [[bench]] (bench/rust/NAME.rs) and every [[test]] path. The test stubs stay (the image builds
# no tests; tests/ is not copied). tools/check-dockerfile.sh, run by .ci/run, replays this
# stage and the next with `cargo check`, so a target added without a stub fails CI.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src bench/rust tests/real_data \
 && for f in src/main.rs bench/rust/serve_load.rs bench/rust/encoder.rs tests/real_data/main.rs; do \
      echo 'fn main() {}' > "$f"; \
    done \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src bench
COPY src ./src
COPY bench/rust ./bench/rust
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin protloc \
 && strip target/release/protloc

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libfontconfig1 libfreetype6 fonts-dejavu-core ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent protloc \
 && mkdir -p /opt/ml/model
COPY --from=build /src/target/release/protloc /usr/local/bin/protloc
ENV PROTLOC_MODEL=/opt/ml/model \
    PROTLOC_HOST=0.0.0.0 \
    PROTLOC_PORT=8080 \
    PROTLOC_LOG=info
USER protloc
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["protloc"]
CMD ["serve"]

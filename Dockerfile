# syntax=docker/dockerfile:1
# The agent image: `docker build -t lb-agent:0.2.0 .`
#
# Stage 1 builds the eBPF object and the agent with the pinned toolchains
# (the same `cargo xtask setup` the developers use); stage 2 ships the binary
# on a small Debian runtime.

FROM debian:bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates curl gcc libc6-dev \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Installs Rust 1.99.0, nightly-2026-07-01 + rust-src, LLVM 22 and bpf-linker.
RUN ./x setup
RUN cargo build --release --locked --package lb-userspace --bin lb-agent

FROM debian:bookworm-slim
# No shell tools are needed at run time; ca-certificates for the API server.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/lb-agent /usr/local/bin/lb-agent
ENTRYPOINT ["/usr/local/bin/lb-agent"]
CMD ["run", "--kubernetes"]

# infergate container image: a multi-stage build (Rust toolchain, then a
# distroless runtime with only libc and libgcc). The runtime runs as the
# non-root user 65532 and listens on 8080 (OpenAI API) and 9090 (admin: status
# page, /metrics, probes), as deploy/base/deployment.yaml expects.
#
#   podman build -t ghcr.io/infergate/infergate:0.1.0 .     (or docker build)
#
# tests/dockerfile.rs keeps this file in step with the manifests.

# --- build: the release binary
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Only what the binary is built from (its crates, main, the embedded quickstart
# config); the registry and target directories are build caches.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY src ./src
COPY config ./config
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin infergate \
 && install -D -m 0755 target/release/infergate /out/infergate

# --- runtime: distroless (no shell, no package manager), user 65532
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/infergate /usr/local/bin/infergate
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/infergate"]
# Kubernetes passes its own args (serve --configmap=...); standalone, mount a
# config file at /etc/infergate/config.yaml.
CMD ["serve", "--config", "/etc/infergate/config.yaml"]

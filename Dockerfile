# syntax=docker/dockerfile:1
#
# The fusioncache-operator image: a static (musl) binary on distroless, running as non-root.
#
#   docker build -t ghcr.io/fusioncache-rs/fusioncache-operator:0.1.0 .
#   docker run --rm ghcr.io/fusioncache-rs/fusioncache-operator:0.1.0 crd     # prints the CRD
#
# Builds natively for the build platform's architecture (amd64 or arm64; with buildx,
# --platform linux/arm64 on an arm64 builder or under emulation).

ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS builder
ARG TARGETARCH
# musl-tools: the C compiler for ring (rustls' crypto), so the binary links statically.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
RUN case "${TARGETARCH:-amd64}" in \
      amd64) echo x86_64-unknown-linux-musl ;; \
      arm64) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac > /rust-target \
 && rustup target add "$(cat /rust-target)"
WORKDIR /src
COPY . .
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_LTO=thin \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=4 \
    CC_x86_64_unknown_linux_musl=musl-gcc \
    CC_aarch64_unknown_linux_musl=musl-gcc
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    target="$(cat /rust-target)" \
 && cargo build --locked --release -p fusioncache-operator --bin fusioncache-operator --target "$target" \
 && cp "target/$target/release/fusioncache-operator" /fusioncache-operator \
 && /fusioncache-operator --help >/dev/null

FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="fusioncache-operator" \
      org.opencontainers.image.description="Kubernetes operator that provisions FusionCache backplane channels and Redis/NATS endpoints" \
      org.opencontainers.image.source="https://github.com/fusioncache-rs/fusioncache-rs" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=builder /fusioncache-operator /usr/local/bin/fusioncache-operator
# distroless' nonroot user; the chart's pod securityContext runs as the same uid/gid.
USER 65532:65532
# /healthz, /readyz, /metrics
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fusioncache-operator"]
CMD ["run"]

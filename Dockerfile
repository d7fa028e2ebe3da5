# handover as an edge container: one static (musl) binary in an otherwise empty image.
# No shell, no CA bundle (the webpki roots are compiled in), non-root (65532), fit for
# a read-only root filesystem.
#
#   docker build -t handover .
#       compiles the binary in the official Rust image (needs an image registry);
#   cargo build --release --target x86_64-unknown-linux-musl   # with CARGO_PROFILE_RELEASE_STRIP=debuginfo
#   DOCKER_BUILDKIT=1 docker build -t handover --build-arg BINARY=prebuilt .
#       puts a binary compiled beforehand into the same final stage (CI, which reaches
#       no registry: with BuildKit, the unused `source` stage is never pulled).
#
#   docker run --rm --read-only --cap-drop ALL -p 8080:8080 \
#     -v "$PWD/handover.toml:/etc/handover/handover.toml:ro" \
#     -v "$PWD/secrets:/run/secrets/genesys:ro" handover
#
# The config is read from $HANDOVER_CONFIG (/etc/handover/handover.toml); the secret
# from wherever its client_secret_file says. The health check is `handover probe`.

# Where the binary comes from: `source` (compiled here) or `prebuilt` (the build
# context's target/x86_64-unknown-linux-musl/release/handover).
ARG BINARY=source

FROM rust:1.95-slim-bookworm AS source
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
# Cargo.toml names the benches; cargo wants their files even to build the binary.
COPY benches benches
# Symbols stay (readable backtraces), debug info goes: ~11 MB instead of ~54 MB.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN target="$(uname -m)-unknown-linux-musl" \
 && rustup target add "$target" \
 && cargo build --release --locked --target "$target" --bin handover \
 && mkdir /out \
 && cp "target/$target/release/handover" /out/handover

FROM scratch AS prebuilt
# Cargo.toml makes the wildcard optional, so that a builder that runs every stage
# (the legacy one) does not fail here when no binary was built beforehand.
COPY Cargo.toml target/x86_64-unknown-linux-musl/release/handove[r] /out/

FROM ${BINARY} AS binary

FROM scratch
COPY --from=binary /out/handover /handover
USER 65532:65532
ENV HANDOVER_CONFIG=/etc/handover/handover.toml
# Client port and admin port, as in deploy/kubernetes/handover.toml.
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["/handover", "probe"]
ENTRYPOINT ["/handover"]
CMD ["serve"]

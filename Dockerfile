# localkms container image.
#   docker build -t localkms:dev .
# Only cargo is needed to build: the protos are compiled by protox (pure Rust), no protoc.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin localkms

# glibc + libgcc only; no shell, no package manager. Built on bookworm to match debian12's glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/localkms /usr/local/bin/localkms
# The default user is non-root (65532). The static Pod overrides it with runAsUser: 0 because
# the host key files are root-owned 0600 (see deploy/kubernetes/localkms.yaml).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/localkms"]
CMD ["serve", "--socket", "unix:///var/run/localkms/kms.sock", "--keystore", "/etc/localkms/keystore.lkms", "--root-key-file", "/etc/localkms/root.key", "--metrics-addr", "127.0.0.1:9464"]

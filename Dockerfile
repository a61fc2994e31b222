# One image with both programs: `switchyard` (the operator, and the command) and `switchyard-stage`
# (the runtime every unit runs; pods copy it into their own image with an init container).
#
#   docker build -t ghcr.io/switchyard-dev/switchyard:0.1.0 .
#
# The binaries are static (musl), so the runtime also works in images without glibc (Alpine).

FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crds crds
COPY platform platform
COPY stage-runtime stage-runtime
COPY operator operator
COPY local local
COPY cli cli
COPY bench bench
COPY e2e e2e
# Small binaries: no debug info in the image.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=true
RUN cargo build --release --locked --bin switchyard --bin switchyard-stage

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/release/switchyard /switchyard
COPY --from=build /src/target/release/switchyard-stage /switchyard-stage
USER 65532:65532
ENTRYPOINT ["/switchyard"]
CMD ["operator"]

# `llama serve` in a container. The model is not baked in: mount it at /models.
#   docker build -t llama-rs .
#   docker run -p 8080:8080 -v ~/.cache/llama-rs/models:/models:ro llama-rs \
#       --model /models/smollm2-135m-instruct-q4_1.gguf
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Portable x86-64 code: the block kernels pick AVX2/AVX-512 at run time.
RUN cargo build --release --locked --bin llama

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 llama
COPY --from=build /src/target/release/llama /usr/local/bin/llama
USER llama
EXPOSE 8080
# Listens on every interface inside the container; publish the port to choose who
# reaches it, and set LLAMA_API_KEY to require a key.
ENTRYPOINT ["llama", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--model", "/models/model.gguf"]

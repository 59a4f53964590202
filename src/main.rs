//! The `llama` binary; see `llama --help`.
fn main() -> std::process::ExitCode {
    llama_cli::main()
}

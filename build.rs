//! Link options of the `llama` binary.
fn main() {
    // Pack the binary's relative relocations (DT_RELR, glibc 2.36+ and binutils 2.38+):
    // the loader otherwise reads a 4.7 MB relocation table at every start, and those
    // pages stay in the process's resident memory.
    let target = std::env::var("TARGET").unwrap_or_default();
    if target.contains("linux-gnu") && !target.starts_with("arm") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

//! Compiles `proto/echo.proto` and `proto/library.proto` without `protoc`: `protox` parses
//! them into a descriptor set in pure Rust, and `tonic-prost-build` generates the messages, client and server from that set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/echo.proto", "proto/library.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

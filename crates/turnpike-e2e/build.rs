//! Compiles `proto/echo.proto` without `protoc`: `protox` parses it into a descriptor set in
//! pure Rust, and `tonic-prost-build` generates the messages, client and server from that set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let fds = protox::compile(["proto/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

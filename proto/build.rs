//! Compiles proto/smelt/v1/*.proto with protox (pure Rust: no protoc needed
//! for our own protos).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["smelt/v1/smelt.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=smelt");
    Ok(())
}

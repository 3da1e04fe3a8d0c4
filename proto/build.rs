fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/coffer/v1/coffer.proto");
    tonic_prost_build::configure()
        // `bytes` fields become `bytes::Bytes`: chunk payloads are sliced out of the receive
        // buffer instead of copied.
        .bytes(".")
        .compile_protos(&["proto/coffer/v1/coffer.proto"], &["proto"])?;
    Ok(())
}

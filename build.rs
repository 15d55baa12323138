//! Compiles the gRPC contracts in `proto/`: the CSI specification's services and the
//! controller-to-node contract. protoc comes from the protoc-bin-vendored crate, so a
//! build needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC after this.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                std::path::PathBuf::from("proto/csi.proto"),
                "proto/snapblk_node.proto".into(),
            ],
            &["proto".into(), include],
        )?;
    Ok(())
}

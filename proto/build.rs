//! Compiles the `.proto` files with protox (pure Rust, no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "protos/workload.proto",
        "protos/tessera/node.proto",
        "protos/tessera/admin.proto",
        "protos/grpc/health/v1/health.proto",
    ];
    for file in files.iter().chain(["protos/tessera/types.proto"].iter()) {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["protos"])?;
    tonic_prost_build::configure()
        // Sorted, so that an entry encodes the same every time: a
        // proposal's content hash is taken over its encoding.
        .btree_map(".tessera.types.v1.Entry.labels")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

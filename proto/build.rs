//! Generates the epserve.v1 code into OUT_DIR (never committed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=epserve");
    tonic_prost_build::configure()
        .bytes(".epserve.v1")
        .compile_protos(&["epserve/v1/expert.proto", "epserve/v1/coordinator.proto"], &["."])?;
    Ok(())
}

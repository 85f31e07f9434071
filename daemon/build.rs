//! With the `cuda` feature, compiles the fixed decode step's fused kernels
//! (kernels/decode_step.cu) to PTX, as Candle's own kernels are built; the
//! driver JIT-compiles it for the GPU at first use.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        cudaforge::KernelBuilder::new()
            .source_files(["kernels/decode_step.cu"])
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx()
            .expect("nvcc: the decode step's kernels")
            .write(out.join("decode_step_ptx.rs"))
            .expect("writing the kernels' module");
    }
}

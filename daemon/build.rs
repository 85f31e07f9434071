//! With the `cuda` feature, compiles our kernels to PTX, as Candle's own
//! kernels are built: the fixed decode step's fused kernels
//! (kernels/decode_step.cu) and device sampling (kernels/sample.cu). The
//! driver JIT-compiles them for the GPU at first use.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        for name in ["decode_step", "sample"] {
            cudaforge::KernelBuilder::new()
                .source_files([format!("kernels/{name}.cu")])
                .arg("-std=c++17")
                .arg("-O3")
                .build_ptx()
                .unwrap_or_else(|e| panic!("nvcc: kernels/{name}.cu: {e}"))
                .write(out.join(format!("{name}_ptx.rs")))
                .expect("writing the kernels' module");
        }
    }
}

//! Choosing a compute device: `cpu`, `cuda[:N]` or `metal[:N]`.
//!
//! The backends are Cargo features wired as Candle's examples wire them
//! (`cuda`, `metal`, `mkl`, `accelerate`); asking for one this build lacks is
//! an error that says which feature to build with.

use candle_core::Device;

use super::error::EngineError;

/// What a device option names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl DeviceSpec {
    /// Parse `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`.
    pub fn parse(s: &str) -> Result<Self, EngineError> {
        let bad = || {
            EngineError::InvalidParams(format!(
                "device `{s}`: expected cpu, cuda, cuda:N, metal or metal:N"
            ))
        };
        let (kind, index) = match s.trim().split_once(':') {
            Some((k, n)) => (k, n.parse::<usize>().map_err(|_| bad())?),
            None => (s.trim(), 0),
        };
        match kind.to_ascii_lowercase().as_str() {
            "cpu" if index == 0 => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(index)),
            "metal" => Ok(DeviceSpec::Metal(index)),
            _ => Err(bad()),
        }
    }

    /// The Candle device, or an error naming the missing feature.
    pub fn open(self) -> Result<Device, EngineError> {
        let missing = |feature: &str| {
            EngineError::InvalidParams(format!(
                "this build has no {feature} support: rebuild with `--features {feature}`"
            ))
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !cfg!(feature = "cuda") => Err(missing("cuda")),
            DeviceSpec::Cuda(n) => Ok(Device::new_cuda(n)?),
            DeviceSpec::Metal(_) if !cfg!(feature = "metal") => Err(missing("metal")),
            DeviceSpec::Metal(n) => Ok(Device::new_metal(n)?),
        }
    }
}

/// A CUDA device's free and total memory in bytes (`None` on other devices).
pub fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = device.as_cuda_device() {
        return cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64));
    }
    let _ = device;
    None
}

/// The backends compiled into this build, for `--version`-style reports.
pub fn compiled_backends() -> Vec<&'static str> {
    [
        (true, "cpu"),
        (cfg!(feature = "cuda"), "cuda"),
        (cfg!(feature = "metal"), "metal"),
        (cfg!(feature = "mkl"), "mkl"),
        (cfg!(feature = "accelerate"), "accelerate"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect()
}

/// The device address of `t`'s first element (a dense F32, F64, U32 or U8
/// tensor on CUDA), for our kernels' launches. The tensor must outlive
/// the launch that reads it.
#[cfg(feature = "cuda")]
pub fn cuda_address(t: &candle_core::Tensor) -> Result<u64, EngineError> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{DType, Storage};

    fn base<T: candle_core::cuda_backend::CudaDType>(c: &CudaStorage) -> Result<u64, EngineError> {
        let s = c.as_cuda_slice::<T>()?;
        Ok(s.device_ptr(s.stream()).0)
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else {
        return Err(EngineError::Candle(candle_core::Error::Msg(
            "a kernel's tensor is not on CUDA".into(),
        )));
    };
    let base = match t.dtype() {
        DType::F32 => base::<f32>(c)?,
        DType::F64 => base::<f64>(c)?,
        DType::U32 => base::<u32>(c)?,
        DType::U8 => base::<u8>(c)?,
        d => {
            return Err(EngineError::Candle(candle_core::Error::Msg(format!(
                "a kernel's tensor of {d:?}"
            ))))
        }
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options_parse() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("CUDA").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:1").unwrap(), DeviceSpec::Cuda(1));
        assert_eq!(DeviceSpec::parse("metal").unwrap(), DeviceSpec::Metal(0));
        for bad in ["gpu", "cuda:x", "cpu:1", ""] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad}");
        }
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}

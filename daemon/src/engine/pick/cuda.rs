//! Sampling on a CUDA device (`daemon/kernels/sample.cu`): top-k of any
//! size, min-p, top-p and temperature over the whole row, and the draw, in
//! one kernel that returns the token. The host's arithmetic in the host's
//! order over the few candidates that can survive the filters, so a seed
//! draws what [`Sampler::sample`](super::Sampler::sample) draws from the
//! row; when the candidates cannot decide (a flat row, thousands of them)
//! the host does, with the same uniform number.

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{DType, Device, Tensor};

use super::{DrawRow, UNDECIDED};
use crate::engine::device::cuda_address;
use crate::engine::error::EngineError;
use crate::engine::SamplingParams;

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/sample_ptx.rs"));
}

const MODULE: &str = "paraphym_sample";
/// The kernel's block (a row per block).
const THREADS: u32 = 1024;

fn msg(m: impl Into<String>) -> EngineError {
    EngineError::Candle(candle_core::Error::Msg(m.into()))
}

/// The token `params` draw from the f32 logits `row` (1-D, on CUDA) with
/// the uniform number `r` in [0, 1); `None` when the host must decide (no
/// finite logit, too many candidates, a row not on CUDA). Sampling
/// settings only: no penalty, a temperature above zero.
pub fn draw(row: &Tensor, params: &SamplingParams, r: f64) -> Result<Option<u32>, EngineError> {
    if !row.device().is_cuda() {
        return Ok(None);
    }
    // The step's kernel with one row: `token` and `drawn` both get it.
    let both = Tensor::zeros(2, DType::U32, row.device())?;
    let (token, drawn) = (both.narrow(0, 0, 1)?, both.narrow(0, 1, 1)?);
    let row = row.reshape((1, ()))?;
    draw_rows(&row, &[Some(DrawRow::of(params, r))], &token, &drawn)?;
    let token = both.to_vec1::<u32>()?[1];
    Ok((token != UNDECIDED).then_some(token))
}

/// A step's sampled rows, one launch: row `r` of `logits` (rows, vocab)
/// with `draws[r]` (`None`: greedy, left alone). Each drawn token replaces
/// `token[r]` (what the next step runs) and goes to `drawn[r]`, which gets
/// [`UNDECIDED`] where the host must choose (`token[r]` then keeps the
/// greedy token).
pub fn draw_rows(
    logits: &Tensor,
    draws: &[Option<DrawRow>],
    token: &Tensor,
    drawn: &Tensor,
) -> Result<(), EngineError> {
    let Device::Cuda(dev) = logits.device() else {
        return Err(msg("device sampling: the logits are not on CUDA"));
    };
    let rows = draws.len();
    let logits = if logits.stride().last() == Some(&1) {
        logits.clone()
    } else {
        logits.contiguous()?
    };
    let (stride, n) = (logits.stride()[0] as i32, logits.dim(1)? as i32);
    let settings: Vec<f64> = draws
        .iter()
        .flat_map(|d| d.map_or([0.0; 5], |d| d.0))
        .collect();
    let settings = Tensor::new(settings, logits.device())?;
    let (x, d, t, o) = (
        cuda_address(&logits)?,
        cuda_address(&settings)?,
        cuda_address(token)?,
        cuda_address(drawn)?,
    );
    let func = dev.get_or_load_custom_func("sample_rows_f32", MODULE, ptx::SAMPLE)?;
    let mut b = func.builder();
    b.arg(&x);
    b.arg(&stride);
    b.arg(&n);
    b.arg(&d);
    b.arg(&t);
    b.arg(&o);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.map_err(|e| msg(format!("sample_rows_f32: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::sampling::Sampler;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// A language model's kind of row: a few tokens far ahead, a long tail.
    fn peaked_row(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u: f32 = rng.random_range(0.0f32..1.0);
                // Mostly around 0, a thin head up to ~25.
                -2.0 + 27.0 * u.powi(60) + rng.random_range(-1.0f32..1.0)
            })
            .collect()
    }

    #[test]
    fn the_device_draws_what_the_host_draws() {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let settings = [
            (40, 0.95, 0.05, 0.8),
            (0, 0.95, 0.0, 0.8),
            (0, 0.9, 0.05, 1.0),
            (0, 1.0, 0.05, 0.7),
            (0, 0.5, 0.0, 1.5),
            (0, 1.0, 0.2, 1.0),
            (100, 0.95, 0.05, 0.8),
            (1000, 1.0, 0.0, 1.0),
            (200, 0.8, 0.0, 1.2),
            (200, 1.0, 0.0, 1.0),
        ];
        let (mut decided, mut cases) = (0, 0);
        // Rows as they come, and steep ones (hundreds of nats from the
        // top to the bottom: a top-k reaches far down).
        // And one with a hundred tokens ~500 nats above a wide bulk: a
        // top-k of 200 ends in the bulk, past the bins counted first.
        let mut split = peaked_row(151_936, 6);
        for (i, v) in split.iter_mut().enumerate() {
            *v = if i % 1500 == 7 {
                450.0 + *v * 2.0
            } else {
                -(((i * 7919) % 100_000) as f32) / 1000.0
            };
        }
        for (n, seed, steep) in [
            (151_936, 1, 1.0),
            (262_144, 2, 1.0),
            (32_000, 3, 1.0),
            (1_000, 4, 1.0),
            (151_936, 5, 12.0),
            (151_936, 6, 0.0),
        ] {
            let mut row: Vec<f32> = if steep == 0.0 {
                split.clone()
            } else {
                peaked_row(n, seed).iter().map(|v| v * steep).collect()
            };
            row[7] = f32::NEG_INFINITY;
            row[n / 2] = f32::NAN;
            let t = Tensor::new(row.as_slice(), &dev).unwrap();
            for (top_k, top_p, min_p, temperature) in settings {
                let params = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    ..SamplingParams::default()
                };
                let mut sampler = Sampler::new(params.clone());
                for at in 0..40 {
                    let history = vec![0; at];
                    let r = sampler.uniform_for(at);
                    cases += 1;
                    let host = sampler.sample(&mut row.clone(), &history);
                    if let Some(d) = draw(&t, &params, r).unwrap() {
                        decided += 1;
                        assert_eq!(d, host, "n={n} {params:?} at {at}");
                    }
                }
            }
        }
        // Only a flat row leaves the choice to the host.
        assert!(decided * 10 >= cases * 9, "{decided} of {cases} decided");
    }

    #[test]
    fn a_flat_row_is_left_to_the_host_and_an_empty_one_too() {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let params = SamplingParams {
            top_k: 0,
            top_p: 0.95,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let flat = Tensor::zeros(151_936, DType::F32, &dev).unwrap();
        assert_eq!(draw(&flat, &params, 0.5).unwrap(), None);
        let none = Tensor::full(f32::NEG_INFINITY, 5000, &dev).unwrap();
        assert_eq!(draw(&none, &params, 0.5).unwrap(), None);
        // A small vocabulary is decided whatever its shape.
        let small = Tensor::zeros(1500, DType::F32, &dev).unwrap();
        let mut sampler = Sampler::new(params.clone());
        let got = draw(&small, &params, sampler.uniform_for(0)).unwrap();
        assert_eq!(got, Some(sampler.sample(&mut vec![0.0; 1500], &[])));
    }
}

//! From the last position's logits to the next token, with as little as
//! possible crossing from the device to the host: one copy per token, and on
//! a GPU only what sampling needs (Candle's examples copy the whole row, 151,936
//! floats for Qwen3, and scan it on the CPU):
//!
//! * greedy: the argmax, reduced on the device (4 bytes);
//! * top-k sampling with `k <= TOP_MAX`: the k largest logits with their ids,
//!   selected on the device by sorting blocks of the row and keeping each
//!   block's k best, then the k best of those (Candle's CUDA sort holds one
//!   row of at most a few thousand entries in shared memory, not a whole
//!   vocabulary). The host then applies min-p, top-p, temperature and the
//!   seeded draw exactly as it does to a full row;
//! * other sampling on CUDA (no top-k, or a larger one, with min-p or
//!   top-p): the token, drawn on the device by our kernel (`cuda::draw`)
//!   with the host's arithmetic and uniform number; a row it cannot decide
//!   (thousands of candidates) is copied and the host decides;
//! * everything else (a repeat penalty; sampling from the whole row with
//!   no filter; other GPUs): the row.
//!
//! On the CPU the row is already in host memory, so the host path is the
//! only one.

use candle_core::{DType, Device, Tensor};

use super::error::EngineError;
use super::sampling::Sampler;

#[cfg(feature = "cuda")]
pub mod cuda;

/// The largest top-k the device selects; larger ones copy the row.
pub const TOP_MAX: usize = 64;

/// What the device's draw answers when the host must choose.
pub const UNDECIDED: u32 = u32::MAX;

/// How a fixed step draws one row's token on the device: (top-k, top-p,
/// min-p, 1 / temperature, the uniform number), as the kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawRow(pub [f64; 5]);

impl DrawRow {
    /// `sampler`'s settings for the token at `position`.
    pub fn new(sampler: &Sampler, position: usize) -> Self {
        Self::of(sampler.params(), sampler.uniform_for(position))
    }

    /// `p`'s settings with the uniform number `r`.
    pub fn of(p: &super::SamplingParams, r: f64) -> Self {
        DrawRow([
            p.top_k.min(i32::MAX as usize) as f64,
            f64::from(p.top_p),
            f64::from(p.min_p),
            1.0 / f64::from(p.temperature),
            r,
        ])
    }
}

/// Block length of the first selection stages. A power of two whose sort
/// fits the CUDA kernel's shared memory (4 bytes an entry); the final sort
/// takes up to twice this.
const BLOCK: usize = 4096;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Copy the row, sample on the host.
    Host,
    /// Argmax on the device.
    Argmax,
    /// The `k` largest logits from the device, sampling on the host.
    Top(usize),
    /// The token drawn on the device (CUDA).
    Device,
}

impl Route {
    /// The route for `sampler` on `device`.
    pub fn new(device: &Device, sampler: &Sampler) -> Self {
        if device.is_cpu() {
            return Route::Host;
        }
        let p = sampler.params();
        if p.is_argmax() {
            Route::Argmax
        } else if sampler.top_suffices(TOP_MAX) {
            Route::Top(p.top_k)
        } else if device.is_cuda() && cfg!(feature = "cuda") && device_draws(sampler) {
            Route::Device
        } else {
            Route::Host
        }
    }
}

/// Choose the next token from `logits` (the last position's row, any shape
/// with one row) by `route`.
pub fn next_token(
    route: Route,
    logits: &Tensor,
    sampler: &mut Sampler,
    history: &[u32],
    top: &mut TopK,
) -> Result<u32, EngineError> {
    let row = logits.flatten_all()?.to_dtype(DType::F32)?;
    match route {
        Route::Argmax => Ok(row.argmax(0)?.to_scalar::<u32>()?),
        Route::Top(k) => {
            let best = top.select(&row, k)?;
            match sampler.sample_top(&best, history.len()) {
                Some(t) => Ok(t),
                // Every selected logit was NaN or infinite: the host decides.
                None => host(&row, sampler, history),
            }
        }
        Route::Device => {
            let r = sampler.uniform_for(history.len());
            match device_draw(&row, sampler, r)? {
                Some(t) => Ok(t),
                None => host(&row, sampler, history),
            }
        }
        Route::Host => host(&row, sampler, history),
    }
}

/// The most candidates the device's draw holds (`MAX_CAND` in
/// `kernels/sample.cu`): a larger top-k is always the host's.
pub const DEVICE_CANDIDATES: usize = 2048;

/// Whether our device kernel takes `sampler`'s settings: sampling without
/// a penalty, with a filter that leaves few candidates in a language
/// model's row (a top-k it can hold, min-p or top-p; without one every
/// token is a candidate and the host is as fast).
pub fn device_draws(sampler: &Sampler) -> bool {
    let p = sampler.params();
    p.temperature > 0.0
        && !p.penalizes()
        && p.top_k <= DEVICE_CANDIDATES
        && (p.top_k > 0 || p.top_p < 1.0 || p.min_p > 0.0)
}

fn host(row: &Tensor, sampler: &mut Sampler, history: &[u32]) -> Result<u32, EngineError> {
    let mut v: Vec<f32> = row.to_vec1()?;
    Ok(sampler.sample(&mut v, history))
}

/// The device's draw (`None`: the host decides).
#[cfg(feature = "cuda")]
fn device_draw(row: &Tensor, sampler: &Sampler, r: f64) -> Result<Option<u32>, EngineError> {
    cuda::draw(row, sampler.params(), r)
}

#[cfg(not(feature = "cuda"))]
fn device_draw(_: &Tensor, _: &Sampler, _: f64) -> Result<Option<u32>, EngineError> {
    Ok(None)
}

/// One selection stage: the row (padded to whole blocks) as `rows` blocks,
/// each block's `k` best kept.
#[derive(Debug)]
struct Stage {
    rows: usize,
    /// `-inf` filling the last block, if the length is not a multiple.
    pad: Option<Tensor>,
    /// `[rows, 1]`: each block's first position, to turn a position in the
    /// block into one in the stage's input.
    base: Tensor,
}

/// Device-side top-k selection, with the constants it needs made once per
/// (row length, k, device) so that a step uploads nothing.
#[derive(Debug, Default)]
pub struct TopK {
    plan: Option<(usize, usize, Vec<Stage>)>,
}

impl TopK {
    fn stages(&mut self, n: usize, k: usize, device: &Device) -> Result<&[Stage], EngineError> {
        let fresh = match &self.plan {
            Some((pn, pk, st)) => {
                *pn != n
                    || *pk != k
                    || st
                        .first()
                        .is_some_and(|s| !s.base.device().same_device(device))
            }
            None => true,
        };
        if fresh {
            let mut stages = Vec::new();
            let mut len = n;
            while len > 2 * BLOCK {
                let rows = len.div_ceil(BLOCK);
                let missing = rows * BLOCK - len;
                let pad = (missing > 0)
                    .then(|| Tensor::full(f32::NEG_INFINITY, missing, device))
                    .transpose()?;
                let base = Tensor::arange_step(0u32, (rows * BLOCK) as u32, BLOCK as u32, device)?
                    .reshape((rows, 1))?;
                stages.push(Stage { rows, pad, base });
                len = rows * k;
            }
            self.plan = Some((n, k, stages));
        }
        Ok(&self.plan.as_ref().expect("planned above").2)
    }

    /// The `k` largest entries of the 1-D f32 `row` as `(index, value)`,
    /// largest first; one copy to the host. Ties may come in any order.
    pub fn select(&mut self, row: &Tensor, k: usize) -> Result<Vec<(u32, f32)>, EngineError> {
        let n = row.dim(0)?;
        let k = k.clamp(1, BLOCK).min(n);
        let device = row.device().clone();
        let mut vals = row.clone();
        // Positions of `vals` in `row`; `None` while they are the identity.
        let mut ids: Option<Tensor> = None;
        for st in self.stages(n, k, &device)? {
            let x = match &st.pad {
                Some(p) => Tensor::cat(&[&vals, p], 0)?,
                None => vals,
            }
            .reshape((st.rows, BLOCK))?;
            let order = x.arg_sort_last_dim(false)?.narrow(1, 0, k)?.contiguous()?;
            vals = x.gather(&order, 1)?.flatten_all()?;
            let pos = order.broadcast_add(&st.base)?.flatten_all()?;
            ids = Some(match ids {
                Some(i) => i.index_select(&pos, 0)?,
                None => pos,
            });
        }
        let order = vals
            .arg_sort_last_dim(false)?
            .narrow(0, 0, k)?
            .contiguous()?;
        let best = vals.gather(&order, 0)?;
        let at = match ids {
            Some(i) => i.index_select(&order, 0)?,
            None => order,
        };
        // Ids below 2^24 are exact in f32: ids and values travel as one copy.
        let packed: Vec<f32> = Tensor::cat(&[&at.to_dtype(DType::F32)?, &best], 0)?.to_vec1()?;
        let (at, best) = packed.split_at(k);
        Ok(at.iter().zip(best).map(|(&i, &v)| (i as u32, v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplingParams;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random_row(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-20.0f32..20.0)).collect()
    }

    /// Host top-k: largest first, lowest id first on ties.
    fn host_top(row: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = row
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    #[test]
    fn device_selection_matches_the_host_over_every_stage_layout() {
        // Lengths: one block, the final sort alone, one stage with and
        // without padding, two stages (Qwen3's and Gemma's vocabularies).
        for (n, k) in [
            (100, 5),
            (8192, 64),
            (8193, 40),
            (16384, 1),
            (151_936, 64),
            (262_144, 20),
        ] {
            let row = random_row(n, n as u64);
            let t = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
            let mut top = TopK::default();
            let got = top.select(&t, k).unwrap();
            assert_eq!(got, host_top(&row, k), "n={n} k={k}");
            // The plan is kept and reused.
            assert_eq!(top.select(&t, k).unwrap(), got);
        }
    }

    #[test]
    fn the_block_edges_and_infinities_are_handled() {
        // The best entries in the padded last block and at block edges.
        let n = 3 * BLOCK + 17;
        let mut row = vec![-1.0f32; n];
        for (i, v) in [
            (n - 1, 9.0),
            (BLOCK - 1, 8.0),
            (BLOCK, 7.0),
            (0, 6.0),
            (2 * BLOCK, 5.0),
        ] {
            row[i] = v;
        }
        row[5] = f32::NEG_INFINITY;
        let t = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
        let got = TopK::default().select(&t, 5).unwrap();
        let ids: Vec<u32> = got.iter().map(|c| c.0).collect();
        assert_eq!(
            ids,
            [n - 1, BLOCK - 1, BLOCK, 0, 2 * BLOCK].map(|i| i as u32)
        );
    }

    #[test]
    fn sampling_from_the_device_top_draws_what_the_full_row_draws() {
        let n = 151_936;
        for (case, params) in [
            SamplingParams {
                seed: Some(7),
                ..SamplingParams::default()
            },
            SamplingParams {
                seed: Some(8),
                top_k: 20,
                top_p: 0.8,
                min_p: 0.0,
                temperature: 0.6,
                ..SamplingParams::default()
            },
            SamplingParams {
                seed: Some(9),
                top_k: 64,
                top_p: 1.0,
                min_p: 0.0,
                temperature: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                seed: Some(10),
                top_k: 5,
                top_p: 1.0,
                min_p: 0.2,
                temperature: 1.0,
                ..SamplingParams::default()
            },
        ]
        .into_iter()
        .enumerate()
        {
            let mut full = Sampler::new(params.clone());
            let mut dev = Sampler::new(params.clone());
            assert!(dev.top_suffices(TOP_MAX), "case {case}");
            let mut top = TopK::default();
            for step in 0..40u64 {
                // Flatter rows than random_row's, so sampling has choices.
                let row: Vec<f32> = random_row(n, 1000 * case as u64 + step)
                    .iter()
                    .map(|v| v / 8.0)
                    .collect();
                let t = Tensor::new(row.as_slice(), &Device::Cpu).unwrap();
                let history = vec![0; step as usize];
                let want = full.sample(&mut row.clone(), &history);
                let best = top.select(&t, params.top_k).unwrap();
                assert_eq!(
                    dev.sample_top(&best, history.len()),
                    Some(want),
                    "case {case} step {step}"
                );
            }
        }
    }

    #[test]
    fn routes_follow_the_sampling_settings() {
        let cpu = Device::Cpu;
        let s = |p: SamplingParams| Sampler::new(p);
        assert_eq!(Route::new(&cpu, &s(SamplingParams::greedy())), Route::Host);
        // The device routes are decided the same way for any non-CPU device;
        // check the decision itself through the sampler's predicate.
        assert!(s(SamplingParams::default()).top_suffices(TOP_MAX));
        let big_k = SamplingParams {
            top_k: 100,
            ..SamplingParams::default()
        };
        assert!(!s(big_k.clone()).top_suffices(TOP_MAX));
        let no_k = SamplingParams {
            top_k: 0,
            ..SamplingParams::default()
        };
        assert!(!s(no_k.clone()).top_suffices(TOP_MAX));
        let penalty = SamplingParams {
            repeat_penalty: 1.1,
            ..SamplingParams::default()
        };
        assert!(!s(penalty.clone()).top_suffices(TOP_MAX));
        assert!(!s(SamplingParams::greedy()).top_suffices(TOP_MAX));
        // What the top-k route leaves, the device's kernel takes on CUDA,
        // except penalties and filterless sampling.
        assert!(device_draws(&s(no_k.clone())));
        assert!(device_draws(&s(big_k)));
        assert!(!device_draws(&s(penalty)));
        assert!(!device_draws(&s(SamplingParams::greedy())));
        let unfiltered = SamplingParams {
            top_p: 1.0,
            min_p: 0.0,
            ..no_k
        };
        assert!(!device_draws(&s(unfiltered)));
        // A top-k past what the kernel holds: the host's at once.
        let huge_k = SamplingParams {
            top_k: DEVICE_CANDIDATES + 1,
            ..SamplingParams::default()
        };
        assert!(!device_draws(&s(huge_k)));
    }

    #[test]
    fn every_route_gives_the_host_answer_on_the_cpu() {
        let row = random_row(50_000, 3);
        let t = Tensor::new(row.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 50_000))
            .unwrap();
        let greedy = SamplingParams::greedy();
        let mut top = TopK::default();
        let a = next_token(
            Route::Argmax,
            &t,
            &mut Sampler::new(greedy.clone()),
            &[],
            &mut top,
        )
        .unwrap();
        let h = next_token(Route::Host, &t, &mut Sampler::new(greedy), &[], &mut top).unwrap();
        assert_eq!(a, h);
        let p = SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        };
        let d = next_token(
            Route::Top(40),
            &t,
            &mut Sampler::new(p.clone()),
            &[],
            &mut top,
        )
        .unwrap();
        let h = next_token(Route::Host, &t, &mut Sampler::new(p), &[], &mut top).unwrap();
        assert_eq!(d, h);
        // The device route on a row the device cannot take: the host
        // decides, with the same uniform number.
        for seed in 0..20 {
            let p = SamplingParams {
                seed: Some(seed),
                top_k: 0,
                ..SamplingParams::default()
            };
            let d = next_token(
                Route::Device,
                &t,
                &mut Sampler::new(p.clone()),
                &[],
                &mut top,
            );
            let h = next_token(Route::Host, &t, &mut Sampler::new(p), &[], &mut top);
            assert_eq!(d.unwrap(), h.unwrap());
        }
    }
}

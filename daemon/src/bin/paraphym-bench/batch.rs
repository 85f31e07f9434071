//! `batch`: batched decoding at the model level (issue 11). B sequences,
//! each prefilled alone, then decoded greedily together, one pass per step
//! for all of them; next to one sequence decoding alone (`Model::forward`,
//! the bare loop), in the same process, interleaved rep by rep. Aggregate
//! tokens/s, its ratio to the single stream, and a check that batching
//! changes no token. The batched pass is `--path`:
//!
//! * `forward` — `Model::forward_batch` (concatenation-grown caches, RoPE
//!   and attention per sequence);
//! * `static` — the fixed-shape step over B slots
//!   (`decoder::StaticDecoder`), run eagerly;
//! * `graph` — the same step captured as a CUDA graph per batch size and
//!   replayed (eager where there is no CUDA).
//!
//! On CUDA the fixed step runs our fused kernels unless `--unfused` (then
//! Candle's ops, as on the CPU); with them, a line compares both against
//! each sequence decoded alone through `Model::forward`: the largest logit
//! difference over the first steps of every sequence.
//!
//! Every path reads each step's tokens back to the host, as a server
//! streaming them must.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use paraphym_daemon::engine::gguf::GgufFile;
use paraphym_daemon::engine::models::decoder::StaticDecoder;
use paraphym_daemon::engine::{bench, models, LogitsFor, Weights};

/// The greedy choice of each row.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Decode `gen` tokens greedily for each of `prompts` in lockstep, `batched`
/// in one pass per step or one sequence after another; decode time in
/// seconds (the prefills are not timed) and each sequence's tokens.
fn run(
    model: &models::Model,
    prompts: &[&[u32]],
    gen: usize,
    batched: bool,
    device: &Device,
) -> Result<(f64, Vec<Vec<u32>>)> {
    let mut seqs: Vec<models::Model> = prompts
        .iter()
        .map(|_| {
            let mut m = model.clone();
            m.clear_kv();
            m
        })
        .collect();
    let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(prompts.len());
    for (m, p) in seqs.iter_mut().zip(prompts) {
        tokens.push(argmax_rows(&m.forward(p, LogitsFor::Last)?)?);
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 1..gen {
        let last: Vec<u32> = tokens.iter().map(|t| t[t.len() - 1]).collect();
        if batched {
            let mut refs: Vec<&mut models::Model> = seqs.iter_mut().collect();
            let runs: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let runs: Vec<&[u32]> = runs.iter().map(|r| r.as_slice()).collect();
            let next = argmax_rows(&models::Model::forward_batch(&mut refs, &runs)?)?;
            for (t, n) in tokens.iter_mut().zip(next) {
                t.push(n);
            }
        } else {
            for ((m, t), &l) in seqs.iter_mut().zip(tokens.iter_mut()).zip(&last) {
                t.push(argmax_rows(&m.forward(&[l], LogitsFor::Last)?)?[0]);
            }
        }
    }
    device.synchronize()?;
    Ok((start.elapsed().as_secs_f64(), tokens))
}

/// The same lockstep decoding through the fixed-shape step: slots 0..B of
/// `fixed` (its buffers and graphs reused across runs), each prefilled alone.
fn run_static(
    model: &mut models::Model,
    fixed: &mut StaticDecoder,
    prompts: &[&[u32]],
    gen: usize,
    device: &Device,
) -> Result<(f64, Vec<Vec<u32>>)> {
    let b = prompts.len();
    let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(b);
    for (slot, p) in prompts.iter().enumerate() {
        fixed.start(slot, model, p)?;
        tokens.push(vec![fixed.tokens(slot + 1)?[slot]]);
    }
    device.synchronize()?;
    let start = Instant::now();
    for _ in 1..gen {
        // Each row's greedy token is already on the device.
        fixed.step(model, b, None)?;
        for (t, n) in tokens.iter_mut().zip(fixed.tokens(b)?) {
            t.push(n);
        }
    }
    device.synchronize()?;
    for slot in 0..b {
        fixed.free(slot)?;
    }
    Ok((start.elapsed().as_secs_f64(), tokens))
}

/// The fused step and Candle's ops (both eager; the fused decoder's
/// prompts through the fused prefill) against each sequence run alone
/// through the model's own forward pass, fed the same tokens, while
/// the two steps' greedy tokens agree: steps compared, the largest logit
/// difference of the fused step and of Candle's ops from the forward pass,
/// the largest logit, and the steps whose tokens all agree.
fn fused_check(
    model: &mut models::Model,
    capacity: usize,
    prompts: &[&[u32]],
    gen: usize,
) -> Result<(usize, f32, f32, f32, usize)> {
    let b = prompts.len();
    let mut fused = StaticDecoder::new(model, capacity, b, false)?;
    let mut plain = StaticDecoder::new(model, capacity, b, false)?.unfused();
    let far = |x: &Tensor, y: &Tensor| -> Result<f32> {
        Ok((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?)
    };
    let mut alone = Vec::with_capacity(b);
    // The fused prefill's last logits count as the fused path's too.
    let mut df = 0f32;
    for (slot, p) in prompts.iter().enumerate() {
        let first = fused.start(slot, model, p)?;
        plain.start(slot, model, p)?;
        let mut m = model.clone();
        m.clear_kv();
        df = df.max(far(&first, &m.forward(p, LogitsFor::Last)?)?);
        alone.push(m);
    }
    let steps = gen.min(32) - 1;
    let (mut dp, mut biggest, mut same) = (0f32, 0f32, 0);
    for _ in 0..steps {
        let fed = plain.tokens(b)?;
        let (a, z) = (fused.step(model, b, None)?, plain.step(model, b, None)?);
        if fused.tokens(b)? != plain.tokens(b)? {
            break;
        }
        same += 1;
        let (mut rf, mut rp) = (Vec::new(), Vec::new());
        for (r, m) in alone.iter_mut().enumerate() {
            let want = m
                .forward(&[fed[r]], LogitsFor::Last)?
                .reshape(model.vocab())?;
            rf.push(far(&a.get(r)?, &want)?);
            rp.push(far(&z.get(r)?, &want)?);
            biggest = biggest.max(want.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        if std::env::var_os("PARAPHYM_FUSED_TRACE").is_some() {
            let list = |v: &[f32]| v.iter().map(|x| format!("{x:.2e}")).collect::<Vec<_>>();
            eprintln!(
                "fused check, step {same}: |fused - forward| per row {:?}; \
                 |Candle's ops - forward| {:?}",
                list(&rf),
                list(&rp)
            );
        }
        df = rf.iter().copied().fold(df, f32::max);
        dp = rp.iter().copied().fold(dp, f32::max);
    }
    Ok((steps, df, dp, biggest, same))
}

/// The batched pass `--path` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Static,
    Graph,
}

impl Pass {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "forward" => Pass::Forward,
            "static" => Pass::Static,
            "graph" => Pass::Graph,
            _ => bail!("--path is forward, static or graph (got {s})"),
        })
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[allow(clippy::too_many_arguments)]
pub fn bench(
    path: &Path,
    device: &Device,
    device_name: &str,
    pass: Pass,
    streams: &[usize],
    prompt_tokens: usize,
    gen: usize,
    reps: usize,
    unfused: bool,
) -> Result<()> {
    let most = streams.iter().copied().max().unwrap_or(1).max(1);
    let gen = gen.max(2);
    let gguf = GgufFile::open(path)?;
    let context = prompt_tokens + gen + 8;
    let mut model = models::load(&gguf, context, Weights::Quantized, device)?;
    drop(gguf);
    // Each sequence its own stretch of one long text.
    let text = bench::prompt_tokens(path, prompt_tokens * most)?;
    let prompts: Vec<&[u32]> = text.chunks(prompt_tokens).take(most).collect();
    let mut fixed = match pass {
        Pass::Forward => None,
        Pass::Static | Pass::Graph => Some(StaticDecoder::new(
            &model,
            context,
            most,
            pass == Pass::Graph,
        )?)
        .map(|f| if unfused { f.unfused() } else { f }),
    };
    let check = match fixed.as_ref().filter(|f| f.is_fused()) {
        Some(f) => Some(fused_check(&mut model, f.capacity(), &prompts, gen)?),
        None => None,
    };
    let mut batched = |model: &mut models::Model, b: usize, gen: usize| match &mut fixed {
        None => run(model, &prompts[..b], gen, true, device),
        Some(f) => run_static(model, f, &prompts[..b], gen, device),
    };
    // Warm-up: every kernel and weight packing both paths use, and a graph
    // for every batch size (captured on its first step, not timed later).
    for b in streams.iter().chain(&[1]) {
        batched(&mut model, (*b).max(1), 3)?;
    }
    run(&model, &prompts[..1], 3, false, device)?;

    println!("model     {}", path.display());
    println!("device    {device_name}");
    if let Some((steps, df, dp, biggest, same)) = check {
        println!(
            "fused     {} sequences, each step against the sequence alone through the model's \
             forward pass: max |logit difference| fused kernels {df:.2e}, Candle's ops {dp:.2e} \
             (largest |logit| {biggest:.1}); the two steps' greedy tokens equal for {same}/{steps} \
             steps",
            prompts.len()
        );
    }
    println!(
        "workload  B sequences of {prompt_tokens} prompt tokens, each prefilled alone, then {gen} greedy \
         tokens each decoded together ({pass:?} pass, one per step, tokens read back each step); \
         median of {reps} reps, interleaved with one sequence decoding alone (the bare loop)"
    );
    println!(
        "{:>8} {:>12} {:>16} {:>12} {:>10} {:>10} {:>12}",
        "streams",
        "bare tok/s",
        "batched tok/s",
        "per stream",
        "x bare",
        "x 1 stream",
        "same tokens"
    );
    let steps = (gen - 1) as f64;
    let mut rows = Vec::new();
    let mut all_alone = Vec::new();
    let mut one = Vec::new();
    let mut widest: Vec<Vec<u32>> = Vec::new();
    let sizes: Vec<usize> = std::iter::once(1)
        .chain(streams.iter().map(|b| (*b).max(1)))
        .collect();
    for (i, &b) in sizes.iter().enumerate() {
        let (mut alone, mut together, mut same) = (Vec::new(), Vec::new(), gen);
        for _ in 0..reps.max(1) {
            let (t1, single) = run(&model, &prompts[..1], gen, false, device)?;
            alone.push(steps / t1);
            let (tb, tokens) = batched(&mut model, b, gen)?;
            together.push(b as f64 * steps / tb);
            let agree = tokens[0]
                .iter()
                .zip(&single[0])
                .take_while(|(a, b)| a == b)
                .count();
            // On the CPU a batch gives each sequence its own numbers (the
            // concatenated caches; the static step sums attention over its
            // padded capacity, so it may part after many tokens on quantized
            // weights); a GPU's matmuls round differently for one row and
            // for many.
            if device.is_cpu() && pass == Pass::Forward && agree < gen {
                bail!("{b} streams: batching changed the first sequence's tokens");
            }
            same = same.min(agree);
            if b == most {
                widest = tokens;
            }
        }
        all_alone.extend_from_slice(&alone);
        if b == 1 {
            one.extend_from_slice(&together);
        }
        // The first row is the single-stream baseline's own measurement.
        if i > 0 {
            rows.push((b, median(alone), median(together), same));
        }
    }
    // One baseline for every row: the median of all the single-stream runs.
    let base = median(all_alone);
    let one = median(one);
    for (b, alone, together, same) in rows {
        println!(
            "{:>8} {:>12.1} {:>16.1} {:>12.1} {:>10.2} {:>10.2} {:>12}",
            b,
            alone,
            together,
            together / b as f64,
            together / base,
            together / one,
            format!("{same}/{gen}")
        );
    }
    println!(
        "x bare: aggregate tokens/s of B batched streams / one sequence in the bare loop (median \
         of all {base:.1} tok/s runs); x 1 stream: / this pass with one stream (median \
         {one:.1} tok/s); same tokens: the first sequence's greedy tokens that match the bare loop"
    );
    // Each sequence's tokens at the widest batch, as digests: runs of
    // other passes (static, graph) over the same prompts compare by these.
    let digests: Vec<String> = widest.iter().map(|t| format!("{:016x}", fnv(t))).collect();
    println!("digests   {most} streams: {}", digests.join(" "));
    Ok(())
}

/// FNV-1a over token ids: a short fingerprint of a sequence.
fn fnv(tokens: &[u32]) -> u64 {
    tokens
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .fold(0xcbf29ce484222325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
        })
}

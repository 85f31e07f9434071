//! `batch`: batched decoding at the model level (issue 11). B sequences,
//! each prefilled alone, then decoded greedily together, one forward pass
//! (`Model::forward_batch`) per step for all of them; next to one sequence
//! decoding alone (`Model::forward`, the loop the engine runs today), in the
//! same process, interleaved rep by rep. Aggregate tokens/s, its ratio to the
//! single stream, and a check that batching changes no token.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use paraphym_daemon::engine::gguf::GgufFile;
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench(
    path: &Path,
    device: &Device,
    device_name: &str,
    streams: &[usize],
    prompt_tokens: usize,
    gen: usize,
    reps: usize,
) -> Result<()> {
    let most = streams.iter().copied().max().unwrap_or(1).max(1);
    let gen = gen.max(2);
    let gguf = GgufFile::open(path)?;
    let context = prompt_tokens + gen + 8;
    let model = models::load(&gguf, context, Weights::Quantized, device)?;
    drop(gguf);
    // Each sequence its own stretch of one long text.
    let text = bench::prompt_tokens(path, prompt_tokens * most)?;
    let prompts: Vec<&[u32]> = text.chunks(prompt_tokens).take(most).collect();
    // Warm-up: every kernel and weight packing both paths use.
    run(&model, &prompts[..most.min(2)], 3, true, device)?;
    run(&model, &prompts[..1], 3, false, device)?;

    println!("model     {}", path.display());
    println!("device    {device_name}");
    println!(
        "workload  B sequences of {prompt_tokens} prompt tokens, each prefilled alone, then {gen} greedy \
         tokens each decoded together (one forward pass per step); median of {reps} reps, \
         interleaved with one sequence decoding alone"
    );
    println!(
        "{:>8} {:>14} {:>16} {:>14} {:>10} {:>12}",
        "streams", "alone tok/s", "batched tok/s", "per stream", "ratio", "same tokens"
    );
    let steps = (gen - 1) as f64;
    let mut rows = Vec::new();
    let mut all_alone = Vec::new();
    for &b in streams {
        let b = b.max(1);
        let (mut alone, mut together, mut same) = (Vec::new(), Vec::new(), gen);
        for _ in 0..reps.max(1) {
            let (t1, single) = run(&model, &prompts[..1], gen, false, device)?;
            alone.push(steps / t1);
            let (tb, tokens) = run(&model, &prompts[..b], gen, true, device)?;
            together.push(b as f64 * steps / tb);
            let agree = tokens[0]
                .iter()
                .zip(&single[0])
                .take_while(|(a, b)| a == b)
                .count();
            // On the CPU a batch gives each sequence its own numbers; a GPU's
            // matmuls round differently for one row and for many.
            if device.is_cpu() && agree < gen {
                bail!("{b} streams: batching changed the first sequence's tokens");
            }
            same = same.min(agree);
        }
        all_alone.extend_from_slice(&alone);
        rows.push((b, median(alone), median(together), same));
    }
    // One baseline for every row: the median of all the single-stream runs.
    let base = median(all_alone);
    for (b, alone, together, same) in rows {
        println!(
            "{:>8} {:>14.1} {:>16.1} {:>14.1} {:>10.2} {:>12}",
            b,
            alone,
            together,
            together / b as f64,
            together / base,
            format!("{same}/{gen}")
        );
    }
    println!(
        "ratio: aggregate tokens/s of B batched streams / one stream alone (median of all \
         {base:.1} tok/s single-stream runs); same tokens: the first sequence's greedy tokens \
         that match it decoding alone"
    );
    Ok(())
}

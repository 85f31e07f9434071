//! From logits to text: the sampler (penalties, top-k, top-p, min-p,
//! temperature, seed), the streaming detokenizer that only ever emits whole
//! UTF-8 characters, and stop-string matching that never emits a stop string
//! or any part of one.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::error::EngineError;

/// Sampling settings. `temperature == 0` is greedy decoding (argmax); the other
/// filters are off at their neutral values (`top_k == 0`, `top_p == 1`,
/// `min_p == 0`, `repeat_penalty == 1`, presence and frequency penalties 0).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    /// Subtracted from the logit of every token in the window (OpenAI's and
    /// llama.cpp's presence penalty).
    pub presence_penalty: f32,
    /// Subtracted once per occurrence in the window (frequency penalty).
    pub frequency_penalty: f32,
    /// How many of the most recent tokens the penalties look at (llama.cpp's
    /// `penalty_last_n`).
    pub repeat_last_n: usize,
    /// `None`: a fresh random seed for each generation. A token's draw
    /// depends on the seed and its position alone (see
    /// [`Sampler::uniform_for`]).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidParams(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return bad(format!(
                "repeat_penalty {} must be > 0",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} {v} must be in [-2, 2]"));
            }
        }
        Ok(())
    }

    /// Whether the next token is simply the row's argmax (greedy, no
    /// penalty): the routes that read it from the device.
    pub fn is_argmax(&self) -> bool {
        self.temperature <= 0.0 && !self.penalizes()
    }

    /// Whether any penalty reads the recent tokens.
    pub fn penalizes(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// Picks the next token from a row of logits.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    /// The seed, or a random one.
    seed: u64,
    /// Scratch buffer of (token, value), reused across steps.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params
            .seed
            .unwrap_or_else(|| StdRng::from_os_rng().random());
        Self {
            params,
            seed,
            cand: Vec::new(),
        }
    }

    /// The uniform number in [0, 1) that draws the token at `position` (the
    /// sequence's length before it). A function of the seed and the
    /// position, not of how many draws came before: a step run ahead and
    /// taken back, or a draw the device made and the host redoes, draws
    /// the same.
    pub fn uniform_for(&self, position: usize) -> f64 {
        let at = (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        StdRng::seed_from_u64(self.seed ^ at).random::<f64>()
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Choose a token. `logits` is modified (penalties); `history` is every token
    /// so far, prompt included.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.penalizes() {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = recent.to_vec();
            seen.sort_unstable();
            // (token, occurrences), as llama.cpp's penalties sampler counts them.
            let mut counts: Vec<(u32, f32)> = Vec::with_capacity(seen.len());
            for t in seen {
                match counts.last_mut() {
                    Some((last, n)) if *last == t => *n += 1.0,
                    _ => counts.push((t, 1.0)),
                }
            }
            for (t, n) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    // CTRL-style, as llama.cpp: shrink positive logits, grow negative ones.
                    if p.repeat_penalty != 1.0 {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                    *l -= n * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }

        // Candidates: top-k first (cheap partial selection), else everything.
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        let r = self.uniform_for(history.len());
        self.draw(r).unwrap_or_else(|| argmax(logits))
    }

    /// Whether [`Sampler::sample_top`] with the `k` largest logits chooses
    /// exactly as [`Sampler::sample`] with all of them would: sampling (not
    /// greedy), no repeat penalty, and a top-k of at most `k`.
    pub fn top_suffices(&self, k: usize) -> bool {
        let p = &self.params;
        p.temperature > 0.0 && !p.penalizes() && p.top_k > 0 && p.top_k <= k
    }

    /// Choose a token from the largest logits alone, `(token, logit)` in any
    /// order (the device path: only these leave the GPU), for the token at
    /// `position`. Chooses as [`Sampler::sample`] would when
    /// [`Sampler::top_suffices`] holds.
    pub fn sample_top(&mut self, top: &[(u32, f32)], position: usize) -> Option<u32> {
        self.cand.clear();
        self.cand
            .extend(top.iter().copied().filter(|(_, l)| l.is_finite()));
        self.draw(self.uniform_for(position))
    }

    /// Top-k, min-p, top-p and temperature over `self.cand`, then the draw
    /// with the uniform number `r`; `None` when there is no candidate.
    fn draw(&mut self, r: f64) -> Option<u32> {
        let p = &self.params;
        let cand = &mut self.cand;
        if cand.is_empty() {
            return None;
        }
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        if p.top_k > 0 {
            // One order whichever way the candidates came (host selection or
            // the device's sort), so a seed draws the same token from both.
            cand.sort_unstable_by(desc);
        }

        // Probabilities before temperature (llama.cpp applies the filters first).
        let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f64;
        for c in cand.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += f64::from(c.1);
        }
        for c in cand.iter_mut() {
            c.1 = (f64::from(c.1) / total) as f32;
        }
        if p.min_p > 0.0 {
            // The top candidate has probability exp(0)/total; keep those within min_p of it.
            let floor = p.min_p * (1.0 / total) as f32;
            cand.retain(|c| c.1 >= floor);
        }
        if p.top_p < 1.0 {
            // Sort just enough of the head to reach top_p.
            let mut head = 64.min(cand.len());
            loop {
                if head < cand.len() {
                    cand.select_nth_unstable_by(head - 1, desc);
                }
                cand[..head].sort_unstable_by(desc);
                let mut acc = 0f32;
                let cut = cand[..head].iter().position(|c| {
                    acc += c.1;
                    acc >= p.top_p
                });
                match cut {
                    Some(i) => {
                        cand.truncate(i + 1);
                        break;
                    }
                    None if head == cand.len() => break,
                    None => head = (head * 8).min(cand.len()),
                }
            }
        }

        // Temperature on what is left, then draw.
        let inv_t = 1.0 / f64::from(p.temperature);
        let weights: Vec<f64> = cand
            .iter()
            .map(|c| f64::from(c.1).max(f64::MIN_POSITIVE).powf(inv_t))
            .collect();
        let sum: f64 = weights.iter().sum();
        let mut r = r * sum;
        for (c, w) in cand.iter().zip(&weights) {
            r -= w;
            if r <= 0.0 {
                return Some(c.0);
            }
        }
        cand.last().map(|c| c.0)
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Turns a growing token sequence into text pieces that are always whole UTF-8
/// characters. Decodes a small window (the tokens since the last emitted piece)
/// so that tokenizers which strip a leading space or merge byte tokens are
/// handled by the tokenizer itself.
#[derive(Debug, Default)]
pub struct Detokenizer {
    tokens: Vec<u32>,
    prev: usize,
    current: usize,
}

impl Detokenizer {
    /// Push a token; returns the new text it completes, if any.
    pub fn push(
        &mut self,
        token: u32,
        decode: impl Fn(&[u32]) -> Result<String, EngineError>,
    ) -> Result<Option<String>, EngineError> {
        let before = if self.prev < self.current {
            decode(&self.tokens[self.prev..self.current])?
        } else {
            String::new()
        };
        self.tokens.push(token);
        let text = decode(&self.tokens[self.prev..])?;
        // An incomplete multi-byte character decodes to U+FFFD: wait for more.
        if text.len() > before.len() && !text.ends_with('\u{FFFD}') {
            let piece = match text.get(before.len()..) {
                Some(p) if text.starts_with(&before) => p.to_owned(),
                // The tokenizer rewrote earlier text: emit what is new by char count.
                _ => text.chars().skip(before.chars().count()).collect(),
            };
            self.prev = self.current;
            self.current = self.tokens.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still pending at the end of generation (possibly U+FFFD).
    pub fn finish(
        &mut self,
        decode: impl Fn(&[u32]) -> Result<String, EngineError>,
    ) -> Result<Option<String>, EngineError> {
        if self.current >= self.tokens.len() {
            return Ok(None);
        }
        let before = decode(&self.tokens[self.prev..self.current])?;
        let text = decode(&self.tokens[self.prev..])?;
        self.prev = self.tokens.len();
        self.current = self.tokens.len();
        Ok(text
            .get(before.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_owned))
    }
}

/// Holds back text that might be the start of a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What to do with newly generated text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text (possibly empty) and go on.
    Continue(String),
    /// Emit this text, then stop: the stop string with this index was produced.
    Stop(String, usize),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(piece.to_owned());
        }
        self.held.push_str(piece);
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, i)) = found {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return StopCheck::Stop(out, i);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep = (1..=self.held.len())
            .rev()
            .filter(|&n| self.held.is_char_boundary(self.held.len() - n))
            .find(|&n| {
                let tail = &self.held[self.held.len() - n..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        StopCheck::Continue(out)
    }

    /// Text held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_choice() {
        let params = SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        // Token 0 (4.0) was just said; penalised to 2.0, token 1 (3.0) wins.
        assert_eq!(s.sample(&mut [4.0, 3.0, 1.0], &[0]), 1);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract_per_token_and_per_occurrence() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        let mut logits = [4.0, 3.0, 2.9, 1.0];
        // Token 0 said three times: 4 - 0.5 - 3 * 0.25 = 2.75; token 2 once:
        // 2.9 - 0.75 = 2.15; token 1 untouched wins.
        assert_eq!(s.sample(&mut logits, &[0, 2, 0, 0]), 1);
        assert_eq!(logits, [2.75, 3.0, 2.15, 1.0]);
        // Outside the window, nothing.
        let params = SamplingParams {
            presence_penalty: 2.0,
            repeat_last_n: 1,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params);
        assert_eq!(s.sample(&mut [4.0, 3.0], &[0, 1]), 0);
        assert!(SamplingParams {
            frequency_penalty: 2.5,
            ..SamplingParams::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params);
        for at in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.5, 0.2, 0.49], &vec![0; at]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_exclude_the_tail() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03].
        let logits = [3.0f32, 2.0, 1.0, -0.2];
        for (top_p, min_p, allowed) in [(0.7, 0.0, 2), (1.0, 0.2, 2), (0.5, 0.0, 1)] {
            let params = SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p,
                min_p,
                seed: Some(1),
                ..SamplingParams::default()
            };
            let mut s = Sampler::new(params);
            let mut seen = [0usize; 4];
            for at in 0..400 {
                seen[s.sample(&mut logits.clone(), &vec![0; at]) as usize] += 1;
            }
            assert!(seen[allowed..].iter().all(|&n| n == 0), "{seen:?}");
            assert!(seen[..allowed].iter().all(|&n| n > 0), "{seen:?}");
        }
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(42),
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |params: &SamplingParams, n| {
            let mut s = Sampler::new(params.clone());
            (0..n)
                .map(|at| s.sample(&mut logits.clone(), &vec![0; at]))
                .collect::<Vec<_>>()
        };
        let tokens = draw(&params, 30);
        assert_eq!(tokens, draw(&params, 30));
        // Positions draw differently, and so do seeds.
        assert!(tokens.iter().any(|&t| t != tokens[0]), "{tokens:?}");
        let other = SamplingParams {
            seed: Some(43),
            ..params.clone()
        };
        assert_ne!(tokens, draw(&other, 30));
        // A draw is the seed's and the position's alone: the same again,
        // whatever was drawn before or in what order.
        let mut s = Sampler::new(params.clone());
        for at in (0..30).rev() {
            assert_eq!(s.sample(&mut logits.clone(), &vec![0; at]), tokens[at]);
        }
        assert_eq!(s.uniform_for(7), Sampler::new(params).uniform_for(7));
    }

    #[test]
    fn validate_rejects_out_of_range() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                min_p: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..SamplingParams::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let mut m = StopMatcher::new(&["</s>".into(), "STOP".into()]);
        assert_eq!(m.push("hello <"), StopCheck::Continue("hello ".into()));
        assert_eq!(m.push("/"), StopCheck::Continue("".into()));
        assert_eq!(m.push("x"), StopCheck::Continue("</x".into()));
        assert_eq!(m.push(" ST"), StopCheck::Continue(" ".into()));
        assert_eq!(m.push("OP and more"), StopCheck::Stop("".into(), 1));
        let mut m = StopMatcher::new(&["é!".into()]);
        assert_eq!(m.push("caféé"), StopCheck::Continue("café".into()));
        assert_eq!(m.flush(), "é");
    }

    #[test]
    fn detokenizer_waits_for_whole_characters() {
        // A toy byte-level decoder: each token is one byte.
        let bytes = "añ😀".as_bytes().to_vec();
        let decode = |ids: &[u32]| -> Result<String, EngineError> {
            let b: Vec<u8> = ids.iter().map(|&i| bytes[i as usize]).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        let mut d = Detokenizer::default();
        let mut out = Vec::new();
        for i in 0..bytes.len() as u32 {
            if let Some(p) = d.push(i, decode).unwrap() {
                out.push(p);
            }
        }
        assert_eq!(out, ["a", "ñ", "😀"]);
        assert_eq!(d.finish(decode).unwrap(), None);
    }
}

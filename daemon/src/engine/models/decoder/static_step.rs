//! A decode step whose every shape is fixed, so the GPU can replay it as one
//! CUDA graph: a KV cache of fixed capacity for a fixed number of slots
//! (per layer, allocated once), each slot's position and token in device
//! tensors (RoPE rows and the KV writes are indexed by them, the masks are
//! computed from them), and attention over the whole capacity with the
//! positions not yet written masked. Nothing of a step's positions reaches
//! the host, so one capture serves every position; the step also leaves
//! each row's greedy token and next position on the device.
//!
//! Slots are sequences decoding together: a step runs the first `rows`
//! slots in one pass (the weights read once for all of them), and a graph
//! is captured per `rows` bucket. A slot that holds no sequence just
//! computes a harmless row (its position is held inside the capacity).
//!
//! On the CPU (and without the `cuda` feature) the same operations run
//! eagerly: that is how the tests check it against `Model::forward`.

#[cfg(feature = "cuda")]
use candle_core::Device;
use candle_core::{DType, Tensor, D};

use super::{Cache, Model};
use crate::engine::error::EngineError;
use crate::engine::models::common::Result;

#[cfg(feature = "cuda")]
mod fused;

/// Sequences decoding with fixed shapes over `model`'s weights, one per
/// slot.
pub struct StaticDecoder {
    capacity: usize,
    /// Per layer, (slots, kv_heads, capacity, head_dim), F32.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Per slot, the token its next step runs and its position (u32).
    token: Tensor,
    pos: Tensor,
    /// Per slot, the token the device drew for it in the last step, or
    /// `pick::UNDECIDED` (u32).
    drawn: Tensor,
    /// `token` then `drawn`: one buffer, so that one copy reads both.
    token_drawn: Tensor,
    /// Per slot, how the next step draws its token on the device (`None`:
    /// greedy); see [`StaticDecoder::set_draws`].
    draws: Vec<Option<crate::engine::pick::DrawRow>>,
    /// Per slot, 1 when its step advances (0: a row that runs a dummy
    /// token and stays where it is); `all_advance` when every one is 1.
    advance: Tensor,
    all_advance: bool,
    /// `capacity - 1` per slot: positions never pass it (an empty slot
    /// keeps stepping; its writes must stay in its buffers).
    last: Tensor,
    /// 0..capacity, and shifted by each sliding window (u32), (1, capacity).
    keys: Tensor,
    windows: Vec<(usize, Tensor)>,
    /// Every step's logits land here (slots, vocab): a graph then owns no
    /// memory past its launch.
    out: Tensor,
    /// -inf and 0, (slots, capacity): the masks' two values.
    neg_inf: Tensor,
    zeros: Tensor,
    /// Per slot, positions written (the host's count of the device's
    /// `pos`); `None`: no sequence.
    len: Vec<Option<usize>>,
    /// The step launched ahead of its results ([`StaticDecoder::step_ahead`]).
    ahead: Option<Ahead>,
    #[cfg(feature = "cuda")]
    /// A graph per (rows, span) bucket.
    graphs: Vec<((usize, usize), Captured)>,
    /// Buckets whose capture failed: they run eagerly.
    #[cfg(feature = "cuda")]
    eager_only: Vec<(usize, usize)>,
    /// The scratch generation its graphs were captured in (see
    /// [`reserve_scratch`]).
    #[cfg(feature = "cuda")]
    scratch_epoch: u64,
    /// Replay captured graphs on CUDA (off: every step runs eagerly).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    use_graph: bool,
    /// On CUDA, the buffers of the fused kernels' step (`None`: Candle's
    /// ops, as on the CPU).
    #[cfg(feature = "cuda")]
    fused: Option<fused::Buffers>,
}

/// A step launched before the host has taken the last one's tokens in:
/// what it ran, for the pass that takes its results.
pub struct Ahead {
    /// It ran the first `rows` slots.
    pub rows: usize,
    /// Per slot, the token it ran (`None`: the slot came along unmoved).
    pub fed: Vec<Option<u32>>,
    /// Its logits (rows, vocab); a later step may overwrite them (a
    /// graph's output buffer), so only its greedy tokens are for keeps.
    pub logits: Tensor,
}

#[cfg(feature = "cuda")]
struct Captured {
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    /// The graph's output: every replay writes the logits here.
    logits: Tensor,
    /// The context of the model it was captured with: its RoPE tables are
    /// the ones the graph indexes (a longer context brings new tables).
    context: usize,
    /// What the graph reads by address stays alive with it.
    _weights: std::sync::Arc<super::Shared>,
    _rope: (
        crate::engine::models::common::Rope,
        Option<crate::engine::models::common::Rope>,
    ),
}

impl StaticDecoder {
    /// Buffers for `slots` sequences of `capacity` positions each (at most
    /// the model's context).
    pub fn new(model: &Model, capacity: usize, slots: usize, use_graph: bool) -> Result<Self> {
        let s = &model.spec;
        let dev = &model.device;
        let capacity = capacity.min(model.context).max(1);
        let slots = slots.max(1);
        // A step's matmuls take up to `slots` rows: reserved before any
        // capture, so the step itself never grows the scratch.
        reserve_scratch(s, slots, dev)?;
        let kv = || Tensor::zeros((slots, s.kv_heads, capacity, s.head_dim), DType::F32, dev);
        let keys: Vec<u32> = (0..capacity as u32).collect();
        let mut windows: Vec<(usize, Tensor)> = Vec::new();
        for w in s.windows.iter().flatten() {
            if !windows.iter().any(|(x, _)| x == w) {
                let shifted: Vec<u32> = keys.iter().map(|k| k + *w as u32).collect();
                windows.push((*w, Tensor::new(shifted, dev)?.reshape((1, capacity))?));
            }
        }
        // `token`, then `drawn`.
        let tokens = Tensor::zeros(2 * slots, DType::U32, dev)?;
        Ok(Self {
            capacity,
            k: (0..s.layers)
                .map(|_| kv())
                .collect::<candle_core::Result<_>>()?,
            v: (0..s.layers)
                .map(|_| kv())
                .collect::<candle_core::Result<_>>()?,
            token: tokens.narrow(0, 0, slots)?,
            drawn: tokens.narrow(0, slots, slots)?,
            token_drawn: tokens,
            draws: vec![None; slots],
            pos: Tensor::zeros(slots, DType::U32, dev)?,
            advance: Tensor::ones(slots, DType::U32, dev)?,
            all_advance: true,
            last: Tensor::full(capacity as u32 - 1, slots, dev)?,
            keys: Tensor::new(keys, dev)?.reshape((1, capacity))?,
            windows,
            out: Tensor::zeros((slots, s.vocab), DType::F32, dev)?,
            neg_inf: Tensor::full(f32::NEG_INFINITY, (slots, capacity), dev)?,
            zeros: Tensor::zeros((slots, capacity), DType::F32, dev)?,
            len: vec![None; slots],
            ahead: None,
            #[cfg(feature = "cuda")]
            graphs: Vec::new(),
            #[cfg(feature = "cuda")]
            eager_only: Vec::new(),
            #[cfg(feature = "cuda")]
            scratch_epoch: scratch::epoch(),
            use_graph,
            #[cfg(feature = "cuda")]
            fused: match dev {
                candle_core::Device::Cuda(_) if fused::serves(s) => {
                    Some(fused::Buffers::new(s, slots, dev)?)
                }
                _ => None,
            },
        })
    }

    /// Run Candle's ops instead of the fused kernels on CUDA (what the
    /// fused step is measured and checked against); a no-op elsewhere.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    pub fn unfused(mut self) -> Self {
        #[cfg(feature = "cuda")]
        {
            self.fused = None;
            self.graphs.clear();
        }
        self
    }

    /// Whether its steps replay captured graphs (on CUDA).
    pub fn uses_graphs(&self) -> bool {
        cfg!(feature = "cuda") && self.use_graph
    }

    /// Whether its steps run the fused kernels.
    pub fn is_fused(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.fused.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Room for at least `slots` sequences of `capacity` positions (at
    /// most the model's context): new buffers when it has less, the
    /// sequences it holds copied over (on the device) at their slots, and
    /// the captured graphs dropped (they name the old buffers). A worker
    /// grows its decoder as its batch does, so the KV buffers stay what
    /// the memory governor reserved for the sequences it runs.
    pub fn grow(&mut self, model: &Model, slots: usize, capacity: usize) -> Result<()> {
        let capacity = capacity.min(model.context).max(self.capacity);
        let slots = slots.max(self.slots());
        if slots == self.slots() && capacity == self.capacity {
            return Ok(());
        }
        let mut next = Self::new(model, capacity, slots, self.use_graph)?;
        if !self.is_fused() {
            next = next.unfused();
        }
        for (slot, len) in self.len.iter().enumerate() {
            if len.is_none() {
                continue;
            }
            let copy = |to: &Tensor, from: &Tensor, dim: usize| -> Result<()> {
                Ok(to
                    .narrow(0, slot, 1)?
                    .slice_set(&from.narrow(0, slot, 1)?, dim, 0)?)
            };
            for (to, from) in next.k.iter().zip(&self.k).chain(next.v.iter().zip(&self.v)) {
                copy(to, from, 2)?;
            }
            copy(&next.token, &self.token, 0)?;
            // A step run ahead may have drawn for it: its result moves too.
            copy(&next.drawn, &self.drawn, 0)?;
            copy(&next.pos, &self.pos, 0)?;
            copy(&next.advance, &self.advance, 0)?;
        }
        next.len[..self.len.len()].copy_from_slice(&self.len);
        next.draws[..self.draws.len()].clone_from_slice(&self.draws);
        next.all_advance = false;
        if let Some(mut a) = self.ahead.take() {
            a.fed.resize(slots, None);
            next.ahead = Some(a);
        }
        *self = next;
        Ok(())
    }

    /// How many sequences it holds at most.
    pub fn slots(&self) -> usize {
        self.len.len()
    }

    /// Positions each sequence may use.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions slot `slot` has written; `None` when it holds no sequence.
    pub fn len(&self, slot: usize) -> Option<usize> {
        self.len.get(slot).copied().flatten()
    }

    /// Slot `slot` holds no sequence from now on (its buffers stay; the
    /// next `start` overwrites them). Its position goes back to 0: a free
    /// slot still runs as a dead row when a step spans it, and the fused
    /// attention reads every key below a row's position.
    pub fn free(&mut self, slot: usize) -> Result<()> {
        if let Some(a) = &mut self.ahead {
            if let Some(f) = a.fed.get_mut(slot) {
                *f = None;
            }
        }
        if self.len.get_mut(slot).and_then(Option::take).is_some() {
            self.set_pos(slot, 0)?;
        }
        Ok(())
    }

    fn set_pos(&self, slot: usize, pos: usize) -> Result<()> {
        let v = Tensor::new(&[pos as u32], self.pos.device())?;
        Ok(self.pos.narrow(0, slot, 1)?.slice_set(&v, 0, 0)?)
    }

    /// Launch a step ([`StaticDecoder::step`] with `feed`) whose results a
    /// later pass takes ([`StaticDecoder::take_ahead`]): on a GPU the host
    /// goes on with the last step's tokens while the device runs this one.
    /// Each row it runs has moved on by a position until
    /// [`StaticDecoder::withdraw`] takes it back. `resident`: every row runs
    /// the token the last step left on the device (`feed` holds them):
    /// nothing goes up to the device.
    pub fn step_ahead(
        &mut self,
        model: &Model,
        rows: usize,
        feed: &[Option<u32>],
        resident: bool,
    ) -> Result<()> {
        let logits = self.step(model, rows, (!resident).then_some(feed))?;
        let mut fed = feed.to_vec();
        fed.resize(self.slots(), None);
        self.ahead = Some(Ahead { rows, fed, logits });
        Ok(())
    }

    /// The step launched ahead, if one was (its tokens: `tokens(rows)`,
    /// which waits for it). A slot it ran whose result nobody takes must
    /// be withdrawn ([`StaticDecoder::unstep`]).
    pub fn take_ahead(&mut self) -> Option<Ahead> {
        self.ahead.take()
    }

    /// The step launched ahead ran slot `slot`'s token for a sequence that
    /// has ended since (its last token was never to be fed): take that
    /// position back before the slot's cache is exported.
    pub fn withdraw(&mut self, slot: usize) -> Result<()> {
        let ran = self
            .ahead
            .as_mut()
            .and_then(|a| a.fed.get_mut(slot))
            .and_then(Option::take)
            .is_some();
        if ran {
            self.unstep(slot)?;
        }
        Ok(())
    }

    /// Slot `slot` forgets its last position (on the host and the device):
    /// what a step ran for it is dropped, and the next step overwrites it.
    pub fn unstep(&mut self, slot: usize) -> Result<()> {
        if let Some(l) = self.len.get_mut(slot).and_then(|l| l.as_mut()) {
            *l = l.saturating_sub(1);
            let l = *l;
            self.set_pos(slot, l)?;
        }
        Ok(())
    }

    /// Start slot `slot` from `prompt`: with the fused kernels (CUDA) they
    /// prefill it ([`StaticDecoder::prefill`]); elsewhere on a GPU the
    /// model's ordinary forward pass does (chunked matmuls) and its keys and
    /// values are copied in; on the CPU, where the model keeps them in its
    /// own layout, the prompt runs through the fixed step token by token,
    /// this slot alone. Returns the last position's logits (1, vocab); the
    /// greedy token is then on the device.
    pub fn start(&mut self, slot: usize, model: &mut Model, prompt: &[u32]) -> Result<Tensor> {
        assert!(slot < self.slots(), "slot {slot} of {}", self.slots());
        if prompt.is_empty() || prompt.len() >= self.capacity {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                context: self.capacity,
            });
        }
        super::check_tokens(prompt, model.spec.vocab)?;
        let dev = model.device.clone();
        let set = |t: &Tensor, v: u32| -> Result<()> {
            Ok(t.narrow(0, slot, 1)?
                .slice_set(&Tensor::new(&[v], &dev)?, 0, 0)?)
        };
        self.len[slot] = Some(0);
        set(&self.pos, 0)?;
        if !matches!(model.kv.first(), Some(Cache::Tensor(_))) {
            // This slot alone, advancing by a position per token.
            set(&self.advance, 1)?;
            let mut logits = None;
            for (i, &t) in prompt.iter().enumerate() {
                set(&self.token, t)?;
                logits = Some(self.ops(model, slot, 1, self.span(i + 1))?);
            }
            self.len[slot] = Some(prompt.len());
            return Ok(logits.expect("a prompt token"));
        }
        model.clear_kv();
        let logits = if self.is_fused() {
            self.prefill(model, &[(slot, prompt)])?
        } else {
            let logits = model.forward(prompt, super::LogitsFor::Last)?;
            self.adopt(slot, model)?;
            model.clear_kv();
            logits
        };
        let next = logits.argmax_keepdim(D::Minus1)?.reshape(1)?;
        self.token.narrow(0, slot, 1)?.slice_set(&next, 0, 0)?;
        Ok(logits)
    }

    /// Prompt chunks into their slots in one pass: `runs` holds (slot,
    /// tokens), each slot holding a sequence (an [`StaticDecoder::adopt`]ed
    /// prefix, maybe empty) that its chunk continues. Only with the fused
    /// kernels ([`StaticDecoder::is_fused`]): a burst of new prompts costs
    /// about one prompt's launches, and their keys and values are written
    /// where the step reads them (no copy from the model's caches). Returns
    /// each run's last logits (runs, vocab).
    pub fn prefill(&mut self, model: &Model, runs: &[(usize, &[u32])]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused.is_some() {
            return self.fused_prefill(model, runs);
        }
        let _ = (model, runs);
        Err(EngineError::Candle(candle_core::Error::Msg(
            "prefill into slots needs the fused kernels (CUDA)".into(),
        )))
    }

    /// Slot `slot` takes over `model`'s cached positions (a prompt the
    /// model's own forward pass prefilled, in chunks as it likes) and
    /// decodes from there; `model`'s cache is left as it was. The next
    /// step's token for the slot comes from the caller.
    pub fn adopt(&mut self, slot: usize, model: &Model) -> Result<()> {
        assert!(slot < self.slots(), "slot {slot} of {}", self.slots());
        let n = model.kv_len();
        if n >= self.capacity {
            return Err(EngineError::PromptTooLong {
                tokens: n,
                context: self.capacity,
            });
        }
        for (i, c) in model.kv.iter().enumerate() {
            let Cache::Tensor(c) = c else {
                return Err(EngineError::Candle(candle_core::Error::Msg(
                    "the fixed step takes over tensor KV caches only".into(),
                )));
            };
            if let Some((k, v)) = c.cached() {
                let (k, v) = (k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
                self.k[i]
                    .narrow(0, slot, 1)?
                    .slice_set(&k.contiguous()?, 2, 0)?;
                self.v[i]
                    .narrow(0, slot, 1)?
                    .slice_set(&v.contiguous()?, 2, 0)?;
            }
        }
        self.pos
            .narrow(0, slot, 1)?
            .slice_set(&Tensor::new(&[n as u32], &model.device)?, 0, 0)?;
        self.len[slot] = Some(n);
        Ok(())
    }

    /// Append the positions slot `slot` decoded past `model`'s cache to
    /// it, so the model holds the whole sequence again (a conversation's
    /// cache for its next turn).
    pub fn export(&self, slot: usize, model: &mut Model) -> Result<()> {
        let len = self.len(slot).unwrap_or(0);
        let from = model.kv_len();
        if len <= from {
            model.truncate_kv(len);
            return Ok(());
        }
        for (i, c) in model.kv.iter_mut().enumerate() {
            let Cache::Tensor(c) = c else {
                return Err(EngineError::Candle(candle_core::Error::Msg(
                    "the fixed step hands back tensor KV caches only".into(),
                )));
            };
            let part = |t: &Tensor| t.narrow(0, slot, 1)?.narrow(2, from, len - from);
            c.append(&part(&self.k[i])?, &part(&self.v[i])?, 0, 0)?;
        }
        Ok(())
    }

    /// One token for each of the first `rows` slots, at its next position,
    /// in one pass. `feed`: per row, a token chosen on the host, or `None`
    /// for a row that only comes along (its slot neither advances nor
    /// changes what it holds); no `feed`: every row runs the greedy token
    /// the last step left on the device. Returns the logits (rows, vocab);
    /// the next greedy tokens are then on the device
    /// ([`StaticDecoder::tokens`]). Rows without a sequence run harmlessly.
    pub fn step(
        &mut self,
        model: &Model,
        rows: usize,
        feed: Option<&[Option<u32>]>,
    ) -> Result<Tensor> {
        assert!(rows >= 1 && rows <= self.slots(), "{rows} rows");
        let moves = |r: usize| feed.is_none_or(|f| f[r].is_some());
        if let Some(full) = (0..rows)
            .filter(|&r| moves(r))
            .filter_map(|r| self.len[r])
            .find(|&l| l >= self.capacity)
        {
            return Err(EngineError::PromptTooLong {
                tokens: full + 1,
                context: self.capacity,
            });
        }
        let dev = &model.device;
        match feed {
            Some(f) => {
                assert_eq!(f.len(), rows, "a token or none per row");
                let tokens: Vec<u32> = f.iter().map(|t| t.unwrap_or(0)).collect();
                super::check_tokens(&tokens, model.spec.vocab)?;
                self.token.slice_set(&Tensor::new(tokens, dev)?, 0, 0)?;
                let advance: Vec<u32> = f.iter().map(|t| u32::from(t.is_some())).collect();
                self.advance.slice_set(&Tensor::new(advance, dev)?, 0, 0)?;
                self.all_advance = false;
            }
            None if !self.all_advance => {
                self.advance
                    .slice_set(&Tensor::ones(self.slots(), DType::U32, dev)?, 0, 0)?;
                self.all_advance = true;
            }
            None => {}
        }
        for r in (0..rows).filter(|&r| moves(r)) {
            if let Some(l) = &mut self.len[r] {
                *l += 1;
            }
        }
        let longest = self.len[..rows].iter().flatten().max().copied();
        let span = self.span(longest.unwrap_or(1));
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(cuda)) = (self.use_graph, &model.device) {
            let logits = self.replay(model, rows, span, &cuda.clone())?;
            self.draw(&logits, rows)?;
            return Ok(logits);
        }
        let logits = self.ops(model, 0, rows, span)?;
        self.draw(&logits, rows)?;
        Ok(logits)
    }

    /// Whether its steps can draw sampled tokens on the device
    /// ([`StaticDecoder::set_draws`]): on CUDA.
    pub fn draws_on_device(&self) -> bool {
        cfg!(feature = "cuda") && self.token.device().is_cuda()
    }

    /// How each slot's next step chooses its token: `None` greedy (the
    /// argmax), else drawn on the device with these settings (see
    /// `pick::draw_row`); the drawn token replaces the greedy one as the
    /// token the following step runs, and [`StaticDecoder::drawn`] reads
    /// it. Stays until set again; only where
    /// [`StaticDecoder::draws_on_device`].
    pub fn set_draws(&mut self, draws: &[Option<crate::engine::pick::DrawRow>]) {
        self.draws.fill(None);
        let n = draws.len().min(self.draws.len());
        self.draws[..n].clone_from_slice(&draws[..n]);
    }

    /// The sampled rows' draws after a step's logits (one launch for all).
    fn draw(&self, logits: &Tensor, rows: usize) -> Result<()> {
        let draws = &self.draws[..rows];
        if draws.iter().all(Option::is_none) {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        crate::engine::pick::cuda::draw_rows(logits, draws, &self.token, &self.drawn)?;
        #[cfg(not(feature = "cuda"))]
        let _ = logits;
        Ok(())
    }

    /// The keys a step attends to when its longest sequence has `len`
    /// positions: a power of two from 256, at most the capacity. Attention
    /// reads every key it spans, so a short sequence in a long context
    /// must not pay for the whole capacity; a few spans mean a few graphs.
    fn span(&self, len: usize) -> usize {
        if self.is_fused() {
            // The fused attention reads each row's own keys: one graph.
            return self.capacity;
        }
        len.max(256).next_power_of_two().min(self.capacity)
    }

    /// The greedy tokens the last step chose for the first `rows` slots
    /// (a copy of 4 bytes per row to the host).
    pub fn tokens(&self, rows: usize) -> Result<Vec<u32>> {
        Ok(self.token.narrow(0, 0, rows)?.to_vec1::<u32>()?)
    }

    /// The tokens the last step left for the first `rows` slots (what the
    /// next step runs: drawn or greedy) and what it drew for each
    /// (`pick::UNDECIDED` where the host must choose, or nothing was
    /// drawn), in one copy.
    pub fn drawn(&self, rows: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let both = self.token_drawn.to_vec1::<u32>()?;
        let (token, drawn) = both.split_at(self.slots());
        Ok((token[..rows].to_vec(), drawn[..rows].to_vec()))
    }

    /// Slot 0's greedy token: the single-stream case.
    pub fn token(&self) -> Result<u32> {
        Ok(self.tokens(1)?[0])
    }

    /// First call for a bucket: the step runs eagerly (filling Candle's
    /// parameter caches that capture needs), then is captured, not run.
    /// Later calls replay that bucket's graph; its logits land in the same
    /// buffer each time.
    #[cfg(feature = "cuda")]
    fn replay(
        &mut self,
        model: &Model,
        rows: usize,
        span: usize,
        cuda: &candle_core::CudaDevice,
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let cu = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            EngineError::Candle(candle_core::Error::Msg(format!("CUDA graph: {e}")))
        };
        let _scratch = scratch::hold();
        if self
            .graphs
            .first()
            .is_some_and(|(_, c)| c.context != model.context)
            || self.scratch_epoch != scratch::epoch()
        {
            // Captured with another model's RoPE tables, or before the
            // matmuls' scratch buffers moved: every bucket anew.
            self.graphs.clear();
            self.eager_only.clear();
            self.scratch_epoch = scratch::epoch();
        }
        if let Some((_, c)) = self.graphs.iter().find(|(k, _)| *k == (rows, span)) {
            c.graph.launch().map_err(cu)?;
            return Ok(c.logits.clone());
        }
        if self.eager_only.contains(&(rows, span)) {
            return self.ops(model, 0, rows, span);
        }
        let _cache = cuda.enable_cuda_graph_htod_cache();
        let eager = self.ops(model, 0, rows, span)?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cu)?;
        let captured = self.ops(model, 0, rows, span);
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        // The eager step already ran: a capture that fails leaves this
        // bucket eager, it does not fail the step.
        let made = (|| {
            let (logits, graph) = (captured?, graph.map_err(cu)?);
            let graph = graph.ok_or_else(|| {
                EngineError::Candle(candle_core::Error::Msg(
                    "CUDA graph: nothing captured".into(),
                ))
            })?;
            graph.upload().map_err(cu)?;
            Ok::<_, EngineError>(Captured {
                graph,
                logits,
                context: model.context,
                _weights: model.shared.clone(),
                _rope: (model.rope.clone(), model.rope_local.clone()),
            })
        })();
        match made {
            Ok(c) => {
                // Captures cost milliseconds each: a burst that meets new
                // buckets shows here.
                tracing::debug!(
                    rows,
                    span,
                    graphs = self.graphs.len() + 1,
                    "CUDA graph captured"
                );
                self.graphs.push(((rows, span), c))
            }
            Err(e) => {
                tracing::warn!(
                    rows,
                    span,
                    "CUDA graph capture failed, running eagerly: {e}"
                );
                self.eager_only.push((rows, span));
            }
        }
        Ok(eager)
    }

    /// The step's operations for slots `first..first + n`, attending to
    /// the first `span` keys; fixed shapes throughout.
    fn ops(&self, model: &Model, first: usize, n: usize, span: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.fused.is_some() {
            assert_eq!(first, 0, "the fused step runs the first rows");
            return self.fused_ops(model, n);
        }
        let (s, w) = (&model.spec, &*model.shared);
        let (heads, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
        let groups = heads / kvh;
        let rows = |t: &Tensor| t.narrow(0, first, n);
        let (token, pos) = (rows(&self.token)?, rows(&self.pos)?);
        let mut x = w
            .embed
            .table()
            .embedding(&token)?
            .to_dtype(DType::F32)?
            .reshape((n, 1, s.hidden))?;
        if let Some(scale) = s.embed_scale {
            x = (x * scale)?;
        }
        // Keys past a row's position are not written yet; a window also
        // hides keys `w` or more behind it. (n, 1, 1, capacity) each.
        let column = pos.reshape((n, 1))?;
        let spanned = |t: &Tensor| rows(t)?.narrow(1, 0, span);
        let (neg_inf, zeros) = (spanned(&self.neg_inf)?, spanned(&self.zeros)?);
        let future = self.keys.narrow(1, 0, span)?.broadcast_gt(&column)?;
        let full = future.where_cond(&neg_inf, &zeros)?;
        let mut windowed = Vec::with_capacity(self.windows.len());
        for (win, shifted) in &self.windows {
            let old = shifted.narrow(1, 0, span)?.broadcast_le(&column)?;
            let mask = old.where_cond(&neg_inf, &full)?;
            windowed.push((*win, mask.reshape((n, 1, 1, span))?));
        }
        let full = full.reshape((n, 1, 1, span))?;
        // Each RoPE table's rows for these positions, once for every layer.
        let global = model.rope.rows_at(&pos)?;
        let local = model
            .rope_local
            .as_ref()
            .map(|r| r.rows_at(&pos))
            .transpose()?;
        let at = pos
            .reshape((n, 1, 1, 1))?
            .broadcast_as((n, kvh, 1, hd))?
            .contiguous()?;
        for (i, layer) in w.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = layer.qkv.project(&h, heads * hd, kvh * hd)?;
            // The rows as a sequence of n positions: RoPE takes a row of
            // its tables per position.
            let mut q = q.reshape((1, n, heads, hd))?;
            let mut k = k.reshape((1, n, kvh, hd))?;
            let v = v.reshape((n, 1, kvh, hd))?;
            if let Some((qn, kn)) = &layer.qk_norm {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            let (rope, (cos, sin)) = match (layer.window, &model.rope_local, &local) {
                (Some(_), Some(r), Some(rows)) => (r, rows),
                _ => (&model.rope, &global),
            };
            let q = rope.rotate(&q, cos, sin)?;
            let k = rope.rotate(&k, cos, sin)?.reshape((n, 1, kvh, hd))?;
            let (kc, vc) = (rows(&self.k[i])?, rows(&self.v[i])?);
            kc.scatter_set(&at, &k.transpose(1, 2)?.contiguous()?, 2)?;
            vc.scatter_set(&at, &v.transpose(1, 2)?.contiguous()?, 2)?;
            // One query row per head: a KV head's query heads are its rows.
            // Scaled after RoPE, as the model's own attention does: folding
            // the scale into the Q norm saves a kernel but rounds otherwise,
            // and greedy tokens should not depend on the path.
            let q = (q.contiguous()?.reshape((n, kvh, groups, hd))? * s.attn_scale)?;
            let (ks, vs) = (kc.narrow(2, 0, span)?, vc.narrow(2, 0, span)?);
            let scores = q.matmul(&ks.transpose(2, 3)?)?;
            let bias = match layer.window {
                Some(win) => &windowed.iter().find(|(x, _)| *x == win).expect("made").1,
                None => &full,
            };
            let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(bias)?)?;
            let attended = p.matmul(&vs)?.reshape((n, 1, heads * hd))?;
            x = layer.finish(s, &attended, residual)?;
        }
        let x = w.norm.forward(&x.reshape((n, s.hidden))?)?;
        let logits = w.output.forward_output(&x)?.to_dtype(DType::F32)?;
        let out = rows(&self.out)?;
        out.slice_set(&logits.contiguous()?, 0, 0)?;
        let logits = out;
        // The greedy tokens and the next positions stay on the device.
        let next = logits.argmax_keepdim(D::Minus1)?.reshape(n)?;
        token.slice_set(&next, 0, 0)?;
        let ahead = pos
            .broadcast_add(&rows(&self.advance)?)?
            .minimum(&rows(&self.last)?)?;
        pos.slice_set(&ahead, 0, 0)?;
        Ok(logits)
    }
}

/// Rows every model reserves at load (see [`reserve_scratch`]): a prefill
/// chunk's worth; larger passes reserve before they run.
pub(super) const RESERVED_ROWS: usize = 512;

/// Make room in Candle's CUDA scratch buffers for a quantized matmul of
/// `rows` rows over `spec`'s weights, before a graph could read them.
/// Candle's fast quantized matmuls (MMVQ for up to 8 rows, MMQ above)
/// quantize their input into a per-device scratch buffer that grows when a
/// larger one is needed, freeing the old one. A graph captured before names
/// the old buffer by address: replaying it then writes freed memory (an
/// illegal address, or another allocation silently overwritten). So every
/// pass reserves its rows first (a lock and a lookup when nothing grows:
/// models reserve `RESERVED_ROWS` at load, a fixed step its slots), and a
/// reservation that grows the buffers moves an epoch that makes every
/// decoder recapture its graphs before its next replay.
pub(super) fn reserve_scratch(
    spec: &super::Spec,
    rows: usize,
    dev: &candle_core::Device,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = dev {
        let k = spec.hidden.max(spec.ffn).max(spec.heads * spec.head_dim);
        scratch::reserve(cuda, rows, k)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (spec, rows, dev);
    Ok(())
}

#[cfg(feature = "cuda")]
mod scratch {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, MutexGuard};

    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{DType, Module, Tensor};

    use crate::engine::models::common::Result;

    /// Per CUDA device: the rows and row length reserved so far.
    static RESERVED: Mutex<Option<HashMap<usize, (usize, usize)>>> = Mutex::new(None);
    static EPOCH: AtomicU64 = AtomicU64::new(0);

    /// Moves whenever a reservation grew the scratch buffers.
    pub fn epoch() -> u64 {
        EPOCH.load(Ordering::SeqCst)
    }

    /// Held from checking the epoch to enqueuing a graph launch (or a
    /// capture): a reservation cannot free the buffers in between.
    pub fn hold() -> MutexGuard<'static, Option<HashMap<usize, (usize, usize)>>> {
        RESERVED.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn reserve(cuda: &candle_core::CudaDevice, rows: usize, k: usize) -> Result<()> {
        let id = match candle_core::Device::Cuda(cuda.clone()).location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        };
        let mut held = hold();
        let map = held.get_or_insert_with(HashMap::new);
        let have = map.get(&id).copied().unwrap_or((0, 0));
        // Candle pads a row to 512 values; MMVQ takes up to 8 rows.
        let k = k.max(have.1).div_ceil(512) * 512;
        let rows = rows.max(have.0).max(9);
        if (rows, k) == have {
            return Ok(());
        }
        // The scratch size depends on rows and row length only: a small
        // Q8_0 matrix of that row length grows it as the model's would.
        let dev = candle_core::Device::Cuda(cuda.clone());
        let w = QTensor::quantize(&Tensor::zeros((128, k), DType::F32, &dev)?, GgmlDType::Q8_0)?;
        let mm = QMatMul::from_qtensor(w)?;
        for n in [8, rows] {
            mm.forward(&Tensor::zeros((n, k), DType::F32, &dev)?)?;
        }
        dev.synchronize()?;
        map.insert(id, (rows, k));
        EPOCH.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

//! A decode step whose every shape is fixed, so the GPU can replay it as one
//! CUDA graph: a KV cache of fixed capacity (per layer, allocated once), the
//! position and the token in device tensors (RoPE rows and the KV write are
//! indexed by them, the mask is computed from them), and attention over the
//! whole capacity with the positions not yet written masked. Nothing of a
//! step's position reaches the host, so one capture serves every position;
//! the step also leaves its greedy token and the next position on the device.
//!
//! On the CPU (and without the `cuda` feature) the same operations run
//! eagerly: that is how the tests check it against `Model::forward`.

#[cfg(feature = "cuda")]
use candle_core::Device;
use candle_core::{DType, Tensor, D};

use super::{Cache, Model};
use crate::engine::error::EngineError;
use crate::engine::models::common::Result;

/// One sequence decoding with fixed shapes over `model`'s weights.
pub struct StaticDecoder {
    capacity: usize,
    /// Per layer, (1, kv_heads, capacity, head_dim), F32.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// The token the next step runs and its position (u32, one element).
    token: Tensor,
    pos: Tensor,
    one: Tensor,
    /// 0..capacity, and shifted by each sliding window (u32).
    keys: Tensor,
    windows: Vec<(usize, Tensor)>,
    /// -inf and 0 over the capacity: the mask's two values.
    neg_inf: Tensor,
    zeros: Tensor,
    /// Positions written (the host's count of the device's `pos`).
    len: usize,
    #[cfg(feature = "cuda")]
    graph: Option<Captured>,
    /// Replay a captured graph on CUDA (off: every step runs eagerly).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    use_graph: bool,
}

#[cfg(feature = "cuda")]
struct Captured {
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    /// The graph's output: every replay writes the logits here.
    logits: Tensor,
}

impl StaticDecoder {
    /// Buffers for `capacity` positions (at most the model's context).
    pub fn new(model: &Model, capacity: usize, use_graph: bool) -> Result<Self> {
        let s = &model.spec;
        let dev = &model.device;
        let capacity = capacity.min(model.context).max(1);
        let kv = || Tensor::zeros((1, s.kv_heads, capacity, s.head_dim), DType::F32, dev);
        let keys: Vec<u32> = (0..capacity as u32).collect();
        let mut windows: Vec<(usize, Tensor)> = Vec::new();
        for w in s.windows.iter().flatten() {
            if !windows.iter().any(|(x, _)| x == w) {
                let shifted: Vec<u32> = keys.iter().map(|k| k + *w as u32).collect();
                windows.push((*w, Tensor::new(shifted, dev)?));
            }
        }
        Ok(Self {
            capacity,
            k: (0..s.layers)
                .map(|_| kv())
                .collect::<candle_core::Result<_>>()?,
            v: (0..s.layers)
                .map(|_| kv())
                .collect::<candle_core::Result<_>>()?,
            token: Tensor::zeros(1, DType::U32, dev)?,
            pos: Tensor::zeros(1, DType::U32, dev)?,
            one: Tensor::ones(1, DType::U32, dev)?,
            keys: Tensor::new(keys, dev)?,
            windows,
            neg_inf: Tensor::full(f32::NEG_INFINITY, capacity, dev)?,
            zeros: Tensor::zeros(capacity, DType::F32, dev)?,
            len: 0,
            #[cfg(feature = "cuda")]
            graph: None,
            use_graph,
        })
    }

    /// Positions written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Start from `prompt`: on a GPU the model's ordinary forward pass
    /// prefills it (chunked matmuls) and its keys and values are copied in;
    /// on the CPU, where the model keeps them in its own layout, the prompt
    /// runs through the fixed step token by token. Returns the last
    /// position's logits (1, vocab); the greedy token is then on the device.
    pub fn start(&mut self, model: &mut Model, prompt: &[u32]) -> Result<Tensor> {
        if prompt.is_empty() || prompt.len() >= self.capacity {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                context: self.capacity,
            });
        }
        self.len = 0;
        self.pos
            .slice_set(&Tensor::zeros(1, DType::U32, &model.device)?, 0, 0)?;
        if !matches!(model.kv.first(), Some(Cache::Tensor(_))) {
            let mut logits = None;
            for &t in prompt {
                logits = Some(self.step(model, Some(t))?);
            }
            return Ok(logits.expect("a prompt token"));
        }
        model.clear_kv();
        let logits = model.forward(prompt, super::LogitsFor::Last)?;
        for (i, c) in model.kv.iter().enumerate() {
            let Cache::Tensor(c) = c else { unreachable!() };
            let (k, v) = c.cached().expect("prefilled");
            self.k[i].slice_set(&k.contiguous()?, 2, 0)?;
            self.v[i].slice_set(&v.contiguous()?, 2, 0)?;
        }
        model.clear_kv();
        let n = prompt.len() as u32;
        self.pos
            .slice_set(&Tensor::new(&[n], &model.device)?, 0, 0)?;
        let next = logits.argmax_keepdim(D::Minus1)?.reshape(1)?;
        self.token.slice_set(&next, 0, 0)?;
        self.len = prompt.len();
        Ok(logits)
    }

    /// Run one token at the next position: `token`, or the greedy token
    /// the last step left on the device. Returns its logits (1, vocab); the
    /// next greedy token is then on the device ([`StaticDecoder::token`]).
    pub fn step(&mut self, model: &Model, token: Option<u32>) -> Result<Tensor> {
        if self.len >= self.capacity {
            return Err(EngineError::PromptTooLong {
                tokens: self.len + 1,
                context: self.capacity,
            });
        }
        if let Some(t) = token {
            super::check_tokens(&[t], model.spec.vocab)?;
            self.token
                .slice_set(&Tensor::new(&[t], &model.device)?, 0, 0)?;
        }
        self.len += 1;
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(cuda)) = (self.use_graph, &model.device) {
            return self.replay(model, &cuda.clone());
        }
        self.ops(model)
    }

    /// The greedy token the last step chose (a 4-byte copy to the host).
    pub fn token(&self) -> Result<u32> {
        Ok(self.token.to_vec1::<u32>()?[0])
    }

    /// First call: the step runs eagerly (filling Candle's parameter caches
    /// that capture needs), then is captured, not run. Later calls replay
    /// the graph; its logits land in the same buffer each time.
    #[cfg(feature = "cuda")]
    fn replay(&mut self, model: &Model, cuda: &candle_core::CudaDevice) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let cu = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            EngineError::Candle(candle_core::Error::Msg(format!("CUDA graph: {e}")))
        };
        if let Some(c) = &self.graph {
            c.graph.launch().map_err(cu)?;
            return Ok(c.logits.clone());
        }
        let _cache = cuda.enable_cuda_graph_htod_cache();
        let eager = self.ops(model)?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(cu)?;
        let captured = self.ops(model);
        let graph = stream.end_capture(
            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let (logits, graph) = (captured?, graph.map_err(cu)?);
        let graph = graph.ok_or_else(|| {
            EngineError::Candle(candle_core::Error::Msg(
                "CUDA graph: nothing captured".into(),
            ))
        })?;
        graph.upload().map_err(cu)?;
        self.graph = Some(Captured { graph, logits });
        Ok(eager)
    }

    /// The step's operations, fixed shapes throughout.
    fn ops(&self, model: &Model) -> Result<Tensor> {
        let (s, w) = (&model.spec, &*model.shared);
        let (heads, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
        let groups = heads / kvh;
        let mut x = w
            .embed
            .table()
            .embedding(&self.token)?
            .to_dtype(DType::F32)?
            .reshape((1, 1, s.hidden))?;
        if let Some(scale) = s.embed_scale {
            x = (x * scale)?;
        }
        // Keys past the position are not written yet; a window also hides
        // keys `w` or more behind it.
        let future = self.keys.broadcast_gt(&self.pos)?;
        let full = future.where_cond(&self.neg_inf, &self.zeros)?;
        let mut windowed = Vec::with_capacity(self.windows.len());
        for (win, shifted) in &self.windows {
            let old = shifted.broadcast_le(&self.pos)?;
            windowed.push((*win, old.where_cond(&self.neg_inf, &full)?));
        }
        // Each RoPE table's rows for this position, once for every layer.
        let global = model.rope.rows_at(&self.pos)?;
        let local = model
            .rope_local
            .as_ref()
            .map(|r| r.rows_at(&self.pos))
            .transpose()?;
        let at = self
            .pos
            .reshape((1, 1, 1, 1))?
            .broadcast_as((1, kvh, 1, hd))?
            .contiguous()?;
        for (i, layer) in w.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.attn_norm.forward(&x)?;
            let (q, k, v) = layer.qkv.project(&h, heads * hd, kvh * hd)?;
            let mut q = q.reshape((1, 1, heads, hd))?;
            let mut k = k.reshape((1, 1, kvh, hd))?;
            let v = v.reshape((1, 1, kvh, hd))?;
            if let Some((qn, kn)) = &layer.qk_norm {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            let (rope, (cos, sin)) = match (layer.window, &model.rope_local, &local) {
                (Some(_), Some(r), Some(rows)) => (r, rows),
                _ => (&model.rope, &global),
            };
            let q = rope.rotate(&q, cos, sin)?;
            let k = rope.rotate(&k, cos, sin)?;
            self.k[i].scatter_set(&at, &k.transpose(1, 2)?.contiguous()?, 2)?;
            self.v[i].scatter_set(&at, &v.transpose(1, 2)?.contiguous()?, 2)?;
            // One query row per head: a KV head's query heads are its rows.
            // Scaled after RoPE, as the model's own attention does: folding
            // the scale into the Q norm saves a kernel but rounds otherwise,
            // and greedy tokens should not depend on the path.
            let q = (q.contiguous()?.reshape((1, kvh, groups, hd))? * s.attn_scale)?;
            let scores = q.matmul(&self.k[i].transpose(2, 3)?)?;
            let bias = match layer.window {
                Some(win) => &windowed.iter().find(|(x, _)| *x == win).expect("made").1,
                None => &full,
            };
            let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(bias)?)?;
            let attended = p.matmul(&self.v[i])?.reshape((1, 1, heads * hd))?;
            x = layer.finish(s, &attended, residual)?;
        }
        let x = w.norm.forward(&x.reshape((1, s.hidden))?)?;
        let logits = w.output.forward_output(&x)?;
        // The greedy token and the next position stay on the device.
        let next = logits.argmax_keepdim(D::Minus1)?.reshape(1)?;
        self.token.slice_set(&next, 0, 0)?;
        self.pos
            .slice_set(&self.pos.broadcast_add(&self.one)?, 0, 0)?;
        Ok(logits)
    }
}

#!/usr/bin/env python3
"""Independent forward pass for paraphym's tiny synthetic models.

numpy + the `gguf` package (llama.cpp's own reader and dequantizers); no Candle,
no paraphym code. Reads a GGUF (qwen3, llama, gemma3 or phi3), runs the tokens
given on the command line through the model in float64 and writes the logits of
every position as little-endian float32, row-major (positions, vocab).

    python3 scripts/ref_forward.py MODEL.gguf 1,2,3 OUT.f32 [CONTEXT]

Semantics follow llama.cpp: RMSNorm x * w (GGUF stores Gemma's 1 + w), NeoX RoPE
for qwen3/gemma3 and interleaved for llama, Gemma 3's sliding window (a query at
p sees keys p-w+1..p) on all layers but every sixth, local RoPE base 10,000,
GELU-tanh MLP and embeddings scaled by sqrt(hidden). Phi-3: fused attn_qkv (Q, K,
V rows) and ffn_up (gate rows, then up rows), NeoX RoPE on the first
rope.dimension_count dimensions of each head, LongRoPE frequency divisors
(rope_factors_long when CONTEXT, default the file's context_length, exceeds
rope.scaling.original_context_length, else rope_factors_short) with cos/sin
scaled by rope.scaling.attn_factor, and no sliding window (as llama.cpp).

By default weights are dequantized and everything runs in float64: the model's
exact math. ACT_QUANT=ggml also rounds each matmul's input to 8-bit blocks the
way ggml's CPU kernels do (q8_K for k-quant weights, q8_0 otherwise);
overrides by block type or tensor name follow, e.g. ACT_QUANT=ggml,Q8_0=q8_k
for Candle's AVX-512 kernels that pair q8_0 weights with q8_K activations.
Which format a kernel uses depends on the CPU and the tensor's shape, so the
tests compare against the exact math (see docs/ARCHITECTURE.md).
"""
import os
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def round_away(v):
    """Round half away from zero (C's roundf), exactly, for float32 input."""
    v = v.astype(np.float64)
    return np.trunc(v + np.copysign(0.5, v))


def quantize_activations(x, fmt):
    """Round each row of x to 8-bit blocks and back, as ggml's quantize_row_q8_K
    (256 values, scale -127/max, float32 d) or quantize_row_q8_0 (32 values,
    d = amax/127 stored as float16) do, returning float64."""
    x = np.asarray(x, dtype=np.float32)
    n = 256 if fmt == "q8_k" else 32
    b = x.reshape(x.shape[0], -1, n)
    if fmt == "q8_k":
        idx = np.argmax(np.abs(b), axis=-1)[..., None]
        mx = np.take_along_axis(b, idx, axis=-1)
        with np.errstate(divide="ignore"):
            iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0)).astype(np.float32)
        q = np.clip(round_away((iscale * b).astype(np.float32)), -128, 127)
        with np.errstate(divide="ignore"):
            d = np.where(iscale != 0, np.float32(1.0) / iscale, np.float32(0)).astype(np.float32)
    else:
        amax = np.abs(b).max(axis=-1, keepdims=True)
        d32 = (amax / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(d32 != 0, np.float32(1.0) / d32, np.float32(0)).astype(np.float32)
        q = round_away((b * inv).astype(np.float32))
        d = d32.astype(np.float16)
    return (q * d.astype(np.float64)).reshape(x.shape)


def main():
    path, tokens, out = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], sys.argv[3]
    r = GGUFReader(path)
    context = int(sys.argv[4]) if len(sys.argv) > 4 else None
    # ACT_QUANT="" (off), "ggml" (ggml's rule: q8_K for k-quants, q8_0 otherwise),
    # or overrides such as "ggml,Q8_0=q8_k" for kernels that pair a block type
    # with the other activation format.
    spec = os.environ.get("ACT_QUANT", "")
    act_quant = None
    if spec:
        act_quant = dict(kv.split("=") for kv in spec.split(",") if "=" in kv)

    def meta(key, default=None):
        f = r.fields.get(key)
        if f is None:
            if default is None:
                raise KeyError(key)
            return default
        return f.contents()

    arch = meta("general.architecture")
    k = lambda s: f"{arch}.{s}"
    hidden = int(meta(k("embedding_length")))
    layers = int(meta(k("block_count")))
    heads = int(meta(k("attention.head_count")))
    kv_heads = int(meta(k("attention.head_count_kv")))
    hd = int(meta(k("attention.key_length"), hidden // heads))
    eps = float(meta(k("attention.layer_norm_rms_epsilon")))
    base = float(meta(k("rope.freq_base"), 10000.0))
    window = int(meta(k("attention.sliding_window"), 0))
    rot = int(meta(k("rope.dimension_count"), hd))
    n_ctx = context or int(meta(k("context_length")))
    original = int(meta(k("rope.scaling.original_context_length"), n_ctx))
    mscale = float(meta(k("rope.scaling.attn_factor"), 1.0))

    tensors = {t.name: t for t in r.tensors}

    def w(name):
        t = tensors[name]
        return dequantize(t.data, t.tensor_type).astype(np.float64)

    def mm(x, name):
        """x @ W.T; with ACT_QUANT set, x is first rounded to 8 bits per block
        the way ggml's CPU kernels round activations for W's block type."""
        t = tensors[name]
        if act_quant is not None:
            default = "q8_k" if t.tensor_type.name.endswith("_K") else "q8_0"
            fmt = act_quant.get(name, act_quant.get(t.tensor_type.name, default))
            x = quantize_activations(x, fmt)
        return x @ w(name).T

    def rms(x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

    factors = None
    fname = "rope_factors_long.weight" if n_ctx > original else "rope_factors_short.weight"
    if fname in tensors:
        factors = w(fname)

    def rope(x, theta, interleaved):
        # x: (T, H, hd); rotates the first `rot` dimensions
        if x.shape[-1] > rot:
            return np.concatenate([rope(x[..., :rot], theta, interleaved), x[..., rot:]], axis=-1)
        T, d = x.shape[0], x.shape[-1]
        inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        if factors is not None:
            inv = inv / factors
        ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]  # (T, hd/2)
        c, s = mscale * np.cos(ang)[:, None, :], mscale * np.sin(ang)[:, None, :]
        if interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
            y = np.empty_like(x)
            y[..., 0::2] = a * c - b * s
            y[..., 1::2] = a * s + b * c
            return y
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)

    gemma = arch == "gemma3"
    emb = w("token_embd.weight")
    x = emb[tokens]
    if gemma:
        x = x * np.sqrt(hidden)
    T = len(tokens)
    pos = np.arange(T)
    for i in range(layers):
        p = lambda s: f"blk.{i}.{s}.weight"
        sliding = gemma and (i + 1) % 6 != 0
        h = rms(x, w(p("attn_norm")))
        if f"blk.{i}.attn_qkv.weight" in tensors:
            qkv = mm(h, p("attn_qkv"))
            qd, kvd = heads * hd, kv_heads * hd
            q = qkv[:, :qd].reshape(T, heads, hd)
            kk = qkv[:, qd : qd + kvd].reshape(T, kv_heads, hd)
            v = qkv[:, qd + kvd :].reshape(T, kv_heads, hd)
        else:
            q = mm(h, p("attn_q")).reshape(T, heads, hd)
            kk = mm(h, p("attn_k")).reshape(T, kv_heads, hd)
            v = mm(h, p("attn_v")).reshape(T, kv_heads, hd)
        if arch in ("qwen3", "gemma3"):
            q = rms(q, w(p("attn_q_norm")))
            kk = rms(kk, w(p("attn_k_norm")))
        theta = 10000.0 if sliding else base
        q = rope(q, theta, arch == "llama")
        kk = rope(kk, theta, arch == "llama")
        allowed = pos[None, :] <= pos[:, None]
        if sliding:
            allowed &= (pos[:, None] - pos[None, :]) < window
        rep = heads // kv_heads
        att = np.empty((T, heads, hd))
        for hh in range(heads):
            s = q[:, hh, :] @ kk[:, hh // rep, :].T / np.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            s /= s.sum(axis=-1, keepdims=True)
            att[:, hh, :] = s @ v[:, hh // rep, :]
        o = mm(att.reshape(T, heads * hd), p("attn_output"))
        if gemma:
            o = rms(o, w(p("post_attention_norm")))
        x = x + o
        h = rms(x, w(p("ffn_norm")))
        if f"blk.{i}.ffn_gate.weight" in tensors:
            g, u = mm(h, p("ffn_gate")), mm(h, p("ffn_up"))
        else:
            gu = mm(h, p("ffn_up"))
            g, u = gu[:, : gu.shape[1] // 2], gu[:, gu.shape[1] // 2 :]
        if gemma:
            g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
        else:
            g = g / (1 + np.exp(-g))
        m = mm(g * u, p("ffn_down"))
        if gemma:
            m = rms(m, w(p("post_ffw_norm")))
        x = x + m
    x = rms(x, w("output_norm.weight"))
    logits = mm(x, "output.weight" if "output.weight" in tensors else "token_embd.weight")
    logits.astype("<f4").tofile(out)


if __name__ == "__main__":
    main()

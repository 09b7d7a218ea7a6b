//! The generic Llama-family decoder, written in candle ops so that every
//! position's hidden state is available (candle-transformers' causal LMs
//! return the last position only), with per-sequence positions and key
//! masks so that one forward pass serves right-padded scoring batches and
//! left-padded generation batches with a KV cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Storage, Tensor};
use serde_json::Value;

use crate::config::{Activation, AttentionKind, ModelConfig, rope_frequencies};
use crate::cpu;
use crate::tokenizer::TextTokenizer;
use crate::{Ctx, Result, c, err};

/// A weight matrix `[out, in]`: a contiguous candle tensor, or packed for
/// the CPU GEMM (`cpu::matmul`) where that runs.
enum Weight {
    Tensor(Tensor),
    Packed(cpu::Packed),
}

impl Weight {
    fn new(t: Tensor, pack: bool) -> Result<Weight> {
        if !pack {
            return Ok(Weight::Tensor(t));
        }
        let (n, k) = c(t.dims2())?;
        Ok(Weight::Packed(with_slice(&t, |w| {
            cpu::Packed::new(w, n, k)
        })?))
    }

    /// `x`: `[rows, in]` → `[rows, out]`.
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Tensor(w) => c(x.matmul(&c(w.t())?)),
            Weight::Packed(p) => {
                let (rows, _) = c(x.dims2())?;
                let y = packed_matmul(x, p)?;
                c(Tensor::from_vec(y, (rows, p.rows()), x.device()))
            }
        }
    }
}

/// `x · wᵀ` through the packed GEMM, as a plain vector.
fn packed_matmul(x: &Tensor, p: &cpu::Packed) -> Result<Vec<f32>> {
    let (rows, inp) = c(x.dims2())?;
    if inp != p.cols() {
        return err(format!(
            "matmul: input has {inp} features, the weight expects {}",
            p.cols()
        ));
    }
    with_slice(x, |xs| cpu::matmul_vec(xs, rows, p))
}

/// Head-major `[B, heads, past + t, hd]`: `prev` (`[B, heads, past, hd]`)
/// followed by the token-major `new` (`[B·t, heads, hd]`).
fn heads_after(
    prev: &[f32],
    new: &[f32],
    (b, heads, past, t, hd): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let tk = past + t;
    let mut out = vec![0f32; b * heads * tk * hd];
    for bi in 0..b {
        for g in 0..heads {
            let dst = &mut out[(bi * heads + g) * tk * hd..][..tk * hd];
            dst[..past * hd].copy_from_slice(&prev[(bi * heads + g) * past * hd..][..past * hd]);
            for ti in 0..t {
                dst[(past + ti) * hd..][..hd]
                    .copy_from_slice(&new[((bi * t + ti) * heads + g) * hd..][..hd]);
            }
        }
    }
    out
}

/// Runs `f` on the f32 values of a CPU tensor, in row-major order.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = c(t.contiguous())?;
    let (st, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*st else {
        return err("packed kernels need a CPU tensor");
    };
    let all = c(s.as_slice::<f32>())?;
    let Some((a, b)) = layout.contiguous_offsets() else {
        return err("packed kernels need a contiguous tensor");
    };
    Ok(f(&all[a..b]))
}

struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// On the packed path: `x · wᵀ + bias` for `x` `[rows, in]`, as a
    /// plain `[rows, out]` vector.
    fn vec(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let Weight::Packed(p) = &self.weight else {
            return err("internal: packed forward on an unpacked weight");
        };
        if x.len() != rows * p.cols() {
            return err(format!(
                "matmul: input has {} values, the weight expects {rows} × {}",
                x.len(),
                p.cols()
            ));
        }
        let mut y = cpu::matmul_vec(x, rows, p);
        if let Some(b) = &self.bias {
            with_slice(b, |b| {
                for row in y.chunks_mut(b.len()) {
                    for (v, &bv) in row.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            })?;
        }
        Ok(y)
    }

    /// `x`: `[n, in]` → `[n, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.matmul(x)?;
        match &self.bias {
            Some(b) => c(y.broadcast_add(b)),
            None => Ok(y),
        }
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: Tensor,
    post_norm: Tensor,
    kind: AttentionKind,
}

/// A decoder ready to run: weights as f32 tensors on one device.
pub struct Model {
    pub config: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[vocab, hidden]` (the embedding when tied).
    lm_head: Weight,
    /// Packed CPU kernels (GEMM, fused attention and SwiGLU) in use.
    packed: bool,
}

/// Key/value cache of a batch: per layer `[B, kv_heads, T, head_dim]`, and
/// each cached key's position (-1 for padding) per sequence.
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    key_pos: Vec<Vec<i64>>,
}

impl Cache {
    pub fn new(model: &Model, batch: usize) -> Cache {
        Cache {
            kv: (0..model.layers.len()).map(|_| None).collect(),
            key_pos: vec![vec![]; batch],
        }
    }

    pub fn len(&self) -> usize {
        self.key_pos.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A model plus its tokenizer, as loaded from a directory or a GGUF file.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Option<TextTokenizer>,
    pub path: PathBuf,
}

/// Names a tensor may carry in a checkpoint: `model.X` (CausalLM) or `X`.
fn take(map: &mut HashMap<String, Tensor>, name: &str) -> Option<Tensor> {
    map.remove(&format!("model.{name}"))
        .or_else(|| map.remove(name))
}

/// A required tensor of a known shape, as contiguous f32.
fn need(
    map: &mut HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let t = match take(map, name) {
        Some(t) => t,
        None => return err(format!("missing tensor `model.{name}`")),
    };
    if t.dims() != shape {
        return err(format!(
            "tensor `model.{name}` has shape {:?}, expected {shape:?} from config.json",
            t.dims()
        ));
    }
    to_f32(t, device, name)
}

fn to_f32(t: Tensor, dev: &Device, name: &str) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32).ctx(|| format!("tensor `{name}`"))?;
    let t = t.to_device(dev).ctx(|| format!("tensor `{name}`"))?;
    t.contiguous().ctx(|| format!("tensor `{name}`"))
}

impl Model {
    /// Builds the decoder from Hugging Face-named tensors (any float dtype;
    /// converted to f32 on `device`). Every missing or misshapen tensor is
    /// reported by name.
    pub fn from_candle_tensors(
        config: ModelConfig,
        map: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Model> {
        let pack = device.is_cpu() && cpu::available();
        Model::build(config, map, device, pack)
    }

    /// As [`Model::from_candle_tensors`]; `pack` chooses the packed CPU
    /// kernels (AVX-512 only; see [`crate::cpu`]) over candle's ops —
    /// `false` forces candle's, for comparisons.
    pub fn build(
        config: ModelConfig,
        mut map: HashMap<String, Tensor>,
        device: &Device,
        pack: bool,
    ) -> Result<Model> {
        let pack = pack && device.is_cpu() && cpu::available();
        let cfg = &config;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let embed = need(
            &mut map,
            "embed_tokens.weight",
            &[cfg.vocab_size, h],
            device,
        )?;
        let norm = need(&mut map, "norm.weight", &[h], device)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("layers.{i}");
            let lin = |map: &mut HashMap<String, Tensor>,
                       name: &str,
                       out: usize,
                       inp: usize|
             -> Result<Linear> {
                let weight = need(map, &format!("{p}.{name}.weight"), &[out, inp], device)?;
                let bias = match take(map, &format!("{p}.{name}.bias")) {
                    Some(b) => {
                        if b.dims() != [out] {
                            return err(format!(
                                "tensor `{p}.{name}.bias` has shape {:?}, expected [{out}]",
                                b.dims()
                            ));
                        }
                        Some(to_f32(b, device, name)?)
                    }
                    None => None,
                };
                Ok(Linear {
                    weight: Weight::new(weight, pack)?,
                    bias,
                })
            };
            let q = lin(&mut map, "self_attn.q_proj", nh * hd, h)?;
            let k = lin(&mut map, "self_attn.k_proj", nkv * hd, h)?;
            let v = lin(&mut map, "self_attn.v_proj", nkv * hd, h)?;
            let o = lin(&mut map, "self_attn.o_proj", h, nh * hd)?;
            let gate = lin(&mut map, "mlp.gate_proj", cfg.intermediate_size, h)?;
            let up = lin(&mut map, "mlp.up_proj", cfg.intermediate_size, h)?;
            let down = lin(&mut map, "mlp.down_proj", h, cfg.intermediate_size)?;
            let opt_norm =
                |map: &mut HashMap<String, Tensor>, name: &str| -> Result<Option<Tensor>> {
                    match take(map, &format!("{p}.self_attn.{name}.weight")) {
                        Some(t) if t.dims() == [hd] => Ok(Some(to_f32(t, device, name)?)),
                        Some(t) => err(format!(
                            "tensor `{p}.self_attn.{name}.weight` has shape {:?}, expected [{hd}]",
                            t.dims()
                        )),
                        None => Ok(None),
                    }
                };
            let q_norm = opt_norm(&mut map, "q_norm")?;
            let k_norm = opt_norm(&mut map, "k_norm")?;
            if cfg.model_type == "qwen3" && (q_norm.is_none() || k_norm.is_none()) {
                return err(format!(
                    "missing tensor `model.{p}.self_attn.q_norm.weight`/`k_norm.weight` (qwen3)"
                ));
            }
            layers.push(Layer {
                q,
                k,
                v,
                o,
                q_norm,
                k_norm,
                gate,
                up,
                down,
                input_norm: need(
                    &mut map,
                    &format!("{p}.input_layernorm.weight"),
                    &[h],
                    device,
                )?,
                post_norm: need(
                    &mut map,
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    device,
                )?,
                kind: cfg.layer_kinds[i],
            });
        }
        let lm_head = match map.remove("lm_head.weight") {
            Some(t) if !cfg.tie_word_embeddings => {
                if t.dims() != [cfg.vocab_size, h] {
                    return err(format!(
                        "tensor `lm_head.weight` has shape {:?}, expected [{}, {h}]",
                        t.dims(),
                        cfg.vocab_size
                    ));
                }
                Weight::new(to_f32(t, device, "lm_head.weight")?, pack)?
            }
            // Tied (or absent, which transformers also resolves by tying).
            _ => Weight::new(embed.clone(), pack)?,
        };
        Ok(Model {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            packed: pack,
        })
    }

    /// Builds the decoder from merge-executor tensors (f32 values in memory)
    /// without touching the disk: evolve's inner loop.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: HashMap<String, smelt_core::tensor::Tensor>,
        device: &Device,
    ) -> Result<Model> {
        let mut map = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let n = t.numel();
            if t.shape.iter().product::<usize>() != n {
                return err(format!(
                    "tensor `{name}`: shape {:?} does not match its {n} values",
                    t.shape
                ));
            }
            let ct = Tensor::from_vec(t.data, t.shape.as_slice(), device)
                .ctx(|| format!("tensor `{name}`"))?;
            map.insert(name, ct);
        }
        Model::from_candle_tensors(config, map, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the packed CPU kernels run this model.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Runs the decoder on `ids` (`B` rows of equal length `T`) whose
    /// positions are `pos` (-1 marks padding, which no real token attends
    /// to), appending to `cache` when given. Returns the final-norm hidden
    /// states `[B, T, hidden]`.
    pub fn forward(
        &self,
        ids: &[Vec<u32>],
        pos: &[Vec<i64>],
        mut cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let b = ids.len();
        if b == 0 || ids[0].is_empty() {
            return err("forward: empty batch");
        }
        let t = ids[0].len();
        let vocab = cfg.vocab_size as u32;
        let mut flat = Vec::with_capacity(b * t);
        for row in ids {
            if row.len() != t {
                return err("forward: rows of different lengths");
            }
            for &id in row {
                if id >= vocab {
                    return err(format!(
                        "token id {id} is out of range for vocab_size {}",
                        cfg.vocab_size
                    ));
                }
                flat.push(id);
            }
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        // Key positions over the whole (cached + new) sequence.
        let mut key_pos: Vec<Vec<i64>> = match cache.as_deref() {
            Some(c) if !c.is_empty() => c.key_pos.clone(),
            _ => vec![vec![]; b],
        };
        for (kp, p) in key_pos.iter_mut().zip(pos) {
            kp.extend_from_slice(p);
        }
        let tk = past + t;

        // Rotary tables for these positions: [B, T, rot/2].
        let max_pos = pos.iter().flatten().copied().max().unwrap_or(0).max(0) as usize;
        let (inv_freq, att) = rope_frequencies(cfg, max_pos + 1);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for p in pos {
            for &q in p {
                let q = q.max(0) as f32;
                for &f in &inv_freq {
                    let a = q * f; // f32 product, as torch's matmul of positions × inv_freq
                    cos.push(((a as f64).cos() as f32) * att);
                    sin.push(((a as f64).sin() as f32) * att);
                }
            }
        }

        // Additive masks [B, (1,) T, Tk], one per distinct window.
        let mut masks: HashMap<Option<usize>, Vec<f32>> = HashMap::new();
        for layer in &self.layers {
            let w = match layer.kind {
                AttentionKind::Full => None,
                AttentionKind::Sliding(w) => Some(w),
            };
            if masks.contains_key(&w) {
                continue;
            }
            let mut m = vec![0f32; b * t * tk];
            for bi in 0..b {
                for ti in 0..t {
                    let qi = past + ti;
                    let pq = pos[bi][ti];
                    let row = &mut m[(bi * t + ti) * tk..(bi * t + ti + 1) * tk];
                    for (j, slot) in row.iter_mut().enumerate() {
                        let pk = key_pos[bi][j];
                        let ok = if pq < 0 {
                            j == qi // padding query: itself only (keeps softmax finite)
                        } else {
                            j <= qi && pk >= 0 && w.is_none_or(|w| pq - pk < w as i64)
                        };
                        if !ok {
                            *slot = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            masks.insert(w, m);
        }
        if self.packed {
            let x = self.forward_packed(
                &flat,
                (b, t, past),
                (&cos, &sin),
                &masks,
                cache.as_deref_mut(),
            )?;
            if let Some(cache) = cache {
                cache.key_pos = key_pos;
            }
            return Ok(x);
        }
        let cos = c(Tensor::from_vec(cos, (b, t, half), &self.device))?;
        let sin = c(Tensor::from_vec(sin, (b, t, half), &self.device))?;
        let mut mask_t: HashMap<Option<usize>, Tensor> = HashMap::new();
        for (w, m) in masks {
            mask_t.insert(w, c(Tensor::from_vec(m, (b, 1, t, tk), &self.device))?);
        }

        let ids_t = c(Tensor::from_vec(flat, b * t, &self.device))?;
        let mut x = c(self.embed.index_select(&ids_t, 0))?; // [B*T, H]
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rep = nh / nkv;
        let rot = cfg.rotary_dim();
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            let hn = c(candle_nn::ops::rms_norm(&x, &layer.input_norm, eps))?;
            let q = layer.q.forward(&hn)?;
            let k = layer.k.forward(&hn)?;
            let v = layer.v.forward(&hn)?;
            let mut q = c(c(q.reshape((b, t, nh, hd)))?.transpose(1, 2))?; // [B,nh,T,hd]
            let mut k = c(c(k.reshape((b, t, nkv, hd)))?.transpose(1, 2))?;
            let v = c(c(c(v.reshape((b, t, nkv, hd)))?.transpose(1, 2))?.contiguous())?;
            if let Some(w) = &layer.q_norm {
                q = c(candle_nn::ops::rms_norm(&c(q.contiguous())?, w, eps))?;
            }
            if let Some(w) = &layer.k_norm {
                k = c(candle_nn::ops::rms_norm(&c(k.contiguous())?, w, eps))?;
            }
            let q = apply_rope(&q, &cos, &sin, rot, hd)?;
            let k = apply_rope(&k, &cos, &sin, rot, hd)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => {
                    let kv = match cache.kv[li].take() {
                        Some((pk, pv)) => (
                            c(Tensor::cat(&[&pk, &k], 2))?,
                            c(Tensor::cat(&[&pv, &v], 2))?,
                        ),
                        None => (k, v),
                    };
                    cache.kv[li] = Some(kv.clone());
                    kv
                }
                None => (k, v),
            };
            let w = match layer.kind {
                AttentionKind::Full => None,
                AttentionKind::Sliding(w) => Some(w),
            };
            let attn = {
                // Grouped-query attention without copying keys: fold the
                // repeated query heads into the sequence axis.
                let qg = c(q.reshape((b, nkv, rep * t, hd)))?;
                let scores = c(c(qg.matmul(&c(k.t())?))?.affine(scale, 0.0))?; // [B,nkv,rep*T,Tk]
                let scores = c(scores.reshape((b, nh, t, tk)))?;
                let scores = c(scores.broadcast_add(&mask_t[&w]))?;
                let probs = c(candle_nn::ops::softmax_last_dim(&scores))?;
                let probs = c(probs.reshape((b, nkv, rep * t, tk)))?;
                let attn = c(probs.matmul(&v))?; // [B,nkv,rep*T,hd]
                c(c(c(attn.reshape((b, nh, t, hd)))?.transpose(1, 2))?.reshape((b * t, nh * hd)))?
            };
            let attn = layer.o.forward(&attn)?;
            x = c(x.add(&attn))?;
            let hn = c(candle_nn::ops::rms_norm(&x, &layer.post_norm, eps))?;
            let g = layer.gate.forward(&hn)?;
            let g = match cfg.hidden_act {
                Activation::Silu => c(candle_nn::ops::silu(&g))?,
                Activation::GeluTanh => c(g.gelu())?,
                Activation::Gelu => c(g.gelu_erf())?,
            };
            let u = layer.up.forward(&hn)?;
            let mlp = layer.down.forward(&c(g.mul(&u))?)?;
            x = c(x.add(&mlp))?;
        }
        if let Some(cache) = cache {
            cache.key_pos = key_pos;
        }
        let x = c(candle_nn::ops::rms_norm(&x, &self.norm, eps))?;
        c(x.reshape((b, t, cfg.hidden_size)))
    }

    /// [`Model::forward`] on the packed CPU kernels, on plain vectors
    /// throughout: token-major activations `[B·T, …]`, rotary tables
    /// `[B·T, rot/2]`, masks `[B, T, Tk]` per window.
    fn forward_packed(
        &self,
        flat: &[u32],
        (b, t, past): (usize, usize, usize),
        (cos, sin): (&[f32], &[f32]),
        masks: &HashMap<Option<usize>, Vec<f32>>,
        mut cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let dev = &self.device;
        let (h, n, tk) = (cfg.hidden_size, b * t, past + t);
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let rot = cfg.rotary_dim();
        let eps = cfg.rms_norm_eps as f32;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let mut x = with_slice(&self.embed, |e| {
            let mut x = Vec::with_capacity(n * h);
            for &id in flat {
                x.extend_from_slice(&e[id as usize * h..][..h]);
            }
            x
        })?;
        let first_norm = match self.layers.first() {
            Some(l) => &l.input_norm,
            None => &self.norm,
        };
        let mut hn = with_slice(first_norm, |w| cpu::rms_norm(&x, w, eps))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let mut q = layer.q.vec(&hn, n)?;
            let mut k = layer.k.vec(&hn, n)?;
            let v = layer.v.vec(&hn, n)?;
            if let Some(w) = &layer.q_norm {
                with_slice(w, |w| cpu::rms_norm_inplace(&mut q, w, eps))?;
            }
            if let Some(w) = &layer.k_norm {
                with_slice(w, |w| cpu::rms_norm_inplace(&mut k, w, eps))?;
            }
            if rot > 0 {
                cpu::rope(&mut q, nh, hd, cos, sin);
                cpu::rope(&mut k, nkv, hd, cos, sin);
            }
            // Keys and values head-major [B, nkv, Tk, hd], after the cache.
            let prev = match cache.as_deref_mut() {
                Some(cache) => cache.kv[li].take(),
                None => None,
            };
            let dims = (b, nkv, past, t, hd);
            let (kf, vf) = match &prev {
                Some((pk, pv)) => (
                    with_slice(pk, |pk| heads_after(pk, &k, dims))?,
                    with_slice(pv, |pv| heads_after(pv, &v, dims))?,
                ),
                None if past == 0 => (heads_after(&[], &k, dims), heads_after(&[], &v, dims)),
                None => return err("forward: cache without keys for this layer"),
            };
            let w = match layer.kind {
                AttentionKind::Full => None,
                AttentionKind::Sliding(w) => Some(w),
            };
            let shape = cpu::AttnShape {
                b,
                nh,
                nkv,
                t,
                tk,
                hd,
            };
            let attn = cpu::attention(&q, &kf, &vf, &masks[&w], shape, scale);
            if let Some(cache) = cache.as_deref_mut() {
                cache.kv[li] = Some((
                    c(Tensor::from_vec(kf, (b, nkv, tk, hd), dev))?,
                    c(Tensor::from_vec(vf, (b, nkv, tk, hd), dev))?,
                ));
            }
            let o = layer.o.vec(&attn, n)?;
            let hn2 = with_slice(&layer.post_norm, |w| cpu::add_rms_norm(&mut x, &o, w, eps))?;
            let mut g = layer.gate.vec(&hn2, n)?;
            let u = layer.up.vec(&hn2, n)?;
            match cfg.hidden_act {
                Activation::Silu => cpu::silu_mul(&mut g, &u),
                act => {
                    let gt = c(Tensor::from_vec(g, (n, cfg.intermediate_size), dev))?;
                    let ut = c(Tensor::from_vec(u, (n, cfg.intermediate_size), dev))?;
                    let a = match act {
                        Activation::GeluTanh => c(gt.gelu())?,
                        _ => c(gt.gelu_erf())?,
                    };
                    g = c(c(c(a.mul(&ut))?.flatten_all())?.to_vec1::<f32>())?;
                }
            }
            let d = layer.down.vec(&g, n)?;
            let next = match self.layers.get(li + 1) {
                Some(l) => &l.input_norm,
                None => &self.norm,
            };
            hn = with_slice(next, |w| cpu::add_rms_norm(&mut x, &d, w, eps))?;
        }
        c(Tensor::from_vec(hn, (b, t, h), dev))
    }

    /// Log-softmax over the vocabulary of the logits of `hidden` (`[N, H]`).
    pub fn log_probs(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.logits(hidden)?;
        c(candle_nn::ops::log_softmax(&logits, D::Minus1))
    }

    /// `log p(targets[i] | hidden[i])` for each row of `hidden` (`[N, H]`):
    /// log-softmax and gather fused on the packed CPU path.
    pub fn pick_log_probs(&self, hidden: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
        let (rows, _) = c(hidden.dims2())?;
        if rows != targets.len() {
            return err(format!(
                "pick_log_probs: {rows} rows but {} targets",
                targets.len()
            ));
        }
        let vocab = self.config.vocab_size;
        if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
            return err(format!(
                "token id {bad} is out of range for vocab_size {vocab}"
            ));
        }
        match &self.lm_head {
            Weight::Packed(p) => {
                let logits = packed_matmul(hidden, p)?;
                let mut out = vec![0f32; rows];
                cpu::pick_logprobs(&logits, vocab, targets, &mut out);
                Ok(out)
            }
            Weight::Tensor(_) => {
                let lp = self.log_probs(hidden)?;
                let tgt = c(Tensor::from_vec(targets.to_vec(), (rows, 1), &self.device))?;
                c(c(c(lp.gather(&tgt, D::Minus1))?.flatten_all())?.to_vec1::<f32>())
            }
        }
    }

    /// Logits of `hidden` (`[N, H]`) → `[N, V]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.matmul(&c(hidden.contiguous())?)
    }
}

/// Rotates the first `rot` dims of each head (transformers' rotate_half).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize, hd: usize) -> Result<Tensor> {
    if rot == hd {
        return c(candle_nn::rotary_emb::rope(&c(x.contiguous())?, cos, sin));
    }
    let xr = c(c(x.narrow(D::Minus1, 0, rot))?.contiguous())?;
    let xp = c(x.narrow(D::Minus1, rot, hd - rot))?;
    let xr = c(candle_nn::rotary_emb::rope(&xr, cos, sin))?;
    c(Tensor::cat(&[&xr, &xp], D::Minus1))
}

/// Reads a Hugging Face model directory (config.json, model.safetensors or a
/// sharded index, tokenizer.json) or a `.gguf` file.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return crate::gguf::load_gguf(path, device);
    }
    if !path.is_dir() {
        return err(format!(
            "{}: not a model directory or a .gguf file",
            path.display()
        ));
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).ctx(|| format!("{}", cfg_path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| crate::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let config = ModelConfig::from_json(&v)
        .map_err(|e| crate::Error::Msg(format!("{}: {e}", cfg_path.display())))?;
    let map = read_safetensors_dir(path, device)?;
    let model = Model::from_candle_tensors(config, map, device)
        .map_err(|e| crate::Error::Msg(format!("{}: {e}", path.display())))?;
    let tok_path = path.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        Some(TextTokenizer::from_file(&tok_path, &model.config)?)
    } else {
        None
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        path: path.to_path_buf(),
    })
}

/// Every tensor of `model.safetensors` or of the shards listed in
/// `model.safetensors.index.json`.
pub fn read_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).ctx(|| format!("{}", index.display()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| crate::Error::Msg(format!("{}: {e}", index.display())))?;
        let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
            return err(format!("{}: no `weight_map` object", index.display()));
        };
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else {
        return err(format!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        ));
    };
    let mut out = HashMap::new();
    for f in files {
        let m = candle_core::safetensors::load(&f, device).ctx(|| format!("{}", f.display()))?;
        out.extend(m);
    }
    Ok(out)
}

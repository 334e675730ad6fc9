//! The CLIP text transformer (CLIP ViT-L/14 for SD1, OpenCLIP ViT-H/14 for SD2, both SDXL
//! encoders), on transformers' `CLIPTextModel` key names, and [`TextEncoder`], which pairs it with
//! its tokenizer to turn a prompt into UNet conditioning.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::config::{read_json, ModelFolder};
use crate::prompt::{
    self, ChunkLayout, EmbeddingLookup, EmbeddingMatch, PromptChunk, PromptWarning, Segment,
    TokenSegment,
};
use crate::textual_inversion::{Embedding as TextualInversion, EmbeddingWarning};
use crate::tokenizer::ClipTokenizer;
use crate::weights::Weights;
use crate::{EngineError, Result};

/// The MLP non-linearity (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// x * sigmoid(1.702 x): OpenAI CLIP (SD1, SDXL's first encoder).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact erf GELU: OpenCLIP (SD2, SDXL's second encoder).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluNew,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // 1.702: OpenAI CLIP `QuickGELU` (clip/model.py).
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluNew => x.gelu(),
        }
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`); defaults are transformers'.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Width of `text_projection` (only `CLIPTextModelWithProjection` has the tensor).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> super::Activation {
        super::Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

impl ClipConfig {
    /// CLIP ViT-L/14 text tower: SD1.x, and SDXL's `text_encoder`
    /// (openai/clip-vit-large-patch14 config.json).
    pub fn clip_vit_l_14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
        }
    }

    /// OpenCLIP ViT-H/14 text tower as SD2 ships it: 23 of its 24 layers (SD2 conditions on the
    /// penultimate layer, so diffusers drops the last; stabilityai/stable-diffusion-2-1).
    pub fn open_clip_vit_h_14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: Activation::Gelu,
            projection_dim: Some(512),
            ..Self::clip_vit_l_14()
        }
    }

    /// OpenCLIP ViT-bigG/14 text tower: SDXL's `text_encoder_2`, with `text_projection`
    /// (stabilityai/stable-diffusion-xl-base-1.0).
    pub fn open_clip_vit_bigg_14() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: Activation::Gelu,
            projection_dim: Some(1280),
            ..Self::clip_vit_l_14()
        }
    }

    /// Reads and checks `text_encoder/config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|message| EngineError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Values we could not build a model from (they would panic or divide by zero later).
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        // Written so that NaN fails too.
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err("layer_norm_eps must be positive".into());
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// Which hidden state becomes the prompt conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// A1111's "Clip skip" N (N >= 1): the output of layer `layers - N + 1`, passed through
    /// `final_layer_norm`. 1 is the last layer, i.e. transformers' `last_hidden_state`.
    ClipSkip(usize),
    /// The output of layer `layers - N + 1` as it is, without `final_layer_norm`: SDXL conditions
    /// on `hidden_states[-2]`, which is `Raw(2)`.
    Raw(usize),
}

impl HiddenLayer {
    fn skip(self) -> usize {
        match self {
            HiddenLayer::ClipSkip(n) | HiddenLayer::Raw(n) => n,
        }
    }
}

/// Conditioning plus the pooled sentence embedding (what SDXL needs from its encoders).
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// [b, t, hidden] at the chosen layer.
    pub hidden: Tensor,
    /// [b, hidden]: the last layer's normalised state at each row's first EOS token.
    pub pooled: Tensor,
    /// [b, projection_dim]: `pooled` through `text_projection`, when the model has one.
    pub projected: Option<Tensor>,
}

/// A projection of an encoder layer: candle's `Linear`, whose weight may be kept in f16 on the
/// CPU in low-memory mode (see [`Recorder::keep`]) and is then widened to f32 each time it runs,
/// as the UNet's layers do (`crate::kernels::weight_for`). With an f32 weight it is candle's
/// `Linear` exactly.
struct LayerLinear {
    weight: Tensor,
    bias: Tensor,
}

impl LayerLinear {
    fn load(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let l = candle_nn::linear(in_dim, out_dim, vb)?;
        Ok(Self {
            weight: l.weight().clone(),
            bias: l
                .bias()
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("candle_nn::linear gave no bias".into()))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = crate::kernels::weight_for(&self.weight, x)?.into_owned();
        Linear::new(weight, Some(self.bias.clone())).forward(x)
    }
}

struct Attention {
    q_proj: LayerLinear,
    k_proj: LayerLinear,
    v_proj: LayerLinear,
    out_proj: LayerLinear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ClipConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: LayerLinear::load(h, h, vb.pp("q_proj"))?,
            k_proj: LayerLinear::load(h, h, vb.pp("k_proj"))?,
            v_proj: LayerLinear::load(h, h, vb.pp("v_proj"))?,
            out_proj: LayerLinear::load(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `mask` is [t, t] f32, 0 where attending is allowed and -inf elsewhere.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let split = |y: Tensor| {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        // Scaling q before the product, as transformers' CLIP does, keeps f16 scores in range.
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = split((self.q_proj.forward(x)? * scale)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        // Softmax in f32 whatever the model dtype (transformers does the same for f16/bf16).
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?.broadcast_add(mask)?)?
                .to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        self.out_proj.forward(&out)
    }
}

struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: LayerLinear,
    fc2: LayerLinear,
    act: Activation,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, cfg: &ClipConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            layer_norm2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: LayerLinear::load(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: LayerLinear::load(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let mlp = self.fc2.forward(
            &self
                .act
                .apply(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?,
        )?;
        x + mlp
    }
}

/// The CLIP text transformer. Loading and running are separate from tokenizing so that the token
/// embedding step ([`Self::embed_tokens`]) can be replaced or edited (textual inversion) before
/// [`Self::forward_embeds`].
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipConfig,
    device: Device,
    dtype: DType,
    /// Every tensor the model took at load, by the name it asked for (the same storage as the
    /// layers', so no extra memory), and the load's prefix: what [`Self::to_device`] rebuilds
    /// from, whatever file layout, renaming or LoRA merge produced them.
    loaded: HashMap<String, Tensor>,
    prefix: String,
}

/// A `VarBuilder` backend that hands out another builder's tensors and keeps a copy of the
/// handle of each (see [`ClipTextModel::to_device`]).
struct Recorder<'a> {
    inner: VarBuilder<'a>,
    seen: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl Recorder<'_> {
    fn keep(&self, name: &str, t: candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let mut t = t?;
        // Under f16 weight storage (low-memory mode, `LoadOptions::load_text_encoder`) the
        // encoder layers' projection matrices, nearly all of the model, are narrowed here rather
        // than in the layers, so that this record and the layer share the one f16 copy.
        if t.rank() == 2 && name.contains("encoder.layers.") && name.ends_with(".weight") {
            t = crate::kernels::stored_weight(t)?;
        }
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(name.to_owned(), t.clone());
        }
        Ok(t)
    }
}

impl candle_nn::var_builder::SimpleBackend for Recorder<'_> {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.keep(name, self.inner.get_with_hints_dtype(s, name, h, dtype))
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.keep(name, self.inner.get_unchecked_dtype(name, dtype))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

impl std::fmt::Debug for ClipTextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTextModel")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .field("projection", &self.text_projection.is_some())
            .finish()
    }
}

impl ClipTextModel {
    /// Loads from `vb` rooted at the checkpoint's top level: `text_model.embeddings...`,
    /// `text_model.encoder.layers.N...`, `text_model.final_layer_norm`, and `text_projection`
    /// when present. Files saved without the `text_model.` prefix (transformers 5 does that) load
    /// too. A missing or mis-shaped tensor is [`EngineError::Weights`] naming it.
    pub fn load(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate().map_err(EngineError::InvalidRequest)?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let prefix = vb.prefix();
        let recorder = Recorder {
            inner: vb.root(),
            seen: seen.clone(),
        };
        let root = VarBuilder::from_backend(Box::new(recorder), vb.dtype(), vb.device().clone());
        let vb = if prefix.is_empty() {
            root
        } else {
            root.push_prefix(&prefix)
        };
        let mut model = Self::load_from(vb, cfg)?;
        model.loaded = std::mem::take(&mut *seen.lock().map_err(|_| {
            EngineError::InvalidRequest("text encoder load was interrupted".into())
        })?);
        model.prefix = prefix;
        Ok(model)
    }

    /// The same model on `device` in `dtype` (the low-VRAM "text encoder on the CPU"): its
    /// weights are copied over and the layers built again from them; `self` is left as it was.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Self> {
        let moved = self
            .loaded
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(device)?.to_dtype(dtype)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(moved, dtype, device);
        let vb = if self.prefix.is_empty() {
            vb
        } else {
            vb.push_prefix(&self.prefix)
        };
        Self::load(vb, &self.config)
    }

    fn load_from(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let tm = if !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            && vb.contains_tensor("embeddings.token_embedding.weight")
        {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(tm.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?;
        // SD1/SD2 text encoders list projection_dim in their config but have no projection
        // tensor (they are `CLIPTextModel`); only `CLIPTextModelWithProjection` has it.
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            let w = match cfg.projection_dim {
                Some(p) => vb.get((p, h), "text_projection.weight")?,
                None => {
                    let w = vb.get_unchecked("text_projection.weight")?;
                    if w.rank() != 2 || w.dim(1)? != h {
                        return Err(EngineError::InvalidRequest(format!(
                            "text_projection.weight has shape {:?}, expected [_, {h}]",
                            w.dims()
                        )));
                    }
                    w
                }
            };
            Some(Linear::new(w, None))
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
            loaded: HashMap::new(),
            prefix: String::new(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// The token embedding table, [vocab, hidden] (e.g. to append textual-inversion vectors).
    pub fn token_embedding_table(&self) -> &Tensor {
        self.token_embedding.embeddings()
    }

    /// Token ids [b, t] (u32 or i64) to token embeddings [b, t, hidden]; no positions added.
    pub fn embed_tokens(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        self.check_len(t)?;
        self.token_embedding.forward(ids)
    }

    /// Token ids [b, t] to the conditioning at A1111 clip skip `clip_skip` (1 = last layer,
    /// through `final_layer_norm`; 2 = penultimate layer, through `final_layer_norm`).
    pub fn forward(&self, ids: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?, clip_skip)
    }

    /// Like [`Self::forward`] from token embeddings [b, t, hidden]. Only the layers needed are run.
    pub fn forward_embeds(&self, embeds: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        let layers = self.layers_for(clip_skip)?;
        let x = self.run(embeds, layers)?;
        self.final_layer_norm.forward(&x)
    }

    /// Conditioning at `layer` plus the pooled output, which is taken at the first `eos_id` of
    /// each row (not at the largest id, transformers' legacy rule, which picks a
    /// textual-inversion token whose id is past EOS).
    pub fn forward_with_pooled(
        &self,
        embeds: &Tensor,
        ids: &Tensor,
        eos_id: u32,
        layer: HiddenLayer,
    ) -> candle_core::Result<ClipOutput> {
        let chosen = self.layers_for(layer.skip())?;
        let x = self.run(embeds, chosen)?;
        let hidden = match layer {
            HiddenLayer::ClipSkip(_) => self.final_layer_norm.forward(&x)?,
            HiddenLayer::Raw(_) => x.clone(),
        };
        let mask = self.causal_mask(x.dim(1)?)?;
        let mut last = x;
        for layer in &self.layers[chosen..] {
            last = layer.forward(&last, &mask)?;
        }
        let last = self.final_layer_norm.forward(&last)?;
        let pooled = pool_at_eos(&last, ids, eos_id)?;
        let projected = match &self.text_projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput {
            hidden,
            pooled,
            projected,
        })
    }

    fn layers_for(&self, clip_skip: usize) -> candle_core::Result<usize> {
        let n = self.layers.len();
        if clip_skip == 0 || clip_skip > n {
            candle_core::bail!(
                "clip skip must be between 1 and {n} for this text encoder, got {clip_skip}"
            );
        }
        Ok(n - (clip_skip - 1))
    }

    fn check_len(&self, t: usize) -> candle_core::Result<()> {
        let max = self.config.max_position_embeddings;
        if t == 0 || t > max {
            candle_core::bail!("text encoder input must have 1 to {max} tokens, got {t}");
        }
        Ok(())
    }

    /// Positions plus the first `layers` encoder layers, without the final norm.
    fn run(&self, embeds: &Tensor, layers: usize) -> candle_core::Result<Tensor> {
        let (_, t, h) = embeds.dims3()?;
        self.check_len(t)?;
        if h != self.config.hidden_size {
            candle_core::bail!(
                "token embeddings are {h} wide, this text encoder takes {}",
                self.config.hidden_size
            );
        }
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let mut x = embeds.to_dtype(self.dtype)?.broadcast_add(&positions)?;
        let mask = self.causal_mask(t)?;
        for layer in &self.layers[..layers] {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }

    /// Each token attends to itself and the tokens before it (CLIP's text tower is causal).
    fn causal_mask(&self, t: usize) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, t), &self.device)
    }
}

/// Picks `hidden[b, first eos in ids[b]]` for each row.
fn pool_at_eos(hidden: &Tensor, ids: &Tensor, eos_id: u32) -> candle_core::Result<Tensor> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut picked = Vec::with_capacity(rows.len());
    for (b, row) in rows.iter().enumerate() {
        let Some(pos) = row.iter().position(|&id| id == eos_id) else {
            candle_core::bail!("row {b} of the token ids has no end-of-text token {eos_id}");
        };
        picked.push(hidden.get(b)?.get(pos)?);
    }
    Tensor::stack(&picked, 0)
}

/// A tokenizer and its text model: prompt in, conditioning out.
#[derive(Debug)]
pub struct TextEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
    embeddings: EmbeddingTable,
    /// Where the conditioning goes when the model runs elsewhere (see [`Self::place`]):
    /// the UNet's device and dtype. `None`: the model's own.
    output: Option<(Device, DType)>,
}

/// Textual-inversion embeddings usable by this encoder, found by their names' token ids.
#[derive(Debug, Default)]
struct EmbeddingTable {
    embeddings: Vec<TextualInversion>,
    /// (name token ids, embedding index), longest names first so "neg_v2" wins over "neg".
    names: Vec<(Vec<u32>, usize)>,
}

impl EmbeddingLookup for EmbeddingTable {
    fn find(&self, tokens: &[u32], at: usize) -> Option<EmbeddingMatch> {
        self.names
            .iter()
            .find(|(ids, _)| tokens[at..].starts_with(ids))
            .map(|(ids, index)| EmbeddingMatch {
                index: *index,
                consumed: ids.len(),
                vectors: self.embeddings[*index].len(),
            })
    }
}

/// A prompt split into encoder rows, before the model runs.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptPlan {
    /// One row per 75-token chunk (at least one).
    pub chunks: Vec<PromptChunk>,
    /// Prompt tokens used (embedding vectors count one each), without BOS/EOS/padding: A1111's
    /// "N/75" counter.
    pub token_count: usize,
    /// Names of the textual-inversion embeddings the prompt uses, in first-use order.
    pub embeddings: Vec<String>,
    /// Extra-network tags (`<lora:...>`) found and taken out of the text.
    pub networks: Vec<prompt::NetworkTag>,
    pub warnings: Vec<PromptWarning>,
}

/// A prompt's conditioning and what went into it.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    /// `[1, 77 * chunks, hidden]` in the model's dtype: the chunks' hidden states side by side.
    pub hidden: Tensor,
    pub plan: PromptPlan,
}

impl TextEncoder {
    /// Pairs a tokenizer with a model; their row lengths must agree.
    pub fn new(tokenizer: ClipTokenizer, model: ClipTextModel) -> Result<Self> {
        if tokenizer.max_len() > model.config().max_position_embeddings {
            return Err(EngineError::InvalidRequest(format!(
                "the tokenizer makes rows of {} tokens but the text encoder takes at most {}",
                tokenizer.max_len(),
                model.config().max_position_embeddings
            )));
        }
        Ok(Self {
            tokenizer,
            model,
            embeddings: EmbeddingTable::default(),
            output: None,
        })
    }

    /// Runs the model on `device` in `dtype` from now on, handing its conditioning over on
    /// `output_device` in `output_dtype` (the UNet's), so callers see no difference. Used to keep
    /// the text encoder on the CPU in low-VRAM mode; a no-op when it is already there.
    pub fn place(
        &mut self,
        device: &Device,
        dtype: DType,
        output_device: &Device,
        output_dtype: DType,
    ) -> Result<()> {
        if !self.model.device().same_device(device) || self.model.dtype() != dtype {
            self.model = self.model.to_device(device, dtype)?;
        }
        self.output = if output_device.same_device(device) && output_dtype == dtype {
            None
        } else {
            Some((output_device.clone(), output_dtype))
        };
        Ok(())
    }

    /// Conditioning moved to where the UNet wants it (see [`Self::place`]).
    fn handed_over(&self, t: Tensor) -> Result<Tensor> {
        Ok(match &self.output {
            Some((device, dtype)) => t.to_device(device)?.to_dtype(*dtype)?,
            None => t,
        })
    }

    /// Loads `text_encoder/` and `tokenizer/` of a diffusers folder.
    pub fn load(folder: &ModelFolder, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_components(folder, "text_encoder", "tokenizer", dtype, device)
    }

    /// Loads a named encoder/tokenizer pair (SDXL: `text_encoder_2`, `tokenizer_2`).
    pub fn load_components(
        folder: &ModelFolder,
        text_encoder: &str,
        tokenizer: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = ClipConfig::from_file(folder.config_file(text_encoder)?)?;
        let weights = Weights::open_all(&folder.weight_files(text_encoder)?)?;
        let model = ClipTextModel::load(weights.var_builder(dtype, device)?, &cfg)?;
        let tokenizer = ClipTokenizer::from_dir(folder.component_dir(tokenizer)?)?;
        Self::new(tokenizer, model)
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn model(&self) -> &ClipTextModel {
        &self.model
    }

    /// Replaces the textual-inversion embeddings this encoder knows. Embeddings of another width
    /// (an SD1 one on SD2), with more vectors than a chunk holds, or whose name is already taken
    /// are skipped with a warning, as A1111 skips them.
    pub fn set_embeddings(&mut self, embeddings: Vec<TextualInversion>) -> Vec<EmbeddingWarning> {
        let width = self.model.hidden_size();
        let capacity = self.tokenizer.chunk_capacity();
        let mut warnings = Vec::new();
        let mut table = EmbeddingTable::default();
        for e in embeddings {
            let skip = |message: String| EmbeddingWarning {
                path: e.path().to_path_buf(),
                message,
            };
            if e.width() != width {
                warnings.push(skip(format!(
                    "its vectors are {} wide but this model's text encoder takes {width}; it \
                     was made for another model family",
                    e.width()
                )));
                continue;
            }
            if e.len() > capacity {
                warnings.push(skip(format!(
                    "it has {} vectors, more than the {capacity} a prompt chunk holds",
                    e.len()
                )));
                continue;
            }
            let ids = match self.tokenizer.tokenize(e.name()) {
                Ok(ids) if !ids.is_empty() => ids,
                _ => {
                    warnings.push(skip(format!(
                        "its name {:?} cannot be typed in a prompt",
                        e.name()
                    )));
                    continue;
                }
            };
            // Names are matched as tokens, which the tokenizer lowercases: "EasyNegative" and
            // "easynegative" are the same name.
            if let Some((_, other)) = table.names.iter().find(|(n, _)| *n == ids) {
                warnings.push(skip(format!(
                    "the name {:?} is already used by {}",
                    e.name(),
                    table.embeddings[*other].path().display()
                )));
                continue;
            }
            table.names.push((ids, table.embeddings.len()));
            table.embeddings.push(e);
        }
        table
            .names
            .sort_by_key(|(ids, _)| std::cmp::Reverse(ids.len()));
        self.embeddings = table;
        warnings
    }

    /// The embeddings in use (after [`Self::set_embeddings`] filtered them).
    pub fn embeddings(&self) -> &[TextualInversion] {
        &self.embeddings.embeddings
    }

    /// The id of `,</w>`, for comma backtracking (CLIP's vocabulary has it; a toy one may not).
    fn comma_id(&self) -> Option<u32> {
        self.tokenizer.token_to_id(",</w>")
    }

    /// How [`Self::encode_prompt`] splits `prompt`: `<lora:...>` tags taken out, A1111 attention
    /// syntax read, each piece tokenized on its own (as A1111 does), embeddings found by name,
    /// then 75-token chunks with comma backtracking and BREAK. Runs no model.
    pub fn plan_prompt(&self, prompt: &str) -> Result<PromptPlan> {
        let networks = prompt::extract_networks(prompt);
        let (_, mut warnings) = networks.loras();
        let parsed = prompt::parse_attention(&networks.text);
        warnings.extend(parsed.warnings);
        let mut segments = Vec::with_capacity(parsed.segments.len());
        for segment in &parsed.segments {
            segments.push(match segment {
                Segment::Break => TokenSegment::Break,
                Segment::Text { text, weight } => TokenSegment::Tokens {
                    ids: self.tokenizer.tokenize(text)?,
                    weight: *weight,
                },
            });
        }
        let layout = ChunkLayout {
            bos: self.tokenizer.bos_id(),
            eos: self.tokenizer.eos_id(),
            pad: self.tokenizer.pad_id(),
            comma: self.comma_id(),
            capacity: self.tokenizer.chunk_capacity(),
            backtrack: prompt::COMMA_BACKTRACK,
        };
        let chunks = prompt::chunk_tokens(&segments, &layout, &self.embeddings);
        let mut used: Vec<String> = Vec::new();
        for (_, index) in chunks.iter().flat_map(|c| &c.embeddings) {
            let name = self.embeddings.embeddings[*index].name();
            if !used.iter().any(|u| u == name) {
                used.push(name.to_string());
            }
        }
        let token_count = chunks
            .iter()
            .map(|c| {
                c.ids[1..]
                    .iter()
                    .position(|&id| id == layout.eos)
                    .unwrap_or(layout.capacity)
            })
            .sum();
        Ok(PromptPlan {
            chunks,
            token_count,
            embeddings: used,
            networks: networks.tags,
            warnings,
        })
    }

    /// The prompt's conditioning as A1111 computes it: every chunk of [`Self::plan_prompt`]
    /// encoded as its own 77-token row (embedding vectors swapped in for their placeholder
    /// tokens), weighted with A1111's "Original" emphasis (scale by the weights, restore the
    /// chunk's mean), and the rows concatenated along the token axis: `[1, 77 * chunks, hidden]`.
    /// `clip_skip` as in [`ClipTextModel::forward`].
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<EncodedPrompt> {
        let plan = self.plan_prompt(prompt)?;
        let hidden = self.handed_over(self.encode_plan(&plan, clip_skip)?)?;
        Ok(EncodedPrompt { hidden, plan })
    }

    /// Prompt and negative prompt with the same number of chunks, which batching them for CFG
    /// needs: the shorter one gets encoded empty prompts appended, as A1111's
    /// `pad_cond_uncond` option does.
    pub fn encode_pair(
        &self,
        prompt: &str,
        negative: &str,
        clip_skip: usize,
    ) -> Result<(EncodedPrompt, EncodedPrompt)> {
        let mut cond = self.encode_prompt(prompt, clip_skip)?;
        let mut uncond = self.encode_prompt(negative, clip_skip)?;
        let (nc, nu) = (cond.plan.chunks.len(), uncond.plan.chunks.len());
        if nc != nu {
            let empty = self.encode_prompt("", clip_skip)?.hidden;
            let short = if nc < nu { &mut cond } else { &mut uncond };
            let mut parts = vec![short.hidden.clone()];
            parts.extend(std::iter::repeat_n(empty, nc.abs_diff(nu)));
            short.hidden = Tensor::cat(&parts, 1)?;
        }
        Ok((cond, uncond))
    }

    /// SDXL's reading of a prompt: like [`Self::encode_prompt`] (chunks, weights, embeddings),
    /// but each chunk's hidden state at `layer` (SDXL: [`HiddenLayer::Raw`]`(2)`, the penultimate
    /// layer without the final norm), plus the pooled output of the first chunk, through
    /// `text_projection` when the model has one: `[1, projection_dim or hidden]`. A1111 and
    /// ComfyUI pool the first chunk; diffusers truncates to one chunk, which is the same for
    /// prompts up to 75 tokens.
    pub fn encode_prompt_pooled(
        &self,
        prompt: &str,
        layer: HiddenLayer,
    ) -> Result<(EncodedPrompt, Tensor)> {
        let plan = self.plan_prompt(prompt)?;
        self.check_clip_skip(layer.skip())?;
        let n = plan.chunks.len();
        let len = self.tokenizer.max_len();
        let ids: Vec<u32> = plan.chunks.iter().flat_map(|c| c.ids.clone()).collect();
        let ids = Tensor::from_vec(ids, (n, len), self.model.device())?;
        let mut embeds = self.model.embed_tokens(&ids)?;
        if plan.chunks.iter().any(|c| !c.embeddings.is_empty()) {
            let rows = plan
                .chunks
                .iter()
                .enumerate()
                .map(|(i, c)| self.splice_embeddings(&embeds.get(i)?, c))
                .collect::<Result<Vec<_>>>()?;
            embeds = Tensor::stack(&rows, 0)?;
        }
        let out = self
            .model
            .forward_with_pooled(&embeds, &ids, self.tokenizer.eos_id(), layer)?;
        let rows = plan
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| prompt::apply_emphasis(&out.hidden.get(i)?, &c.weights))
            .collect::<Result<Vec<_>>>()?;
        let hidden = self.handed_over(Tensor::cat(&rows, 0)?.unsqueeze(0)?)?;
        let pooled = self.handed_over(out.projected.unwrap_or(out.pooled).narrow(0, 0, 1)?)?;
        Ok((EncodedPrompt { hidden, plan }, pooled))
    }

    fn encode_plan(&self, plan: &PromptPlan, clip_skip: usize) -> Result<Tensor> {
        self.check_clip_skip(clip_skip)?;
        let n = plan.chunks.len();
        let len = self.tokenizer.max_len();
        let ids: Vec<u32> = plan.chunks.iter().flat_map(|c| c.ids.clone()).collect();
        let ids = Tensor::from_vec(ids, (n, len), self.model.device())?;
        let mut embeds = self.model.embed_tokens(&ids)?;
        if plan.chunks.iter().any(|c| !c.embeddings.is_empty()) {
            let rows = plan
                .chunks
                .iter()
                .enumerate()
                .map(|(i, c)| self.splice_embeddings(&embeds.get(i)?, c))
                .collect::<Result<Vec<_>>>()?;
            embeds = Tensor::stack(&rows, 0)?;
        }
        // All chunks in one batch: rows do not interact (each has its own causal attention).
        let hidden = self.model.forward_embeds(&embeds, clip_skip)?;
        let rows = plan
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| prompt::apply_emphasis(&hidden.get(i)?, &c.weights))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?.unsqueeze(0)?)
    }

    /// Token embeddings `[77, hidden]` of one chunk with its embeddings' vectors in place.
    fn splice_embeddings(&self, row: &Tensor, chunk: &PromptChunk) -> Result<Tensor> {
        if chunk.embeddings.is_empty() {
            return Ok(row.clone());
        }
        let mut parts = Vec::new();
        let mut at = 0;
        for &(pos, index) in &chunk.embeddings {
            let v = self.embeddings.embeddings[index]
                .vectors()
                .to_device(self.model.device())?
                .to_dtype(row.dtype())?;
            if pos > at {
                parts.push(row.narrow(0, at, pos - at)?);
            }
            at = pos + v.dim(0)?;
            parts.push(v);
        }
        let len = row.dim(0)?;
        if at < len {
            parts.push(row.narrow(0, at, len - at)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn check_clip_skip(&self, clip_skip: usize) -> Result<()> {
        let layers = self.model.layers.len();
        if clip_skip == 0 || clip_skip > layers {
            return Err(EngineError::InvalidRequest(format!(
                "clip skip must be between 1 and {layers} for this model, got {clip_skip}"
            )));
        }
        Ok(())
    }

    /// The prompt's conditioning, [1, 77, hidden] in the model's dtype and device, read as plain
    /// text (no weights, no embeddings). Prompts over 75 tokens are truncated (see
    /// [`ClipTokenizer::encode`]); [`Self::encode_prompt`] is what generation uses.
    pub fn encode(&self, prompt: &str, clip_skip: usize) -> Result<Tensor> {
        let ids = self.tokenizer.encode(prompt)?;
        self.encode_ids(&ids, clip_skip)
    }

    /// Conditioning for one row of ids (e.g. one 77-token chunk of a long prompt).
    pub fn encode_ids(&self, ids: &[u32], clip_skip: usize) -> Result<Tensor> {
        self.check_clip_skip(clip_skip)?;
        let ids = Tensor::from_slice(ids, (1, ids.len()), self.model.device())?;
        self.handed_over(self.model.forward(&ids, clip_skip)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn tiny_config() -> ClipConfig {
        ClipConfig {
            vocab_size: 10,
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 6,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(4),
        }
    }

    /// Deterministic small weights for every tensor the tiny config needs.
    fn tiny_weights(cfg: &ClipConfig, with_projection: bool) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "text_model.embeddings.token_embedding.weight".into(),
                vec![cfg.vocab_size, cfg.hidden_size],
            ),
            (
                "text_model.embeddings.position_embedding.weight".into(),
                vec![cfg.max_position_embeddings, cfg.hidden_size],
            ),
        ];
        let h = cfg.hidden_size;
        let mut norm = |name: String| {
            shapes.push((format!("{name}.weight"), vec![h]));
            shapes.push((format!("{name}.bias"), vec![h]));
        };
        norm("text_model.final_layer_norm".into());
        for i in 0..cfg.num_hidden_layers {
            norm(format!("text_model.encoder.layers.{i}.layer_norm1"));
            norm(format!("text_model.encoder.layers.{i}.layer_norm2"));
        }
        for i in 0..cfg.num_hidden_layers {
            let p = format!("text_model.encoder.layers.{i}");
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                shapes.push((format!("{p}.self_attn.{proj}.weight"), vec![h, h]));
                shapes.push((format!("{p}.self_attn.{proj}.bias"), vec![h]));
            }
            shapes.push((
                format!("{p}.mlp.fc1.weight"),
                vec![cfg.intermediate_size, h],
            ));
            shapes.push((format!("{p}.mlp.fc1.bias"), vec![cfg.intermediate_size]));
            shapes.push((
                format!("{p}.mlp.fc2.weight"),
                vec![h, cfg.intermediate_size],
            ));
            shapes.push((format!("{p}.mlp.fc2.bias"), vec![h]));
        }
        if with_projection {
            shapes.push(("text_projection.weight".into(), vec![4, h]));
        }
        shapes
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape))| {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = (0..n)
                    .map(|i| (((i * 7 + k * 13) % 17) as f32 - 8.0) / 20.0)
                    .collect();
                (name, Tensor::from_vec(data, shape, &dev).unwrap())
            })
            .collect()
    }

    fn tiny_model(with_projection: bool) -> ClipTextModel {
        let cfg = tiny_config();
        let vb = VarBuilder::from_tensors(
            tiny_weights(&cfg, with_projection),
            DType::F32,
            &Device::Cpu,
        );
        ClipTextModel::load(vb, &cfg).unwrap()
    }

    #[test]
    fn config_parses_sd2_text_encoder() {
        // stabilityai/stable-diffusion-2-1 text_encoder/config.json (trimmed to what we read).
        let cfg: ClipConfig = serde_json::from_str(
            r#"{"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024,
                "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
                "max_position_embeddings": 77, "projection_dim": 512, "vocab_size": 49408,
                "layer_norm_eps": 1e-05, "torch_dtype": "float32"}"#,
        )
        .unwrap();
        assert_eq!(cfg, ClipConfig::open_clip_vit_h_14());
        let bad = ClipConfig {
            num_attention_heads: 5,
            ..cfg
        };
        assert!(bad.validate().unwrap_err().contains("multiple"));
    }

    #[test]
    fn clip_skip_out_of_range_is_an_error() {
        let model = tiny_model(false);
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        assert!(model.forward(&ids, 0).is_err());
        assert!(model.forward(&ids, 3).is_err());
        let too_long = Tensor::zeros((1, 7), DType::U32, &Device::Cpu).unwrap();
        assert!(model.forward(&too_long, 1).is_err());
        let out_of_vocab = Tensor::new(&[[1u32, 10]], &Device::Cpu).unwrap();
        assert!(model.forward(&out_of_vocab, 1).is_err());
    }

    #[test]
    fn causal_mask_means_later_tokens_do_not_change_earlier_states() {
        let model = tiny_model(false);
        let a = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 2, 7, 8]], &Device::Cpu).unwrap();
        let ha = model.forward(&a, 1).unwrap().narrow(1, 0, 2).unwrap();
        let hb = model.forward(&b, 1).unwrap().narrow(1, 0, 2).unwrap();
        let diff = (ha - hb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn pooled_output_and_clip_skip_agree_with_forward() {
        let model = tiny_model(true);
        let ids = Tensor::new(&[[8u32, 2, 9, 9], [8, 9, 9, 9]], &Device::Cpu).unwrap();
        let embeds = model.embed_tokens(&ids).unwrap();
        let out = model
            .forward_with_pooled(&embeds, &ids, 9, HiddenLayer::ClipSkip(2))
            .unwrap();
        let skip2 = model.forward(&ids, 2).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(max_diff(&out.hidden, &skip2), 0.0);
        let last = model.forward(&ids, 1).unwrap();
        // Row 0's first EOS is at 2, row 1's at 1.
        let expected = Tensor::stack(
            &[
                last.get(0).unwrap().get(2).unwrap(),
                last.get(1).unwrap().get(1).unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(max_diff(&out.pooled, &expected), 0.0);
        assert_eq!(out.projected.unwrap().dims(), &[2, 4]);
        let raw = model
            .forward_with_pooled(&embeds, &ids, 9, HiddenLayer::Raw(2))
            .unwrap();
        assert!(max_diff(&raw.hidden, &skip2) > 0.0);
    }

    #[test]
    fn missing_layer_is_a_weights_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config();
        let mut tensors = tiny_weights(&cfg, false);
        tensors.remove("text_model.encoder.layers.1.mlp.fc2.bias");
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let vb = Weights::open(&path)
            .unwrap()
            .var_builder(DType::F32, &Device::Cpu)
            .unwrap();
        let err = ClipTextModel::load(vb, &cfg).unwrap_err();
        assert!(
            matches!(&err, EngineError::Weights { path: p, message } if p == &path && message.contains("text_model.encoder.layers.1.mlp.fc2.bias")),
            "{err}"
        );
    }

    #[test]
    fn keys_without_text_model_prefix_load() {
        let cfg = tiny_config();
        let tensors: HashMap<String, Tensor> = tiny_weights(&cfg, false)
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let stripped = ClipTextModel::load(vb, &cfg).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        let a = stripped.forward(&ids, 1).unwrap();
        let b = tiny_model(false).forward(&ids, 1).unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }
}

//! The denoising UNet (diffusers `UNet2DConditionModel`) for SD1.x, SD2.x and, through
//! `addition_embed_type = "text_time"`, SDXL; with `time_cond_proj_dim`, the guidance-embedded
//! UNets of full LCMs. The architecture comes from the model's own `unet/config.json`, so tiny
//! test models and full-size models run through the same code.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::{AttentionOptions, SpatialTransformer, SpatialTransformerConfig};
use crate::embeddings::{TimestepEmbedding, TimestepProjection};
use crate::kernels;
use crate::resnet::{
    conv2d, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, ResnetConfig, Upsample2D,
};
use crate::EngineError;

/// A config value given either once for every block or as a list with one entry per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    // `Many` first: serde tries untagged variants in order, and a nested `OneOrMany` would
    // otherwise swallow a whole list as one value.
    Many(Vec<T>),
    One(T),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for each of `n` blocks.
    fn per_block(&self, n: usize, name: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => candle_core::bail!(
                "unet config: {name} has {} entries but the model has {n} blocks",
                v.len()
            ),
        }
    }
}

fn default_down_blocks() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".into());
    v
}
fn default_up_blocks() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_attention_head_dim() -> Option<OneOrMany<usize>> {
    Some(OneOrMany::One(8))
}
fn default_groups() -> Option<usize> {
    Some(32)
}
fn default_default() -> String {
    "default".into()
}

/// `unet/config.json` of a diffusers `UNet2DConditionModel`. Field names and defaults are
/// diffusers' own (`models/unets/unet_2d_condition.py`), so a missing key means what it means
/// there. Values we parse but do not implement are rejected by [`UNetConfig::validate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "no_one")]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two_one")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "default_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "cross_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    /// Per block; an entry may itself be a per-layer list (SDXL variants).
    #[serde(default = "one_one")]
    pub transformer_layers_per_block: OneOrMany<OneOrMany<usize>>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<OneOrMany<usize>>>,
    /// diffusers' naming quirk: when `num_attention_heads` is absent (SD1, SD2, SDXL), this is
    /// the *number of heads*, not their width.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `"text_time"` for SDXL (pooled text embedding plus size/crop micro-conditioning).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Width of the guidance embedding guidance-distilled UNets (LCM) take as `timestep_cond`
    /// through `time_embedding.cond_proj`; `None` for regular UNets.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_default")]
    pub attention_type: String,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn no_one() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn two_one() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn one_one() -> OneOrMany<OneOrMany<usize>> {
    OneOrMany::One(OneOrMany::One(1))
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn norm_eps() -> f64 {
    1e-5
}
fn cross_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}

impl Default for UNetConfig {
    /// diffusers' defaults (an SD1-shaped UNet with 1280-wide cross-attention).
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// Kinds of blocks we implement, by diffusers class name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    CrossAttn,
    Plain,
}

/// Everything a block needs, resolved from the config's scalars-or-lists.
#[derive(Debug, Clone)]
struct BlockPlan {
    kind: BlockKind,
    layers: usize,
    /// Transformer depth for each layer of the block.
    depths: Vec<usize>,
    heads: usize,
    cross_dim: usize,
    only_cross: bool,
}

impl UNetConfig {
    /// Parses `unet/config.json`. A `null` value means "use the default", as diffusers' config
    /// loader does for its keyword arguments (SDXL's config has `"upcast_attention": null`);
    /// only for `mid_block_type` and `norm_num_groups` does `null` keep its own meaning.
    pub fn from_json(json: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_value(crate::vae::drop_nulls(
            serde_json::from_str(json)?,
            &["mid_block_type", "norm_num_groups"],
        ))
    }

    /// Reads and validates `unet/config.json`.
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        let text = crate::config::read_text(path)?;
        let config_err = |message: String| EngineError::Config {
            path: path.into(),
            message,
        };
        let cfg = Self::from_json(&text).map_err(|e| config_err(e.to_string()))?;
        cfg.validate().map_err(|e| config_err(e.to_string()))?;
        Ok(cfg)
    }

    /// Number of down (and up) blocks.
    pub fn num_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Total spatial downsampling of the UNet (latent sides need not be multiples of it: the up
    /// blocks resize to their skips).
    pub fn downsampling_factor(&self) -> usize {
        1 << self.num_blocks().saturating_sub(1)
    }

    /// Width of the text embeddings the first cross-attention block expects.
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(v) => v.first().copied().unwrap_or(0),
        }
    }

    /// Whether the model needs SDXL's added conditions (`text_embeds`, `time_ids`).
    pub fn needs_added_conditions(&self) -> bool {
        self.addition_embed_type.is_some()
    }

    /// Whether the guidance scale is an input of the model (`time_cond_proj_dim`: full LCMs such
    /// as LCM_Dreamshaper_v7 and lcm-sdxl) rather than classifier-free guidance around it.
    /// diffusers runs such models without CFG, one UNet pass per step on the prompt alone.
    pub fn guidance_embedded(&self) -> bool {
        self.time_cond_proj_dim.is_some()
    }

    fn groups(&self) -> Result<usize> {
        self.norm_num_groups
            .ok_or_else(|| candle_core::Error::Msg("unet config: norm_num_groups is null".into()))
    }

    fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// Checks the config describes a UNet this code implements, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_blocks();
        if n == 0 {
            candle_core::bail!("unet config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "unet config: {} down blocks and {} up blocks for {n} entries in block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        let unsupported = |what: &str| -> Result<()> {
            candle_core::bail!("unet config: {what} is not supported")
        };
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            unsupported("class embeddings (class_embed_type / num_class_embeds)")?;
        }
        if let Some(t) = &self.addition_embed_type {
            if t != "text_time" {
                unsupported(&format!("addition_embed_type {t:?}"))?;
            }
            if self.addition_time_embed_dim.is_none()
                || self.projection_class_embeddings_input_dim.is_none()
            {
                candle_core::bail!(
                    "unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim \
                     and projection_class_embeddings_input_dim"
                );
            }
        }
        if let Some(d) = self.time_cond_proj_dim {
            // diffusers' guidance embedding divides by half the width minus one.
            if d < 4 {
                candle_core::bail!("unet config: time_cond_proj_dim {d} is below 4");
            }
        }
        if self.encoder_hid_dim.is_some() {
            unsupported("encoder_hid_dim")?;
        }
        if self.dual_cross_attention {
            unsupported("dual_cross_attention")?;
        }
        if self.cross_attention_norm.is_some() {
            unsupported("cross_attention_norm")?;
        }
        if self.timestep_post_act.is_some() || self.time_embedding_act_fn.is_some() {
            unsupported("timestep_post_act / time_embedding_act_fn")?;
        }
        if self.resnet_out_scale_factor != 1.0 || self.resnet_skip_time_act {
            unsupported("resnet_out_scale_factor other than 1 / resnet_skip_time_act")?;
        }
        if self.act_fn != "silu" {
            unsupported(&format!("act_fn {:?}", self.act_fn))?;
        }
        if self.resnet_time_scale_shift != "default" {
            unsupported(&format!(
                "resnet_time_scale_shift {:?}",
                self.resnet_time_scale_shift
            ))?;
        }
        if self.time_embedding_type != "positional" {
            unsupported(&format!(
                "time_embedding_type {:?}",
                self.time_embedding_type
            ))?;
        }
        if self.attention_type != "default" {
            unsupported(&format!("attention_type {:?}", self.attention_type))?;
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            unsupported("conv_in_kernel / conv_out_kernel other than 3")?;
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            unsupported(&format!("mid_block_type {:?}", self.mid_block_type))?;
        }
        let groups = self.groups()?;
        for &c in &self.block_out_channels {
            if groups == 0 || !c.is_multiple_of(groups) {
                candle_core::bail!("unet config: {c} channels do not split into {groups} groups");
            }
        }
        // Resolving the plans checks list lengths, block names and head counts.
        self.down_plans()?;
        self.up_plans()?;
        self.mid_plan()?;
        Ok(())
    }

    fn heads(&self, n: usize) -> Result<Vec<usize>> {
        let h = self
            .num_attention_heads
            .as_ref()
            .or(self.attention_head_dim.as_ref())
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "unet config: neither num_attention_heads nor attention_head_dim is set".into(),
                )
            })?;
        h.per_block(n, "num_attention_heads")
    }

    fn down_plans(&self) -> Result<Vec<BlockPlan>> {
        let n = self.num_blocks();
        let layers = self.layers_per_block.per_block(n, "layers_per_block")?;
        let depths = self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let heads = self.heads(n)?;
        let cross = self
            .cross_attention_dim
            .per_block(n, "cross_attention_dim")?;
        let only = self
            .only_cross_attention
            .per_block(n, "only_cross_attention")?;
        (0..n)
            .map(|i| {
                let kind = match self.down_block_types[i].as_str() {
                    "CrossAttnDownBlock2D" => BlockKind::CrossAttn,
                    "DownBlock2D" => BlockKind::Plain,
                    other => {
                        candle_core::bail!("unet config: down block {other:?} is not supported")
                    }
                };
                let depths = per_layer(&depths[i], layers[i], "transformer_layers_per_block")?;
                self.plan(kind, layers[i], depths, heads[i], cross[i], only[i], i)
            })
            .collect()
    }

    fn up_plans(&self) -> Result<Vec<BlockPlan>> {
        let n = self.num_blocks();
        let layers = rev(self.layers_per_block.per_block(n, "layers_per_block")?);
        let heads = rev(self.heads(n)?);
        let cross = rev(self
            .cross_attention_dim
            .per_block(n, "cross_attention_dim")?);
        let only = rev(self
            .only_cross_attention
            .per_block(n, "only_cross_attention")?);
        let depths = match &self.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => candle_core::bail!(
                "unet config: reverse_transformer_layers_per_block has {} entries for {n} blocks",
                v.len()
            ),
            None => rev(self
                .transformer_layers_per_block
                .per_block(n, "transformer_layers_per_block")?),
        };
        (0..n)
            .map(|i| {
                let kind = match self.up_block_types[i].as_str() {
                    "CrossAttnUpBlock2D" => BlockKind::CrossAttn,
                    "UpBlock2D" => BlockKind::Plain,
                    other => candle_core::bail!("unet config: up block {other:?} is not supported"),
                };
                // Up blocks have one more layer than their down twin (it eats the extra skip).
                let l = layers[i] + 1;
                let depths = per_layer(&depths[i], l, "reverse_transformer_layers_per_block")?;
                let c = n - 1 - i;
                self.plan(kind, l, depths, heads[i], cross[i], only[i], c)
            })
            .collect()
    }

    fn mid_plan(&self) -> Result<BlockPlan> {
        let n = self.num_blocks();
        let last = |v: Vec<usize>| v[n - 1];
        let depth = match &self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?[n - 1]
        {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(v) => v.first().copied().unwrap_or(1),
        };
        let heads = last(self.heads(n)?);
        let cross = last(
            self.cross_attention_dim
                .per_block(n, "cross_attention_dim")?,
        );
        // diffusers' cross-attention mid block has no only_cross_attention switch.
        self.plan(
            BlockKind::CrossAttn,
            1,
            vec![depth],
            heads,
            cross,
            false,
            n - 1,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        kind: BlockKind,
        layers: usize,
        depths: Vec<usize>,
        heads: usize,
        cross_dim: usize,
        only_cross: bool,
        channels_index: usize,
    ) -> Result<BlockPlan> {
        let c = self.block_out_channels[channels_index];
        if kind == BlockKind::CrossAttn && (heads == 0 || !c.is_multiple_of(heads)) {
            candle_core::bail!(
                "unet config: {c} channels do not split into {heads} attention heads"
            );
        }
        if layers == 0 {
            candle_core::bail!("unet config: a block with zero layers");
        }
        Ok(BlockPlan {
            kind,
            layers,
            depths,
            heads,
            cross_dim,
            only_cross,
        })
    }
}

fn rev<T>(mut v: Vec<T>) -> Vec<T> {
    v.reverse();
    v
}

/// Per-layer transformer depth of one block: a single number repeats for every layer.
fn per_layer(v: &OneOrMany<usize>, layers: usize, name: &str) -> Result<Vec<usize>> {
    match v {
        OneOrMany::One(d) => Ok(vec![*d; layers]),
        OneOrMany::Many(d) if d.len() == layers => Ok(d.clone()),
        OneOrMany::Many(d) => candle_core::bail!(
            "unet config: {name} lists {} layers for a block with {layers}",
            d.len()
        ),
    }
}

/// SDXL's extra conditioning (`added_cond_kwargs` in diffusers).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// Pooled, projected text embedding, `[batch, dim]`.
    pub text_embeds: Tensor,
    /// `[batch, 6]`: original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: Tensor,
}

/// SDXL `add_time_proj` + `add_embedding`.
#[derive(Debug, Clone)]
struct AddEmbedding {
    time_proj: TimestepProjection,
    embedding: TimestepEmbedding,
}

/// One down block: resnets, optional transformers, optional downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample2D>,
}

/// One up block: resnets fed with concatenated skips, optional transformers and upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample2D>,
}

/// Inputs shared by every block of one forward pass.
struct Step<'a> {
    temb: &'a Tensor,
    context: &'a Tensor,
    opts: &'a AttentionOptions,
}

impl DownBlock {
    fn forward(&self, x: &Tensor, s: &Step, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(s.temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, s.context, s.opts)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsample {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

impl UpBlock {
    fn forward(&self, x: &Tensor, s: &Step, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("unet: ran out of skip connections".into())
            })?;
            h = resnet.forward(&kernels::cat_channels(&h, &skip)?, Some(s.temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, s.context, s.opts)?;
            }
        }
        match (&self.upsample, skips.last()) {
            // Land on the next skip's size: equal to 2x when the sides divide evenly.
            (Some(up), Some(next)) => {
                let (_, _, sh, sw) = next.dims4()?;
                up.forward_to(&h, sh, sw)
            }
            (Some(up), None) => up.forward(&h),
            (None, _) => Ok(h),
        }
    }
}

/// diffusers `UNet2DConditionModel`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    time_proj: TimestepProjection,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<AddEmbedding>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: SpatialTransformer,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    dtype: DType,
    device: Device,
    attention: AttentionOptions,
    max_batch: Option<usize>,
    /// Whether steps on a CUDA device may be replayed as a graph (see `cuda_graph`).
    graphs_on: bool,
    #[cfg(feature = "cuda")]
    graphs: crate::cuda_graph::GraphCache,
}

impl UNet2DConditionModel {
    /// Builds the model from diffusers key names under `vb` (the root of the UNet's weights).
    /// Weights are converted to `vb`'s dtype; inputs must then be in that dtype too.
    pub fn load(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let groups = cfg.groups()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let temb_dim = cfg.time_embed_dim();
        let resnet = |vb: VarBuilder, cin: usize, cout: usize, scale: f64| {
            ResnetBlock2D::load(
                vb,
                &ResnetConfig {
                    in_channels: cin,
                    out_channels: cout,
                    temb_channels: Some(temb_dim),
                    groups,
                    eps: cfg.norm_eps,
                    output_scale_factor: scale,
                },
            )
        };
        let transformer = |vb: VarBuilder, plan: &BlockPlan, c: usize, depth: usize| {
            SpatialTransformer::load(
                vb,
                &SpatialTransformerConfig {
                    channels: c,
                    heads: plan.heads,
                    dim_head: c / plan.heads,
                    depth,
                    context_dim: plan.cross_dim,
                    groups,
                    use_linear_projection: cfg.use_linear_projection,
                    only_cross_attention: plan.only_cross,
                    upcast_attention: cfg.upcast_attention,
                },
            )
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, plan) in cfg.down_plans()?.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_c = out_c;
            out_c = boc[i];
            let mut resnets = Vec::with_capacity(plan.layers);
            let mut attentions = Vec::new();
            for j in 0..plan.layers {
                let cin = if j == 0 { in_c } else { out_c };
                resnets.push(resnet(vb.pp(format!("resnets.{j}")), cin, out_c, 1.0)?);
                if plan.kind == BlockKind::CrossAttn {
                    let a = transformer(
                        vb.pp(format!("attentions.{j}")),
                        plan,
                        out_c,
                        plan.depths[j],
                    );
                    attentions.push(a?);
                }
            }
            let downsample = if i + 1 < n {
                let d = Downsample2D::load(vb.pp("downsamplers.0"), out_c, cfg.downsample_padding);
                Some(d?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let mid = cfg.mid_plan()?;
        let c = boc[n - 1];
        let vbm = vb.pp("mid_block");
        let s = cfg.mid_block_scale_factor;
        let mid_resnets = [
            resnet(vbm.pp("resnets.0"), c, c, s)?,
            resnet(vbm.pp("resnets.1"), c, c, s)?,
        ];
        let mid_attention = transformer(vbm.pp("attentions.0"), &mid, c, mid.depths[0])?;

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut out_c = rev[0];
        for (i, plan) in cfg.up_plans()?.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev_c = out_c;
            out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let mut resnets = Vec::with_capacity(plan.layers);
            let mut attentions = Vec::new();
            for j in 0..plan.layers {
                // The last layer receives the skip from the block's input resolution.
                let skip_c = if j + 1 == plan.layers { in_c } else { out_c };
                let cin = if j == 0 { prev_c } else { out_c };
                resnets.push(resnet(
                    vb.pp(format!("resnets.{j}")),
                    cin + skip_c,
                    out_c,
                    1.0,
                )?);
                if plan.kind == BlockKind::CrossAttn {
                    let a = transformer(
                        vb.pp(format!("attentions.{j}")),
                        plan,
                        out_c,
                        plan.depths[j],
                    );
                    attentions.push(a?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Upsample2D::load(vb.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }

        let time_proj = TimestepProjection {
            dim: boc[0],
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            downscale_freq_shift: cfg.freq_shift,
        };
        let add_embedding = match (
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (Some(t), Some(p)) if cfg.needs_added_conditions() => Some(AddEmbedding {
                time_proj: TimestepProjection {
                    dim: t,
                    ..time_proj
                },
                embedding: TimestepEmbedding::load(vb.pp("add_embedding"), p, temb_dim)?,
            }),
            _ => None,
        };
        Ok(Self {
            config: cfg.clone(),
            time_proj,
            time_embedding: TimestepEmbedding::load_with_cond(
                vb.pp("time_embedding"),
                boc[0],
                temb_dim,
                cfg.time_cond_proj_dim,
            )?,
            add_embedding,
            conv_in: conv2d(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNorm::load(vb.pp("conv_norm_out"), groups, boc[0], cfg.norm_eps)?,
            conv_out: conv2d(vb.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            attention: AttentionOptions::default(),
            max_batch: None,
            graphs_on: true,
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn attention_options(&self) -> AttentionOptions {
        self.attention
    }

    /// Chooses chunked/sliced attention (low-memory mode); takes effect on the next forward.
    pub fn set_attention_options(&mut self, opts: AttentionOptions) {
        self.attention = opts;
    }

    /// Runs batches larger than `max` in parts of at most `max` samples (`None`: whole batches).
    /// Low-memory mode uses 1, so the guidance pair runs one sample at a time.
    pub fn set_max_batch(&mut self, max: Option<usize>) {
        self.max_batch = max.map(|m| m.max(1));
    }

    pub fn max_batch(&self) -> Option<usize> {
        self.max_batch
    }

    /// Whether steps on a CUDA device may run as a recorded graph (on by default; never in
    /// low-memory mode, as a graph keeps its intermediates' memory while it is held). Only
    /// speed changes: a graph replays the same kernels. Elsewhere this changes nothing.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs_on = on;
        self.release_graphs();
    }

    /// Frees the recorded step graph and the device memory it holds; call when a sampling run
    /// ends. The next steps record a new one.
    pub fn release_graphs(&self) {
        #[cfg(feature = "cuda")]
        self.graphs.release();
    }

    /// How many steps ran as a graph replay (always 0 without the `cuda` feature).
    pub fn graph_replays(&self) -> u64 {
        #[cfg(feature = "cuda")]
        return self.graphs.replays();
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Why steps ran without a graph on a CUDA device, if they did (they then ran eagerly).
    pub fn graph_failure(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        return self.graphs.failure();
        #[cfg(not(feature = "cuda"))]
        None
    }

    /// The UNet's part of `memory`: its attention strategy, and the guidance pair one sample at
    /// a time under batch splitting.
    pub fn set_memory_options(&mut self, memory: &crate::memory::MemoryOptions) {
        self.set_attention_options(memory.attention());
        self.set_max_batch(memory.split_batch.then_some(1));
    }

    /// Predicts noise (or v) for latents `x` `[batch, in_channels, h, w]` at `timestep`, with
    /// text embeddings `encoder_hidden_states` `[batch, tokens, cross_attention_dim]`.
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with(x, timestep, encoder_hidden_states, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditions (required when the config has
    /// `addition_embed_type`, ignored otherwise).
    pub fn forward_with(
        &self,
        x: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        self.forward_cond(x, timestep, encoder_hidden_states, added, None)
    }

    /// The guidance embedding a guidance-embedded UNet takes for `guidance_scale` (see
    /// [`UNetConfig::guidance_embedded`]): diffusers' `get_guidance_scale_embedding(
    /// guidance_scale - 1)`, `[1, time_cond_proj_dim]` in the model's dtype. The "- 1": diffusers'
    /// LCM and SDXL pipelines use the Imagen CFG form `u + g (c - u)`, whose scale is one more
    /// than the LCM paper's `w`. `None` for regular UNets.
    pub fn guidance_embedding(&self, guidance_scale: f64) -> Result<Option<Tensor>> {
        let Some(dim) = self.config.time_cond_proj_dim else {
            return Ok(None);
        };
        if !guidance_scale.is_finite() {
            candle_core::bail!("unet: guidance scale {guidance_scale} is not a finite number");
        }
        let e = crate::embeddings::guidance_embedding(guidance_scale - 1.0, dim, &self.device)?;
        Ok(Some(e.to_dtype(self.dtype)?))
    }

    /// [`forward_with`](Self::forward_with) with `timestep_cond` `[1 or batch,
    /// time_cond_proj_dim]`, the condition guidance-embedded UNets add to the timestep
    /// embedding (see [`Self::guidance_embedding`]). Without it such a UNet runs as diffusers
    /// runs it then: as if `cond_proj` were absent.
    pub fn forward_cond(
        &self,
        x: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.check_inputs(x, encoder_hidden_states)?;
        let batch = x.dim(0)?;
        if let Some(c) = timestep_cond {
            self.check_timestep_cond(c, batch)?;
        }
        match self.max_batch {
            // Low-memory mode: the guidance halves one after the other. Every sample of the batch
            // is computed independently (group norms are per sample), so this changes no numbers.
            Some(max) if batch > max => {
                let mut outs = Vec::with_capacity(batch.div_ceil(max));
                for start in (0..batch).step_by(max) {
                    let n = max.min(batch - start);
                    let part = added
                        .map(|a| -> Result<AddedConditions> {
                            Ok(AddedConditions {
                                text_embeds: a.text_embeds.narrow(0, start, n)?,
                                time_ids: a.time_ids.narrow(0, start, n)?,
                            })
                        })
                        .transpose()?;
                    // One condition row is shared by the whole batch; per-sample rows split.
                    let cond = match timestep_cond {
                        Some(c) if c.dim(0)? == batch => Some(c.narrow(0, start, n)?),
                        other => other.cloned(),
                    };
                    outs.push(self.forward_batch(
                        &x.narrow(0, start, n)?,
                        timestep,
                        &encoder_hidden_states.narrow(0, start, n)?,
                        part.as_ref(),
                        cond.as_ref(),
                    )?);
                }
                Tensor::cat(&outs, 0)
            }
            _ => self.forward_batch(x, timestep, encoder_hidden_states, added, timestep_cond),
        }
    }

    fn forward_batch(
        &self,
        x: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        if !timestep.is_finite() {
            candle_core::bail!("unet: timestep {timestep} is not a finite number");
        }
        // The timestep is the same for the whole batch: embed it once, broadcast in the resnets.
        let t = self
            .time_proj
            .embed(&[timestep], &self.device, self.dtype)?;
        let mut emb = self.time_embedding.forward_cond(&t, timestep_cond)?;
        if let Some(add) = &self.add_embedding {
            let a = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "unet: this is an SDXL-type model; it needs text_embeds and time_ids".into(),
                )
            })?;
            emb = emb.broadcast_add(&self.added_embedding(add, a, x.dim(0)?)?)?;
        }
        let temb = emb.silu()?;
        let x = if self.config.center_input_sample {
            x.affine(2.0, -1.0)?
        } else {
            x.clone()
        };
        // Everything below depends only on these three tensors and the weights: the part
        // replayed as a CUDA graph, where one applies. Not in low-memory mode (split batches,
        // sliced attention): a held graph keeps the memory of its intermediates.
        #[cfg(feature = "cuda")]
        if self.graphs_on
            && self.max_batch.is_none()
            && self.attention == AttentionOptions::default()
        {
            return self.graphs.run(&[&x, &temb, encoder_hidden_states], |t| {
                self.body(&t[0], &t[1], &t[2])
            });
        }
        self.body(&x, &temb, encoder_hidden_states)
    }

    /// The blocks, from `conv_in` to `conv_out`, given the (centred) latents, the activated
    /// timestep embedding and the text embeddings.
    fn body(&self, x: &Tensor, temb: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        let step = Step {
            temb,
            context: encoder_hidden_states,
            opts: &self.attention,
        };
        let mut h = self.conv_in.forward(x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &step, &mut skips)?;
        }
        h = self.mid_resnets[0].forward(&h, Some(temb))?;
        h = self
            .mid_attention
            .forward(&h, encoder_hidden_states, &self.attention)?;
        h = self.mid_resnets[1].forward(&h, Some(temb))?;
        for block in &self.up_blocks {
            h = block.forward(&h, &step, &mut skips)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }

    fn added_embedding(
        &self,
        add: &AddEmbedding,
        a: &AddedConditions,
        batch: usize,
    ) -> Result<Tensor> {
        let (tb, _) = a.text_embeds.dims2()?;
        let (ib, n_ids) = a.time_ids.dims2()?;
        if tb != batch || ib != batch {
            candle_core::bail!(
                "unet: text_embeds batch {tb} and time_ids batch {ib} must equal the latent batch {batch}"
            );
        }
        // The ids are a handful of sizes; embed them on the host like the timestep.
        let ids: Vec<f64> = a.time_ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let time = add
            .time_proj
            .embed(&ids, &self.device, self.dtype)?
            .reshape((batch, n_ids * add.time_proj.dim))?;
        let input = Tensor::cat(&[&a.text_embeds.to_dtype(self.dtype)?, &time], 1)?;
        add.embedding.forward(&input)
    }

    fn check_timestep_cond(&self, c: &Tensor, batch: usize) -> Result<()> {
        let Some(dim) = self.config.time_cond_proj_dim else {
            candle_core::bail!(
                "unet: timestep_cond given, but the model has no time_cond_proj_dim"
            );
        };
        match c.dims() {
            &[b, d] if (b == 1 || b == batch) && d == dim => {}
            d => candle_core::bail!(
                "unet: timestep_cond must be [1 or {batch}, {dim}] (time_cond_proj_dim), got {d:?}"
            ),
        }
        if !c.device().same_device(&self.device) {
            candle_core::bail!("unet: timestep_cond is on a different device than the model");
        }
        Ok(())
    }

    /// Shape, dtype and device checks with messages a user can act on, instead of a deep
    /// shape error (or a panic) somewhere inside a block.
    fn check_inputs(&self, x: &Tensor, ctx: &Tensor) -> Result<()> {
        let cfg = &self.config;
        let (b, c, h, w) = match x.dims() {
            &[b, c, h, w] => (b, c, h, w),
            d => candle_core::bail!(
                "unet: latents must be [batch, channels, height, width], got {d:?}"
            ),
        };
        if c != cfg.in_channels {
            candle_core::bail!(
                "unet: latents have {c} channels, the model expects {}",
                cfg.in_channels
            );
        }
        // Any size works: sides that do not divide by the downsampling factor are rounded up on
        // the way down and the up blocks resize to their skips, as diffusers does.
        if b == 0 || h == 0 || w == 0 {
            candle_core::bail!("unet: latent size {h}x{w} (batch {b}) must not be empty");
        }
        let (cb, _, cd) = match ctx.dims() {
            &[cb, t, cd] if t > 0 => (cb, t, cd),
            d => {
                candle_core::bail!("unet: text embeddings must be [batch, tokens, dim], got {d:?}")
            }
        };
        if cb != b {
            candle_core::bail!("unet: {cb} text embeddings for a batch of {b} latents");
        }
        if cd != cfg.context_dim() {
            candle_core::bail!(
                "unet: text embeddings are {cd} wide, the model expects {} (wrong text encoder?)",
                cfg.context_dim()
            );
        }
        for (name, t) in [("latents", x), ("text embeddings", ctx)] {
            if t.dtype() != self.dtype {
                candle_core::bail!(
                    "unet: {name} are {:?} but the model was loaded as {:?}",
                    t.dtype(),
                    self.dtype
                );
            }
            if !t.device().same_device(&self.device) {
                candle_core::bail!("unet: {name} are on a different device than the model");
            }
        }
        Ok(())
    }
}

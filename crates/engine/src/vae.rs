//! The image autoencoder (diffusers `AutoencoderKL`): the encoder turns an image into a latent
//! distribution, the decoder turns latents back into an image. Architecture from `vae/config.json`.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::attention::{AttentionOptions, SpatialSelfAttention};
use crate::resnet::{
    conv2d, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, ResnetConfig, Upsample2D,
};
use crate::EngineError;

/// 1e-6: the eps diffusers hard-codes for every norm in the VAE's encoder and decoder.
const VAE_NORM_EPS: f64 = 1e-6;

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn groups() -> usize {
    32
}
fn block_out() -> Vec<usize> {
    vec![64]
}
fn down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn silu() -> String {
    "silu".into()
}
fn sd_scaling() -> f64 {
    // 0.18215: SD1/SD2 VAE scaling factor, diffusers AutoencoderKL default and vae/config.json.
    0.18215
}

/// `vae/config.json` of a diffusers `AutoencoderKL`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latents are `encode(x) * scaling_factor`, so they have roughly unit variance.
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    /// SD3/Flux-style VAEs also shift the latents; absent for SD1/SD2/SDXL.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// diffusers runs this VAE in f32 even in an f16 pipeline (SDXL's VAE overflows in f16).
    #[serde(default = "yes")]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl VaeConfig {
    /// Parses `vae/config.json`; a `null` value means "use the default".
    pub fn from_json(json: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_value(drop_nulls(serde_json::from_str(json)?, &[]))
    }

    /// Reads and validates `vae/config.json`.
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

    /// Image pixels per latent pixel along each side (8 for SD's 4-block VAE).
    pub fn downsampling_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            candle_core::bail!("vae config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "vae config: {} down and {} up blocks for {n} entries in block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| t.as_str() != "DownEncoderBlock2D")
        {
            candle_core::bail!("vae config: down block {t:?} is not supported");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| t.as_str() != "UpDecoderBlock2D")
        {
            candle_core::bail!("vae config: up block {t:?} is not supported");
        }
        if self.act_fn != "silu" {
            candle_core::bail!("vae config: act_fn {:?} is not supported", self.act_fn);
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| g == 0 || !c.is_multiple_of(g))
        {
            candle_core::bail!("vae config: {c} channels do not split into {g} groups");
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            candle_core::bail!("vae config: layers_per_block and latent_channels must be positive");
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            candle_core::bail!(
                "vae config: scaling_factor {} is not usable",
                self.scaling_factor
            );
        }
        Ok(())
    }
}

/// Removes top-level `null` entries (except `keep`) so serde fills in the field defaults.
pub(crate) fn drop_nulls(mut v: serde_json::Value, keep: &[&str]) -> serde_json::Value {
    if let serde_json::Value::Object(m) = &mut v {
        m.retain(|k, x| !x.is_null() || keep.contains(&k.as_str()));
    }
    v
}

/// The encoder's output: a diagonal Gaussian over latents (diffusers
/// `DiagonalGaussianDistribution`), before the scaling factor.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + exp(logvar / 2) * noise`; the caller supplies the noise so it comes from the
    /// seeded generator.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean
            .add(&(self.logvar.affine(0.5, 0.0)?.exp()? * noise)?)
    }
}

/// `UNetMidBlock2D` of the VAE: resnet, (attention), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    fn load(vb: VarBuilder, c: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let r = ResnetConfig {
            in_channels: c,
            out_channels: c,
            temb_channels: None,
            groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        };
        let attention = if add_attention {
            // diffusers passes attention_head_dim = channels: one head over all channels.
            let a = SpatialSelfAttention::load(vb.pp("attentions.0"), c, c, groups, VAE_NORM_EPS);
            Some(a?)
        } else {
            None
        };
        Ok(Self {
            resnets: [
                ResnetBlock2D::load(vb.pp("resnets.0"), &r)?,
                ResnetBlock2D::load(vb.pp("resnets.1"), &r)?,
            ],
            attention,
        })
    }

    fn forward(&self, x: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h, opts)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

fn resnet_chain(
    vb: &VarBuilder,
    in_c: usize,
    out_c: usize,
    layers: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..layers)
        .map(|j| {
            let cfg = ResnetConfig {
                in_channels: if j == 0 { in_c } else { out_c },
                out_channels: out_c,
                temb_channels: None,
                groups,
                eps: VAE_NORM_EPS,
                output_scale_factor: 1.0,
            };
            ResnetBlock2D::load(vb.pp(format!("resnets.{j}")), &cfg)
        })
        .collect()
}

/// `Encoder` of diffusers' VAE (image -> `2 * latent_channels` moments).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let n = boc.len();
        let mut blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_c = out_c;
            out_c = c;
            let resnets = resnet_chain(&vb, in_c, out_c, cfg.layers_per_block, g)?;
            // downsample_padding = 0: the LDM asymmetric pad, kept by diffusers for the VAE.
            let down = if i + 1 < n {
                Some(Downsample2D::load(vb.pp("downsamplers.0"), out_c, 0)?)
            } else {
                None
            };
            blocks.push((resnets, down));
        }
        let c = boc[n - 1];
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::load(vb.pp("mid_block"), c, g, cfg.mid_block_add_attention)?,
            norm_out: GroupNorm::load(vb.pp("conv_norm_out"), g, c, VAE_NORM_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), c, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h, opts)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// `Decoder` of diffusers' VAE (latents -> image).
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let n = rev.len();
        let mut blocks = Vec::with_capacity(n);
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev_c = out_c;
            out_c = c;
            let resnets = resnet_chain(&vb, prev_c, out_c, cfg.layers_per_block + 1, g)?;
            let up = if i + 1 < n {
                Some(Upsample2D::load(vb.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            blocks.push((resnets, up));
        }
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?,
            mid: MidBlock::load(vb.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?,
            blocks,
            norm_out: GroupNorm::load(vb.pp("conv_norm_out"), g, rev[n - 1], VAE_NORM_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), rev[n - 1], cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor, opts: &AttentionOptions) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?, opts)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
    device: Device,
    attention: AttentionOptions,
}

impl AutoencoderKL {
    /// Builds the VAE from diffusers key names under `vb` (the root of the VAE's weights).
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::load(vb.pp("encoder"), cfg)?,
            decoder: Decoder::load(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            attention: AttentionOptions::default(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
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

    /// Chooses chunked/sliced attention for the mid block (its 4096-token attention at 512x512
    /// is the VAE's largest single allocation).
    pub fn set_attention_options(&mut self, opts: AttentionOptions) {
        self.attention = opts;
    }

    /// Image `[batch, in_channels, h, w]` in [-1, 1] -> the latent distribution (unscaled).
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let f = self.config.downsampling_factor();
        self.check(image, self.config.in_channels, f, "image")?;
        let mut moments = self.encoder.forward(image, &self.attention)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: moments.narrow(1, 0, l)?,
            // [-30, 20]: diffusers' DiagonalGaussianDistribution clamp.
            logvar: moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Raw latents (already divided by the scaling factor) -> image, roughly in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check(z, self.config.latent_channels, 1, "latents")?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z, &self.attention)
    }

    /// Latents as the UNet sees them -> image: undoes `scaling_factor` (and `shift_factor`).
    pub fn decode_scaled(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        self.decode(&latents.affine(1.0 / self.config.scaling_factor, shift)?)
    }

    /// Image -> latents as the UNet sees them: the distribution's mean (or a sample with the
    /// given noise), shifted and scaled as diffusers' pipelines do.
    pub fn encode_scaled(&self, image: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let dist = self.encode(image)?;
        let z = match noise {
            Some(n) => dist.sample(n)?,
            None => dist.mean,
        };
        let s = self.config.scaling_factor;
        z.affine(s, -self.config.shift_factor.unwrap_or(0.0) * s)
    }

    fn check(&self, x: &Tensor, channels: usize, multiple: usize, name: &str) -> Result<()> {
        let (b, c, h, w) = match x.dims() {
            &[b, c, h, w] => (b, c, h, w),
            d => candle_core::bail!(
                "vae: {name} must be [batch, channels, height, width], got {d:?}"
            ),
        };
        if c != channels {
            candle_core::bail!("vae: {name} have {c} channels, the model expects {channels}");
        }
        if b == 0 || h == 0 || w == 0 || !h.is_multiple_of(multiple) || !w.is_multiple_of(multiple)
        {
            candle_core::bail!(
                "vae: {name} size {h}x{w} (batch {b}) must be non-empty multiples of {multiple}"
            );
        }
        if x.dtype() != self.dtype {
            candle_core::bail!(
                "vae: {name} are {:?} but the model was loaded as {:?}",
                x.dtype(),
                self.dtype
            );
        }
        if !x.device().same_device(&self.device) {
            candle_core::bail!("vae: {name} are on a different device than the model");
        }
        Ok(())
    }
}

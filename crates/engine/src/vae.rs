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

/// How [`AutoencoderKL::decode_tiled`] cuts the latents. Sizes are in latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileOptions {
    /// Side of one tile (64: 512 image pixels, the size SD was trained at).
    pub tile: usize,
    /// Latent pixels shared by neighbouring tiles, blended linearly.
    pub overlap: usize,
}

impl Default for TileOptions {
    /// 64 latent pixels with a quarter of overlap: diffusers' `AutoencoderKL` tiling defaults
    /// (`tile_sample_min_size` 512, `tile_overlap_factor` 0.25).
    fn default() -> Self {
        Self {
            tile: 64,
            overlap: 16,
        }
    }
}

impl TileOptions {
    fn validate(&self) -> Result<()> {
        if self.tile == 0 || self.overlap >= self.tile {
            candle_core::bail!(
                "vae tiling: overlap {} must be smaller than the tile {}",
                self.overlap,
                self.tile
            );
        }
        Ok(())
    }
}

/// Tile origins along one side of `n` latent pixels: every `tile - overlap`, the last one flush
/// with the end so no tile hangs over.
fn tile_starts(n: usize, t: &TileOptions) -> Vec<usize> {
    if n <= t.tile {
        return vec![0];
    }
    let stride = t.tile - t.overlap;
    let mut v: Vec<usize> = (0..n - t.tile).step_by(stride).collect();
    v.push(n - t.tile);
    v
}

/// Blend weight of pixel `p` of a tile `len` pixels long: rising over `ramp` pixels from a side
/// that has a neighbour (`lo`: before, `hi`: after), 1 elsewhere. Never 0, so every pixel is
/// covered.
fn ramp(p: usize, len: usize, ramp: usize, lo: bool, hi: bool) -> f32 {
    let mut v = 1f32;
    if ramp > 0 {
        if lo && p < ramp {
            v = v.min((p as f32 + 0.5) / ramp as f32);
        }
        if hi && p + ramp >= len {
            v = v.min(((len - p) as f32 - 0.5) / ramp as f32);
        }
    }
    v
}

/// Runs `decode` on overlapping tiles of `z` `[b, c, h, w]` and blends the results (`[b, out_c,
/// h * f, w * f]` each) with linear ramps across the overlaps. Returns an f32 CPU tensor.
fn blend_tiles(
    z: &Tensor,
    tiles: &TileOptions,
    f: usize,
    oc: usize,
    decode: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, _, h, w) = z.dims4()?;
    let (ih, iw) = (h * f, w * f);
    // Blended on the CPU in f32: the full image is small next to the decoder's activations, and
    // the device then only ever holds one tile's.
    let mut acc = vec![0f32; b * oc * ih * iw];
    let mut weight = vec![0f32; ih * iw];
    let ramp_px = tiles.overlap * f;
    for y0 in tile_starts(h, tiles) {
        for x0 in tile_starts(w, tiles) {
            let (th, tw) = (tiles.tile.min(h), tiles.tile.min(w));
            // The packed CPU convolutions want contiguous input; a narrowed view is not.
            let tile_z = z.narrow(2, y0, th)?.narrow(3, x0, tw)?.contiguous()?;
            let part = decode(&tile_z)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let (ph, pw) = (th * f, tw * f);
            if part.len() != b * oc * ph * pw {
                candle_core::bail!("vae tiling: a tile decoded to {} values", part.len());
            }
            let wy: Vec<f32> = (0..ph)
                .map(|p| ramp(p, ph, ramp_px, y0 > 0, y0 + th < h))
                .collect();
            let wx: Vec<f32> = (0..pw)
                .map(|p| ramp(p, pw, ramp_px, x0 > 0, x0 + tw < w))
                .collect();
            let (oy, ox) = (y0 * f, x0 * f);
            for (py, &wyv) in wy.iter().enumerate() {
                for (px, &wxv) in wx.iter().enumerate() {
                    weight[(oy + py) * iw + ox + px] += wyv * wxv;
                }
            }
            for plane in 0..b * oc {
                let src = &part[plane * ph * pw..(plane + 1) * ph * pw];
                let dst = &mut acc[plane * ih * iw..(plane + 1) * ih * iw];
                for (py, &wyv) in wy.iter().enumerate() {
                    let row = &src[py * pw..(py + 1) * pw];
                    let at = (oy + py) * iw + ox;
                    for ((o, &v), &wxv) in dst[at..at + pw].iter_mut().zip(row).zip(&wx) {
                        *o += v * wyv * wxv;
                    }
                }
            }
        }
    }
    for plane in acc.chunks_mut(ih * iw) {
        for (v, &wt) in plane.iter_mut().zip(&weight) {
            *v /= wt;
        }
    }
    Tensor::from_vec(acc, (b, oc, ih, iw), &Device::Cpu)
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

    /// [`Self::decode_scaled`] in overlapping tiles (see [`Self::decode_tiled`]).
    pub fn decode_scaled_tiled(&self, latents: &Tensor, tiles: &TileOptions) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        self.decode_tiled(
            &latents.affine(1.0 / self.config.scaling_factor, shift)?,
            tiles,
        )
    }

    /// [`Self::decode`] in overlapping latent tiles blended linearly across their overlap, so the
    /// decoder's working memory depends on the tile size, not the image size. Latents that fit in
    /// one tile decode exactly as [`Self::decode`].
    ///
    /// Not bit-identical to the plain decode: the decoder's group norms and its mid-block
    /// attention see one tile instead of the whole image, so colours and contrast can drift a
    /// little between tiles; the blend hides the seams. The tests measure the difference.
    ///
    /// Not diffusers' `tiled_decode` either, though the geometry is the same: diffusers keeps
    /// stepping by the stride to the edge (ending in partial, sometimes tiny tiles), ramps
    /// `y / blend` instead of `(y + 0.5) / blend`, and blends corners neighbour by neighbour. Pixels
    /// that one tile covers in both agree to float noise (tested against diffusers' output).
    pub fn decode_tiled(&self, z: &Tensor, tiles: &TileOptions) -> Result<Tensor> {
        self.check(z, self.config.latent_channels, 1, "latents")?;
        tiles.validate()?;
        let (_, _, h, w) = z.dims4()?;
        if h <= tiles.tile && w <= tiles.tile {
            return self.decode(z);
        }
        let f = self.config.downsampling_factor();
        let image = blend_tiles(z, tiles, f, self.config.out_channels, |t| self.decode(t))?;
        image.to_dtype(self.dtype)?.to_device(&self.device)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Weights;

    fn tiny_vae() -> AutoencoderKL {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny/sd1/vae");
        let cfg = VaeConfig::from_file(&dir.join("config.json")).unwrap();
        let w = Weights::open(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        AutoencoderKL::load(w.var_builder(DType::F32, &Device::Cpu).unwrap(), &cfg).unwrap()
    }

    /// A VAE with SD's layout at a quarter of its width, with seeded random weights: the bounds
    /// below were measured on it, so it must be the same model on every run.
    fn random_vae() -> AutoencoderKL {
        let cfg = VaeConfig::from_json(
            r#"{"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2,
                "down_block_types": ["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]}"#,
        )
        .unwrap();
        AutoencoderKL::load(crate::bench::seeded_weights(DType::F32, &Device::Cpu), &cfg).unwrap()
    }

    /// Mean and largest absolute difference in 8-bit pixel steps after clamping to [-1, 1], as
    /// the pixels are saved (random-weight decoders overshoot that range a lot).
    fn pixel_diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let c = |t: &Tensor| t.clamp(-1f32, 1f32).unwrap();
        let d = ((c(a) - c(b)).unwrap().abs().unwrap() * 127.5).unwrap();
        let mean = d.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let max = d
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (mean, max)
    }

    /// The same measure between the plain image and itself shifted by one tile stride: what a
    /// misplaced tile would cost, so the bounds below are known to be able to fail.
    fn shifted_diff(a: &Tensor, shift: usize) -> f32 {
        let w = a.dim(3).unwrap();
        let left = a.narrow(3, 0, w - shift).unwrap();
        let right = a.narrow(3, shift, w - shift).unwrap();
        pixel_diff(&left, &right).0
    }

    fn latents(h: usize, w: usize) -> Tensor {
        // Smooth-ish latents like a real image's, so seams would show: noise plus a gradient.
        // Seeded, so the measured bounds hold on every run.
        let noise =
            crate::rng::seeded_normal(h as u64 * 1000 + w as u64, 0., 0.5, &[1, 4, h, w]).unwrap();
        let ramp = Tensor::arange(0f32, w as f32, &Device::Cpu)
            .unwrap()
            .affine(2.0 / w as f64, -1.0)
            .unwrap()
            .reshape((1, 1, 1, w))
            .unwrap();
        noise.broadcast_add(&ramp).unwrap()
    }

    #[test]
    fn tile_origins_cover_the_side_and_end_flush() {
        let t = TileOptions {
            tile: 12,
            overlap: 4,
        };
        assert_eq!(tile_starts(10, &t), [0]);
        assert_eq!(tile_starts(12, &t), [0]);
        assert_eq!(tile_starts(24, &t), [0, 8, 12]);
        assert_eq!(tile_starts(20, &t), [0, 8]);
        assert!(TileOptions {
            tile: 4,
            overlap: 4
        }
        .validate()
        .is_err());
        // Weights rise from a neighbour's side and never reach 0.
        assert_eq!(ramp(5, 10, 4, false, false), 1.0);
        assert!(ramp(0, 10, 4, true, false) > 0.0 && ramp(0, 10, 4, true, false) < 0.2);
        assert!(ramp(9, 10, 4, false, true) > 0.0 && ramp(9, 10, 4, false, true) < 0.2);
    }

    #[test]
    fn blending_a_local_decoder_is_exact() {
        // A decoder whose pixels depend only on their own latent (x8 nearest upsampling of 3
        // channels) must come out of the tiling unchanged: this pins tile placement and the
        // blend weights, apart from what the real decoder's global layers add.
        let z = latents(21, 30);
        let up = |t: &Tensor| -> Result<Tensor> {
            t.narrow(1, 0, 3)?
                .upsample_nearest2d(t.dim(2)? * 8, t.dim(3)? * 8)
        };
        let want = up(&z).unwrap();
        let got = blend_tiles(
            &z,
            &TileOptions {
                tile: 8,
                overlap: 3,
            },
            8,
            3,
            up,
        )
        .unwrap();
        let (mean, max) = pixel_diff(&want, &got);
        assert!(max < 1e-3, "mean {mean}, max {max}");
    }

    #[test]
    fn one_tile_is_the_plain_decode() {
        let vae = tiny_vae();
        let z = latents(8, 8);
        let plain = vae.decode(&z).unwrap();
        let tiled = vae
            .decode_tiled(
                &z,
                &TileOptions {
                    tile: 8,
                    overlap: 2,
                },
            )
            .unwrap();
        assert_eq!(pixel_diff(&plain, &tiled).1, 0.0);
    }

    // Tiles see their own group-norm statistics and their own mid-block attention, so the tiled
    // image is not the plain one; these bounds are what was measured with margin (see the
    // printed figures with --nocapture), and they fail if the blend or the placement is wrong
    // (a misplaced tile differs by tens of steps on average).
    #[test]
    fn tiled_decode_of_the_tiny_model_is_close_to_the_plain_one() {
        let vae = tiny_vae();
        // 768x640 pixels in the default 64-latent tiles with 16 of overlap: 2 x 2 tiles.
        let z = latents(80, 96);
        let plain = vae.decode(&z).unwrap();
        let tiled = vae.decode_tiled(&z, &TileOptions::default()).unwrap();
        assert_eq!(plain.dims(), tiled.dims());
        let (mean, max) = pixel_diff(&plain, &tiled);
        let control = shifted_diff(&plain, 48 * 8);
        eprintln!("tiny VAE 768x640, default tiles: mean {mean:.2}, max {max:.1} pixel steps; misplaced tile {control:.2}");
        assert!(mean < TINY_MEAN_STEPS, "mean {mean}, max {max}");
        assert!(control > TINY_MEAN_STEPS, "control {control}");
    }

    #[test]
    fn tiled_decode_of_a_random_sd_shaped_vae_is_close_to_the_plain_one() {
        let vae = random_vae();
        let z = latents(40, 40);
        let plain = vae.decode(&z).unwrap();
        let tiled = vae
            .decode_tiled(
                &z,
                &TileOptions {
                    tile: 24,
                    overlap: 8,
                },
            )
            .unwrap();
        let (mean, max) = pixel_diff(&plain, &tiled);
        let control = shifted_diff(&plain, 16 * 8);
        eprintln!("random VAE 320x320, 24/8 tiles: mean {mean:.2}, max {max:.1} pixel steps; misplaced tile {control:.2}");
        assert!(mean < RANDOM_MEAN_STEPS, "mean {mean}, max {max}");
        assert!(control > RANDOM_MEAN_STEPS, "control {control}");
    }

    /// Largest absolute difference between `a` and `b` (`[1, 3, h, w]`) over the rectangles
    /// `ys x xs` (pixel ranges), unclamped.
    fn region_max(a: &Tensor, b: &Tensor, ys: &[(usize, usize)], xs: &[(usize, usize)]) -> f32 {
        let mut m = 0f32;
        for &(y0, y1) in ys {
            for &(x0, x1) in xs {
                let cut = |t: &Tensor| {
                    t.narrow(2, y0, y1 - y0)
                        .unwrap()
                        .narrow(3, x0, x1 - x0)
                        .unwrap()
                };
                let d = (cut(a) - cut(b))
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                m = m.max(d.max(0).unwrap().to_scalar::<f32>().unwrap());
            }
        }
        m
    }

    // diffusers' `tiled_decode` of the tiny VAE (tests/fixtures/make_tiled_vae_refs.py) with the
    // same tile geometry as `TileOptions { tile: 8, overlap: 2 }`: 8-latent tiles every 6, blended
    // over 16 pixels. The two tilings are not the same algorithm (diffusers adds partial tiles at
    // the far edges instead of a flush last tile, ramps by y/16 instead of (y + 0.5)/16, and
    // blends corners one neighbour after the other), but where a pixel comes from one tile alone
    // in both, both are that tile's own decode, so those pixels must agree to float noise.
    #[test]
    fn tiled_decode_matches_diffusers_tiled_decode_where_the_tilings_agree() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/refs/vae_tiled.safetensors");
        let refs = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
        let (z, want) = (&refs["z"], &refs["tiled"]);
        let vae = tiny_vae();
        let tiles = TileOptions {
            tile: 8,
            overlap: 2,
        };
        let got = vae.decode_tiled(z, &tiles).unwrap();
        assert_eq!(got.dims(), want.dims());
        // 14 x 20 latents: our tiles start at 0, 6 (rows) and 0, 6, 12 (columns); diffusers' at
        // 0, 6, 12 and 0, 6, 12, 18. Pixels covered by a single tile in both layouts:
        let ys = [(0, 48), (64, 96)];
        let xs = [(0, 48), (64, 96), (112, 144)];
        let single = region_max(&got, want, &ys, &xs);
        // The same pixels of the plain decode: per-tile group norms make them differ a lot, so a
        // tile decoded with the wrong latents or put in the wrong place cannot pass.
        let plain = vae.decode(z).unwrap();
        let control = region_max(&plain, want, &ys, &xs);
        // A seam both blend from the same two tiles (rows 0..48, columns 48..64, tiles at latent
        // columns 0 and 6): our weight of the right tile is (x + 0.5) / 16, diffusers' x / 16, so
        // ours minus diffusers' must be exactly (right - left) / 32 there.
        let tile = |x0: usize| {
            let t = z.narrow(2, 0, 8).unwrap().narrow(3, x0, 8).unwrap();
            vae.decode(&t.contiguous().unwrap()).unwrap()
        };
        let band = |t: &Tensor, x0: usize| t.narrow(2, 0, 48).unwrap().narrow(3, x0, 16).unwrap();
        let (left, right) = (band(&tile(0), 48), band(&tile(6), 0));
        let half_step = ((right - left).unwrap() / 32.0).unwrap();
        let offset = (band(&got, 48) - band(want, 48)).unwrap();
        let seam = region_max(&offset, &half_step, &[(0, 48)], &[(0, 16)]);
        let seam_raw = region_max(&band(&got, 48), &band(want, 48), &[(0, 48)], &[(0, 16)]);
        // Everywhere: the overlaps differ by the ramp and corner rules, the far edges by
        // diffusers' partial tiles.
        let corners = region_max(&got, want, &[(48, 64)], &[(48, 64), (96, 112)]);
        let edges = region_max(&got, want, &[(96, 112)], &[(0, 160)]).max(region_max(
            &got,
            want,
            &[(0, 112)],
            &[(144, 160)],
        ));
        let (mean, max) = pixel_diff(&got, want);
        let (plain_mean, _) = pixel_diff(&plain, want);
        eprintln!("vs diffusers tiled: single-tile pixels max {single:e} (plain decode {control:e}); seam after the half-pixel ramp offset {seam:e} (raw {seam_raw:e}); corners {corners:e}, far edges {edges:e}; whole image mean {mean:.3} max {max:.2} pixel steps (plain decode mean {plain_mean:.2})");
        assert!(single < SINGLE_TILE_TOL, "single-tile max {single}");
        assert!(control > 1000.0 * SINGLE_TILE_TOL, "control {control}");
        assert!(seam < SINGLE_TILE_TOL, "seam {seam}");
        assert!(seam_raw > 100.0 * SINGLE_TILE_TOL, "seam raw {seam_raw}");
        assert!(mean < DIFFUSERS_MEAN_STEPS, "mean {mean}, max {max}");
        assert!(
            plain_mean > 5.0 * DIFFUSERS_MEAN_STEPS,
            "plain mean {plain_mean}"
        );
    }

    // Measured: single-tile pixels 1.6e-5 and the seam 7.3e-6 (float noise of two conv stacks;
    // the plain decode is 2.8 off there and the raw seam 0.057). Whole image 3.5 mean steps,
    // most of it the far edges (up to 1.18, diffusers' 2-latent tiles) and the corners (0.25).
    const SINGLE_TILE_TOL: f32 = 1e-4;
    const DIFFUSERS_MEAN_STEPS: f32 = 5.0;

    // Measured with the seeded latents and weights: tiny model 16.6 mean steps (of 255), random
    // SD-shaped VAE 39.0; a misplaced tile costs 33.1 and 79.4. (Unseeded, the random VAE ranged
    // from 39 to 58 between runs and once failed CI.) Random-weight decoders amplify the per-tile group-norm statistics far
    // more than a trained VAE does, so these are loose upper bounds, not a quality claim.
    const TINY_MEAN_STEPS: f32 = 22.0;
    const RANDOM_MEAN_STEPS: f32 = 55.0;
}

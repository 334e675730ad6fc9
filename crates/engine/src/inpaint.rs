//! Drawing from a prompt alone with an inpainting model (SD 1.5/2 inpainting and their merges:
//! a UNet whose 9 input channels are the latents, a mask and the masked picture's latents). The
//! whole picture is to be painted, so the mask is all ones and the masked picture all mid-grey
//! (0 in [-1, 1]), as A1111's txt2img gives these models (`txt2img_image_conditioning`).

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use crate::unet::UNetConfig;
use crate::vae::AutoencoderKL;
use crate::Result;

/// The UNet input channels of an inpainting model: 4 latents, 1 mask, 4 masked-picture latents.
pub const INPAINT_CHANNELS: usize = 9;

/// Whether `unet` is an inpainting UNet that needs [`whole_picture`] beside the latents.
pub fn is_inpainting(unet: &UNetConfig) -> bool {
    unet.in_channels == INPAINT_CHANNELS
}

/// The extra UNet input for painting a whole `height` x `width` picture: `[1, 5, h/8, w/8]`, the
/// mask (ones) then the grey picture's latents (its VAE encoding's mean, scaled as the UNet sees
/// latents; A1111 and diffusers draw a sample of the encoding instead, which differs by the
/// encoder's small spread), in `dtype` on `device`.
pub fn whole_picture(
    vae: &AutoencoderKL,
    height: usize,
    width: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let grey = Tensor::zeros((1, 3, height, width), vae.dtype(), vae.device())?;
    let latents = vae
        .encode_scaled(&grey, None)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let (_, _, h, w) = latents.dims4()?;
    let mask = Tensor::ones((1, 1, h, w), dtype, device)?;
    Ok(Tensor::cat(&[&mask, &latents], 1)?)
}

/// The last [`whole_picture`], kept by its size: it depends on nothing else, and encoding costs
/// about a VAE decode (seconds on a CPU), so every picture of a batch and every later job of
/// the same size reuses it instead of encoding again.
#[derive(Debug, Default)]
pub struct WholePictureCache(Mutex<Option<((usize, usize), Tensor)>>);

impl WholePictureCache {
    /// The conditioning for `height` x `width`, from `encode` only when the size is new.
    pub fn get(
        &self,
        height: usize,
        width: usize,
        encode: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((size, t)) = kept.as_ref() {
            if *size == (height, width) {
                return Ok(t.clone());
            }
        }
        let t = encode()?;
        *kept = Some(((height, width), t.clone()));
        Ok(t)
    }
}

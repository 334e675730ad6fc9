//! A1111's "Hires. fix": the picture is first drawn at the requested size, then enlarged (in
//! latent space, or as pixels through the VAE) and drawn over at the larger size for a few
//! steps, starting part-way down the noise schedule. The model then only refines detail at a
//! size it was not trained for, so it does not repeat the subject or break the layout, as a
//! direct 1024x1024 SD 1.5 picture would.
//!
//! The second pass follows A1111's `sample_img2img` with hires steps given: a schedule for
//! `steps / denoise` steps, of which the last `steps` are walked, from the enlarged latents
//! plus fresh seeded noise at the first of those sigmas.

use candle_core::{DType, Device, Tensor};

use crate::pipeline::{GenerateRequest, Observer, Progress};
use crate::sampler::{Control, Sampler};
use crate::schedule::{NoiseSchedule, ScheduleKind};
use crate::vae::AutoencoderKL;
use crate::{EngineError, Result};

/// How the first pass's picture is enlarged before the second pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiresUpscaler {
    /// The latents, bilinear (A1111 "Latent", its default; "Latent (antialiased)" is the same
    /// when enlarging).
    #[default]
    Latent,
    /// The latents, nearest neighbour as PyTorch's `nearest` picks it (A1111 "Latent (nearest)").
    LatentNearest,
    /// The latents, nearest neighbour by pixel centres (A1111 "Latent (nearest-exact)").
    LatentNearestExact,
    /// Decoded, enlarged as pixels with a Lanczos filter, encoded again (A1111 "Lanczos"; also
    /// its "None").
    Lanczos,
}

impl HiresUpscaler {
    pub const ALL: [HiresUpscaler; 4] = [
        HiresUpscaler::Latent,
        HiresUpscaler::LatentNearest,
        HiresUpscaler::LatentNearestExact,
        HiresUpscaler::Lanczos,
    ];

    /// The A1111 name.
    pub fn name(self) -> &'static str {
        match self {
            HiresUpscaler::Latent => "Latent",
            HiresUpscaler::LatentNearest => "Latent (nearest)",
            HiresUpscaler::LatentNearestExact => "Latent (nearest-exact)",
            HiresUpscaler::Lanczos => "Lanczos",
        }
    }

    /// The upscaler for an A1111 name (case and spacing ignored), with `true` when it is that
    /// upscaler itself and `false` when it stands in for one we do not have: the bicubic latent
    /// modes draw as "Latent", model upscalers (ESRGAN, SwinIR, ...) as "Lanczos".
    pub fn from_name(name: &str) -> (Self, bool) {
        let key: String = name
            .chars()
            .filter(|c| !c.is_whitespace())
            .flat_map(char::to_lowercase)
            .collect();
        match key.as_str() {
            "" | "latent" | "latent(antialiased)" => (HiresUpscaler::Latent, true),
            "latent(nearest)" => (HiresUpscaler::LatentNearest, true),
            "latent(nearest-exact)" => (HiresUpscaler::LatentNearestExact, true),
            "lanczos" | "none" => (HiresUpscaler::Lanczos, true),
            k if k.starts_with("latent") => (HiresUpscaler::Latent, false),
            _ => (HiresUpscaler::Lanczos, false),
        }
    }

    /// Whether this upscaler works on the latents (no VAE between the passes).
    pub fn is_latent(self) -> bool {
        self != HiresUpscaler::Lanczos
    }
}

/// The least denoising strength a hires pass takes (A1111 has no floor; below this the second
/// pass changes nothing visible anyway).
pub const MIN_DENOISE: f64 = 0.01;

/// The second pass of a request ([`crate::pipeline::GenerateRequest::hires`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HiresFix {
    /// The final picture's size: multiples of 8 in 64..=2048.
    pub width: usize,
    pub height: usize,
    /// Steps the second pass runs (A1111 "Hires steps"; its 0, "as many as the first pass", is
    /// resolved by the caller).
    pub steps: usize,
    /// How far down the schedule the second pass starts, 0 < denoise <= 1 (A1111 "Denoising
    /// strength"): 1 draws over the enlarged picture almost from noise, 0.3 keeps it nearly as
    /// it is.
    pub denoise: f64,
    pub upscaler: HiresUpscaler,
    /// The size the first picture is enlarged to before its middle is cut to `width` x
    /// `height`: A1111's `hr_resize_x` and `hr_resize_y` of another shape than the picture
    /// (enlarged to cover, then cropped). `None`: enlarged to `width` x `height` itself.
    pub cover: Option<(usize, usize)>,
    /// The factor asked for (A1111's `hr_scale`), for the parameters text; `None` when the size
    /// was asked for instead.
    pub scale: Option<f64>,
}

impl HiresFix {
    /// Checks the second pass's own fields; the error names A1111's field.
    pub fn validate(&self) -> Result<()> {
        use crate::pipeline::{MAX_SIZE, MAX_STEPS, MIN_SIZE};
        // The fix names the field the request set: a factor, or a size.
        let fix = if self.scale.is_some() {
            "lower hr_scale"
        } else {
            "choose a smaller hr_resize_x and hr_resize_y"
        };
        for (field, v) in [("hires width", self.width), ("hires height", self.height)] {
            if !(MIN_SIZE..=MAX_SIZE).contains(&v) || !v.is_multiple_of(8) {
                return Err(EngineError::InvalidRequest(format!(
                    "the {field} must be a multiple of 8 between {MIN_SIZE} and {MAX_SIZE}, \
                     got {v}; {fix}"
                )));
            }
        }
        if let Some((w, h)) = self.cover {
            if w < self.width
                || h < self.height
                || w > 2 * MAX_SIZE
                || h > 2 * MAX_SIZE
                || !w.is_multiple_of(8)
                || !h.is_multiple_of(8)
            {
                return Err(EngineError::InvalidRequest(format!(
                    "the hires cover size {w}x{h} must hold {}x{} and be multiples of 8",
                    self.width, self.height
                )));
            }
        }
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(EngineError::InvalidRequest(format!(
                "hires steps must be between 1 and {MAX_STEPS}, got {}",
                self.steps
            )));
        }
        // The floor keeps the longer schedule (steps / denoise) to a few thousand sigmas; a
        // denoise near 0 would ask for billions and run the process out of memory.
        if !(MIN_DENOISE..=1.0).contains(&self.denoise) {
            return Err(EngineError::InvalidRequest(format!(
                "denoising_strength must be between {MIN_DENOISE} and 1 for a hires pass, got {}",
                self.denoise
            )));
        }
        Ok(())
    }

    /// The sigmas the second pass walks: A1111 builds the sampler's schedule for
    /// `int(steps / min(denoise, 0.999))` steps and keeps its last `steps + 1` values.
    pub fn sigmas(
        &self,
        sampler: &dyn Sampler,
        schedule: &NoiseSchedule,
        kind: ScheduleKind,
    ) -> Vec<f64> {
        let full = (self.steps as f64 / self.denoise.min(0.999)) as usize;
        let sigmas = sampler.sigmas(schedule, kind, full.max(self.steps));
        // A sampler that walks its own count of sigmas (DDIM's uniform timesteps) still starts
        // no earlier than the whole schedule.
        let keep = (self.steps + 1).min(sigmas.len());
        sigmas[sigmas.len() - keep..].to_vec()
    }

    /// The size the first picture is enlarged to: [`Self::cover`], or the final size.
    pub fn enlarged_size(&self) -> (usize, usize) {
        self.cover.unwrap_or((self.width, self.height))
    }

    /// `latents` enlarged to [`Self::enlarged_size`] with their middle cut to the final size,
    /// as A1111 cuts (`truncate // 2` off the top and left, the rest off the bottom and right).
    fn crop(&self, latents: Tensor) -> Result<Tensor> {
        let Some((cw, ch)) = self.cover else {
            return Ok(latents);
        };
        let (_, _, lh, lw) = latents.dims4()?;
        let (th, tw) = (lh * self.height / ch, lw * self.width / cw);
        let (top, left) = ((lh - th) / 2, (lw - tw) / 2);
        Ok(latents.narrow(2, top, th)?.narrow(3, left, tw)?)
    }

    /// The second pass as a request of its own: `req` at this size with these steps (and no
    /// further pass). Prompt, seed, sampler and guidance stay the first pass's.
    pub fn second_request(&self, req: &GenerateRequest) -> GenerateRequest {
        GenerateRequest {
            width: self.width,
            height: self.height,
            steps: self.steps,
            hires: None,
            ..req.clone()
        }
    }
}

/// The sigmas of one pass: the whole schedule from noise, or a hires pass's tail.
pub(crate) fn pass_sigmas(
    sampler: &dyn Sampler,
    schedule: &NoiseSchedule,
    req: &GenerateRequest,
    init: Option<(&Tensor, &HiresFix)>,
) -> Vec<f64> {
    match init {
        Some((_, fix)) => fix.sigmas(sampler, schedule, req.schedule),
        None => sampler.sigmas(schedule, req.schedule, req.steps),
    }
}

/// The sampler's state before a pass's first step (k-diffusion scale): noise at the schedule's
/// start, or, for a hires pass, the enlarged latents plus the noise at `sigmas[0]` (A1111's
/// `x + noise * sigma_sched[0]`; what diffusers' `add_noise` gives, divided by
/// `sqrt(alpha_cumprod)`).
pub(crate) fn starting_state(
    sampler: &dyn Sampler,
    sigmas: &[f64],
    noise: Tensor,
    init: Option<(&Tensor, &HiresFix)>,
) -> Result<Tensor> {
    Ok(match init {
        None => (noise * sampler.initial_noise_scale(sigmas))?,
        Some((latents, _)) => {
            let latents = latents.to_device(noise.device())?.to_dtype(noise.dtype())?;
            (latents + (noise * sigmas[0])?)?
        }
    })
}

/// One sampling pass of [`two_pass`]: its request, where it starts (`None`: noise; else the
/// enlarged latents of a hires pass) and its observer; returns latents in diffusers' scale.
pub(crate) type PassFn<'a> = dyn FnMut(&GenerateRequest, Option<(&Tensor, &HiresFix)>, &mut dyn Observer) -> Result<Tensor>
    + 'a;

/// Runs `pass` for `req` from noise and, when `req` has a hires fix, again at its size from the
/// first result enlarged by `enlarge`. Both passes report to `observer` as one run of their
/// steps together. Returns the last pass's latents (diffusers scale).
pub(crate) fn two_pass(
    req: &GenerateRequest,
    schedule: &NoiseSchedule,
    observer: &mut dyn Observer,
    enlarge: &mut dyn FnMut(&Tensor, &HiresFix) -> Result<Tensor>,
    pass: &mut PassFn<'_>,
) -> Result<Tensor> {
    let Some(fix) = &req.hires else {
        return pass(req, None, observer);
    };
    // Callers validate the request; checked again here because the schedule's length depends on
    // the denoising strength.
    fix.validate()?;
    let sampler = req.sampler.sampler();
    let first = sampler.sigmas(schedule, req.schedule, req.steps).len() - 1;
    let second = fix.sigmas(sampler.as_ref(), schedule, req.schedule).len() - 1;
    let total = first + second;
    let latents = pass(
        req,
        None,
        &mut PassObserver {
            inner: observer,
            offset: 0,
            total,
        },
    )?;
    let start = fix.crop(enlarge(&latents, fix)?)?;
    drop(latents);
    pass(
        &fix.second_request(req),
        Some((&start, fix)),
        &mut PassObserver {
            inner: observer,
            offset: first,
            total,
        },
    )
}

/// The request whose size SDXL's time ids carry in a pass: the pass's own, or, for a hires pass
/// whose picture is cut from a larger one, the enlarged size (A1111's `hr_upscale_to_x`/`_y`).
pub(crate) fn conditioned<'a>(
    r: &'a GenerateRequest,
    init: Option<(&Tensor, &HiresFix)>,
) -> std::borrow::Cow<'a, GenerateRequest> {
    match init {
        Some((_, fix)) if fix.cover.is_some() => {
            let (width, height) = fix.enlarged_size();
            std::borrow::Cow::Owned(GenerateRequest {
                width,
                height,
                ..r.clone()
            })
        }
        _ => std::borrow::Cow::Borrowed(r),
    }
}

/// A first pass's latents (diffusers scale) enlarged to `fix`'s [`HiresFix::enlarged_size`]
/// for its second pass: resized as latents (`factor` pixels per latent pixel), or, for
/// Lanczos, by `through_vae` ([`enlarge_decoded`] with the caller's VAE).
pub(crate) fn enlarge(
    latents: &Tensor,
    fix: &HiresFix,
    factor: usize,
    through_vae: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    if !fix.upscaler.is_latent() {
        return through_vae();
    }
    let (width, height) = fix.enlarged_size();
    upscale_latents(latents, fix.upscaler, height / factor, width / factor)
}

/// `latents` enlarged for `fix` from their decoded picture `image`: resized with Lanczos and
/// encoded by `vae` (its mean, as for [`crate::inpaint::whole_picture`]), in `dtype` on
/// `device`. When the picture is not finite (a half-precision VAE that overflowed) the latent
/// upscaler enlarges them instead: drawing over a black picture would waste the first pass.
pub(crate) fn enlarge_decoded(
    vae: &AutoencoderKL,
    image: &Tensor,
    latents: &Tensor,
    fix: &HiresFix,
    factor: usize,
    (dtype, device): (DType, &Device),
) -> Result<Tensor> {
    let (width, height) = fix.enlarged_size();
    let sum = image.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        tracing::warn!("the first pass decoded to a broken picture; enlarging its latents instead");
        return upscale_latents(
            latents,
            HiresUpscaler::Latent,
            height / factor,
            width / factor,
        );
    }
    let pixels = resize_pixels(image, height, width, vae.device())?.to_dtype(vae.dtype())?;
    Ok(vae
        .encode_scaled(&pixels, None)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// `latents` `[1, C, h, w]` resized to `height` x `width` latent pixels by a latent upscaler,
/// as PyTorch's `interpolate` does it (bilinear without corner alignment; nearest by
/// `floor(i * in / out)`, nearest-exact by `floor((i + 0.5) * in / out)`).
pub fn upscale_latents(
    latents: &Tensor,
    upscaler: HiresUpscaler,
    height: usize,
    width: usize,
) -> Result<Tensor> {
    let (_, _, h, w) = latents.dims4()?;
    let nearest = |exact: bool| -> Result<Tensor> {
        let index = |from: usize, to: usize, device: &Device| -> Result<Tensor> {
            let scale = from as f64 / to as f64;
            let idx: Vec<u32> = (0..to)
                .map(|i| {
                    let src = if exact {
                        ((i as f64 + 0.5) * scale).floor()
                    } else {
                        (i as f64 * scale).floor()
                    };
                    (src as usize).min(from - 1) as u32
                })
                .collect();
            Ok(Tensor::new(idx, device)?)
        };
        let rows = index(h, height, latents.device())?;
        let cols = index(w, width, latents.device())?;
        Ok(latents.index_select(&rows, 2)?.index_select(&cols, 3)?)
    };
    match upscaler {
        HiresUpscaler::Latent => {
            // Bilinear in f32: candle's kernel may not take every storage type.
            let dtype = latents.dtype();
            Ok(latents
                .to_dtype(DType::F32)?
                .upsample_bilinear2d(height, width, false)?
                .to_dtype(dtype)?)
        }
        HiresUpscaler::LatentNearest => nearest(false),
        HiresUpscaler::LatentNearestExact => nearest(true),
        HiresUpscaler::Lanczos => Err(EngineError::InvalidRequest(
            "Lanczos enlarges pixels, not latents".into(),
        )),
    }
}

/// A decoded picture `[1, 3, H, W]` in [-1, 1] enlarged to `height` x `width` as A1111 does for
/// "Lanczos": rounded to 8-bit pixels, resized with a Lanczos filter (3 lobes), back to [-1, 1]
/// f32 on `device`.
pub fn resize_pixels(
    image: &Tensor,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    let rgb = crate::pipeline::to_rgb8(image)?;
    let picture = image::RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| {
        EngineError::InvalidRequest("a decoded picture had the wrong number of pixels".into())
    })?;
    let resized = image::imageops::resize(
        &picture,
        width as u32,
        height as u32,
        image::imageops::FilterType::Lanczos3,
    );
    let values: Vec<f32> = resized
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(values, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// An observer for one pass of a two-pass run: its steps count on from `offset`, out of `total`
/// for the whole run, so the progress bar and the ETA cover both passes.
pub(crate) struct PassObserver<'a> {
    pub inner: &'a mut dyn Observer,
    pub offset: usize,
    pub total: usize,
}

impl Observer for PassObserver<'_> {
    fn on_progress(&mut self, p: &Progress<'_>) -> Control {
        self.inner.on_progress(&Progress {
            step: self.offset + p.step,
            total: self.total,
            preview: p.preview,
        })
    }

    fn preview_every(&self) -> Option<std::num::NonZeroUsize> {
        self.inner.preview_every()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_upscaler_names_resolve_and_stand_ins_are_flagged() {
        for u in HiresUpscaler::ALL {
            assert_eq!(HiresUpscaler::from_name(u.name()), (u, true));
        }
        assert_eq!(
            HiresUpscaler::from_name("Latent (antialiased)"),
            (HiresUpscaler::Latent, true)
        );
        assert_eq!(
            HiresUpscaler::from_name("None"),
            (HiresUpscaler::Lanczos, true)
        );
        assert_eq!(
            HiresUpscaler::from_name("Latent (bicubic antialiased)"),
            (HiresUpscaler::Latent, false)
        );
        assert_eq!(
            HiresUpscaler::from_name("R-ESRGAN 4x+"),
            (HiresUpscaler::Lanczos, false)
        );
    }

    #[test]
    fn nearest_modes_pick_pytorchs_source_pixels() {
        // 3 -> 5: torch 'nearest' takes floor(i * 0.6) = 0,0,1,1,2; 'nearest-exact' takes
        // floor((i + 0.5) * 0.6) = 0,0,1,2,2.
        let t = Tensor::new(&[10f32, 20., 30.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 3))
            .unwrap();
        let row = |u| {
            upscale_latents(&t, u, 1, 5)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(row(HiresUpscaler::LatentNearest), [10., 10., 20., 20., 30.]);
        assert_eq!(
            row(HiresUpscaler::LatentNearestExact),
            [10., 10., 20., 30., 30.]
        );
    }

    #[test]
    fn the_second_pass_walks_the_tail_of_a_longer_schedule() {
        let schedule =
            NoiseSchedule::from_config(&crate::config::SchedulerConfig::default()).unwrap();
        let sampler = crate::sampler::SamplerKind::Euler.sampler();
        let fix = HiresFix {
            width: 128,
            height: 128,
            steps: 10,
            denoise: 0.5,
            upscaler: HiresUpscaler::Latent,
            cover: None,
            scale: Some(2.0),
        };
        let tail = fix.sigmas(sampler.as_ref(), &schedule, ScheduleKind::Karras);
        let full = sampler.sigmas(&schedule, ScheduleKind::Karras, 20);
        assert_eq!(tail.len(), 11);
        assert_eq!(tail, full[10..]);
        // Denoise 1 is capped at 0.999 as in A1111: int(10 / 0.999) = 10 steps, all walked.
        let whole = HiresFix {
            denoise: 1.0,
            ..fix
        };
        assert_eq!(
            whole.sigmas(sampler.as_ref(), &schedule, ScheduleKind::Karras),
            sampler.sigmas(&schedule, ScheduleKind::Karras, 10)
        );
    }
}

//! The model wrapper samplers talk to: it turns the UNet's epsilon or v prediction into a
//! denoised estimate in sigma space (k-diffusion `DiscreteEpsDDPMDenoiser` /
//! `DiscreteVDDPMDenoiser`) and applies classifier-free guidance. Samplers only see [`Denoise`],
//! so they can be tested with a fake model.
//!
//! Sigma space: `x = x0 + sigma * noise`. diffusers' latents are `x / sqrt(1 + sigma^2)`, which
//! is exactly the `c_in` scaling the network input gets here.

use candle_core::{DType, Tensor};

use crate::config::PredictionType;
use crate::schedule::NoiseSchedule;
use crate::{EngineError, Result};

/// A denoiser in sigma space: the samplers' view of the model.
pub trait Denoise {
    /// The estimate of the clean latent `x0` given `x` at noise level `sigma`. `x` is the
    /// sampler's f32 state; the result has its shape and dtype.
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor>;
}

/// The network behind the denoiser, e.g. the UNet: `(x_in, t, context) -> eps or v`, where `x_in`
/// is the `c_in`-scaled batch, `t` the (continuous) training timestep and `context` the text
/// embeddings with the same batch size. Keeping it this small lets tests plug in a closure.
pub trait NoisePredictor {
    fn predict(&self, x_in: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor>;
}

impl<F> NoisePredictor for F
where
    F: Fn(&Tensor, f64, &Tensor) -> Result<Tensor>,
{
    fn predict(&self, x_in: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self(x_in, timestep, context)
    }
}

/// The classifier-free guidance scale the [`Denoiser`] should apply for a requested
/// `guidance_scale`. Guidance-embedded models (full LCMs, see
/// [`crate::unet::UNetConfig::guidance_embedded`]) take the scale as an input instead
/// ([`crate::unet::UNet2DConditionModel::guidance_embedding`]) and run without CFG, as diffusers
/// runs them: 1, a single pass on the prompt alone (their negative prompt goes unused).
pub fn cfg_scale_for(guidance_scale: f64, guidance_embedded: bool) -> f64 {
    if guidance_embedded {
        1.0
    } else {
        guidance_scale
    }
}

/// The text conditioning of one generation.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Embeddings of the prompt, `[1, tokens, dim]`.
    pub cond: Tensor,
    /// Embeddings of the negative prompt; needed unless `cfg_scale` is 1.
    pub uncond: Option<Tensor>,
    /// Classifier-free guidance scale: `u + cfg * (c - u)`; 1 means the prompt alone.
    pub cfg_scale: f64,
}

/// A [`NoisePredictor`] turned into a [`Denoise`] for one prompt.
pub struct Denoiser<'a> {
    model: &'a dyn NoisePredictor,
    schedule: &'a NoiseSchedule,
    prediction: PredictionType,
    /// `[uncond, cond]` concatenated once (uncond first, as A1111 and diffusers batch them), or
    /// the cond alone when guidance is off.
    context: Tensor,
    guided: bool,
    cfg_scale: f64,
    /// dtype the network wants its input in (the UNet's weights dtype).
    model_dtype: DType,
}

impl<'a> Denoiser<'a> {
    pub fn new(
        model: &'a dyn NoisePredictor,
        schedule: &'a NoiseSchedule,
        prediction: PredictionType,
        conditioning: &Conditioning,
        model_dtype: DType,
    ) -> Result<Self> {
        if prediction == PredictionType::Sample {
            return Err(EngineError::InvalidRequest(
                "models that predict the sample itself (prediction_type \"sample\") are not supported"
                    .into(),
            ));
        }
        // cfg 1 gives exactly the cond prediction, so the uncond half of the batch is skipped
        // (half the UNet work), as A1111 and diffusers do.
        let guided = conditioning.cfg_scale != 1.0;
        let context = match (&conditioning.uncond, guided) {
            (Some(u), true) => Tensor::cat(&[u, &conditioning.cond], 0)?,
            (None, true) => {
                return Err(EngineError::InvalidRequest(
                    "classifier-free guidance needs negative-prompt embeddings".into(),
                ))
            }
            (_, false) => conditioning.cond.clone(),
        };
        Ok(Self {
            model,
            schedule,
            prediction,
            context: context.to_dtype(model_dtype)?,
            guided,
            cfg_scale: conditioning.cfg_scale,
            model_dtype,
        })
    }

    /// The raw network output (eps or v) for `x` at `sigma`, batch `[uncond; cond]` when guided.
    fn network(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
        let x_in = (x * c_in)?;
        let x_in = if self.guided {
            Tensor::cat(&[&x_in, &x_in], 0)?
        } else {
            x_in
        };
        let t = self.schedule.sigma_to_t(sigma);
        let out = self
            .model
            .predict(&x_in.to_dtype(self.model_dtype)?, t, &self.context)?;
        Ok(out.to_dtype(x.dtype())?)
    }
}

impl Denoise for Denoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let out = self.network(x, sigma)?;
        let x_batch = if self.guided {
            Tensor::cat(&[x, x], 0)?
        } else {
            x.clone()
        };
        let denoised = to_denoised(self.prediction, &x_batch, &out, sigma)?;
        if !self.guided {
            return Ok(denoised);
        }
        // Guidance on the denoised estimates, as k-diffusion CFG wrappers do (the same as on eps
        // up to rounding, since the map is affine in the network output).
        let b = x.dim(0)?;
        let uncond = denoised.narrow(0, 0, b)?;
        let cond = denoised.narrow(0, b, b)?;
        Ok((&uncond + ((cond - &uncond)? * self.cfg_scale)?)?)
    }
}

/// The k-diffusion scalings: eps: `x - sigma * eps`; v: `x c_skip + v c_out` with
/// `c_skip = 1 / (sigma^2 + 1)`, `c_out = -sigma / sqrt(sigma^2 + 1)` (sigma_data 1).
pub fn to_denoised(
    prediction: PredictionType,
    x: &Tensor,
    out: &Tensor,
    sigma: f64,
) -> Result<Tensor> {
    let denoised = match prediction {
        PredictionType::Epsilon => (x + (out * -sigma)?)?,
        PredictionType::VPrediction => {
            let c_skip = 1.0 / (sigma * sigma + 1.0);
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            ((out * c_out)? + (x * c_skip)?)?
        }
        PredictionType::Sample => out.clone(),
    };
    Ok(denoised)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::from_config(&crate::config::SchedulerConfig::default()).unwrap()
    }

    fn cond(cfg: f64) -> Conditioning {
        let dev = Device::Cpu;
        Conditioning {
            cond: Tensor::full(1f32, (1, 2, 3), &dev).unwrap(),
            uncond: Some(Tensor::full(-1f32, (1, 2, 3), &dev).unwrap()),
            cfg_scale: cfg,
        }
    }

    /// A "network" whose output is the mean of each batch item's context, broadcast, so the
    /// guidance arithmetic is visible: uncond gives -1, cond gives +1.
    fn context_mean(x: &Tensor, _t: f64, ctx: &Tensor) -> Result<Tensor> {
        let m = ctx.mean_keepdim(2)?.mean_keepdim(1)?.unsqueeze(3)?;
        Ok(m.broadcast_as(x.shape())?.contiguous()?)
    }

    #[test]
    fn eps_guidance_combines_uncond_first() {
        let s = schedule();
        let model = context_mean;
        let d = Denoiser::new(&model, &s, PredictionType::Epsilon, &cond(7.5), DType::F32).unwrap();
        let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        // eps_u = -1, eps_c = 1 at x = 0, sigma = 2: denoised_u = 2, denoised_c = -2, and
        // 2 + 7.5 * (-2 - 2) = -28.
        let out: Vec<f32> = d
            .denoise(&x, 2.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for v in out {
            assert!((v - (-2.0 * 14.0)).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn cfg_one_runs_the_cond_batch_only() {
        let s = schedule();
        let batches = std::cell::Cell::new(0);
        let model = |x: &Tensor, _t: f64, ctx: &Tensor| -> Result<Tensor> {
            batches.set(x.dim(0)?);
            assert_eq!(ctx.dim(0)?, x.dim(0)?);
            Ok(x.zeros_like()?)
        };
        let mut c = cond(1.0);
        c.uncond = None;
        let d = Denoiser::new(&model, &s, PredictionType::Epsilon, &c, DType::F32).unwrap();
        let x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        d.denoise(&x, 1.0).unwrap();
        assert_eq!(batches.get(), 1);
    }

    #[test]
    fn guidance_embedded_models_run_without_cfg() {
        assert_eq!(cfg_scale_for(7.5, false), 7.5);
        assert_eq!(cfg_scale_for(8.0, true), 1.0);
        assert_eq!(cfg_scale_for(1.0, true), 1.0);
    }

    #[test]
    fn v_prediction_scalings() {
        // With v = 0 the denoised estimate is x / (sigma^2 + 1); with x = 0 it is -sigma v / sqrt(..).
        let dev = Device::Cpu;
        let x = Tensor::full(2f32, (1, 1, 1, 1), &dev).unwrap();
        let zero = x.zeros_like().unwrap();
        let v = Tensor::full(1f32, (1, 1, 1, 1), &dev).unwrap();
        let a: Vec<f32> = to_denoised(PredictionType::VPrediction, &x, &zero, 3.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((a[0] - 0.2).abs() < 1e-6);
        let b: Vec<f32> = to_denoised(PredictionType::VPrediction, &zero, &v, 3.0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((b[0] + 3.0 / 10f32.sqrt()).abs() < 1e-6);
    }
}

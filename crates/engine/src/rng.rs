//! Seeded noise sources. [`TorchRng`] reproduces PyTorch's CPU generator bit for bit
//! (`torch.manual_seed(s); torch.randn(shape)` in float32), so a seed gives the same starting noise
//! as A1111 / ComfyUI / diffusers with CPU noise, and the same image on CPU, CUDA and Metal.
//! [`PhiloxRng`] is A1111's "NV" source (`modules/rng_philox.py`), which imitates
//! `torch.randn(device="cuda")` so seeds from images made on NVIDIA GPUs reproduce.
//! [`SeedSource`] picks one for a request.
//!
//! What PyTorch does (ATen, checked against torch 2.x on x86-64):
//! - `at::mt19937` is the reference MT19937 seeded with the low 32 bits of the u64 seed
//!   (`MT19937RNGEngine.h`, `init_with_uint32`).
//! - float32 `randn` of a contiguous tensor with 16 or more elements (`normal_fill_AVX2` in
//!   `ATen/native/cpu/DistributionTemplates.h`): first one uniform per element,
//!   `(u32 & 0xFFFFFF) * 2^-24`, then Box-Muller in place on blocks of 16, pairing element `j`
//!   (radius) with `j + 8` (angle). When the count is not a multiple of 16, 16 fresh uniforms are
//!   drawn for the last 16 elements and that overlapping block is transformed again.
//!   The log and sincos are Cephes polynomials from `avx_mathfun.h` (not libm), compiled with
//!   fused multiply-adds; we evaluate the same operations per lane with `mul_add`, so the result
//!   is identical on every platform. `normal_stub` is registered "no AVX512", so this AVX2 kernel
//!   is what every x86-64 CPU with AVX2 runs, AVX-512 ones included.
//! - fewer than 16 elements: one `normal_distribution<double>` per element: two 53-bit uniforms
//!   from two u32 draws each, `r = sqrt(-2 ln(1 - u2))`, `theta = 2 pi u1`; `r cos(theta)` is
//!   returned and `r sin(theta)` is cached in the generator for the next scalar draw, also across
//!   calls (the cache only resets on `manual_seed`). The block path neither reads nor clears it.

use candle_core::{Device, Tensor};

use crate::Result;

/// A stream of standard-normal noise. Samplers that add noise (ancestral, SDE) draw from it after
/// the initial latent, so the whole image is a function of the seed.
pub trait NoiseSource: Send {
    /// Draws `shape.iter().product()` standard-normal values in row-major order.
    fn randn(&mut self, shape: &[usize]) -> Vec<f32>;

    /// [`NoiseSource::randn`] as an f32 tensor on `device`. Noise is always made on the CPU and
    /// copied, which is what makes a seed device-independent.
    fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let values = self.randn(shape);
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

/// `mean + std * N(0, 1)` from PyTorch's CPU generator seeded with `seed`, as an f32 CPU tensor:
/// for tests and measurements that need the same random values on every run (candle's
/// `Tensor::randn` on the CPU and `VarMap`'s initialisers are unseeded, so a bound that holds for
/// one run's values can fail on the next).
pub fn seeded_normal(seed: u64, mean: f64, std: f64, shape: &[usize]) -> Result<Tensor> {
    Ok(TorchRng::new(seed)
        .randn_tensor(shape, &Device::Cpu)?
        .affine(std, mean)?)
}

/// Which generator turns a seed into noise (A1111's "Random number generator source" setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SeedSource {
    /// PyTorch's CPU generator ([`TorchRng`]): A1111 "CPU", ComfyUI and diffusers.
    #[default]
    Cpu,
    /// A1111's "NV" Philox source ([`PhiloxRng`]): what a CUDA GPU draws for the seed.
    Nv,
}

impl SeedSource {
    pub const ALL: &'static [SeedSource] = &[SeedSource::Cpu, SeedSource::Nv];

    /// A1111's label, as its infotext writes it ("RNG: NV").
    pub fn name(self) -> &'static str {
        match self {
            SeedSource::Cpu => "CPU",
            SeedSource::Nv => "NV",
        }
    }

    /// "cpu" or "nv", ignoring case and surrounding spaces.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim();
        Self::ALL
            .iter()
            .copied()
            .find(|s| s.name().eq_ignore_ascii_case(name))
    }

    /// A fresh generator for `seed`. Later draws continue the same stream: that is how A1111
    /// makes the extra noise of ancestral and SDE samplers (`ImageRNG.next`).
    pub fn generator(self, seed: u64) -> Box<dyn NoiseSource> {
        match self {
            SeedSource::Cpu => Box::new(TorchRng::new(seed)),
            SeedSource::Nv => Box::new(PhiloxRng::new(seed)),
        }
    }
}

/// A1111's "NV" generator (`modules/rng_philox.py`): one Philox 4x32-10 block per output value,
/// keyed by the 64-bit seed, with counter `[offset, 0, index, 0]`; the first two words go through
/// Box-Muller and the value is `r sin(theta)`. `offset` counts calls, so consecutive draws are
/// independent streams, as CUDA's per-call offset makes them.
///
/// A1111 computes the Box-Muller part in numpy float64 (uint32 times a float32 array promotes to
/// float64) and rounds to float32 at the end; so do we. A last-bit difference between numpy's
/// and Rust's f64 `ln`/`sin` can, very rarely, change the float32 result by one ulp.
#[derive(Debug, Clone)]
pub struct PhiloxRng {
    seed: u64,
    offset: u32,
}

/// Philox 4x32 round multipliers and key increments (Salmon et al. 2011, "Parallel random
/// numbers: as easy as 1, 2, 3"; the same constants as cuRAND and A1111's rng_philox.py).
const PHILOX_M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
const PHILOX_W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];

impl PhiloxRng {
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// The 4x32-10 block for `counter` under this seed.
    fn block(&self, mut counter: [u32; 4]) -> [u32; 4] {
        let mut key = [self.seed as u32, (self.seed >> 32) as u32];
        for round in 0..10 {
            if round > 0 {
                key[0] = key[0].wrapping_add(PHILOX_W[0]);
                key[1] = key[1].wrapping_add(PHILOX_W[1]);
            }
            let p0 = u64::from(counter[0]) * u64::from(PHILOX_M[0]);
            let p2 = u64::from(counter[2]) * u64::from(PHILOX_M[1]);
            counter = [
                (p2 >> 32) as u32 ^ counter[1] ^ key[0],
                p2 as u32,
                (p0 >> 32) as u32 ^ counter[3] ^ key[1],
                p0 as u32,
            ];
        }
        counter
    }
}

impl NoiseSource for PhiloxRng {
    fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        // rng_philox.py's float32 constants, used as float64 (see the type's documentation).
        let inv = f64::from(2.328_306_4e-10_f32);
        let inv_2pi = f64::from((2.328_306_4e-10_f64 * 6.283_185_5) as f32);
        let n: usize = shape.iter().product();
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..n)
            .map(|i| {
                // A1111 keeps the index in one 32-bit word ("up to 2^32 numbers").
                let [a, b, _, _] = self.block([offset, 0, i as u32, 0]);
                let u = f64::from(a) * inv + inv / 2.0;
                let v = f64::from(b) * inv_2pi + inv_2pi / 2.0;
                ((-2.0 * u.ln()).sqrt() * v.sin()) as f32
            })
            .collect()
    }
}

/// PyTorch's CPU generator: MT19937 plus the two float32 `randn` paths described in the module
/// documentation. `TorchRng::new(s)` behaves like `torch.manual_seed(s)` on a fresh generator.
#[derive(Clone)]
pub struct TorchRng {
    seed: u64,
    mt: Mt19937,
    /// The `r sin(theta)` half of the last scalar Box-Muller pair (`next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl TorchRng {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            // PyTorch keeps the full u64 as "the seed" but the engine only sees its low 32 bits,
            // so 2^32 + 5 draws the same numbers as 5.
            mt: Mt19937::new(seed as u32),
            cached_normal: None,
        }
    }

    /// The seed this generator was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One raw 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// One 64-bit draw made of two 32-bit draws, the first one high (`random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.mt.next_u32());
        let lo = u64::from(self.mt.next_u32());
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled into [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00FF_FFFF) as f32 * (1.0 / 16_777_216.0)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled into [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `normal_distribution<double>(0, 1)` with the generator's cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        // ln_1p(-u2) = ln(1 - u2): u2 is in [0, 1), so the argument of the log is in (0, 1].
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

impl NoiseSource for TorchRng {
    fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// The reference MT19937 (Matsumoto and Nishimura, 2002 initialisation).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    index: usize,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: MT_N }
    }

    fn twist(&mut self) {
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mut v = y >> 1;
            if y & 1 != 0 {
                v ^= MATRIX_A;
            }
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ v;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// `normal_fill_16_AVX2` for one block of 16 uniforms, one lane at a time.
fn box_muller_16(block: &mut [f32]) {
    // _mm256_set1_ps(2.0f * c10::pi<double>): the product is a double, rounded once to f32.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - block[j]; // [0, 1) -> (0, 1] for the log
        let u2 = block[j + 8];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let (sin, cos) = cephes_sincos(two_pi * u2);
        // The kernel ends with fmadd(n, std, mean) with std 1 and mean 0: a no-op except that it
        // turns -0.0 into +0.0, kept for bit equality.
        block[j] = (radius * cos).mul_add(1.0, 0.0);
        block[j + 8] = (radius * sin).mul_add(1.0, 0.0);
    }
}

/// Constants are written exactly as in `avx_mathfun.h` so they can be checked against it.
/// `log256_ps` (Cephes logf) for one lane, with the fused multiply-adds GCC forms in the torch
/// wheel: each product that feeds an addition is fused, the rest are plain products.
#[allow(clippy::excessive_precision)]
fn cephes_log(x: f32) -> f32 {
    // Inputs here are in [2^-24, 1]: never zero, negative or subnormal, so the NaN and
    // denormal handling of the vector code is not needed.
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // Mantissa with the exponent of 0.5: m in [0.5, 1).
    let m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // If m < sqrt(1/2): e -= 1, x = 2m - 1, else x = m - 1 (computed as (m - 1) + m or + 0).
    let mut x = m - 1.0;
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1.0;
        x += m;
    }
    let z = x * x;
    let mut y = 7.0376836292E-2_f32;
    for p in [
        -1.1514610310E-1_f32,
        1.1676998740E-1,
        -1.2420140846E-1,
        1.4249322787E-1,
        -1.6668057665E-1,
        2.0000714765E-1,
        -2.4999993993E-1,
        3.3333331174E-1,
    ] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * -2.12194440e-4);
    y = z.mul_add(-0.5, y);
    e.mul_add(0.693359375, x + y)
}

/// `sincos256_ps` (Cephes sinf/cosf) for one lane, returning (sin, cos), same fusing rule.
#[allow(clippy::excessive_precision)]
fn cephes_sincos(theta: f32) -> (f32, f32) {
    const SIGN: u32 = 0x8000_0000;
    let mut sign_sin = theta.to_bits() & SIGN;
    let mut x = theta.abs();
    // j = (trunc(x * 4/pi) + 1) & !1: the octant, rounded up to even.
    let j = (((x * 1.27323954473516) as i32) + 1) & !1;
    let y = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let use_sin_poly = j & 2 == 0;

    // Extended-precision reduction x - y * pi/4, pi/4 split in three parts.
    x = y.mul_add(-0.78515625, x);
    x = y.mul_add(-2.4187564849853515625e-4, x);
    x = y.mul_add(-3.77489497744594108e-8, x);

    let z = x * x;
    let mut c = 2.443315711809948E-005_f32.mul_add(z, -1.388731625493765E-003);
    c = c.mul_add(z, 4.166664568298827E-002);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;

    let mut s = (-1.9515295891E-4_f32).mul_add(z, 8.3321608736E-3);
    s = s.mul_add(z, -1.6666654611E-1);
    s *= z;
    s = s.mul_add(x, x);

    // The vector code selects with and/andnot masks and adds: the unselected side contributes
    // +0.0, so a -0.0 result becomes +0.0. Reproduced exactly.
    let (sin_part_s, sin_part_c) = if use_sin_poly { (s, 0.0) } else { (0.0, c) };
    let sin = sin_part_c + sin_part_s;
    let cos = (c - sin_part_c) + (s - sin_part_s);
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_rng_philox_docstring() {
        // modules/rng_philox.py documents Generator(seed=0).randn((3, 4)) as these values: what
        // torch.randn on CUDA gives. A1111's numpy port (and so we) land within 2e-7 of them,
        // CUDA's float32 Box-Muller being slightly different; tests/noise.rs checks the port's
        // own values bit for bit.
        let want = [
            -0.924_662_59,
            -0.425_344_15,
            -2.643_845_7,
            0.145_183_88,
            -0.120_866_47,
            -0.579_725_64,
            -0.622_851_22,
            -0.328_387_09,
            -1.074_542_31,
            -0.363_144_07,
            -1.671_050_67,
            2.265_504_97,
        ];
        let got = PhiloxRng::new(0).randn(&[3, 4]);
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 5e-7, "{got:?}");
        }
    }

    #[test]
    fn philox_offsets_each_call() {
        let mut rng = PhiloxRng::new(7);
        let first = rng.randn(&[8]);
        let second = rng.randn(&[8]);
        assert_ne!(first, second);
        assert_eq!(first, PhiloxRng::new(7).randn(&[8]));
        assert_eq!(SeedSource::from_name(" nv "), Some(SeedSource::Nv));
        assert_eq!(SeedSource::from_name("gpu"), None);
        assert_eq!(SeedSource::default().name(), "CPU");
    }

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The 10000th output of mt19937 seeded with 5489 is 4123659995 (C++11 [rand.predef]).
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_the_low_32_bits() {
        let a = TorchRng::new(5).randn(&[20]);
        let b = TorchRng::new((1 << 32) + 5).randn(&[20]);
        assert_eq!(a, b);
    }

    #[test]
    fn scalar_path_caches_the_second_value() {
        // Two scalar draws use one Box-Muller pair: the second is r sin(theta) of the first.
        let mut rng = TorchRng::new(0);
        let pair = rng.randn(&[2]);
        let mut rng = TorchRng::new(0);
        let first = rng.randn(&[1]);
        let second = rng.randn(&[1]);
        assert_eq!(pair, [first[0], second[0]]);
    }

    #[test]
    fn cephes_functions_are_accurate() {
        // Not a parity check (that is tests/noise.rs) but a guard against a typo in a constant.
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((cephes_log(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0));
            let theta = x * std::f32::consts::TAU;
            let (s, c) = cephes_sincos(theta);
            assert!((s - theta.sin()).abs() < 3e-7 && (c - theta.cos()).abs() < 3e-7);
        }
    }
}

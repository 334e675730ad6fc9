//! What this computer has: OS, CPU, memory and NVIDIA GPUs. The report feeds Diagnostics, the
//! `doctor` command and (later) automatic settings. A machine without an NVIDIA GPU is a normal
//! answer with its reason, never an error.

use serde::Serialize;
use std::sync::OnceLock;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SystemReport {
    pub os: OsInfo,
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    pub gpus: Vec<GpuInfo>,
    pub gpu_status: GpuStatus,
    pub build: BuildInfo,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OsInfo {
    pub name: String,
    pub version: String,
    pub kernel: String,
    pub arch: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CpuInfo {
    pub name: String,
    pub physical_cores: Option<usize>,
    pub logical_cores: usize,
    /// Instruction-set extensions that matter for inference speed (AVX2, AVX-512, BF16, NEON).
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuInfo {
    pub name: String,
    pub vram_total_bytes: u64,
    pub vram_free_bytes: u64,
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
    pub compute_capability: Option<String>,
}

/// Whether GPUs could be queried, and if not, why — in words a user can act on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuStatus {
    pub available: bool,
    pub reason: Option<String>,
}

/// Which GPU back ends this build was compiled with (cargo features of the binary).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub struct BuildInfo {
    pub cuda: bool,
    pub metal: bool,
}

/// Asks the GPU driver what it has. A trait so tests can stand in a machine with a GPU.
pub trait GpuProbe: Send + Sync {
    fn probe(&self) -> (Vec<GpuInfo>, GpuStatus);
}

/// The real probe, through NVML. NVML is initialised once and kept, as its docs advise.
#[derive(Default)]
pub struct NvmlProbe {
    nvml: OnceLock<Result<nvml_wrapper::Nvml, String>>,
}

impl NvmlProbe {
    fn nvml(&self) -> &Result<nvml_wrapper::Nvml, String> {
        self.nvml
            .get_or_init(|| nvml_wrapper::Nvml::init().map_err(|e| explain_nvml_error(&e)))
    }
}

fn explain_nvml_error(e: &nvml_wrapper::error::NvmlError) -> String {
    use nvml_wrapper::error::NvmlError as E;
    match e {
        E::LibloadingError(_) => {
            "No NVIDIA GPU found: the NVIDIA driver library (libnvidia-ml) is \
             not installed. Images are made on the CPU, which is slower. If this computer has an \
             NVIDIA card, install its driver."
                .to_owned()
        }
        E::DriverNotLoaded => "No NVIDIA GPU found: the NVIDIA driver is installed but not \
             running. Restart the computer, or reinstall the driver."
            .to_owned(),
        E::NoPermission => "The NVIDIA driver refused access to the GPU. Check that your user \
             may use the graphics card."
            .to_owned(),
        other => format!("The NVIDIA driver could not be asked about the GPU: {other}"),
    }
}

impl GpuProbe for NvmlProbe {
    fn probe(&self) -> (Vec<GpuInfo>, GpuStatus) {
        let nvml = match self.nvml() {
            Ok(n) => n,
            Err(reason) => {
                return (
                    Vec::new(),
                    GpuStatus {
                        available: false,
                        reason: Some(reason.clone()),
                    },
                )
            }
        };
        let driver = nvml.sys_driver_version().ok();
        let cuda = nvml.sys_cuda_driver_version().ok().map(|v| {
            format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )
        });
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                return (
                    Vec::new(),
                    GpuStatus {
                        available: false,
                        reason: Some(explain_nvml_error(&e)),
                    },
                )
            }
        };
        let mut gpus = Vec::new();
        for i in 0..count {
            let Ok(dev) = nvml.device_by_index(i) else {
                continue;
            };
            let mem = dev.memory_info().ok();
            gpus.push(GpuInfo {
                name: dev.name().unwrap_or_else(|_| format!("NVIDIA GPU {i}")),
                vram_total_bytes: mem.as_ref().map_or(0, |m| m.total),
                vram_free_bytes: mem.as_ref().map_or(0, |m| m.free),
                driver_version: driver.clone(),
                cuda_version: cuda.clone(),
                compute_capability: dev
                    .cuda_compute_capability()
                    .ok()
                    .map(|c| format!("{}.{}", c.major, c.minor)),
            });
        }
        let status = if gpus.is_empty() {
            GpuStatus {
                available: false,
                reason: Some(
                    "No NVIDIA GPU found: the driver is running but reports no cards.".into(),
                ),
            }
        } else {
            GpuStatus {
                available: true,
                reason: None,
            }
        };
        (gpus, status)
    }
}

/// The memory the system can give a new allocation now without swapping (Linux `MemAvailable`:
/// free memory plus reclaimable caches), in bytes; `None` when it cannot be read.
pub fn available_ram() -> Option<u64> {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .ok()?;
    Some(sys.available_memory()).filter(|&b| b > 0)
}

/// The system's free swap in bytes; `None` when it cannot be read (0 when there is none).
pub fn free_swap() -> Option<u64> {
    use sysinfo::{MemoryRefreshKind, RefreshKind, System};
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_swap()),
    )
    .ok()?;
    Some(sys.free_swap())
}

/// Gathers the whole report. Blocking (NVML and /proc reads): call it off the async runtime.
pub fn system_report(probe: &dyn GpuProbe, build: BuildInfo) -> SystemReport {
    use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
    // sysinfo can fail on unusual systems (no /proc): report what we can rather than fail.
    let sys = System::new_with_specifics(
        RefreshKind::nothing()
            .with_memory(MemoryRefreshKind::everything())
            .with_cpu(CpuRefreshKind::nothing()),
    )
    .map_err(|e| tracing::warn!(error = %e, "could not read system information"))
    .ok();
    let cpus = sys.as_ref().map_or(&[][..], |s| s.cpus());
    let cpu_name = cpus
        .first()
        .map(|c| c.brand().trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "Unknown CPU".to_owned());
    let (gpus, gpu_status) = probe.probe();
    SystemReport {
        os: OsInfo {
            name: System::name().unwrap_or_else(|_| std::env::consts::OS.to_owned()),
            version: System::os_version().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            arch: std::env::consts::ARCH.to_owned(),
        },
        cpu: CpuInfo {
            name: cpu_name,
            physical_cores: System::physical_core_count().ok(),
            logical_cores: cpus
                .len()
                .max(std::thread::available_parallelism().map_or(1, |n| n.get())),
            features: cpu_features(),
        },
        memory: MemoryInfo {
            total_bytes: sys.as_ref().map_or(0, |s| s.total_memory()),
            available_bytes: sys.as_ref().map_or(0, |s| s.available_memory()),
        },
        gpus,
        gpu_status,
        build,
    }
}

fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut out: Vec<String> = Vec::new();
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        macro_rules! check {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) { out.push($f.to_owned()); }
            )*};
        }
        check!(
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            out.push("neon".to_owned());
        }
        if std::arch::is_aarch64_feature_detected!("bf16") {
            out.push("bf16".to_owned());
        }
    }
    out
}

impl SystemReport {
    /// The plain-text report `doctor` prints and the UI's "Copy report" button copies.
    pub fn to_text(&self) -> String {
        // 1024-based like Windows and the UI, so a 12 GiB card reads "12.0 GB" as on its box.
        let gb = |b: u64| format!("{:.1} GB", b as f64 / (1u64 << 30) as f64);
        let mut s = String::new();
        s.push_str(&format!(
            "System:  {} {} (kernel {}, {})\n",
            self.os.name, self.os.version, self.os.kernel, self.os.arch
        ));
        let cores = match self.cpu.physical_cores {
            Some(p) => format!("{p} cores, {} threads", self.cpu.logical_cores),
            None => format!("{} threads", self.cpu.logical_cores),
        };
        s.push_str(&format!("CPU:     {} ({cores})\n", self.cpu.name));
        if !self.cpu.features.is_empty() {
            s.push_str(&format!(
                "         features: {}\n",
                self.cpu.features.join(", ")
            ));
        }
        s.push_str(&format!(
            "Memory:  {} total, {} available\n",
            gb(self.memory.total_bytes),
            gb(self.memory.available_bytes)
        ));
        if self.gpus.is_empty() {
            let reason = self
                .gpu_status
                .reason
                .as_deref()
                .unwrap_or("No NVIDIA GPU found.");
            s.push_str(&format!("GPU:     none — {reason}\n"));
        }
        for g in &self.gpus {
            s.push_str(&format!(
                "GPU:     {} — {} VRAM, {} free; driver {}, CUDA {}, compute {}\n",
                g.name,
                gb(g.vram_total_bytes),
                gb(g.vram_free_bytes),
                g.driver_version.as_deref().unwrap_or("?"),
                g.cuda_version.as_deref().unwrap_or("?"),
                g.compute_capability.as_deref().unwrap_or("?"),
            ));
        }
        s.push_str(&format!(
            "Build:   CUDA {}, Metal {}\n",
            if self.build.cuda { "yes" } else { "no" },
            if self.build.metal { "yes" } else { "no" }
        ));
        s
    }
}

/// One choice of the recommendation, with its reason in plain words.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Choice<T> {
    pub value: T,
    pub reason: String,
}

/// Where pictures are drawn.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

/// The largest square picture one model family can draw here.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FamilyLimit {
    pub family: crate::models::Family,
    /// Side in pixels of the largest safe square size; `None`: the family does not fit at all.
    pub max_size: Option<usize>,
    /// The family's usual size (512 for SD1, 768 for SD2, 1024 for SDXL).
    pub native_size: usize,
    /// Estimated memory at the usual size, with the recommended low-VRAM strategies.
    pub needed_bytes: u64,
    pub reason: String,
}

/// What this computer should use, each choice with its reason. Settings set to "Auto" follow it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recommendation {
    pub device: Choice<DeviceKind>,
    pub precision: Choice<crate::settings::Precision>,
    /// Low-VRAM mode and the strategies it turns on.
    pub low_vram: Choice<bool>,
    pub strategies: Vec<&'static str>,
    /// Memory the estimates are measured against (VRAM or RAM, less a reserve).
    pub budget_bytes: u64,
    pub families: Vec<FamilyLimit>,
    /// Anything else worth knowing (an old driver, a build without GPU support).
    pub notes: Vec<String>,
}

/// Oldest CUDA driver API the `cuda` build runs on: candle's CUDA kernels are built with CUDA 12
/// (driver 525 or newer).
const MIN_CUDA: (u32, u32) = (12, 0);
/// Kept free on a GPU for the CUDA context, cuBLAS workspace and allocator slack (typically
/// 300-600 MB on current drivers).
pub const GPU_RESERVE: u64 = 768 << 20;
/// At most this share of system RAM is planned for on the CPU: the OS and the browser need
/// the rest.
const RAM_SHARE: f64 = 0.7;
/// Cards with this much VRAM or less get low-VRAM mode (the issue: "6 GB cards and below").
const LOW_VRAM_MAX: u64 = 6 << 30;
/// The major part of a compute capability as NVML reports it ("8.6" -> 8).
pub fn compute_major(capability: Option<&str>) -> Option<u32> {
    capability?.split('.').next()?.trim().parse().ok()
}

/// Headroom on top of the estimate before a size counts as safe.
const SAFETY: f64 = 1.15;
/// Square sizes tried for the largest safe resolution, smallest first.
const SIZES: [usize; 8] = [512, 640, 768, 896, 1024, 1280, 1536, 2048];

fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split('.');
    Some((
        it.next()?.trim().parse().ok()?,
        it.next().unwrap_or("0").trim().parse().ok()?,
    ))
}

fn gb(b: u64) -> String {
    format!("{:.1} GB", b as f64 / (1u64 << 30) as f64)
}

/// The low-memory strategies low-VRAM mode turns on for a card with `vram` bytes: slicing,
/// batch splitting, tiling and the text encoder on the CPU always; the VAE on the CPU at 4 GB
/// and below, where even its weights and one tile are too much next to the UNet.
pub fn low_vram_options(vram: u64) -> ld_engine::memory::MemoryOptions {
    ld_engine::memory::MemoryOptions {
        attention_slice: Some(ld_engine::memory::MemoryOptions::SLICED_SCORES),
        vae_tiling: true,
        vae_on_cpu: vram <= 4 << 30,
        vae_f32: false,
        split_batch: true,
        text_encoder_on_cpu: true,
    }
}

/// Decides device, precision, low-VRAM mode and size limits from the report.
pub fn recommend(report: &SystemReport) -> Recommendation {
    use crate::models::Family;
    use crate::settings::Precision;
    use ld_engine::memory::{estimate, estimate_staged, MemoryOptions, ModelShape, Target};
    let mut notes = Vec::new();
    let gpu = report.gpus.iter().max_by_key(|g| g.vram_total_bytes);
    let old_driver = gpu
        .and_then(|g| g.cuda_version.as_deref())
        .and_then(parse_version)
        .filter(|v| *v < MIN_CUDA);
    let device = match gpu {
        Some(g) if report.gpu_status.available && report.build.cuda && old_driver.is_none() => {
            Choice {
                value: DeviceKind::Cuda,
                reason: format!(
                    "{} is many times faster than the processor for drawing.",
                    g.name
                ),
            }
        }
        Some(g) if report.gpu_status.available && report.build.cuda => {
            let (maj, min) = old_driver.unwrap_or_default();
            notes.push(format!(
                "Update the NVIDIA driver (version 525 or newer) to use {}; it supports CUDA {maj}.{min}, this app needs CUDA 12.",
                g.name
            ));
            Choice {
                value: DeviceKind::Cpu,
                reason: format!(
                    "The NVIDIA driver ({}) is too old for this app, so the processor draws until it is updated.",
                    g.driver_version.as_deref().unwrap_or("unknown version")
                ),
            }
        }
        Some(g) if report.gpu_status.available => {
            notes.push("Download the NVIDIA (CUDA) version of Local Diffusers to use the graphics card.".into());
            Choice {
                value: DeviceKind::Cpu,
                reason: format!(
                    "{} was found, but this version of the app was built without NVIDIA support.",
                    g.name
                ),
            }
        }
        _ if report.build.metal && cfg!(target_os = "macos") => Choice {
            value: DeviceKind::Metal,
            reason: "The Apple graphics chip draws faster than the processor.".into(),
        },
        _ => Choice {
            value: DeviceKind::Cpu,
            reason: match &report.gpu_status.reason {
                Some(r) => format!("No graphics card this app can use ({r}). The processor works, only slower: expect a minute or more per picture."),
                None => "No graphics card this app can use was found. The processor works, only slower: expect a minute or more per picture.".into(),
            },
        },
    };
    let on_gpu = device.value == DeviceKind::Cuda;
    let vram = gpu.map_or(0, |g| g.vram_total_bytes);
    let budget = if on_gpu {
        vram.saturating_sub(GPU_RESERVE)
    } else {
        (report.memory.total_bytes as f64 * RAM_SHARE) as u64
    };
    let precision = if on_gpu || device.value == DeviceKind::Metal {
        Choice {
            value: Precision::Fp16,
            reason: "Half precision needs half the memory and is faster on graphics cards; the picture looks the same.".into(),
        }
    } else {
        Choice {
            value: Precision::Fp32,
            reason:
                "Processors draw full precision fastest; half precision would only be slower here."
                    .into(),
        }
    };
    let low = on_gpu && vram <= LOW_VRAM_MAX;
    let low_vram = Choice {
        value: low,
        reason: if !on_gpu {
            "Not needed on the processor: it uses system memory, and with low-VRAM mode on \"Auto\" (the default) a picture that would not fit with all its models loaded is drawn with one model loaded at a time.".into()
        } else if low {
            format!("{} has {} of graphics memory, so it saves memory (a little slower) to avoid running out.", gpu.map_or("The card", |g| g.name.as_str()), gb(vram))
        } else {
            format!("{} of graphics memory is enough for the usual sizes; it turns on by itself only for a picture that would not fit.", gb(vram))
        },
    };
    let opts = if low {
        low_vram_options(vram)
    } else {
        MemoryOptions::default()
    };
    let dtype = if precision.value == Precision::Fp16 {
        candle_core::DType::F16
    } else {
        candle_core::DType::F32
    };
    let target = if on_gpu {
        gpu.and_then(|g| compute_major(g.compute_capability.as_deref()))
            .map_or(Target::Gpu, |major| Target::nvidia(major, dtype))
    } else {
        Target::Cpu
    };
    let families = [
        (Family::Sd1, ModelShape::SD1, 512),
        (Family::Sd2, ModelShape::SD2, 768),
        (Family::Sdxl, ModelShape::SDXL, 1024),
    ]
    .into_iter()
    .map(|(family, shape, native)| {
        // When a size does not fit plainly, the job service turns the strategies on by itself
        // (low-VRAM "Auto"), so the limit is the size that fits with all of them.
        // 15% headroom: the estimate is a planning figure (see ld_engine::memory).
        // On the processor, judged as `jobs::staging` judges it: the UNet counted in f16, as
        // the CPU keeps an fp16 file's (the catalog's downloads are fp16), and a job whose
        // whole pipeline would not fit drawn with one model in memory at a time (low-memory
        // "Auto"). Planned as a whole f32 pipeline, an 8 GB laptop was told SD 1.5 needs 6.0
        // GB. (Metal never stages.)
        let cpu = device.value == DeviceKind::Cpu;
        let whole = |size: usize, o: &MemoryOptions| {
            let e = estimate(&shape, size, size, true, dtype, target, o).peak;
            if cpu && dtype == candle_core::DType::F32 {
                e.saturating_sub(shape.unet_params * 2)
            } else {
                e
            }
        };
        let staged = |size: usize, o: &MemoryOptions| cpu && whole(size, o) as f64 * SAFETY > budget as f64;
        let peak = |size: usize, o: &MemoryOptions| {
            if staged(size, o) {
                estimate_staged(&shape, size, size, true, dtype, target, o, true).peak
            } else {
                whole(size, o)
            }
        };
        let fits = |size: usize, o: &MemoryOptions| peak(size, o) as f64 * SAFETY <= budget as f64;
        let lowest = if on_gpu { MemoryOptions::lowest() } else { MemoryOptions { vae_on_cpu: false, text_encoder_on_cpu: false, ..MemoryOptions::lowest() } };
        let max_size = SIZES.iter().copied().filter(|&s| fits(s, &lowest)).max();
        // The figures shown are the ones decided with: the headroom included, and the savings
        // that make the usual size fit (found by review: "needs 5.2 GB, can give 5.6 GB" said
        // of a model that did not fit, and 17.9 GB needed beside 16.5 GB that fit).
        let plan = if fits(native, &opts) { &opts } else { &lowest };
        let with_headroom = |o: &MemoryOptions| (peak(native, o) as f64 * SAFETY) as u64;
        let needed = with_headroom(plan);
        let memory = if on_gpu { "graphics memory" } else { "memory" };
        let one_at_a_time = if staged(native, plan) { ", loading one model at a time" } else { "" };
        let reason = match max_size {
            None => format!("Needs about {} at {native}×{native} even with every memory saving on; this computer can give it {}.", gb(with_headroom(&lowest)), gb(budget)),
            Some(m) if m < native => format!("Fits only below its usual {native}×{native} (about {} needed{one_at_a_time}, {} of {memory} to use); pictures will look worse.", gb(needed), gb(budget)),
            Some(m) => format!("Up to {m}×{m} fits in {} of {memory} (about {} at {native}×{native}{one_at_a_time}).", gb(budget), gb(needed)),
        };
        FamilyLimit { family, max_size, native_size: native, needed_bytes: needed, reason }
    })
    .collect::<Vec<_>>();
    // (VRAM 0: the driver did not say; the card is not judged by it.)
    if on_gpu && vram > 0 && families.iter().all(|f| f.max_size.is_none()) {
        // A 2 GB card (MX150, GT 1030) holds no model even with every saving on: drawing on it
        // refused every job, SD 1.5 included (found by review). The processor can draw.
        let mut cpu = report.clone();
        cpu.gpu_status.available = false;
        cpu.gpu_status.reason = Some(format!(
            "{} has {} of graphics memory, too little for any model this app draws",
            gpu.map_or("The graphics card", |g| g.name.as_str()),
            gb(vram)
        ));
        return recommend(&cpu);
    }
    if !on_gpu
        && families
            .iter()
            .any(|f| f.family == Family::Sdxl && f.max_size.is_some())
    {
        notes.push("SDXL works on the processor but takes several minutes per picture; SD 1.5 at 512×512 is the quick choice.".into());
    }
    Recommendation {
        strategies: opts.describe(),
        device,
        precision,
        low_vram,
        budget_bytes: budget,
        families,
        notes,
    }
}

impl Recommendation {
    /// Plain-text lines for the report and `doctor`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let device = match self.device.value {
            DeviceKind::Cpu => "processor",
            DeviceKind::Cuda => "NVIDIA graphics card (CUDA)",
            DeviceKind::Metal => "Apple graphics (Metal)",
        };
        let precision = match self.precision.value {
            crate::settings::Precision::Fp16 => "fp16",
            _ => "fp32",
        };
        s.push_str(&format!("Device:    {device} — {}\n", self.device.reason));
        s.push_str(&format!(
            "Precision: {precision} — {}\n",
            self.precision.reason
        ));
        s.push_str(&format!(
            "Low VRAM:  {} — {}\n",
            if self.low_vram.value {
                format!("on ({})", self.strategies.join(", "))
            } else {
                "off".into()
            },
            self.low_vram.reason
        ));
        for f in &self.families {
            let size = f
                .max_size
                .map_or("does not fit".to_owned(), |m| format!("up to {m}×{m}"));
            s.push_str(&format!(
                "{:<5}      {size} — {}\n",
                f.family.label(),
                f.reason
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("Note:      {n}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn available_ram_is_read_and_at_most_the_total() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let free = available_ram().expect("MemAvailable is readable on Linux");
        assert!(
            free > 1 << 20 && free <= total_kib * 1024,
            "{free} of {total_kib} KiB"
        );
    }

    #[test]
    fn free_swap_is_read_and_at_most_the_total() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib = |key: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap()
        };
        let swap = free_swap().expect("swap is readable on Linux");
        assert!(swap <= kib("SwapTotal:") * 1024, "{swap}");
        // Read now, it agrees with /proc/meminfo's SwapFree within what may change meanwhile.
        assert!(swap.abs_diff(kib("SwapFree:") * 1024) <= 64 << 20, "{swap}");
    }

    struct FakeGpu;
    impl GpuProbe for FakeGpu {
        fn probe(&self) -> (Vec<GpuInfo>, GpuStatus) {
            (
                vec![GpuInfo {
                    name: "NVIDIA GeForce RTX 3060".into(),
                    vram_total_bytes: 12_884_901_888,
                    vram_free_bytes: 11_000_000_000,
                    driver_version: Some("550.54".into()),
                    cuda_version: Some("12.4".into()),
                    compute_capability: Some("8.6".into()),
                }],
                GpuStatus {
                    available: true,
                    reason: None,
                },
            )
        }
    }

    const GB: u64 = 1 << 30;

    /// A machine as the tests want it: RAM, and a GPU answer.
    fn machine(
        ram_gb: u64,
        gpu: Option<(u64, &str)>,
        reason: Option<&str>,
        cuda_build: bool,
    ) -> SystemReport {
        let gpus: Vec<GpuInfo> = gpu
            .map(|(vram, cuda)| GpuInfo {
                name: format!("NVIDIA Test {vram} GB"),
                vram_total_bytes: vram * GB,
                vram_free_bytes: vram * GB - GB / 2,
                driver_version: Some(if cuda.starts_with("11") {
                    "470.82".into()
                } else {
                    "550.54".into()
                }),
                cuda_version: Some(cuda.into()),
                compute_capability: Some("8.6".into()),
            })
            .into_iter()
            .collect();
        SystemReport {
            os: OsInfo {
                name: "Linux".into(),
                version: "13".into(),
                kernel: "6".into(),
                arch: "x86_64".into(),
            },
            cpu: CpuInfo {
                name: "CPU".into(),
                physical_cores: Some(8),
                logical_cores: 16,
                features: vec![],
            },
            memory: MemoryInfo {
                total_bytes: ram_gb * GB,
                available_bytes: ram_gb * GB / 2,
            },
            gpu_status: GpuStatus {
                available: !gpus.is_empty(),
                reason: reason.map(str::to_owned),
            },
            gpus,
            build: BuildInfo {
                cuda: cuda_build,
                metal: false,
            },
        }
    }

    fn max_size(r: &Recommendation, f: crate::models::Family) -> Option<usize> {
        r.families.iter().find(|x| x.family == f).unwrap().max_size
    }

    use crate::models::Family::{Sd1, Sd2, Sdxl};
    use crate::settings::Precision;

    #[test]
    fn profiles_get_the_expected_recommendation() {
        // (profile, VRAM GB, device, precision, low VRAM, largest SD1, SDXL fits)
        // Sizes follow the estimate with every saving on (ld_engine::memory), plus 15% headroom.
        // SDXL's fp16 weights are 6.8 GB, 5.1 GB of them the UNet's: with the text encoders on
        // the processor (the job service turns that on by itself when a picture would not fit),
        // 8 GB is enough for it; 6 GB is not.
        type Case = (
            &'static str,
            u64,
            DeviceKind,
            Precision,
            bool,
            Option<usize>,
            bool,
        );
        #[rustfmt::skip]
        let cases: [Case; 5] = [
            ("4 GB", 4, DeviceKind::Cuda, Precision::Fp16, true, Some(2048), false),
            ("6 GB", 6, DeviceKind::Cuda, Precision::Fp16, true, Some(2048), false),
            ("8 GB", 8, DeviceKind::Cuda, Precision::Fp16, false, Some(2048), true),
            ("12 GB", 12, DeviceKind::Cuda, Precision::Fp16, false, Some(2048), true),
            ("24 GB", 24, DeviceKind::Cuda, Precision::Fp16, false, Some(2048), true),
        ];
        for (name, vram, device, precision, low, sd1, xl) in cases {
            let r = recommend(&machine(32, Some((vram, "12.4")), None, true));
            assert_eq!(r.device.value, device, "{name}");
            assert_eq!(r.precision.value, precision, "{name}");
            assert_eq!(r.low_vram.value, low, "{name}: {}", r.low_vram.reason);
            assert_eq!(max_size(&r, Sd1), sd1, "{name}: {}", r.to_text());
            assert_eq!(max_size(&r, Sdxl).is_some(), xl, "{name}: {}", r.to_text());
            assert!(r.budget_bytes < vram * GB, "{name}: a reserve is kept");
            assert!(r.families.iter().all(|f| !f.reason.is_empty()));
            figures_agree_with_decisions(&r);
        }
        for ram in [4, 6, 8, 12, 16, 32] {
            figures_agree_with_decisions(&recommend(&machine(ram, None, Some("none"), false)));
        }
        // SDXL needs an 8 GB card (its fp16 UNet is 5.1 GB); from there every size fits with
        // the strategies on.
        let sizes: Vec<_> = [4, 6, 8, 12, 24]
            .map(|v| {
                max_size(
                    &recommend(&machine(32, Some((v, "12.4")), None, true)),
                    Sdxl,
                )
                .unwrap_or(0)
            })
            .to_vec();
        assert_eq!(sizes, [0, 0, 2048, 2048, 2048]);
        // 4 GB cards also move the VAE to the processor; 6 GB cards keep it.
        let four = recommend(&machine(32, Some((4, "12.4")), None, true));
        assert!(
            four.strategies.contains(&"VAE on CPU"),
            "{:?}",
            four.strategies
        );
        let six = recommend(&machine(32, Some((6, "12.4")), None, true));
        assert!(!six.strategies.contains(&"VAE on CPU") && six.strategies.contains(&"tiled VAE"));
        assert!(
            six.low_vram.reason.contains("6.0 GB"),
            "{}",
            six.low_vram.reason
        );
    }

    /// The figures a family's reason shows are those it was decided with (found by review:
    /// "needs 5.2 GB, can give 5.6 GB" was said of a model that did not fit).
    fn figures_agree_with_decisions(r: &Recommendation) {
        for f in &r.families {
            match f.max_size {
                Some(m) if m >= f.native_size => {
                    assert!(f.needed_bytes <= r.budget_bytes, "{}", r.to_text())
                }
                None => assert!(f.needed_bytes > r.budget_bytes, "{}", r.to_text()),
                _ => {}
            }
        }
    }

    #[test]
    fn compute_capabilities_read_as_their_major_part() {
        assert_eq!(compute_major(Some("8.6")), Some(8));
        assert_eq!(compute_major(Some("12.0")), Some(12));
        assert_eq!(compute_major(Some("7")), Some(7));
        assert_eq!(compute_major(Some("?")), None);
        assert_eq!(compute_major(None), None);
    }

    #[test]
    fn without_a_gpu_the_processor_draws_in_full_precision() {
        let r = recommend(&machine(
            16,
            None,
            Some("No NVIDIA GPU found: the NVIDIA driver library (libnvidia-ml) is not installed."),
            false,
        ));
        assert_eq!(r.device.value, DeviceKind::Cpu);
        assert_eq!(r.precision.value, Precision::Fp32);
        assert!(!r.low_vram.value);
        assert!(
            r.device.reason.contains("libnvidia-ml"),
            "the library's absence is the reason: {}",
            r.device.reason
        );
        // 16 GB of RAM x 0.7: SD1 and SD2 fit at their usual size.
        assert!(max_size(&r, Sd1).unwrap() >= 512);
        assert!(max_size(&r, Sd2).unwrap() >= 768);
        // 12 GB of RAM: SDXL (13.5 GB of fp32 weights as a whole pipeline) fits only one model
        // at a time; 6 GB (4.2 GB to use) is less than its f16 UNet alone.
        let small = recommend(&machine(12, None, Some("none"), false));
        assert!(
            max_size(&small, Sdxl).unwrap() >= 1024,
            "{}",
            small.to_text()
        );
        assert!(max_size(&small, Sd1).is_some(), "{}", small.to_text());
        let tiny = recommend(&machine(6, None, Some("none"), false));
        assert!(max_size(&tiny, Sdxl).is_none(), "{}", tiny.to_text());
    }

    #[test]
    fn without_a_gpu_the_limits_are_those_of_jobs_drawn_one_model_at_a_time() {
        // An 8 GB laptop (5.6 GB to use): SD 1.5 and SD 2 at their usual sizes. Planned as
        // whole f32 pipelines they "did not fit" (6.0 GB); with the f16 UNet counted as jobs
        // count it, SD 1.5's whole pipeline fits, and SD 2's too, or one model at a time.
        let r = recommend(&machine(8, None, Some("none"), false));
        for (family, native) in [(Sd1, 512), (Sd2, 768)] {
            let f = r.families.iter().find(|f| f.family == family).unwrap();
            assert!(f.max_size.unwrap() >= native, "{}", r.to_text());
        }
        // 4 GB (2.8 GB to use): SD 1.5 only one model at a time, about 2 GB (measured
        // 1.94-2.1 GB of peak RSS for such a job).
        let r = recommend(&machine(4, None, Some("none"), false));
        let sd1 = r.families.iter().find(|f| f.family == Sd1).unwrap();
        assert!(sd1.max_size.unwrap() >= 512, "{}", r.to_text());
        assert!(sd1.reason.contains("one model at a time"), "{}", sd1.reason);
        assert!(sd1.needed_bytes < 5 << 29, "{}", r.to_text());
        // 32 GB holds SD 1.5's whole pipeline: no staging, and the reason does not say it.
        let big = recommend(&machine(32, None, Some("none"), false));
        let sd1 = big.families.iter().find(|f| f.family == Sd1).unwrap();
        assert!(
            !sd1.reason.contains("one model at a time"),
            "{}",
            sd1.reason
        );
        assert!(sd1.needed_bytes > 4 << 30, "{}", big.to_text());
    }

    #[test]
    fn an_old_driver_or_a_build_without_cuda_falls_back_with_the_reason() {
        let old = recommend(&machine(32, Some((12, "11.4")), None, true));
        assert_eq!(old.device.value, DeviceKind::Cpu);
        assert!(
            old.device.reason.contains("too old"),
            "{}",
            old.device.reason
        );
        assert!(
            old.notes.iter().any(|n| n.contains("525")),
            "{:?}",
            old.notes
        );
        // A 2 GB card holds no model: the processor draws, and says why (found by review).
        let two = recommend(&machine(32, Some((2, "12.4")), None, true));
        assert_eq!(two.device.value, DeviceKind::Cpu, "{}", two.to_text());
        assert!(
            two.device.reason.contains("too little"),
            "{}",
            two.device.reason
        );
        assert!(max_size(&two, Sd1).is_some() && !two.low_vram.value);
        let no_cuda = recommend(&machine(32, Some((12, "12.4")), None, false));
        assert_eq!(no_cuda.device.value, DeviceKind::Cpu);
        assert!(no_cuda.device.reason.contains("without NVIDIA support"));
        let text = old.to_text();
        assert!(
            text.contains("Device:    processor") && text.contains("SDXL"),
            "{text}"
        );
    }

    #[test]
    fn report_reads_this_machine() {
        let r = system_report(&NvmlProbe::default(), BuildInfo::default());
        assert!(r.memory.total_bytes > 0);
        assert!(r.cpu.logical_cores >= 1);
        assert!(!r.cpu.name.is_empty());
        // Either GPUs were found, or we say why not: never silence.
        assert!(r.gpu_status.available || r.gpu_status.reason.is_some());
    }

    #[test]
    fn text_report_names_the_gpu_and_its_vram() {
        let r = system_report(&FakeGpu, BuildInfo::default());
        let t = r.to_text();
        assert!(t.contains("NVIDIA GeForce RTX 3060 — 12.0 GB VRAM"), "{t}");
        assert!(t.contains("CUDA 12.4"), "{t}");
    }
}

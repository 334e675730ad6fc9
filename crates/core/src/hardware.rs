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

#[cfg(test)]
mod tests {
    use super::*;

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

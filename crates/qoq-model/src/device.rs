//! The one device parser: `cpu`, `cuda` (= `cuda:0`) and `cuda:N` become a [`DeviceSpec`], then a
//! [`candle_core::Device`]. Every command's `--device` and the run file's `model.device` go
//! through it (ARCHITECTURE.md "Devices and scale": one device chosen at the edge, passed down).
//!
//! Parsing checks the build as well as the spelling: `cuda` in a build without the `cuda` cargo
//! feature is refused there, with the command that builds it, before any file is read. Metal is
//! refused in every build: qoq declares no `metal` feature (its kernels and tests target the CPU
//! and CUDA).

use candle_core::Device;
use std::fmt;
use std::str::FromStr;

/// The build command of a CUDA-enabled `qoq`, quoted by [`DeviceError::CudaNotBuilt`].
pub const CUDA_BUILD_COMMAND: &str = "cargo build --release -p qoq-cli --features cuda";

/// The accepted spellings, quoted by [`DeviceError::Unknown`].
pub const ACCEPTED: &str = "`cpu`, `cuda` (the first GPU) or `cuda:N` (GPU number N, from 0)";

/// Why a device name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Not a device name qoq knows.
    #[error("unknown device `{value}`: expected {}", ACCEPTED)]
    Unknown {
        /// The name as given.
        value: String,
    },
    /// A CUDA device in a build without the `cuda` feature.
    #[error(
        "device `{value}`: qoq was built without the `cuda` feature: rebuild with `{}`",
        CUDA_BUILD_COMMAND
    )]
    CudaNotBuilt {
        /// The name as given.
        value: String,
    },
    /// `metal`: not supported by any qoq build.
    #[error(
        "device `{value}`: Metal is not supported (qoq has no `metal` feature); use {}",
        ACCEPTED
    )]
    Metal {
        /// The name as given.
        value: String,
    },
    /// The device exists in the build but could not be opened (no GPU with that number, no
    /// driver).
    #[error("device `{spec}` cannot be opened: {message}")]
    Open {
        /// The device.
        spec: DeviceSpec,
        /// candle's (the driver's) message.
        message: String,
    },
}

/// A parsed device name: what `--device` and `model.device` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default of every command and run file).
    #[default]
    Cpu,
    /// CUDA GPU number N (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` or `cuda:N`; refuses an unknown name, `metal`, and `cuda` in a build
    /// without the `cuda` feature ([`DeviceError`] names the value).
    pub fn parse(value: &str) -> Result<Self, DeviceError> {
        let spec = match value {
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            "metal" => {
                return Err(DeviceError::Metal {
                    value: value.into(),
                });
            }
            _ if value.starts_with("metal:") => {
                return Err(DeviceError::Metal {
                    value: value.into(),
                });
            }
            _ => match value.strip_prefix("cuda:").map(str::parse::<usize>) {
                // `usize::from_str` also takes a leading `+`; only plain digits are a GPU number.
                Some(Ok(n)) if value["cuda:".len()..].bytes().all(|b| b.is_ascii_digit()) => {
                    Self::Cuda(n)
                }
                _ => {
                    return Err(DeviceError::Unknown {
                        value: value.into(),
                    });
                }
            },
        };
        if matches!(spec, Self::Cuda(_)) && !candle_core::utils::cuda_is_available() {
            return Err(DeviceError::CudaNotBuilt {
                value: value.into(),
            });
        }
        Ok(spec)
    }

    /// Whether it is a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Opens the device (for CUDA: creates the context on GPU N; the error names the device).
    pub fn device(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n).map_err(|e| DeviceError::Open {
                spec: self,
                message: e.to_string(),
            }),
        }
    }
}

/// The canonical name: `cpu` or `cuda:N` (what a resolved run file records).
impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        Self::parse(s)
    }
}

/// Parses a device name and opens it: [`DeviceSpec::parse`] then [`DeviceSpec::device`].
pub fn parse_device(value: &str) -> Result<Device, DeviceError> {
    DeviceSpec::parse(value)?.device()
}

/// A device's memory in bytes: what is free for new allocations, and the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// CPU: `MemAvailable` of `/proc/meminfo`; CUDA: the driver's free memory on the GPU.
    pub free: u64,
    /// CPU: `MemTotal`; CUDA: the GPU's memory.
    pub total: u64,
}

/// The memory of `dev` (for budgets and the dry-run's fit check); the error says what could not
/// be read.
pub fn memory(dev: &Device) -> Result<Memory, String> {
    match dev {
        Device::Cpu => {
            let text = std::fs::read_to_string("/proc/meminfo")
                .map_err(|e| format!("reading /proc/meminfo: {e}"))?;
            cpu_memory(&text).ok_or_else(|| {
                "/proc/meminfo has no MemTotal and MemAvailable lines in kB".to_string()
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d
                .cuda_stream()
                .context()
                .mem_get_info()
                .map_err(|e| format!("querying the GPU's memory: {e}"))?;
            Ok(Memory {
                free: free as u64,
                total: total as u64,
            })
        }
        other => Err(format!("memory of device {other:?} is not known to qoq")),
    }
}

/// The GPU of one data-parallel rank: `spec` (the run's `model.device`) for the rank at
/// `local_rank` of the `local_ranks` on its machine, which sees `visible` GPUs.
///
/// - The CPU, or one rank on the machine: `spec` itself.
/// - One visible GPU: every rank takes it (each process sees only its own GPU, as with
///   `CUDA_VISIBLE_DEVICES` set per rank, or the ranks share one GPU).
/// - Else `cuda:N` is the first of the machine's ranks' GPUs: the rank takes GPU
///   `N + local_rank`, and `N + local_ranks` must not exceed the visible GPUs (two ranks on one
///   GPU of several is a launch error, not a choice).
pub fn rank_device(
    spec: DeviceSpec,
    local_rank: usize,
    local_ranks: usize,
    visible: usize,
) -> Result<DeviceSpec, String> {
    let DeviceSpec::Cuda(first) = spec else {
        return Ok(spec);
    };
    if local_ranks <= 1 || visible == 1 {
        return Ok(spec);
    }
    if first + local_ranks > visible {
        return Err(format!(
            "{local_ranks} ranks run on this machine and take one GPU each from {spec} on \
             (rank {local_rank} would take cuda:{}), but {visible} GPU(s) are visible: launch at \
             most {} rank(s) per machine (mpirun --map-by ppr:N:node) or give each rank its own \
             GPU with CUDA_VISIBLE_DEVICES",
            first + local_rank,
            visible.saturating_sub(first)
        ));
    }
    Ok(DeviceSpec::Cuda(first + local_rank))
}

/// The GPUs this process sees (`CUDA_VISIBLE_DEVICES` applied); 0 in a build without CUDA.
pub fn visible_gpus() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| format!("counting the GPUs: {e:?}"))
    }
    #[cfg(not(feature = "cuda"))]
    Ok(0)
}

/// `MemAvailable` and `MemTotal` of a `/proc/meminfo` text.
fn cpu_memory(meminfo: &str) -> Option<Memory> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?.trim();
            let kb = rest.strip_suffix("kB")?.trim().parse::<u64>().ok()?;
            Some(kb * 1024)
        })
    };
    Some(Memory {
        free: field("MemAvailable")?,
        total: field("MemTotal")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_memory_reads_meminfo() {
        let text =
            "MemTotal:       24576000 kB\nMemFree:         100 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(
            cpu_memory(text),
            Some(Memory {
                free: 12_288_000 * 1024,
                total: 24_576_000 * 1024
            })
        );
        assert_eq!(cpu_memory("MemTotal: 5 kB\n"), None);
        let here = memory(&Device::Cpu).unwrap();
        assert!(here.free > 0 && here.free <= here.total, "{here:?}");
    }

    #[test]
    fn each_rank_takes_its_gpu_of_the_machine_or_the_one_it_sees() {
        let cuda = DeviceSpec::Cuda;
        // The CPU and a single rank keep the run's device.
        assert_eq!(rank_device(DeviceSpec::Cpu, 3, 8, 0), Ok(DeviceSpec::Cpu));
        assert_eq!(rank_device(cuda(2), 0, 1, 8), Ok(cuda(2)));
        // 8 ranks on 8 GPUs: rank r takes GPU r; from cuda:4, 4 ranks take 4..8.
        for r in 0..8 {
            assert_eq!(rank_device(cuda(0), r, 8, 8), Ok(cuda(r)));
        }
        assert_eq!(rank_device(cuda(4), 3, 4, 8), Ok(cuda(7)));
        // One visible GPU per process (CUDA_VISIBLE_DEVICES per rank): every rank's cuda:0.
        assert_eq!(rank_device(cuda(0), 5, 8, 1), Ok(cuda(0)));
        // More ranks than GPUs: refused, naming the counts and the ways out.
        let e = rank_device(cuda(0), 2, 4, 2).unwrap_err();
        for part in [
            "4 ranks",
            "cuda:2",
            "2 GPU(s)",
            "at most 2",
            "CUDA_VISIBLE_DEVICES",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        let e = rank_device(cuda(6), 0, 4, 8).unwrap_err();
        assert!(e.contains("from cuda:6") && e.contains("at most 2"), "{e}");
    }

    #[test]
    fn cpu_parses_opens_and_prints_back() {
        let s = DeviceSpec::parse("cpu").unwrap();
        assert_eq!(s, DeviceSpec::Cpu);
        assert_eq!(s, DeviceSpec::default());
        assert_eq!(s.to_string(), "cpu");
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
    }

    #[test]
    fn unknown_names_are_refused_naming_the_value_and_the_accepted_forms() {
        for bad in [
            "", "gpu", "CPU", "Cuda", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda0", " cpu",
            "cuda:0:1", "tpu:0",
        ] {
            let e = DeviceSpec::parse(bad).unwrap_err();
            assert_eq!(
                e,
                DeviceError::Unknown {
                    value: bad.to_string()
                },
                "{bad:?}"
            );
            let m = e.to_string();
            assert!(m.contains(&format!("`{bad}`")), "{m}");
            assert!(
                m.contains("`cpu`") && m.contains("`cuda`") && m.contains("`cuda:N`"),
                "{m}"
            );
        }
    }

    #[test]
    fn metal_is_refused_in_every_build() {
        for v in ["metal", "metal:0"] {
            let e = DeviceSpec::parse(v).unwrap_err();
            assert_eq!(e, DeviceError::Metal { value: v.into() });
            assert!(e.to_string().contains("Metal is not supported"), "{e}");
        }
    }

    /// `cuda`, `cuda:N`: parsed in a CUDA build, refused with the build command in a CPU build.
    #[test]
    fn cuda_forms_parse_to_their_ordinal_or_name_the_missing_feature() {
        for (v, n) in [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3), ("cuda:12", 12)] {
            let r = DeviceSpec::parse(v);
            if cfg!(feature = "cuda") {
                let s = r.unwrap();
                assert_eq!(s, DeviceSpec::Cuda(n));
                assert_eq!(s.to_string(), format!("cuda:{n}"));
            } else {
                let e = r.unwrap_err();
                assert_eq!(e, DeviceError::CudaNotBuilt { value: v.into() });
                assert_eq!(
                    e.to_string(),
                    format!(
                        "device `{v}`: qoq was built without the `cuda` feature: rebuild with \
                         `cargo build --release -p qoq-cli --features cuda`"
                    )
                );
            }
        }
    }

    /// Opening a GPU that is not there names the device (in a CPU build candle's dummy backend
    /// refuses every ordinal; in a CUDA build, GPU 4096 does not exist).
    #[test]
    fn a_gpu_that_cannot_be_opened_is_named() {
        let e = DeviceSpec::Cuda(4096).device().unwrap_err();
        assert!(matches!(
            e,
            DeviceError::Open {
                spec: DeviceSpec::Cuda(4096),
                ..
            }
        ));
        assert!(
            e.to_string()
                .starts_with("device `cuda:4096` cannot be opened: "),
            "{e}"
        );
    }
}

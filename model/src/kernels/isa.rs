//! Which instruction set the kernels run on: detected once per process, or chosen with
//! `EPSERVE_KERNEL_ISA=avx512|avx2|portable` (to measure or test a CPU's fallback forms on a CPU
//! that has more). A value the CPU cannot run, or that names no set, is logged as a warning at
//! first use and the detected set is used.

use std::sync::OnceLock;

/// The forms the kernels use: AVX-512 ([`super::dot512`], [`super::outer`]), AVX2 with FMA
/// ([`super::dot256`], [`super::outer256`]) or portable Rust ([`super::dot`] only: every product
/// in blocks of its rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Lanes of the outer form's vectors, `None` where there is no outer form.
    pub(super) fn outer_lanes(self) -> Option<usize> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(super::outer::LANES),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(super::outer256::LANES),
            _ => None,
        }
    }

    fn parse(text: &str) -> Option<Isa> {
        match text.trim().to_ascii_lowercase().as_str() {
            "avx512" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2),
            "portable" => Some(Isa::Portable),
            _ => None,
        }
    }

    /// The richest set this CPU runs.
    fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if super::outer::available() {
                return Isa::Avx512;
            }
            if super::dot256::available() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    fn rank(self) -> u8 {
        match self {
            Isa::Portable => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        }
    }
}

/// The instruction set the kernels use in this process.
pub fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let detected = Isa::detected();
        let chosen = chosen(detected);
        tracing::debug!(detected = detected.name(), chosen = chosen.name(), "CPU kernels' instruction set");
        chosen
    })
}

/// What `EPSERVE_KERNEL_ISA` asks for, where this CPU runs it, else `detected`.
fn chosen(detected: Isa) -> Isa {
    let Ok(asked) = std::env::var("EPSERVE_KERNEL_ISA") else { return detected };
    match Isa::parse(&asked) {
        Some(isa) if isa.rank() <= detected.rank() => isa,
        Some(isa) => {
            tracing::warn!(
                asked = isa.name(),
                detected = detected.name(),
                "EPSERVE_KERNEL_ISA asks for instructions this CPU lacks; using what it has"
            );
            detected
        }
        None => {
            tracing::warn!(
                asked,
                detected = detected.name(),
                "EPSERVE_KERNEL_ISA is not avx512, avx2 or portable; using what the CPU has"
            );
            detected
        }
    }
}

//! Creating io_uring instances and checking, once at startup, that the kernel gives us what the
//! workers need.
//!
//! Owns ring construction (flags and their fallback) and the startup diagnostics. It must not
//! submit anything or keep any ring: each worker owns the ring this module builds for it.

use std::io;

use io_uring::{opcode, IoUring, Probe};

use super::bufring::BufRing;
use super::error::{describe, IoError};

const SYSCTL_PATH: &str = "/proc/sys/kernel/io_uring_disabled";

const SECCOMP_FIX: &str = "containers: run with --security-opt seccomp=unconfined or a profile \
                           allowing io_uring_*";

/// Opcodes the workers submit, with the names a diagnostic should show.
const REQUIRED_OPS: [(u8, &str); 6] = [
    (opcode::Accept::CODE, "IORING_OP_ACCEPT"),
    (opcode::RecvMulti::CODE, "IORING_OP_RECV"),
    (opcode::Send::CODE, "IORING_OP_SEND"),
    (opcode::Connect::CODE, "IORING_OP_CONNECT"),
    (opcode::AsyncCancel2::CODE, "IORING_OP_ASYNC_CANCEL"),
    (opcode::Read::CODE, "IORING_OP_READ"),
];

/// Builds a worker ring: single issuer + deferred task work + cooperative task run, a CQ four
/// times the SQ (multishot operations post many completions per submission). Falls back to
/// fewer flags when the kernel refuses them, so older kernels still run, just less efficiently.
pub(crate) fn build(entries: u32) -> io::Result<IoUring> {
    let cq_entries = entries.saturating_mul(4);
    let tuned = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .setup_cqsize(cq_entries)
        .build(entries);
    match tuned {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        other => return other,
    }
    match IoUring::builder().setup_cqsize(cq_entries).build(entries) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        other => other,
    }
}

/// Checks that io_uring can be used and supports every operation the workers submit.
pub fn probe() -> Result<(), IoError> {
    // Declared before the ring so it is dropped after it: the registration must end first.
    let mut bufs = BufRing::new(1, 64, 0).map_err(|e| IoError::Setup {
        worker: 0,
        what: "map a probe buffer",
        source: e,
    })?;
    let ring = IoUring::new(8).map_err(|e| unavailable(&e, read_sysctl()))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|_| IoError::Unsupported {
            feature: "IORING_REGISTER_PROBE",
        })?;
    if let Some((_, name)) = REQUIRED_OPS
        .iter()
        .find(|(code, _)| !probe.is_supported(*code))
    {
        return Err(IoError::Unsupported { feature: name });
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(IoError::Unsupported {
            feature: "IORING_FEAT_EXT_ARG",
        });
    }
    bufs.register(&ring.submitter())
        .map_err(|_| IoError::Unsupported {
            feature: "provided buffer rings (IORING_REGISTER_PBUF_RING)",
        })?;
    Ok(())
}

fn read_sysctl() -> Option<u32> {
    std::fs::read_to_string(SYSCTL_PATH)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The diagnostic for a refused `io_uring_setup`, given `kernel.io_uring_disabled` if readable.
pub(crate) fn unavailable(err: &io::Error, sysctl: Option<u32>) -> IoError {
    let blocked = matches!(
        err.raw_os_error(),
        Some(libc::EPERM | libc::ENOSYS | libc::EACCES)
    );
    let hint = match (blocked, sysctl) {
        (false, _) => "the kernel refused to create a ring (check ulimit -l and ulimit -n)".into(),
        (true, Some(2)) => {
            "it is disabled by sysctl kernel.io_uring_disabled=2 (set it to 0)".into()
        }
        (true, Some(1)) => "it is restricted by sysctl kernel.io_uring_disabled=1 to members of \
                            kernel.io_uring_group (set it to 0)"
            .into(),
        (true, Some(_)) => format!(
            "it is likely disabled by seccomp ({SECCOMP_FIX}); sysctl kernel.io_uring_disabled \
             allows it"
        ),
        (true, None) => format!(
            "it is likely disabled by seccomp ({SECCOMP_FIX}) or by sysctl \
             kernel.io_uring_disabled (set it to 0)"
        ),
    };
    IoError::Unavailable {
        reason: describe(err),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_passes_on_this_machine() {
        probe().expect("io_uring usable");
    }

    #[test]
    fn diagnostics_are_one_line_and_name_the_fix() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        for sysctl in [None, Some(0), Some(1), Some(2)] {
            let text = unavailable(&eperm, sysctl).to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(
                text.starts_with("io_uring is unavailable (operation not permitted): "),
                "{text}"
            );
        }
        let text = unavailable(&eperm, None).to_string();
        assert!(text.contains("seccomp=unconfined") && text.contains("set it to 0"));
        assert!(unavailable(&eperm, Some(2))
            .to_string()
            .contains("kernel.io_uring_disabled=2"));
    }

    #[test]
    fn tuned_ring_builds() {
        build(64).expect("ring");
    }
}

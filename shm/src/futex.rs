//! Sleeping on a 32-bit word of the shared mapping until the other process changes it (Linux
//! futex without `FUTEX_PRIVATE_FLAG`, so that the kernel keys the wait on the shared page, not on
//! this process's address space). Elsewhere: a short sleep, correct but slower to wake.

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `word` holds `expected`, at most `timeout` (spurious returns are fine: callers
/// re-check what they wait for).
#[cfg(target_os = "linux")]
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, 4-aligned AtomicU32 (in the mapping, which outlives this call);
    // FUTEX_WAIT only reads it and compares with `expected`; `ts` lives across the call; the
    // remaining arguments are ignored by FUTEX_WAIT. Errors (EAGAIN: the value changed, EINTR,
    // ETIMEDOUT) all mean "look again", which the caller does.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every process sleeping on `word`.
#[cfg(target_os = "linux")]
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a live, 4-aligned AtomicU32; FUTEX_WAKE does not touch its memory, it
    // only wakes waiters keyed on its (shared) page and offset.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn wait(_word: &AtomicU32, _expected: u32, timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_micros(200)));
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn wake_all(_word: &AtomicU32) {}

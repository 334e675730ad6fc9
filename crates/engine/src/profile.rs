//! Opt-in time per layer kind (`LD_LAYER_TIMES=1`), to find where a step's time goes on a device
//! that has no profiler at hand: each region waits for the device before and after it, so
//! queued GPU work lands in the region that launched it. Off by default, where a region costs
//! one relaxed atomic load. The waits slow a GPU run a little; use the table for shares, and
//! the plain bench for times.
//!
//! Not `LD_PROFILE`: glibc's dynamic loader reads that name and then routes every call into a
//! shared library through its profiling trampoline (seen on the GPU machine: loading random
//! weights went from 4 s to over a minute, libm and libcuda calls alike).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{Device, Result};

/// 0: not read yet, 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Whether `LD_LAYER_TIMES` is set to something other than `0` (read once).
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("LD_LAYER_TIMES").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Runs `f`, adding its time (device work included) to `name` when profiling is on.
pub fn scope<T>(name: &'static str, dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    dev.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    dev.synchronize()?;
    let d = t.elapsed();
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table.entry(name).or_default();
    e.0 += d;
    e.1 += 1;
    Ok(out)
}

/// The regions timed since the last call, longest first, and clears them.
pub fn take() -> Vec<(&'static str, Duration, u64)> {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<_> = std::mem::take(&mut *table)
        .into_iter()
        .map(|(k, (d, n))| (k, d, n))
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_passes_results_and_errors_through() {
        let dev = Device::Cpu;
        assert_eq!(scope("t", &dev, || Ok(3)).unwrap(), 3);
        assert!(scope::<()>("t", &dev, || candle_core::bail!("no")).is_err());
    }
}

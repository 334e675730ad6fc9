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

/// 0: not read yet, 1: off, 2: on, 3: on, with shapes.
static STATE: AtomicU8 = AtomicU8::new(0);
static TABLE: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

fn state() -> u8 {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let s = match std::env::var("LD_LAYER_TIMES").as_deref() {
                Ok("shapes") => 3,
                Ok(v) if !v.is_empty() && v != "0" => 2,
                _ => 1,
            };
            STATE.store(s, Ordering::Relaxed);
            s
        }
        s => s,
    }
}

/// Whether `LD_LAYER_TIMES` is set to something other than `0` (read once).
pub fn enabled() -> bool {
    state() >= 2
}

/// [`scope`] for a layer whose rows `LD_LAYER_TIMES=shapes` splits by shape: `name`, the
/// input's dims and the output channels (`conv 3x3 [2, 640, 32, 32] -> 640`), so the layers
/// of one kind that scale or perform worse than the others stand out.
pub fn scope_shaped<T>(
    name: &'static str,
    dims: &[usize],
    out: usize,
    dev: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if state() != 3 {
        return scope(name, dev, f);
    }
    // Row names live as long as the table: one leaked string per distinct shape (a few dozen
    // in a model), only while profiling by shape.
    static NAMES: Mutex<BTreeMap<String, &'static str>> = Mutex::new(BTreeMap::new());
    let key = format!("{name} {dims:?} -> {out}");
    let label = *NAMES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_insert_with_key(|k| Box::leak(k.clone().into_boxed_str()));
    scope(label, dev, f)
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

    #[test]
    fn shapes_mode_splits_rows_by_shape() {
        let dev = Device::Cpu;
        // Process-wide: restored below (nextest runs each test in its own process).
        STATE.store(3, Ordering::Relaxed);
        take();
        for dims in [[2, 320, 64, 64], [2, 640, 32, 32], [2, 320, 64, 64]] {
            scope_shaped("conv 3x3", &dims, 320, &dev, || Ok(())).unwrap();
        }
        let rows = take();
        STATE.store(0, Ordering::Relaxed);
        let mut names: Vec<_> = rows.iter().map(|r| (r.0, r.2)).collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("conv 3x3 [2, 320, 64, 64] -> 320", 2),
                ("conv 3x3 [2, 640, 32, 32] -> 320", 1)
            ]
        );
    }
}

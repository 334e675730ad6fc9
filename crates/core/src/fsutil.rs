//! Small file-system helpers: writing a file so that readers never see half of it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Numbers this process's temp files, so that two threads saving the same file at once (two
/// settings saves from the API) never write into one temp file.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// Write `bytes` to `path` atomically: temp file in the same folder, fsync, rename, fsync folder.
/// A crash leaves either the old file or the new one, never a truncated mix. Concurrent writers
/// each rename a whole file of their own; the last rename wins.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_owned());
    let (tmp, mut f) = create_temp(dir, &name)?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        // The rename itself must reach the disk too; not every platform lets us open a folder.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A new temp file for `name` in `dir`: `.<name>.tmp-<pid>-<n>`, created only if no file has
/// that name (one left by a crashed process whose pid came back is skipped, not reused).
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(std::path::PathBuf, File)> {
    let mut tries = 0;
    loop {
        let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// The process that wrote a temp file named by [`write_atomic`] (`.<name>.tmp-<pid>-<n>`, or
/// `.<name>.tmp-<pid>` from versions before 2026-11); `None` for any other name.
pub(crate) fn temp_file_owner(name: &str) -> Option<u32> {
    let (_, tail) = name.strip_prefix('.')?.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-').unwrap_or((tail, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
    }

    #[test]
    fn concurrent_saves_of_one_file_each_land_whole() {
        // Found by review: with one temp name per process, two threads saving the same file
        // (two settings changes through the API) wrote into one temp file, leaving a mix of both
        // under the final name or failing the save that lost the rename.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("settings.json");
        let contents: Vec<Vec<u8>> = (0..4)
            .map(|t| {
                format!(
                    "{{\"writer\": {t}, \"pad\": \"{}\"}}",
                    "x".repeat(1000 * (t + 1))
                )
                .into_bytes()
            })
            .collect();
        for _ in 0..50 {
            std::thread::scope(|s| {
                for c in &contents {
                    let p = &p;
                    s.spawn(move || write_atomic(p, c).unwrap());
                }
            });
            let now = fs::read(&p).unwrap();
            assert!(
                contents.contains(&now),
                "a mix of writers: {} bytes",
                now.len()
            );
        }
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temp files left behind: {names:?}");
    }

    #[test]
    fn temp_files_name_their_process() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, _) = create_temp(dir.path(), "a.png").unwrap();
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_file_owner(name), Some(std::process::id()));
        assert_eq!(temp_file_owner(".00001-1.png.tmp-123"), Some(123));
        assert_eq!(temp_file_owner(".00001-1.png.tmp-123-7"), Some(123));
        for other in [
            "00001-1.png.tmp-123",
            ".x.png.tmp-",
            ".x.png.tmp-12-",
            ".x.tmp-1-a",
            ".x.png",
        ] {
            assert_eq!(temp_file_owner(other), None, "{other}");
        }
    }
}

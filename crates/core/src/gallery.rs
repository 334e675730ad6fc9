//! The image gallery: every generated image is a PNG file (with A1111 `parameters` text) under the
//! images folder, indexed in SQLite for search, favourites and the trash. The files are the truth:
//! on open, the index is reconciled with the folder, and a damaged index is rebuilt from it.
//!
//! Layout: `<images>/2026-11-26/00042-1234567890.png` (UTC date, counter, seed, like A1111),
//! thumbnails at the same relative path under `<images>/.thumbs/`, trashed images under
//! `<images>/.trash/`. Nothing is deleted except by emptying the trash.

use crate::fsutil::write_atomic;
use crate::image_file::{encode_png, save_png, ImageFileError};
use crate::infotext::Infotext;
use crate::metadata;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Index schema version, kept in `PRAGMA user_version`. 2: ids are never reused, and rows know
/// their file's modified time and size.
const SCHEMA_VERSION: i64 = 2;
const THUMBS_DIR: &str = ".thumbs";
const TRASH_DIR: &str = ".trash";
/// Longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIZE: u32 = 256;
/// Most images one page may hold, and what a query asking for 0 gets.
pub const MAX_PAGE: usize = 200;
pub const DEFAULT_PAGE: usize = 50;
/// Files found in the folder larger than this are not indexed (no generated PNG comes near).
const MAX_INDEXED_FILE: u64 = 256 * 1024 * 1024;
/// A temp file of ours this old cannot belong to a save still running.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);
/// Folder levels walked below the images folder (date folders are one level).
const MAX_WALK_DEPTH: usize = 8;
/// How many `<name>-<n>.png` names to try when a trashed file must make way for a gallery file
/// of the same name.
const MAX_RENAME_TRIES: u32 = 10_000;

/// The images table, named so that the schema 1 migration can build it beside the old one.
/// `AUTOINCREMENT`: an id is never handed out again once used, even after its image is deleted
/// for good; the UI, browser caches and character avatars name images by id, and a reused id
/// would silently show them another picture.
fn images_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL DEFAULT '',
    negative_prompt TEXT NOT NULL DEFAULT '',
    model TEXT,
    sampler TEXT,
    schedule TEXT,
    steps INTEGER,
    cfg_scale REAL,
    seed INTEGER,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    favourite INTEGER NOT NULL DEFAULT 0,
    trashed_at INTEGER,
    parameters TEXT NOT NULL DEFAULT '',
    -- The file as last indexed (unix ns, bytes), so reconcile can tell a file edited outside
    -- the app. NULL for rows from schema 1 until the next reconcile fills them in.
    file_mtime_ns INTEGER,
    file_size INTEGER
);"
    )
}

const INDEXES: &str = "
-- Every list filters on trashed_at and sorts by created_at; the others narrow it further.
CREATE INDEX images_trashed_created ON images(trashed_at, created_at);
CREATE INDEX images_created ON images(created_at);
CREATE INDEX images_favourite ON images(favourite, created_at);
CREATE INDEX images_model ON images(model, created_at);
";

const COLUMNS: &str = "id, file, prompt, negative_prompt, model, sampler, schedule, steps, \
    cfg_scale, seed, width, height, created_at, favourite, trashed_at, parameters";

#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    #[error("could not use {path}: {source}; check that it exists, is writable and the disk is not full")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gallery index {path} failed: {source}; restarting the app rebuilds it from the image files if it is damaged")]
    Database {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the gallery index {path} was written by a newer Local Diffusers (schema {found}, this version knows {supported}); update the app")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("there is no image with id {id}")]
    NotFound { id: i64 },
    #[error("the image file {path} is missing; restart the app to re-scan the images folder")]
    FileMissing { path: PathBuf },
    #[error("cannot restore the image: {path} already exists; move that file away first")]
    RestoreConflict { path: PathBuf },
    #[error("could not save the image: {0}")]
    Encode(#[from] ImageFileError),
    #[error("could not make a thumbnail of {path}: {source}")]
    Thumbnail {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
}

type Result<T, E = GalleryError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GalleryError + '_ {
    move |source| GalleryError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A picture to add: 8-bit RGB pixels and the settings that made it.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub rgb: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub infotext: Infotext,
}

/// One image in the index. Settings are `None` for files found in the folder that carry none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageRecord {
    pub id: i64,
    /// Path relative to the images folder, '/'-separated, made by us (never from a request).
    pub file: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub model: Option<String>,
    pub sampler: Option<String>,
    pub schedule: Option<String>,
    pub steps: Option<u32>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    /// Pixel size of the file.
    pub width: u32,
    pub height: u32,
    /// Unix time in milliseconds.
    pub created_at: i64,
    pub favourite: bool,
    pub trashed: bool,
    /// When it was moved to the trash (unix ms).
    pub trashed_at: Option<i64>,
    /// The full infotext, as stored in the PNG ("" when the file has none).
    pub parameters: String,
}

/// What to list. `Default` lists the newest [`DEFAULT_PAGE`] images outside the trash.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ImageQuery {
    /// Case-insensitive (for ASCII letters) substring of the prompt; `%` and `_` are literal.
    pub search: Option<String>,
    /// Exact model name.
    pub model: Option<String>,
    pub favourites_only: bool,
    /// Created at or after (unix ms).
    pub since: Option<i64>,
    /// Created before (unix ms).
    pub until: Option<i64>,
    /// List the trash instead of the gallery.
    pub trashed: bool,
    pub offset: usize,
    /// 0 means [`DEFAULT_PAGE`]; more than [`MAX_PAGE`] is cut to it.
    pub limit: usize,
}

/// One page of a list, newest first, and how many images match in all.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImagePage {
    pub items: Vec<ImageRecord>,
    pub total: u64,
}

/// What opening the gallery found and fixed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReconcileReport {
    /// Files that had no row and were indexed.
    pub added: usize,
    /// Rows whose file was gone and were dropped.
    pub removed: usize,
    /// Plain-language notes for the user (a rebuilt index, files that could not be read).
    pub warnings: Vec<String>,
}

/// The gallery. Shared between threads (`Send + Sync`); saves from several jobs at once each get
/// their own file name.
pub struct Gallery {
    images_dir: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
    /// Held while a file name is chosen and the file renamed into place.
    names: Mutex<NameCounter>,
}

#[derive(Default)]
struct NameCounter {
    /// The date folder `next` belongs to.
    date: String,
    next: u32,
}

impl Gallery {
    /// Open (or create) the gallery and reconcile the index with the folder. A damaged index is
    /// moved aside and rebuilt, with a warning in the report.
    pub fn open(images_dir: &Path, db_path: &Path) -> Result<(Gallery, ReconcileReport)> {
        std::fs::create_dir_all(images_dir).map_err(io_err(images_dir))?;
        if let Some(parent) = db_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut warnings = Vec::new();
        let conn = match open_db(db_path) {
            Ok(conn) => conn,
            Err(e) if is_corruption(&e) => {
                let aside = move_aside(db_path)?;
                let msg = format!(
                    "The gallery index was damaged; it was moved to {} and rebuilt from the image \
                     files. Favourites and trash dates could not be kept, and characters need \
                     their pictures chosen again.",
                    aside.display()
                );
                tracing::warn!(error = %e, "{msg}");
                warnings.push(msg);
                let conn = open_db(db_path)?;
                match highest_id_in(&aside) {
                    Some(floor) => {
                        start_ids_above(&conn, floor).map_err(|source| GalleryError::Database {
                            path: db_path.to_path_buf(),
                            source,
                        })?
                    }
                    None => tracing::warn!(
                        "no ids could be read from the damaged gallery index; new ids start at 1"
                    ),
                }
                conn
            }
            Err(e) => return Err(e),
        };
        let gallery = Gallery {
            images_dir: images_dir.to_path_buf(),
            db_path: db_path.to_path_buf(),
            conn: Mutex::new(conn),
            names: Mutex::new(NameCounter::default()),
        };
        let mut report = gallery.reconcile()?;
        warnings.append(&mut report.warnings);
        report.warnings = warnings;
        Ok((gallery, report))
    }

    /// Write the PNG (temp file, fsync, rename), its thumbnail, then the index row. If the row
    /// cannot be written the file stays, and the next open indexes it.
    pub fn save(&self, img: NewImage) -> Result<ImageRecord> {
        let parameters = img.infotext.to_text();
        // Encoding is the slow part; do it before taking the name lock.
        let png = encode_png(&img.rgb, img.width, img.height, &parameters)?;
        let thumb = image::RgbImage::from_raw(img.width, img.height, img.rgb)
            .map(|rgb| thumbnail_png(image::DynamicImage::ImageRgb8(rgb)));
        let created_at = now_ms();
        let info = &img.infotext;
        let file = {
            let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
            let file = self.next_name(&mut names, created_at, info.seed);
            save_png(&self.images_dir.join(&file), &png)?;
            file
        };
        // Without a stamp the next open reads the file's size once more; nothing is lost.
        let stamp = std::fs::metadata(self.images_dir.join(&file))
            .ok()
            .map(|m| FileStamp::of(&m));
        match thumb {
            Some(Ok(bytes)) => {
                let path = self.thumbs_dir().join(&file);
                if let Err(e) = write_atomic(&path, &bytes) {
                    // Not fatal: thumbnail_path makes it again when asked.
                    tracing::warn!(path = %path.display(), error = %e, "thumbnail not written");
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "thumbnail not made"),
            None => {}
        }
        let mut record = ImageRecord {
            id: 0,
            file,
            prompt: info.prompt.clone(),
            negative_prompt: info.negative_prompt.clone(),
            model: info.model.clone(),
            sampler: Some(info.sampler.clone()),
            schedule: info.schedule.clone(),
            steps: Some(info.steps),
            cfg_scale: Some(info.cfg_scale),
            seed: Some(info.seed),
            width: img.width,
            height: img.height,
            created_at,
            favourite: false,
            trashed: false,
            trashed_at: None,
            parameters,
        };
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.db_err())?;
        record.id = insert(&tx, &record, stamp).map_err(self.db_err())?;
        tx.commit().map_err(self.db_err())?;
        Ok(record)
    }

    pub fn get(&self, id: i64) -> Result<Option<ImageRecord>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM images WHERE id = ?1"),
                [id],
                row_to_record,
            )
            .optional()
            .map_err(self.db_err())
    }

    /// Where the image's PNG is (in the trash folder while it is trashed).
    pub fn file_path(&self, rec: &ImageRecord) -> PathBuf {
        let base = if rec.trashed {
            self.images_dir.join(TRASH_DIR)
        } else {
            self.images_dir.clone()
        };
        join_relative(&base, &rec.file)
    }

    /// The image's thumbnail, made again first if it is missing or older than the image (the
    /// image was edited or replaced outside the app).
    pub fn thumbnail_path(&self, rec: &ImageRecord) -> Result<PathBuf> {
        let thumb = join_relative(&self.thumbs_dir(), &rec.file);
        let src = self.file_path(rec);
        if is_up_to_date(&thumb, &src) {
            return Ok(thumb);
        }
        let bytes = match std::fs::read(&src) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(GalleryError::FileMissing { path: src })
            }
            Err(e) => return Err(io_err(&src)(e)),
        };
        let thumb_err = |source| GalleryError::Thumbnail {
            path: src.clone(),
            source,
        };
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .map_err(thumb_err)?;
        let png = thumbnail_png(img).map_err(thumb_err)?;
        if let Err(e) = write_atomic(&thumb, &png) {
            // Two requests for the same missing thumbnail race on one temp name; the loser's
            // rename fails although the thumbnail is now there.
            if !thumb.is_file() {
                return Err(io_err(&thumb)(e));
            }
        }
        Ok(thumb)
    }

    /// A page of images, newest first.
    pub fn list(&self, q: &ImageQuery) -> Result<ImagePage> {
        let mut clauses = vec![if q.trashed {
            "trashed_at IS NOT NULL"
        } else {
            "trashed_at IS NULL"
        }];
        let mut args: Vec<SqlValue> = Vec::new();
        if let Some(search) = q.search.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            clauses.push("prompt LIKE ? ESCAPE '\\'");
            args.push(SqlValue::Text(format!("%{}%", escape_like(search))));
        }
        if let Some(model) = &q.model {
            clauses.push("model = ?");
            args.push(SqlValue::Text(model.clone()));
        }
        if q.favourites_only {
            clauses.push("favourite = 1");
        }
        if let Some(since) = q.since {
            clauses.push("created_at >= ?");
            args.push(SqlValue::Integer(since));
        }
        if let Some(until) = q.until {
            clauses.push("created_at < ?");
            args.push(SqlValue::Integer(until));
        }
        let filter = clauses.join(" AND ");
        let limit = match q.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let conn = self.conn();
        let total: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM images WHERE {filter}"),
                rusqlite::params_from_iter(args.iter()),
                |r| r.get(0),
            )
            .map_err(self.db_err())?;
        args.push(SqlValue::Integer(limit as i64));
        args.push(SqlValue::Integer(q.offset.min(i64::MAX as usize) as i64));
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM images WHERE {filter} \
                 ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
            ))
            .map_err(self.db_err())?;
        let items = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), row_to_record)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.db_err())?;
        Ok(ImagePage {
            items,
            total: total as u64,
        })
    }

    pub fn set_favourite(&self, id: i64, favourite: bool) -> Result<()> {
        let n = self
            .conn()
            .execute(
                "UPDATE images SET favourite = ?1 WHERE id = ?2",
                params![favourite, id],
            )
            .map_err(self.db_err())?;
        if n == 0 {
            return Err(GalleryError::NotFound { id });
        }
        Ok(())
    }

    /// Move an image to the trash: its file goes to `.trash/` and it leaves the normal lists.
    /// Trashing a trashed image does nothing.
    pub fn trash(&self, id: i64) -> Result<()> {
        let rec = self.get(id)?.ok_or(GalleryError::NotFound { id })?;
        if rec.trashed {
            return Ok(());
        }
        let from = self.file_path(&rec);
        let trash = self.images_dir.join(TRASH_DIR);
        let mut file = rec.file.clone();
        let to = join_relative(&trash, &file);
        if from.exists() {
            if to.exists() {
                // Another trashed picture has this name (on a case-insensitive disk, `Cat.png`
                // meets `.trash/cat.png`): a rename would replace it, so this one is trashed
                // under a free numbered name, which it keeps when restored.
                file = self.free_name(&rec.file)?;
            }
            move_file(&from, &join_relative(&trash, &file))?;
        } else if !to.exists() {
            return Err(GalleryError::FileMissing { path: from });
        }
        if file != rec.file {
            self.remove_thumbnail(&rec.file);
        }
        self.conn()
            .execute(
                "UPDATE images SET trashed_at = ?1, file = ?2 WHERE id = ?3",
                params![now_ms(), file, id],
            )
            .map_err(self.db_err())?;
        Ok(())
    }

    /// `rel` numbered (`name-2.png`, ...) so that no row, gallery file or trashed file has it.
    fn free_name(&self, rel: &str) -> Result<String> {
        let trash = self.images_dir.join(TRASH_DIR);
        let conn = self.conn();
        for n in 2..MAX_RENAME_TRIES {
            let name = numbered_name(rel, n);
            let taken: bool = conn
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM images WHERE file = ?1)",
                    [&name],
                    |r| r.get(0),
                )
                .map_err(self.db_err())?;
            if !taken
                && !join_relative(&self.images_dir, &name).exists()
                && !join_relative(&trash, &name).exists()
            {
                return Ok(name);
            }
        }
        Err(GalleryError::RestoreConflict {
            path: join_relative(&trash, rel),
        })
    }

    /// Bring an image back from the trash. Restoring one that is not trashed does nothing.
    pub fn restore(&self, id: i64) -> Result<()> {
        let rec = self.get(id)?.ok_or(GalleryError::NotFound { id })?;
        if !rec.trashed {
            return Ok(());
        }
        let from = self.file_path(&rec);
        let to = join_relative(&self.images_dir, &rec.file);
        if to.exists() {
            return Err(GalleryError::RestoreConflict { path: to });
        }
        if !from.exists() {
            return Err(GalleryError::FileMissing { path: from });
        }
        move_file(&from, &to)?;
        self.conn()
            .execute("UPDATE images SET trashed_at = NULL WHERE id = ?1", [id])
            .map_err(self.db_err())?;
        Ok(())
    }

    /// Delete every trashed image for good (file, thumbnail and row). Returns how many.
    pub fn empty_trash(&self) -> Result<usize> {
        let trashed = self.list_all_trashed()?;
        let mut deleted = Vec::new();
        for rec in &trashed {
            let path = self.file_path(rec);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Keep the row so the file is not orphaned; the next try deletes it.
                    tracing::warn!(path = %path.display(), error = %e, "trashed file not deleted");
                    continue;
                }
            }
            self.remove_thumbnail(&rec.file);
            deleted.push(rec.id);
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.db_err())?;
        for id in &deleted {
            // Only while still trashed: a restore between the listing and here has put the
            // file back (so removing it found nothing), and its row must stay.
            tx.execute(
                "DELETE FROM images WHERE id = ?1 AND trashed_at IS NOT NULL",
                [id],
            )
            .map_err(self.db_err())?;
        }
        tx.commit().map_err(self.db_err())?;
        Ok(deleted.len())
    }

    fn list_all_trashed(&self) -> Result<Vec<ImageRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM images WHERE trashed_at IS NOT NULL"
            ))
            .map_err(self.db_err())?;
        let rows = stmt
            .query_map([], row_to_record)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.db_err())?;
        Ok(rows)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // SQLite rolls back an unfinished transaction, so a panic elsewhere leaves it usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn db_err(&self) -> impl Fn(rusqlite::Error) -> GalleryError + '_ {
        move |source| GalleryError::Database {
            path: self.db_path.clone(),
            source,
        }
    }

    fn thumbs_dir(&self) -> PathBuf {
        self.images_dir.join(THUMBS_DIR)
    }

    fn remove_thumbnail(&self, file: &str) {
        let _ = std::fs::remove_file(join_relative(&self.thumbs_dir(), file));
    }

    /// A file name no image has, in the gallery or in the trash: `<date>/<counter>-<seed>.png`.
    fn next_name(&self, names: &mut NameCounter, created_at: i64, seed: u64) -> String {
        let date = utc_date(created_at);
        if names.date != date {
            // Counting on from the highest number on disk keeps names in creation order.
            let highest = [
                self.images_dir.join(&date),
                self.images_dir.join(TRASH_DIR).join(&date),
            ]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let name = name.to_str()?;
                name.split('-').next()?.parse::<u32>().ok()
            })
            .max()
            .unwrap_or(0);
            names.date = date.clone();
            names.next = highest.saturating_add(1);
        }
        loop {
            let file = format!("{date}/{:05}-{seed}.png", names.next);
            names.next = names.next.saturating_add(1);
            let taken = self.images_dir.join(&file).exists()
                || self.images_dir.join(TRASH_DIR).join(&file).exists();
            if !taken {
                return file;
            }
        }
    }

    /// Make the index match the folder: index files that have no row, drop rows whose file is
    /// gone, fix rows whose file moved in or out of the trash or was edited, delete our stale
    /// temp files. A file that cannot be indexed becomes a warning, never an error: the app must
    /// start whatever is in the folder.
    fn reconcile(&self) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let mut files = Vec::new();
        self.walk(&self.images_dir, "", 0, &mut files, &mut report)?;
        let mut on_disk: HashMap<(String, bool), FoundFile> = files
            .into_iter()
            .map(|f| ((f.rel.clone(), f.trashed), f))
            .collect();

        let rows: Vec<IndexedRow> = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare(
                    "SELECT id, file, trashed_at IS NOT NULL, width, height, file_mtime_ns, \
                     file_size FROM images",
                )
                .map_err(self.db_err())?;
            let rows = stmt
                .query_map([], |r| {
                    let mtime_ns: Option<i64> = r.get(5)?;
                    let size: Option<i64> = r.get(6)?;
                    Ok(IndexedRow {
                        id: r.get(0)?,
                        file: r.get(1)?,
                        trashed: r.get(2)?,
                        size: (r.get(3)?, r.get(4)?),
                        stamp: mtime_ns
                            .zip(size)
                            .map(|(mtime_ns, size)| FileStamp { mtime_ns, size }),
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(self.db_err())?;
            rows
        };
        let renamed = self.separate_same_names(&mut on_disk, &rows, &mut report);

        let mut known = HashSet::new();
        {
            let mut conn = self.conn();
            let tx = conn.transaction().map_err(self.db_err())?;
            for row in &rows {
                let mut file = row.file.clone();
                if let Some(new) = renamed.get(&file).filter(|_| row.trashed) {
                    tx.execute(
                        "UPDATE images SET file = ?1 WHERE id = ?2",
                        params![new, row.id],
                    )
                    .map_err(self.db_err())?;
                    file = new.clone();
                }
                let key = if on_disk.contains_key(&(file.clone(), row.trashed)) {
                    (file, row.trashed)
                } else if on_disk.contains_key(&(file.clone(), !row.trashed)) {
                    // A crash between moving the file and updating the row.
                    let at = (!row.trashed).then(now_ms);
                    tx.execute(
                        "UPDATE images SET trashed_at = ?1 WHERE id = ?2",
                        params![at, row.id],
                    )
                    .map_err(self.db_err())?;
                    (file, !row.trashed)
                } else {
                    tx.execute("DELETE FROM images WHERE id = ?1", [row.id])
                        .map_err(self.db_err())?;
                    self.remove_thumbnail(&file);
                    report.removed += 1;
                    continue;
                };
                if let Some(found) = on_disk.get(&key) {
                    self.refresh_if_changed(&tx, row, found, &mut report)
                        .map_err(self.db_err())?;
                }
                known.insert(key);
            }
            tx.commit().map_err(self.db_err())?;
        }

        let mut new: Vec<_> = on_disk
            .into_iter()
            .filter(|(key, _)| !known.contains(key))
            .map(|(_, found)| found)
            .collect();
        new.sort_by(|a, b| (&a.rel, a.trashed).cmp(&(&b.rel, b.trashed)));
        let mut records = Vec::new();
        for found in new {
            match record_from_file(&found.path, found.rel, found.trashed) {
                Ok(rec) => records.push((found.path, rec)),
                Err(why) => {
                    let msg = format!(
                        "{} was not added to the gallery: {why}",
                        found.path.display()
                    );
                    tracing::warn!("{msg}");
                    report.warnings.push(msg);
                }
            }
        }
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.db_err())?;
        for (path, (rec, stamp)) in &records {
            match insert(&tx, rec, Some(*stamp)) {
                Ok(_) => report.added += 1,
                // separate_same_names leaves no clash; should one remain anyway, that one file
                // stays out of the index rather than the whole app failing to start. A failed
                // statement does not end the transaction.
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    let msg = format!(
                        "{} was not added to the gallery: another picture has the same name. \
                         Rename it or move it to another folder, then restart the app.",
                        path.display()
                    );
                    tracing::warn!("{msg}");
                    report.warnings.push(msg);
                }
                Err(e) => return Err(self.db_err()(e)),
            }
        }
        tx.commit().map_err(self.db_err())?;
        if report.added + report.removed > 0 {
            tracing::info!(
                added = report.added,
                removed = report.removed,
                "gallery index reconciled with the images folder"
            );
        }
        Ok(report)
    }

    /// One relative name in the gallery and in the trash at once (a trashed picture copied back
    /// by hand) would be two rows with the same `file`. The trashed copy is renamed within the
    /// trash (`<name>-2.png`), which is ours to manage, so both stay visible and the user's file
    /// is left where they put it. Returns the trash renames, old name to new.
    fn separate_same_names(
        &self,
        on_disk: &mut HashMap<(String, bool), FoundFile>,
        rows: &[IndexedRow],
        report: &mut ReconcileReport,
    ) -> HashMap<String, String> {
        let mut clashes: Vec<String> = on_disk
            .keys()
            .filter(|(rel, trashed)| *trashed && on_disk.contains_key(&(rel.clone(), false)))
            .map(|(rel, _)| rel.clone())
            .collect();
        clashes.sort();
        let mut taken: HashSet<String> = rows.iter().map(|r| r.file.clone()).collect();
        taken.extend(on_disk.keys().map(|(rel, _)| rel.clone()));
        let trash = self.images_dir.join(TRASH_DIR);
        let mut renamed = HashMap::new();
        for rel in clashes {
            let Some(mut found) = on_disk.remove(&(rel.clone(), true)) else {
                continue;
            };
            let free = (2..MAX_RENAME_TRIES)
                .map(|n| numbered_name(&rel, n))
                .find(|name| {
                    !taken.contains(name)
                        && !join_relative(&self.images_dir, name).exists()
                        && !join_relative(&trash, name).exists()
                });
            let moved = match free {
                Some(name) => {
                    let to = join_relative(&trash, &name);
                    match std::fs::rename(&found.path, &to) {
                        Ok(()) => Ok((name, to)),
                        Err(e) => Err(e.to_string()),
                    }
                }
                None => Err("no free name was found".to_owned()),
            };
            match moved {
                Ok((name, to)) => {
                    tracing::info!(
                        from = %found.path.display(),
                        to = %to.display(),
                        "trashed picture renamed: a picture of the same name is in the gallery"
                    );
                    // The thumbnail may show either copy; each is made again when asked for.
                    self.remove_thumbnail(&rel);
                    taken.insert(name.clone());
                    found.rel = name.clone();
                    found.path = to;
                    on_disk.insert((name.clone(), true), found);
                    renamed.insert(rel, name);
                }
                Err(why) => {
                    // Keep the copy the index already has; with neither indexed, the gallery one.
                    let row_trashed = rows.iter().find(|r| r.file == rel).map(|r| r.trashed);
                    let gallery_path = join_relative(&self.images_dir, &rel);
                    let left_out = if row_trashed == Some(true) {
                        on_disk.insert((rel.clone(), true), found);
                        on_disk.remove(&(rel.clone(), false));
                        gallery_path
                    } else {
                        found.path
                    };
                    let msg = format!(
                        "{} was not added to the gallery: the gallery and the trash both hold a \
                         picture named {rel}, and the trashed one could not be renamed ({why}). \
                         Move one of them out of the images folder, then restart the app.",
                        left_out.display()
                    );
                    tracing::warn!("{msg}");
                    report.warnings.push(msg);
                }
            }
        }
        renamed
    }

    /// A file edited or replaced outside the app since it was indexed: take its new pixel size
    /// (the settings text stays; an editor often drops it) and drop its outdated thumbnail.
    fn refresh_if_changed(
        &self,
        tx: &Connection,
        row: &IndexedRow,
        found: &FoundFile,
        report: &mut ReconcileReport,
    ) -> rusqlite::Result<()> {
        if row.stamp == Some(found.stamp) {
            return Ok(());
        }
        let (width, height) = match crate::image_file::read_png_size(&found.path) {
            Ok(size) => size,
            Err(e) => {
                let msg = format!(
                    "{} could not be read ({e}); the gallery shows it as it was. Open it in an \
                     image editor and save it as PNG again, or move it to the trash.",
                    found.path.display()
                );
                tracing::warn!("{msg}");
                report.warnings.push(msg);
                return Ok(());
            }
        };
        tx.execute(
            "UPDATE images SET width = ?1, height = ?2, file_mtime_ns = ?3, file_size = ?4 \
             WHERE id = ?5",
            params![
                width,
                height,
                found.stamp.mtime_ns,
                found.stamp.size,
                row.id
            ],
        )?;
        // Rows from schema 1 have no stamp: nothing says their file changed, so their
        // thumbnails stay (thumbnail_path still remakes one older than its image).
        if row.stamp.is_some() || (width, height) != row.size {
            self.remove_thumbnail(&found.rel);
        }
        Ok(())
    }

    /// Collect the PNGs under `dir`.
    fn walk(
        &self,
        dir: &Path,
        rel: &str,
        depth: usize,
        out: &mut Vec<FoundFile>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if depth > 0 => {
                report
                    .warnings
                    .push(format!("could not read the folder {}: {e}", dir.display()));
                return Ok(());
            }
            Err(e) => return Err(io_err(dir)(e)),
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            // Symlinks are not followed: the gallery owns only what is really in its folder.
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if kind.is_dir() {
                if depth < MAX_WALK_DEPTH {
                    self.walk(&path, &child_rel, depth + 1, out, report)?;
                }
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            if is_our_temp_file(&name) {
                if is_stale(&path, &name) {
                    match std::fs::remove_file(&path) {
                        Ok(()) => tracing::info!(path = %path.display(), "stale temp file removed"),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "stale temp file not removed")
                        }
                    }
                }
                continue;
            }
            if name.starts_with('.') || !name.to_ascii_lowercase().ends_with(".png") {
                continue;
            }
            // Gone since the folder was listed: like a file that was never there.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let stamp = FileStamp::of(&meta);
            let (top, rest) = child_rel.split_once('/').unwrap_or(("", &child_rel));
            let (rel, trashed) = match top {
                THUMBS_DIR => continue,
                TRASH_DIR => (rest.to_owned(), true),
                _ => (child_rel, false),
            };
            out.push(FoundFile {
                rel,
                trashed,
                path,
                stamp,
            });
        }
        Ok(())
    }
}

fn insert(conn: &Connection, r: &ImageRecord, stamp: Option<FileStamp>) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO images (file, prompt, negative_prompt, model, sampler, schedule, steps, \
         cfg_scale, seed, width, height, created_at, favourite, trashed_at, parameters, \
         file_mtime_ns, file_size) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            r.file,
            r.prompt,
            r.negative_prompt,
            r.model,
            r.sampler,
            r.schedule,
            r.steps,
            r.cfg_scale,
            // SQLite integers are i64; seeds are u64, so the bits are stored as they are.
            r.seed.map(|s| s as i64),
            r.width,
            r.height,
            r.created_at,
            r.favourite,
            r.trashed_at,
            r.parameters,
            stamp.map(|s| s.mtime_ns),
            stamp.map(|s| s.size),
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// A PNG found in the images folder.
struct FoundFile {
    /// Relative to the images folder, or to the trash folder when `trashed`.
    rel: String,
    trashed: bool,
    path: PathBuf,
    stamp: FileStamp,
}

/// The part of a row reconcile needs.
struct IndexedRow {
    id: i64,
    file: String,
    trashed: bool,
    size: (u32, u32),
    /// `None` for rows made by schema 1.
    stamp: Option<FileStamp>,
}

/// `2026-01-01/00001-5.png` with `n` = 2 gives `2026-01-01/00001-5-2.png`.
fn numbered_name(rel: &str, n: u32) -> String {
    let (dir, name) = match rel.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name),
        None => (String::new(), rel),
    };
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{dir}{stem}-{n}.{ext}"),
        _ => format!("{dir}{name}-{n}"),
    }
}

/// What reconcile compares to tell whether a file changed since it was indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    /// Modified time, unix nanoseconds (0 when the file system does not keep one).
    mtime_ns: i64,
    size: i64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        FileStamp {
            mtime_ns,
            size: i64::try_from(meta.len()).unwrap_or(i64::MAX),
        }
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRecord> {
    let trashed_at: Option<i64> = r.get(14)?;
    Ok(ImageRecord {
        id: r.get(0)?,
        file: r.get(1)?,
        prompt: r.get(2)?,
        negative_prompt: r.get(3)?,
        model: r.get(4)?,
        sampler: r.get(5)?,
        schedule: r.get(6)?,
        steps: r.get(7)?,
        cfg_scale: r.get(8)?,
        seed: r.get::<_, Option<i64>>(9)?.map(|s| s as u64),
        width: r.get(10)?,
        height: r.get(11)?,
        created_at: r.get(12)?,
        favourite: r.get(13)?,
        trashed: trashed_at.is_some(),
        trashed_at,
        parameters: r.get(15)?,
    })
}

/// An index row for a PNG found in the folder, with the settings its text chunks hold (ours,
/// A1111's, ComfyUI's or InvokeAI's).
fn record_from_file(
    path: &Path,
    file: String,
    trashed: bool,
) -> Result<(ImageRecord, FileStamp), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_INDEXED_FILE {
        return Err(format!("it is larger than {} MiB", MAX_INDEXED_FILE >> 20));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let png = metadata::read_png_text(&bytes).map_err(|e| e.to_string())?;
    let parameters = png
        .chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let found = metadata::inspect_text(png.chunks);
    let created_at = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or_else(now_ms);
    let record = ImageRecord {
        id: 0,
        file,
        prompt: found.prompt.unwrap_or_default(),
        negative_prompt: found.negative_prompt.unwrap_or_default(),
        model: found.model,
        sampler: found.sampler,
        schedule: found.schedule,
        steps: found.steps,
        cfg_scale: found.cfg_scale,
        seed: found.seed,
        width: png.width,
        height: png.height,
        created_at,
        favourite: false,
        trashed,
        trashed_at: trashed.then_some(created_at),
        parameters,
    };
    Ok((record, FileStamp::of(&meta)))
}

fn open_db(path: &Path) -> Result<Connection> {
    let db_err = |source| GalleryError::Database {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(db_err)?;
    // WAL: readers do not wait for a save; NORMAL sync is safe with WAL (only the last commit can
    // be lost on power failure, and reconcile re-adds its file).
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
        .map_err(db_err)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(db_err)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    match version {
        0 => {
            conn.execute_batch(&format!(
                "BEGIN; {} {INDEXES} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;",
                images_table("images")
            ))
            .map_err(db_err)?;
        }
        1 => migrate_from_v1(&mut conn).map_err(db_err)?,
        SCHEMA_VERSION => {}
        found if found > SCHEMA_VERSION => {
            return Err(GalleryError::NewerSchema {
                path: path.to_path_buf(),
                found,
                supported: SCHEMA_VERSION,
            })
        }
        found => {
            // No older schema has been released; treat it as damage rather than guess.
            return Err(db_err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(format!("unknown gallery schema version {found}")),
            )));
        }
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(db_err)?;
    if check != "ok" {
        return Err(db_err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(check),
        )));
    }
    Ok(conn)
}

/// Schema 1 to 2: the images table gains `AUTOINCREMENT` and the file stamp columns. SQLite
/// cannot add `AUTOINCREMENT` with `ALTER TABLE`, so the table is made again and the rows copied,
/// as <https://www.sqlite.org/lang_altertable.html#otheralter> describes. One transaction: a
/// crash leaves schema 1 as it was and the next open tries again. Ids are copied as they are, and
/// `sqlite_sequence` starts at the highest of them (ids deleted above it while schema 1 was in
/// use were already free for reuse and cannot be known now).
fn migrate_from_v1(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Dropping the old table drops its indexes and triggers; note every one the database really
    // has (not just the ones schema 1 made) to make them again on the new table.
    let extras: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'images' \
             AND type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY type, name",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    tx.execute_batch(&format!(
        "{} INSERT INTO images_new ({COLUMNS}) SELECT {COLUMNS} FROM images; \
         DROP TABLE images; ALTER TABLE images_new RENAME TO images;",
        images_table("images_new")
    ))?;
    for sql in &extras {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    tracing::info!("gallery index upgraded to schema {SCHEMA_VERSION}");
    Ok(())
}

/// The highest id a moved-aside index handed out, read as far as the damage allows; `None`
/// when nothing can be read.
fn highest_id_in(path: &Path) -> Option<i64> {
    let conn =
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let max_row = conn
        .query_row("SELECT MAX(id) FROM images", [], |r| {
            r.get::<_, Option<i64>>(0)
        })
        .ok()
        .flatten();
    // Schema 1 has no sqlite_sequence; an error here is expected then.
    let sequence = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'images'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .ok();
    max_row
        .into_iter()
        .chain(sequence)
        .max()
        // A damaged page can read as any number; one this large would leave no ids to hand out.
        .filter(|id| (0..i64::MAX / 2).contains(id))
}

/// Start the new index's ids above `floor`, so a rebuilt index does not hand out again ids that
/// the damaged one gave to pictures (and that character avatars may still name).
fn start_ids_above(conn: &Connection, floor: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'images', ?1 \
         WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'images')",
        [floor],
    )?;
    conn.execute(
        "UPDATE sqlite_sequence SET seq = MAX(seq, ?1) WHERE name = 'images'",
        [floor],
    )?;
    Ok(())
}

fn is_corruption(e: &GalleryError) -> bool {
    match e {
        GalleryError::Database {
            source: rusqlite::Error::SqliteFailure(f, _),
            ..
        } => matches!(
            f.code,
            rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
        ),
        _ => false,
    }
}

/// Rename a damaged index (and its WAL) to `<name>.corrupt-<unix ms>`; never delete it, it may
/// still be rescued by hand.
fn move_aside(db_path: &Path) -> Result<PathBuf> {
    let stamp = now_ms();
    let name = db_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gallery.sqlite".to_owned());
    let aside = db_path.with_file_name(format!("{name}.corrupt-{stamp}"));
    std::fs::rename(db_path, &aside).map_err(io_err(db_path))?;
    for suffix in ["-wal", "-shm"] {
        let side = db_path.with_file_name(format!("{name}{suffix}"));
        if side.exists() {
            let to = db_path.with_file_name(format!("{name}.corrupt-{stamp}{suffix}"));
            std::fs::rename(&side, &to).map_err(io_err(&side))?;
        }
    }
    Ok(aside)
}

/// Whether `derived` (a thumbnail) exists and was written no earlier than `source` was last
/// modified. Trash and restore rename files, which keeps their modified time; `save` writes the
/// thumbnail after the image.
fn is_up_to_date(derived: &Path, source: &Path) -> bool {
    let modified = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
    };
    match (modified(derived), modified(source)) {
        (Some(d), Some(s)) => d >= s,
        _ => false,
    }
}

/// PNG bytes of a thumbnail at most [`THUMBNAIL_SIZE`] on the long side (never enlarged).
fn thumbnail_png(img: image::DynamicImage) -> Result<Vec<u8>, image::ImageError> {
    let img = if img.width() > THUMBNAIL_SIZE || img.height() > THUMBNAIL_SIZE {
        img.thumbnail(THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    } else {
        img
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Rename within the images folder, making the target's folder first.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    std::fs::rename(from, to).map_err(io_err(from))
}

/// `base` joined with a '/'-separated relative path, keeping only plain components: the index
/// is ours, but a hand-edited row must still not point outside the folder.
fn join_relative(base: &Path, rel: &str) -> PathBuf {
    let mut out = base.to_path_buf();
    for part in Path::new(rel).components() {
        if let Component::Normal(p) = part {
            out.push(p);
        }
    }
    out
}

/// Temp files as `fsutil::write_atomic` names them.
fn is_our_temp_file(name: &str) -> bool {
    crate::fsutil::temp_file_owner(name).is_some()
}

/// Left by another process (a crash), or old enough that no save of ours is still writing it.
fn is_stale(path: &Path, name: &str) -> bool {
    let other_process = crate::fsutil::temp_file_owner(name) != Some(std::process::id());
    let old = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > STALE_TEMP_AGE);
    other_process || old
}

/// `%`, `_` and the escape character itself match literally.
fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// "2026-11-26" in UTC (the `time` crate cannot read the local offset safely in a threaded
/// program).
fn utc_date(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let d = t.date();
    format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn info(prompt: &str, seed: u64) -> Infotext {
        Infotext {
            prompt: prompt.into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "Euler".into(),
            schedule: Some("Karras".into()),
            cfg_scale: 7.5,
            seed,
            width: 8,
            height: 8,
            model_hash: None,
            model: Some("tiny".into()),
            clip_skip: 1,
            extra: Vec::new(),
        }
    }

    fn image(prompt: &str, seed: u64) -> NewImage {
        NewImage {
            rgb: (0..8 * 8 * 3).map(|i| (i * 7) as u8).collect(),
            width: 8,
            height: 8,
            infotext: info(prompt, seed),
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn images(&self) -> PathBuf {
            self.dir.path().join("images")
        }
        fn db(&self) -> PathBuf {
            self.dir.path().join("gallery.sqlite")
        }
        fn open(&self) -> (Gallery, ReconcileReport) {
            Gallery::open(&self.images(), &self.db()).unwrap()
        }
    }

    /// Every file under `dir`, relative, sorted.
    fn files_under(dir: &Path) -> Vec<String> {
        fn go(dir: &Path, rel: &str, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                let r = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                if e.file_type().unwrap().is_dir() {
                    go(&e.path(), &r, out);
                } else {
                    out.push(r);
                }
            }
        }
        let mut out = Vec::new();
        go(dir, "", &mut out);
        out.sort();
        out
    }

    #[test]
    fn gallery_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Gallery>();
    }

    #[test]
    fn save_get_list() {
        let f = Fixture::new();
        let (g, report) = f.open();
        assert_eq!(report, ReconcileReport::default());
        let rec = g.save(image("a red fox", u64::MAX)).unwrap();
        assert_eq!(rec.seed, Some(u64::MAX), "u64 seeds survive the i64 column");
        let got = g.get(rec.id).unwrap().unwrap();
        assert_eq!(got, rec);
        assert_eq!(got.sampler.as_deref(), Some("Euler"));
        assert_eq!(got.schedule.as_deref(), Some("Karras"));
        assert_eq!((got.width, got.height), (8, 8));
        assert!(got
            .parameters
            .starts_with("a red fox\nNegative prompt: blurry\nSteps: 20"));
        // A1111-like name: date folder, 5-digit counter, seed.
        let (date, name) = rec.file.split_once('/').unwrap();
        assert_eq!(date, utc_date(rec.created_at));
        assert_eq!(name, format!("00001-{}.png", u64::MAX));
        // The PNG carries the parameters.
        let bytes = std::fs::read(g.file_path(&rec)).unwrap();
        assert_eq!(
            crate::image_file::read_parameters(&bytes).as_deref(),
            Some(rec.parameters.as_str())
        );
        let page = g.list(&ImageQuery::default()).unwrap();
        assert_eq!(page.total, 1);
        assert_eq!(page.items, vec![rec.clone()]);
        assert_eq!(g.get(rec.id + 1).unwrap(), None);
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["file"], rec.file.as_str());
        assert_eq!(json["trashed"], false);
    }

    #[test]
    fn save_leaves_no_temp_file_and_writes_a_thumbnail() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let big = NewImage {
            rgb: vec![200; 600 * 300 * 3],
            width: 600,
            height: 300,
            infotext: info("wide", 1),
        };
        let rec = g.save(big).unwrap();
        let small = g.save(image("small", 2)).unwrap();
        let files = files_under(&f.images());
        assert_eq!(
            files,
            vec![
                format!(".thumbs/{}", rec.file),
                format!(".thumbs/{}", small.file),
                rec.file.clone(),
                small.file.clone(),
            ]
        );
        let thumb = g.thumbnail_path(&rec).unwrap();
        let t = image::open(&thumb).unwrap();
        assert_eq!((t.width(), t.height()), (256, 128));
        // Small images are not enlarged.
        let t = image::open(g.thumbnail_path(&small).unwrap()).unwrap();
        assert_eq!((t.width(), t.height()), (8, 8));
    }

    #[test]
    fn missing_thumbnail_is_made_again() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        let thumb = g.thumbnail_path(&rec).unwrap();
        std::fs::remove_file(&thumb).unwrap();
        assert_eq!(g.thumbnail_path(&rec).unwrap(), thumb);
        assert!(thumb.is_file());
        // A trashed image's thumbnail comes from the trash folder.
        g.trash(rec.id).unwrap();
        std::fs::remove_file(&thumb).unwrap();
        let rec = g.get(rec.id).unwrap().unwrap();
        assert!(g.thumbnail_path(&rec).unwrap().is_file());
        std::fs::remove_file(&thumb).unwrap();
        std::fs::remove_file(g.file_path(&rec)).unwrap();
        assert!(matches!(
            g.thumbnail_path(&rec),
            Err(GalleryError::FileMissing { .. })
        ));
    }

    #[test]
    fn bad_pixel_buffer_is_an_error_and_writes_nothing() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let mut img = image("x", 1);
        img.rgb.pop();
        assert!(matches!(g.save(img), Err(GalleryError::Encode(_))));
        assert!(files_under(&f.images()).is_empty());
        assert_eq!(g.list(&ImageQuery::default()).unwrap().total, 0);
    }

    #[test]
    fn search_treats_percent_and_underscore_literally() {
        let f = Fixture::new();
        let (g, _) = f.open();
        for p in [
            "100% cotton",
            "100 cotton",
            "snake_case",
            "snakeXcase",
            "Red FOX",
        ] {
            g.save(image(p, 1)).unwrap();
        }
        let search = |s: &str| -> Vec<String> {
            let mut v: Vec<_> = g
                .list(&ImageQuery {
                    search: Some(s.into()),
                    ..Default::default()
                })
                .unwrap()
                .items
                .into_iter()
                .map(|r| r.prompt)
                .collect();
            v.sort();
            v
        };
        assert_eq!(search("100%"), ["100% cotton"]);
        assert_eq!(search("e_c"), ["snake_case"]);
        assert_eq!(search("red fox"), ["Red FOX"], "case-insensitive");
        assert_eq!(search("  fox "), ["Red FOX"], "trimmed");
        assert_eq!(search("\\"), Vec::<String>::new());
        assert_eq!(search("").len(), 5, "an empty search lists everything");
    }

    #[test]
    fn filters_and_paging() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let mut ids = Vec::new();
        for i in 0..7 {
            let mut img = image(&format!("cat {i}"), i);
            if i % 2 == 0 {
                img.infotext.model = Some("other".into());
            }
            ids.push(g.save(img).unwrap().id);
        }
        // Spread created_at so since/until and order are exact.
        {
            let conn = g.conn();
            for (i, id) in ids.iter().enumerate() {
                conn.execute(
                    "UPDATE images SET created_at = ?1 WHERE id = ?2",
                    params![1000 * (i as i64 + 1), id],
                )
                .unwrap();
            }
        }
        let list = |q: ImageQuery| {
            let page = g.list(&q).unwrap();
            (
                page.items
                    .iter()
                    .map(|r| r.seed.unwrap())
                    .collect::<Vec<_>>(),
                page.total,
            )
        };
        assert_eq!(list(ImageQuery::default()), (vec![6, 5, 4, 3, 2, 1, 0], 7));
        let page = |offset, limit| ImageQuery {
            offset,
            limit,
            ..Default::default()
        };
        assert_eq!(list(page(0, 3)), (vec![6, 5, 4], 7));
        assert_eq!(list(page(3, 3)), (vec![3, 2, 1], 7));
        assert_eq!(list(page(6, 3)), (vec![0], 7));
        assert_eq!(list(page(9, 3)), (vec![], 7));
        let model = ImageQuery {
            model: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(list(model), (vec![6, 4, 2, 0], 4));
        let window = ImageQuery {
            since: Some(2000),
            until: Some(5000),
            ..Default::default()
        };
        assert_eq!(
            list(window),
            (vec![3, 2, 1], 3),
            "since inclusive, until exclusive"
        );
        g.set_favourite(ids[1], true).unwrap();
        g.set_favourite(ids[5], true).unwrap();
        g.set_favourite(ids[5], false).unwrap();
        g.set_favourite(ids[3], true).unwrap();
        let fav = ImageQuery {
            favourites_only: true,
            ..Default::default()
        };
        assert_eq!(list(fav.clone()), (vec![3, 1], 2));
        assert!(g.get(ids[1]).unwrap().unwrap().favourite);
        assert!(matches!(
            g.set_favourite(9999, true),
            Err(GalleryError::NotFound { id: 9999 })
        ));
        // Limits are capped.
        assert_eq!(
            g.list(&page(0, 100_000)).unwrap().items.len(),
            7,
            "a huge limit is cut, not refused"
        );
    }

    #[test]
    fn limit_is_capped_at_max_page() {
        let f = Fixture::new();
        let (g, _) = f.open();
        {
            let mut conn = g.conn();
            let tx = conn.transaction().unwrap();
            for i in 0..(MAX_PAGE + 50) {
                let mut rec = g_record(i);
                rec.file = format!("x/{i}.png");
                insert(&tx, &rec, None).unwrap();
            }
            tx.commit().unwrap();
        }
        let page = g
            .list(&ImageQuery {
                limit: 10_000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.items.len(), MAX_PAGE);
        assert_eq!(page.total, (MAX_PAGE + 50) as u64);
        assert_eq!(
            g.list(&ImageQuery::default()).unwrap().items.len(),
            DEFAULT_PAGE
        );
    }

    fn g_record(i: usize) -> ImageRecord {
        ImageRecord {
            id: 0,
            file: String::new(),
            prompt: format!("prompt {i}"),
            negative_prompt: String::new(),
            model: None,
            sampler: None,
            schedule: None,
            steps: None,
            cfg_scale: None,
            seed: None,
            width: 8,
            height: 8,
            created_at: i as i64,
            favourite: i.is_multiple_of(10),
            trashed: false,
            trashed_at: None,
            parameters: String::new(),
        }
    }

    #[test]
    fn lists_use_the_indexes() {
        // Thousands of rows must not mean a full scan plus sort for every page.
        let f = Fixture::new();
        let (g, _) = f.open();
        let conn = g.conn();
        for sql in [
            "SELECT * FROM images WHERE trashed_at IS NULL ORDER BY created_at DESC, id DESC LIMIT 50",
            "SELECT * FROM images WHERE trashed_at IS NOT NULL ORDER BY created_at DESC, id DESC LIMIT 50",
            "SELECT * FROM images WHERE trashed_at IS NULL AND favourite = 1 ORDER BY created_at DESC, id DESC LIMIT 50",
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let plan = plan.join("; ");
            assert!(plan.contains("INDEX images_"), "{sql}: {plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{sql}: {plan}");
        }
    }

    #[test]
    fn trash_restore_and_empty() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let keep = g.save(image("keep", 1)).unwrap();
        let gone = g.save(image("gone", 2)).unwrap();
        let path = g.file_path(&gone);
        g.trash(gone.id).unwrap();
        g.trash(gone.id).unwrap(); // twice is fine
        assert!(!path.exists());
        let trashed = g.get(gone.id).unwrap().unwrap();
        assert!(trashed.trashed && trashed.trashed_at.is_some());
        let tpath = g.file_path(&trashed);
        assert!(tpath.is_file());
        assert!(tpath.starts_with(f.images().join(".trash")));

        let normal = g.list(&ImageQuery::default()).unwrap();
        assert_eq!(
            normal.items.iter().map(|r| r.id).collect::<Vec<_>>(),
            [keep.id]
        );
        let trash_q = ImageQuery {
            trashed: true,
            ..Default::default()
        };
        let in_trash = g.list(&trash_q).unwrap();
        assert_eq!((in_trash.total, in_trash.items[0].id), (1, gone.id));

        g.restore(gone.id).unwrap();
        assert!(path.is_file() && !tpath.exists());
        assert_eq!(g.list(&ImageQuery::default()).unwrap().total, 2);
        assert_eq!(g.empty_trash().unwrap(), 0, "nothing in the trash");

        g.trash(gone.id).unwrap();
        let thumb = f.images().join(".thumbs").join(&gone.file);
        assert!(thumb.is_file());
        assert_eq!(g.empty_trash().unwrap(), 1);
        assert_eq!(g.get(gone.id).unwrap(), None);
        assert!(!tpath.exists() && !thumb.exists());
        assert!(g.get(keep.id).unwrap().is_some());
        assert!(g.file_path(&keep).is_file());
        assert!(matches!(
            g.trash(gone.id),
            Err(GalleryError::NotFound { .. })
        ));
        assert!(matches!(
            g.restore(gone.id),
            Err(GalleryError::NotFound { .. })
        ));
    }

    #[test]
    fn trashing_never_replaces_a_trashed_file_of_the_same_name() {
        // As on a case-insensitive disk, where `Cat.png` meets a trashed `cat.png`.
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        let before = std::fs::read(g.file_path(&rec)).unwrap();
        let older = f.images().join(".trash").join(&rec.file);
        std::fs::create_dir_all(older.parent().unwrap()).unwrap();
        std::fs::write(&older, b"an older trashed picture").unwrap();
        g.trash(rec.id).unwrap();
        assert_eq!(std::fs::read(&older).unwrap(), b"an older trashed picture");
        let trashed = g.get(rec.id).unwrap().unwrap();
        assert!(trashed.trashed);
        assert_ne!(trashed.file, rec.file);
        assert_eq!(std::fs::read(g.file_path(&trashed)).unwrap(), before);
        g.restore(rec.id).unwrap();
        let back = g.get(rec.id).unwrap().unwrap();
        assert_eq!(std::fs::read(g.file_path(&back)).unwrap(), before);
        assert!(g.file_path(&back).starts_with(f.images()) && !back.trashed);
    }

    #[test]
    fn restore_refuses_to_overwrite() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        let path = g.file_path(&rec);
        g.trash(rec.id).unwrap();
        std::fs::write(&path, b"someone else's file").unwrap();
        assert!(matches!(
            g.restore(rec.id),
            Err(GalleryError::RestoreConflict { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's file");
    }

    #[test]
    fn new_names_skip_numbers_used_in_the_trash() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let a = g.save(image("a", 5)).unwrap();
        g.trash(a.id).unwrap();
        drop(g);
        // A new process starts counting from the files on disk, trash included.
        let (g, _) = f.open();
        let b = g.save(image("b", 5)).unwrap();
        assert_ne!(a.file, b.file);
        assert!(b.file.ends_with("/00002-5.png"), "{}", b.file);
        g.restore(a.id).unwrap();
    }

    #[test]
    fn reconcile_adds_files_and_removes_rows() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let a = g.save(image("a", 1)).unwrap();
        let b = g.save(image("b", 2)).unwrap();
        let c = g.save(image("c", 3)).unwrap();
        g.set_favourite(a.id, true).unwrap();
        g.trash(c.id).unwrap();
        let c = g.get(c.id).unwrap().unwrap();
        drop(g);

        // b's file disappears; two files arrive: an A1111 one and one with no text at all.
        std::fs::remove_file(f.images().join(&b.file)).unwrap();
        let a1111 =
            "from a1111\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 77, Size: 8x8";
        let png = crate::image_file::encode_png(&[9; 8 * 8 * 3], 8, 8, a1111).unwrap();
        std::fs::create_dir_all(f.images().join("imported/deeper")).unwrap();
        std::fs::write(f.images().join("imported/deeper/x.PNG"), &png).unwrap();
        let mut plain = Vec::new();
        image::RgbImage::new(4, 2)
            .write_to(
                &mut std::io::Cursor::new(&mut plain),
                image::ImageFormat::Png,
            )
            .unwrap();
        std::fs::write(f.images().join("plain.png"), &plain).unwrap();
        // Not images of ours: ignored.
        std::fs::write(f.images().join("notes.txt"), b"hi").unwrap();
        std::fs::write(f.images().join(".thumbs/orphan.png"), &plain).unwrap();
        std::fs::write(f.images().join("broken.png"), b"not a png").unwrap();

        let (g, report) = f.open();
        assert_eq!((report.added, report.removed), (2, 1), "{report:?}");
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        assert!(report.warnings[0].contains("broken.png"), "{report:?}");
        assert_eq!(g.get(b.id).unwrap(), None);
        assert!(!f.images().join(".thumbs").join(&b.file).exists());
        let kept = g.get(a.id).unwrap().unwrap();
        assert!(kept.favourite, "rows that match a file are untouched");
        assert_eq!(
            g.get(c.id).unwrap().unwrap(),
            c,
            "trashed rows stay trashed"
        );

        let all = g.list(&ImageQuery::default()).unwrap();
        assert_eq!(all.total, 3);
        let imported = all
            .items
            .iter()
            .find(|r| r.file == "imported/deeper/x.PNG")
            .expect("imported file indexed");
        assert_eq!(imported.prompt, "from a1111");
        assert_eq!(imported.seed, Some(77));
        assert_eq!(imported.sampler.as_deref(), Some("DPM++ 2M Karras"));
        assert_eq!(imported.parameters, a1111);
        let mtime = std::fs::metadata(f.images().join("imported/deeper/x.PNG"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!(imported.created_at, mtime);
        let plain_rec = all.items.iter().find(|r| r.file == "plain.png").unwrap();
        assert_eq!((plain_rec.width, plain_rec.height), (4, 2));
        assert_eq!((plain_rec.steps, plain_rec.seed), (None, None));
        assert!(g.thumbnail_path(plain_rec).unwrap().is_file());

        // Opening again finds nothing to do.
        drop(g);
        let (_, report) = f.open();
        assert_eq!((report.added, report.removed), (0, 0));
    }

    #[test]
    fn reconcile_follows_a_file_moved_by_an_interrupted_trash() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        g.set_favourite(rec.id, true).unwrap();
        drop(g);
        // The file reached the trash but the row was not updated.
        let to = f.images().join(".trash").join(&rec.file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(f.images().join(&rec.file), &to).unwrap();
        let (g, report) = f.open();
        assert_eq!((report.added, report.removed), (0, 0));
        let now = g.get(rec.id).unwrap().unwrap();
        assert!(now.trashed && now.favourite);
    }

    #[test]
    fn reconcile_indexes_trash_files_without_rows() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        g.trash(rec.id).unwrap();
        drop(g);
        std::fs::remove_file(f.db()).unwrap();
        let (g, report) = f.open();
        assert_eq!(report.added, 1);
        let page = g
            .list(&ImageQuery {
                trashed: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.items[0].file, rec.file);
        assert_eq!(g.empty_trash().unwrap(), 1);
        assert!(files_under(&f.images().join(".trash")).is_empty());
    }

    #[test]
    fn stale_temp_files_are_removed_and_fresh_ones_kept() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.images().join("2026-01-01")).unwrap();
        let stale = f.images().join("2026-01-01/.00001-1.png.tmp-4000000000");
        let ours = f.images().join(format!(
            "2026-01-01/.00002-1.png.tmp-{}",
            std::process::id()
        ));
        let not_ours = f.images().join("2026-01-01/.hidden.png");
        for p in [&stale, &ours, &not_ours] {
            std::fs::write(p, b"half a png").unwrap();
        }
        let (_, report) = f.open();
        assert_eq!(report.added, 0, "temp and hidden files are not images");
        assert!(!stale.exists(), "left by another process");
        assert!(
            ours.exists(),
            "a save of this process may still be writing it"
        );
        assert!(not_ours.exists());
    }

    #[test]
    fn corrupt_database_is_moved_aside_and_rebuilt() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let a = g.save(image("a", 1)).unwrap();
        g.save(image("b", 2)).unwrap();
        drop(g);
        let _ = std::fs::remove_file(f.dir.path().join("gallery.sqlite-wal"));
        let _ = std::fs::remove_file(f.dir.path().join("gallery.sqlite-shm"));
        std::fs::write(f.db(), b"this is not an SQLite database".repeat(100)).unwrap();

        let (g, report) = f.open();
        assert_eq!(report.added, 2);
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        assert!(report.warnings[0].contains("damaged"), "{report:?}");
        let page = g.list(&ImageQuery::default()).unwrap();
        assert_eq!(page.total, 2);
        assert!(page
            .items
            .iter()
            .any(|r| r.file == a.file && r.prompt == "a"));
        let aside: Vec<_> = std::fs::read_dir(f.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("gallery.sqlite.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(
            std::fs::read(f.dir.path().join(&aside[0])).unwrap(),
            b"this is not an SQLite database".repeat(100),
            "the damaged file is kept for rescue"
        );
    }

    #[test]
    fn newer_schema_is_refused_not_overwritten() {
        let f = Fixture::new();
        drop(f.open());
        {
            let conn = Connection::open(f.db()).unwrap();
            conn.execute_batch("PRAGMA user_version = 99").unwrap();
        }
        match Gallery::open(&f.images(), &f.db()) {
            Err(e @ GalleryError::NewerSchema { found: 99, .. }) => {
                assert!(e.to_string().contains("update the app"), "{e}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened a newer schema"),
        }
    }

    #[test]
    fn database_uses_wal_and_schema_version() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let conn = g.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn concurrent_saves_get_unique_files() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let g = Arc::new(g);
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..5)
                        .map(|i| g.save(image(&format!("t{t} i{i}"), 42)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let recs: Vec<ImageRecord> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let mut names: Vec<_> = recs.iter().map(|r| r.file.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 20);
        for r in &recs {
            let bytes = std::fs::read(g.file_path(r)).unwrap();
            let text = crate::image_file::read_parameters(&bytes).unwrap();
            assert!(text.starts_with(&r.prompt), "{} holds {text}", r.file);
        }
        assert_eq!(g.list(&ImageQuery::default()).unwrap().total, 20);
        let on_disk = files_under(&f.images());
        assert_eq!(
            on_disk.len(),
            40,
            "20 images and 20 thumbnails, no temp files"
        );
    }

    /// Sets a file's modified time, as an editor saving it (or a copy keeping the time) does.
    fn set_mtime(path: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    fn png_of(width: u32, height: u32, value: u8) -> Vec<u8> {
        let rgb = vec![value; (width * height * 3) as usize];
        crate::image_file::encode_png(&rgb, width, height, "edited").unwrap()
    }

    #[test]
    fn a_picture_copied_back_from_the_trash_by_hand_does_not_stop_the_start() {
        // Review finding: the copy in the gallery and the trashed original share a name, `file`
        // is unique, and open failed with "UNIQUE constraint failed" on every start.
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        g.trash(rec.id).unwrap();
        drop(g);
        let trashed = f.images().join(".trash").join(&rec.file);
        std::fs::copy(&trashed, f.images().join(&rec.file)).unwrap();

        let (g, report) = f.open();
        assert_eq!((report.added, report.removed), (1, 0), "{report:?}");
        assert_eq!(report.warnings, Vec::<String>::new());
        let shown = g.list(&ImageQuery::default()).unwrap();
        assert_eq!(shown.total, 1);
        assert_eq!(
            shown.items[0].file, rec.file,
            "the user's copy keeps its name"
        );
        assert_ne!(shown.items[0].id, rec.id);
        // The trashed original keeps its id under a new name in the trash.
        let original = g.get(rec.id).unwrap().unwrap();
        assert!(original.trashed);
        assert_eq!(original.file, numbered_name(&rec.file, 2));
        assert!(!trashed.exists());
        assert!(g.file_path(&original).is_file());
        assert!(g.thumbnail_path(&original).unwrap().is_file());
        g.restore(rec.id).unwrap();
        assert_eq!(g.list(&ImageQuery::default()).unwrap().total, 2);
        drop(g);
        let (_, report) = f.open();
        assert_eq!((report.added, report.removed), (0, 0), "{report:?}");

        // With no index at all, both copies of one name are indexed too.
        let (g, _) = f.open();
        g.trash(rec.id).unwrap();
        drop(g);
        let back = f.images().join(".trash").join(&original.file);
        std::fs::copy(&back, f.images().join(&original.file)).unwrap();
        std::fs::remove_file(f.db()).unwrap();
        let (g, report) = f.open();
        assert_eq!((report.added, report.warnings.len()), (3, 0), "{report:?}");
        let in_trash = g
            .list(&ImageQuery {
                trashed: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(in_trash.items[0].file, numbered_name(&original.file, 2));
    }

    #[test]
    fn numbered_names() {
        assert_eq!(
            numbered_name("2026-01-01/00001-5.png", 2),
            "2026-01-01/00001-5-2.png"
        );
        assert_eq!(numbered_name("a/b/x.PNG", 3), "a/b/x-3.PNG");
        assert_eq!(numbered_name("plain.png", 2), "plain-2.png");
        assert_eq!(numbered_name(".png", 2), ".png-2");
    }

    #[test]
    fn ids_are_never_handed_out_twice() {
        // Review finding: without AUTOINCREMENT SQLite gives the newest row's id to the next
        // insert once that row is deleted, and browsers and character avatars then show the
        // new picture for the deleted one.
        let f = Fixture::new();
        let (g, _) = f.open();
        g.save(image("a", 1)).unwrap();
        let b = g.save(image("b", 2)).unwrap();
        g.trash(b.id).unwrap();
        assert_eq!(g.empty_trash().unwrap(), 1);
        let c = g.save(image("c", 3)).unwrap();
        assert!(c.id > b.id, "{} after deleting {}", c.id, b.id);
        g.trash(c.id).unwrap();
        g.empty_trash().unwrap();
        drop(g);
        let (g, _) = f.open();
        assert!(
            g.save(image("d", 4)).unwrap().id > c.id,
            "kept across opens"
        );
    }

    /// The schema 1 table as released, to test the upgrade.
    const SCHEMA_1: &str = "
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            file TEXT NOT NULL UNIQUE,
            prompt TEXT NOT NULL DEFAULT '',
            negative_prompt TEXT NOT NULL DEFAULT '',
            model TEXT,
            sampler TEXT,
            schedule TEXT,
            steps INTEGER,
            cfg_scale REAL,
            seed INTEGER,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            favourite INTEGER NOT NULL DEFAULT 0,
            trashed_at INTEGER,
            parameters TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX images_trashed_created ON images(trashed_at, created_at);
        CREATE INDEX images_created ON images(created_at);
        CREATE INDEX images_favourite ON images(favourite, created_at);
        CREATE INDEX images_model ON images(model, created_at);
        PRAGMA user_version = 1;
    ";

    #[test]
    fn a_schema_1_index_is_upgraded_keeping_rows_ids_and_indexes() {
        let f = Fixture::new();
        std::fs::create_dir_all(f.images().join("old")).unwrap();
        {
            let conn = Connection::open(f.db()).unwrap();
            conn.execute_batch(SCHEMA_1).unwrap();
            // Whatever else a database holds on the table must survive the rebuild too.
            conn.execute_batch(
                "CREATE INDEX images_seed ON images(seed);
                 CREATE TRIGGER images_keep_prompt BEFORE UPDATE OF prompt ON images
                 BEGIN SELECT RAISE(ABORT, 'prompts are fixed'); END;",
            )
            .unwrap();
            for (id, name, favourite) in [(2, "a", true), (5, "b", false), (9, "c", false)] {
                let file = format!("old/{name}.png");
                std::fs::write(f.images().join(&file), png_of(8, 8, 1)).unwrap();
                conn.execute(
                    "INSERT INTO images (id, file, prompt, width, height, created_at, favourite) \
                     VALUES (?1, ?2, ?3, 8, 8, ?1, ?4)",
                    params![id, file, format!("prompt {name}"), favourite],
                )
                .unwrap();
            }
        }
        let (g, report) = f.open();
        assert_eq!(report, ReconcileReport::default());
        let page = g.list(&ImageQuery::default()).unwrap();
        let rows: Vec<_> = page
            .items
            .iter()
            .map(|r| (r.id, r.file.as_str(), r.prompt.as_str(), r.favourite))
            .collect();
        assert_eq!(
            rows,
            [
                (9, "old/c.png", "prompt c", false),
                (5, "old/b.png", "prompt b", false),
                (2, "old/a.png", "prompt a", true),
            ]
        );
        {
            let conn = g.conn();
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(version, SCHEMA_VERSION);
            let mut objects: Vec<String> = conn
                .prepare(
                    "SELECT name FROM sqlite_master WHERE tbl_name = 'images' AND name != 'images'",
                )
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .filter(|n: &String| !n.starts_with("sqlite_autoindex"))
                .collect();
            objects.sort();
            assert_eq!(
                objects,
                [
                    "images_created",
                    "images_favourite",
                    "images_keep_prompt",
                    "images_model",
                    "images_seed",
                    "images_trashed_created",
                ]
            );
            // The stamps are filled in, so the next open reads no file.
            let unstamped: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM images WHERE file_mtime_ns IS NULL",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(unstamped, 0);
        }
        // The newest id is not handed out again once deleted.
        g.trash(9).unwrap();
        g.empty_trash().unwrap();
        assert_eq!(g.save(image("new", 1)).unwrap().id, 10);
    }

    #[test]
    fn a_rebuilt_index_starts_ids_above_the_damaged_one() {
        // Pictures indexed again get new ids; none may be an id the damaged index gave out.
        let f = Fixture::new();
        let (g, _) = f.open();
        g.save(image("a", 1)).unwrap();
        g.save(image("b", 2)).unwrap();
        let c = g.save(image("c", 3)).unwrap();
        g.trash(c.id).unwrap();
        g.empty_trash().unwrap();
        drop(g);
        {
            // Readable, but not a schema this version knows: opened as damaged.
            let conn = Connection::open(f.db()).unwrap();
            conn.execute_batch("PRAGMA user_version = -1").unwrap();
        }
        let (g, report) = f.open();
        assert_eq!(report.added, 2);
        assert!(report.warnings[0].contains("damaged"), "{report:?}");
        let page = g.list(&ImageQuery::default()).unwrap();
        assert!(page.items.iter().all(|r| r.id > c.id), "{page:?}");
    }

    #[test]
    fn a_picture_edited_outside_the_app_gets_a_new_thumbnail_and_size() {
        // Review finding: an existing thumbnail was served whatever became of its image, and
        // reconcile kept the row's old size.
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        let thumb = g.thumbnail_path(&rec).unwrap();
        let path = g.file_path(&rec);
        std::fs::write(&path, png_of(16, 4, 200)).unwrap();
        // Ahead of the thumbnail even where file times are coarse.
        set_mtime(&path, SystemTime::now() + Duration::from_secs(5));
        let t = image::open(g.thumbnail_path(&rec).unwrap()).unwrap();
        assert_eq!((t.width(), t.height()), (16, 4), "made again while running");
        drop(g);
        let (g, report) = f.open();
        assert_eq!(report, ReconcileReport::default());
        let now = g.get(rec.id).unwrap().unwrap();
        assert_eq!((now.width, now.height), (16, 4));
        assert_eq!(now.prompt, rec.prompt, "the settings stay");

        // Replaced by a file older than the thumbnail (a copy that kept its time): the size
        // and the thumbnail still follow it.
        std::fs::write(&path, png_of(6, 12, 9)).unwrap();
        set_mtime(
            &path,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
        );
        drop(g);
        let (g, _) = f.open();
        let now = g.get(rec.id).unwrap().unwrap();
        assert_eq!((now.width, now.height), (6, 12));
        assert_eq!(g.thumbnail_path(&now).unwrap(), thumb);
        let t = image::open(&thumb).unwrap();
        assert_eq!((t.width(), t.height()), (6, 12));
    }

    #[test]
    fn an_unreadable_edited_file_is_a_warning_and_keeps_its_row() {
        let f = Fixture::new();
        let (g, _) = f.open();
        let rec = g.save(image("x", 1)).unwrap();
        drop(g);
        let path = f.images().join(&rec.file);
        std::fs::write(&path, b"not a png any more").unwrap();
        set_mtime(&path, SystemTime::now() + Duration::from_secs(5));
        let (g, report) = f.open();
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        assert!(report.warnings[0].contains(&rec.file), "{report:?}");
        assert_eq!(g.get(rec.id).unwrap().unwrap(), rec);
        assert!(matches!(
            g.thumbnail_path(&rec),
            Err(GalleryError::Thumbnail { .. })
        ));
    }

    #[test]
    fn relative_paths_cannot_leave_the_folder() {
        let base = Path::new("/data/images");
        assert_eq!(
            join_relative(base, "../../etc/passwd"),
            Path::new("/data/images/etc/passwd")
        );
        assert_eq!(
            join_relative(base, "/abs/x.png"),
            Path::new("/data/images/abs/x.png")
        );
        assert_eq!(
            join_relative(base, "2026-01-01/00001-1.png"),
            Path::new("/data/images/2026-01-01/00001-1.png")
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(escape_like(r"50%_a\b"), r"50\%\_a\\b");
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_795_651_200_000), "2026-11-26");
        assert!(is_our_temp_file(".00001-1.png.tmp-123"));
        assert!(!is_our_temp_file("00001-1.png.tmp-123"));
        assert!(!is_our_temp_file(".x.png.tmp-"));
        assert!(!is_our_temp_file(".x.png"));
    }
}

//! The installed-model library as the service sees it: diffusers model folders found in the data
//! folder's `models/` and in the folders the user added, each with a stable name and its family.
//! (Single-file checkpoints, the catalog and downloads build on this in the models issue.)

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Model families; the UI and the A1111 API show these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Family {
    #[serde(rename = "SD1")]
    Sd1,
    #[serde(rename = "SD2")]
    Sd2,
    #[serde(rename = "SDXL")]
    Sdxl,
    #[serde(rename = "unknown")]
    Unknown,
}

impl Family {
    pub fn label(self) -> &'static str {
        match self {
            Family::Sd1 => "SD1",
            Family::Sd2 => "SD2",
            Family::Sdxl => "SDXL",
            Family::Unknown => "unknown",
        }
    }
}

/// One installed model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// What users and chat apps pick the model by: the folder name, made unique.
    pub name: String,
    pub family: Family,
    pub path: PathBuf,
    /// Bytes on disk of its weight files.
    pub size_bytes: u64,
    /// "diffusers" for a model folder (the only kind this version loads).
    pub format: &'static str,
    /// Whether it lives in our data folder (so we may delete it) or in a folder the user added.
    pub managed: bool,
    /// The catalog entry it was downloaded from.
    pub catalog_id: Option<String>,
}

/// Every model under `roots`: a root that is itself a model folder, or model folders one level
/// below it. Sorted by name; names made unique with a " (2)" suffix in root order.
pub fn scan(managed_root: &Path, user_roots: &[PathBuf]) -> Vec<ModelInfo> {
    let mut found = Vec::new();
    let roots = std::iter::once((managed_root, true))
        .chain(user_roots.iter().map(|r| (r.as_path(), false)));
    for (root, managed) in roots {
        if is_model_folder(root) {
            found.push(describe(root, managed));
            continue;
        }
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            // Hidden folders are ours in progress (a download's staging folder).
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .filter(|p| is_model_folder(p))
            .collect();
        dirs.sort();
        found.extend(dirs.iter().map(|d| describe(d, managed)));
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for m in &mut found {
        let n = seen.entry(m.name.to_lowercase()).or_insert(0);
        *n += 1;
        if *n > 1 {
            m.name = format!("{} ({})", m.name, n);
        }
    }
    found.sort_by_key(|m| m.name.to_lowercase());
    found
}

/// Finds a model by name (case-insensitive) or by the A1111 title we show ("name [hash]" style
/// titles are matched on the part before " [").
pub fn find<'a>(models: &'a [ModelInfo], wanted: &str) -> Option<&'a ModelInfo> {
    let wanted = wanted.trim();
    let bare = wanted.split(" [").next().unwrap_or(wanted).trim();
    models
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(wanted))
        .or_else(|| models.iter().find(|m| m.name.eq_ignore_ascii_case(bare)))
}

fn is_model_folder(p: &Path) -> bool {
    p.join("model_index.json").is_file() && p.join("unet").is_dir()
}

fn describe(dir: &Path, managed: bool) -> ModelInfo {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned());
    ModelInfo {
        name,
        family: family_of(dir),
        path: dir.to_path_buf(),
        size_bytes: folder_size(dir, 3),
        format: "diffusers",
        // Only what we downloaded (it carries our marker) counts as ours to delete.
        managed: managed && dir.join(crate::download::MARKER).is_file(),
        catalog_id: std::fs::read_to_string(dir.join(crate::download::MARKER))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("catalog_id")?.as_str().map(str::to_owned)),
    }
}

/// Deletes a model we downloaded. Anything else (the user's own folders, models they copied in by
/// hand) is refused: we never delete what we did not put there.
pub fn delete_managed(model: &ModelInfo) -> std::io::Result<()> {
    if !model.managed {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "only models downloaded by Local Diffusers can be deleted here",
        ));
    }
    // Renamed first, so a delete cut short leaves a hidden folder, not a broken model.
    let parent = model.path.parent().unwrap_or(Path::new("."));
    let doomed = parent.join(format!(
        ".deleting-{}",
        model.path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::rename(&model.path, &doomed)?;
    std::fs::remove_dir_all(&doomed)
}

/// SDXL by its pipeline class; SD1 and SD2 by their text encoders (OpenAI CLIP uses quick_gelu,
/// SD2's OpenCLIP plain gelu), which holds for tiny test models too, where sizes say nothing.
fn family_of(dir: &Path) -> Family {
    let json = |rel: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(rel)).ok()?).ok()
    };
    let class = json("model_index.json")
        .and_then(|v| v.get("_class_name")?.as_str().map(str::to_owned))
        .unwrap_or_default();
    if class.contains("XL") {
        return Family::Sdxl;
    }
    match json("text_encoder/config.json")
        .and_then(|v| v.get("hidden_act")?.as_str().map(str::to_owned))
        .as_deref()
    {
        Some("quick_gelu") => Family::Sd1,
        Some("gelu") => Family::Sd2,
        _ => Family::Unknown,
    }
}

fn folder_size(dir: &Path, depth: usize) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() && depth > 0 => folder_size(&e.path(), depth - 1),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/tiny")
            .join(name)
    }

    #[test]
    fn finds_the_tiny_models_with_their_families() {
        let t = tempfile::tempdir().unwrap();
        let models = scan(
            t.path(),
            &[tiny("sd1"), tiny("sd2").parent().unwrap().to_path_buf()],
        );
        let names: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.family)).collect();
        // sd1 is found twice (as a root and inside models/tiny): the second gets a suffix.
        assert_eq!(
            names,
            [
                ("sd1", Family::Sd1),
                ("sd1 (2)", Family::Sd1),
                ("sd2", Family::Sd2)
            ]
        );
        assert!(models.iter().all(|m| !m.managed && m.size_bytes > 10_000));
    }

    #[test]
    fn find_matches_names_and_a1111_titles() {
        let models = scan(&tiny("sd1"), &[]);
        assert_eq!(find(&models, "SD1").unwrap().name, "sd1");
        assert_eq!(find(&models, "sd1 [abcdef0123]").unwrap().name, "sd1");
        assert!(find(&models, "other").is_none());
        assert!(
            !models[0].managed,
            "not downloaded by us: never ours to delete"
        );
    }
}

//! The catalog of recommended models (`models/catalog.toml`, built into the binary): what the
//! guided setup offers and what `local-diffusers models download ID` fetches.

use serde::{Deserialize, Serialize};

const CATALOG_TOML: &str = include_str!("../../../models/catalog.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub id: String,
    pub name: String,
    /// Hugging Face repository id.
    pub repo: String,
    #[serde(default = "main")]
    pub revision: String,
    /// "SD1", "SD2" or "SDXL".
    pub family: String,
    /// Preferred weights variant ("fp16"): half the download, same pictures once loaded.
    #[serde(default)]
    pub variant: Option<String>,
    pub size_gb: f64,
    pub min_vram_gb: f64,
    /// The size it was trained for (512 or 1024).
    pub native_size: u32,
    pub cpu_ok: bool,
    /// Turbo/LCM-style models that need only a few steps.
    #[serde(default)]
    pub fast: bool,
    #[serde(default)]
    pub style: Vec<String>,
    pub licence: String,
    pub description: String,
}

fn main() -> String {
    "main".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    model: Vec<CatalogEntry>,
}

/// Every catalog entry, in the file's order (the first suits the most computers).
pub fn entries() -> Vec<CatalogEntry> {
    let file: CatalogFile =
        toml::from_str(CATALOG_TOML).expect("models/catalog.toml is checked by the tests");
    file.model
}

pub fn find(id: &str) -> Option<CatalogEntry> {
    entries()
        .into_iter()
        .find(|e| e.id.eq_ignore_ascii_case(id.trim()))
}

/// How far under a catalog figure a card may report and still count as that size: cards sold
/// as "8 GB" may report a few MiB under 8 GiB (8188 MiB is 7.996 GiB; found by review), which
/// must not move them to the smaller suggestion.
const VRAM_SLACK_GB: f64 = 0.25;

/// Whether an entry runs well here: on a GPU with `vram_gb`, or on the CPU when there is none.
pub fn fits(entry: &CatalogEntry, vram_gb: Option<f64>) -> bool {
    match vram_gb {
        Some(v) => v + VRAM_SLACK_GB >= entry.min_vram_gb,
        None => entry.cpu_ok,
    }
}

/// The one model the guided setup suggests first: the best-quality model that fits, preferring
/// fast ones on the CPU, where every step counts.
pub fn suggest(vram_gb: Option<f64>) -> CatalogEntry {
    let all = entries();
    let pick = match vram_gb {
        None => all.iter().find(|e| e.cpu_ok && e.fast),
        Some(v) if v + VRAM_SLACK_GB >= 8.0 => all.iter().find(|e| e.id == "sdxl-base"),
        Some(_) => all.iter().find(|e| e.id == "dreamshaper-8"),
    };
    pick.or_else(|| all.iter().find(|e| fits(e, vram_gb)))
        .unwrap_or(&all[0])
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::is_valid_id;

    #[test]
    fn the_catalog_parses_and_is_sane() {
        let all = entries();
        assert!(all.len() >= 5);
        let mut ids = std::collections::HashSet::new();
        for e in &all {
            assert!(ids.insert(e.id.clone()), "duplicate id {}", e.id);
            // Ids become folder names.
            assert!(is_valid_id(&e.id.replace('.', "-")), "{}", e.id);
            assert!(!e.id.contains('/') && !e.id.contains(".."));
            assert!(
                ["SD1", "SD2", "SDXL"].contains(&e.family.as_str()),
                "{}",
                e.family
            );
            assert!(e.repo.split('/').count() == 2, "{}", e.repo);
            assert!(e.size_gb > 0.5 && e.min_vram_gb >= 2.0);
        }
        for want in ["sd-1.5", "sd-turbo", "sdxl-base"] {
            assert!(find(want).is_some(), "{want}");
        }
    }

    #[test]
    fn suggestions_follow_the_hardware() {
        assert_eq!(suggest(None).id, "sd-turbo");
        assert_eq!(suggest(Some(6.0)).id, "dreamshaper-8");
        assert_eq!(suggest(Some(24.0)).id, "sdxl-base");
        // An "8 GB" card reporting 8188 MiB is an 8 GB card (found by review).
        let sold_as_8 = 8188.0 / 1024.0;
        assert_eq!(suggest(Some(sold_as_8)).id, "sdxl-base");
        let xl = find("sdxl-base").unwrap();
        assert!(fits(&xl, Some(sold_as_8)) && !fits(&xl, Some(6.0)));
        let xl = find("sdxl-base").unwrap();
        assert!(!fits(&xl, None) && !fits(&xl, Some(6.0)) && fits(&xl, Some(12.0)));
    }
}

//! The installed-model library: diffusers model folders and single-file checkpoints found in the
//! data folder's `models/` and in the folders the user added, used in place, never copied. A
//! folder the user adds may be a model folder, a folder of models, an A1111 or ComfyUI install
//! (their `models/Stable-diffusion` / `models/checkpoints` are found), or the Hugging Face cache.

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
    /// "diffusers" (a model folder), "safetensors" (a single-file checkpoint) or "pickle" (a
    /// `.ckpt`/`.pt`/`.bin` file, which is never opened: it can run code).
    pub format: &'static str,
    /// Why the model cannot be used as it is, in words for the user.
    pub problem: Option<String>,
    /// Whether it lives in our data folder (so we may delete it) or in a folder the user added.
    pub managed: bool,
    /// The catalog entry it was downloaded from.
    pub catalog_id: Option<String>,
    /// A few-step model (Turbo, LCM, Lightning): the "Quick" preset's choice.
    pub fast: bool,
    /// An SDXL refiner: offered as a refiner for SDXL models, never drawn with alone.
    pub refiner: bool,
    /// A single file's sha256 once known (hashed when first used, or on request), and the
    /// 10-digit AutoV2 hash Civitai shows.
    pub sha256: Option<String>,
    pub short_hash: Option<String>,
    /// What a request for it starts from (steps, CFG, sampler, size), read from its configs.
    /// Shown to the UI, which fills a fast model's form from it.
    #[serde(serialize_with = "serialize_defaults")]
    pub defaults: Option<ld_engine::model_defaults::ModelDefaults>,
    /// A single-file checkpoint without a VAE inside or beside it: usable once a VAE file is
    /// chosen in Settings ([`crate::vae::usable_with`] clears its `problem` then).
    #[serde(default)]
    pub needs_vae: bool,
}

/// Every model under `roots`. Sorted by name; names made unique with a " (2)" suffix in root order.
pub fn scan(managed_root: &Path, user_roots: &[PathBuf]) -> Vec<ModelInfo> {
    let mut found = Vec::new();
    let roots = std::iter::once((managed_root, true))
        .chain(user_roots.iter().map(|r| (r.as_path(), false)));
    for (root, managed) in roots {
        for (dir, depth) in checkpoint_dirs(root) {
            scan_dir(&dir, managed, &mut found, depth);
        }
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

/// `defaults` as the API shows them: steps, CFG scale, sampler and schedule names, size.
fn serialize_defaults<S: serde::Serializer>(
    defaults: &Option<ld_engine::model_defaults::ModelDefaults>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::Serialize as _;
    defaults
        .map(|d| {
            serde_json::json!({
                "steps": d.steps,
                "cfg_scale": d.cfg_scale,
                "sampler": d.sampler.name(),
                "schedule": d.schedule.name(),
                "width": d.width,
                "height": d.height,
            })
        })
        .serialize(s)
}

/// Finds a model by name (case-insensitive) or by an A1111 title: "name [hash]" titles are
/// matched on the part before " [", and A1111's own titles of checkpoint files
/// ("SDXL/juggernaut.safetensors [6ce0161689]", what a chat app saved from an A1111 install) on
/// the file's name without its folder and extension, which is how files are named here.
pub fn find<'a>(models: &'a [ModelInfo], wanted: &str) -> Option<&'a ModelInfo> {
    let wanted = wanted.trim();
    let bare = wanted.split(" [").next().unwrap_or(wanted).trim();
    let file = bare.rsplit(['/', '\\']).next().unwrap_or(bare);
    let stem = [".safetensors", ".ckpt", ".pt", ".bin"]
        .iter()
        .find_map(|ext| {
            let cut = file.len().checked_sub(ext.len())?;
            (file.is_char_boundary(cut) && file[cut..].eq_ignore_ascii_case(ext))
                .then(|| &file[..cut])
        })
        .unwrap_or(file);
    [wanted, bare, stem]
        .iter()
        .find_map(|name| models.iter().find(|m| m.name.eq_ignore_ascii_case(name)))
}

/// The folders of a root that hold checkpoints, each with how many levels of subfolders to look
/// in: the root itself and its subfolders, what A1111 and ComfyUI installs keep checkpoints in
/// (where users sort them into folders such as `SDXL/` or `Pony/`, which both apps list), and the
/// snapshots of a Hugging Face cache. The root goes one level deep only: it may be a whole A1111
/// install, whose other folders (extensions, repositories) hold files that are no checkpoints.
fn checkpoint_dirs(root: &Path) -> Vec<(PathBuf, usize)> {
    if is_model_folder(root) {
        return vec![(root.to_path_buf(), 0)];
    }
    let mut dirs = vec![(root.to_path_buf(), 1)];
    for sub in [
        "models/Stable-diffusion",
        "Stable-diffusion",
        "models/checkpoints",
        "checkpoints",
        "models/diffusers",
    ] {
        let d = root.join(sub);
        if d.is_dir() {
            dirs.push((d, 3));
        }
    }
    // Hugging Face cache: models--org--name/snapshots/<revision>/ (the revision refs/main names).
    for hub_root in [root.to_path_buf(), root.join("hub")] {
        let Ok(entries) = std::fs::read_dir(&hub_root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("models--") {
                continue;
            }
            let repo = e.path();
            let rev = std::fs::read_to_string(repo.join("refs/main")).unwrap_or_default();
            let snapshot = repo.join("snapshots").join(rev.trim());
            if !rev.trim().is_empty() && is_model_folder(&snapshot) {
                dirs.push((snapshot, 0));
            }
        }
    }
    dirs
}

/// Adds the models in `dir`: the folder itself when it is one, else the model folders and
/// checkpoint files in it, and in its subfolders down to `depth` levels.
fn scan_dir(dir: &Path, managed: bool, found: &mut Vec<ModelInfo>, depth: usize) {
    if is_model_folder(dir) {
        if !found.iter().any(|m| m.path == dir) {
            let mut m = describe(dir, managed);
            // A Hugging Face snapshot folder is named by its revision: use the repository name.
            if let Some(repo) = hf_repo_name(dir) {
                m.name = repo;
            }
            found.push(m);
        }
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        // Hidden entries are ours in progress (a download's staging folder, a .part file).
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    for p in paths {
        if found.iter().any(|m| m.path == p) {
            continue;
        }
        if is_model_folder(&p) {
            found.push(describe(&p, managed));
        } else if p.is_file() {
            if let Some(m) = describe_file(&p) {
                found.push(m);
            }
        } else if depth > 0 && p.is_dir() && !is_hugging_face_cache(&p) {
            scan_dir(&p, managed, found, depth - 1);
        }
    }
}

/// A Hugging Face cache or one of its repositories, whose snapshots [`checkpoint_dirs`] lists
/// (only the revision `refs/main` names; a walk would list every old one too).
fn is_hugging_face_cache(dir: &Path) -> bool {
    dir.file_name().is_some_and(|n| {
        let n = n.to_string_lossy();
        n.starts_with("models--") || n == "hub"
    })
}

/// The name the app gives the model at `path` (what [`scan`] lists and pictures' parameters
/// carry): a file's name without its extension, a Hugging Face snapshot's repository name, else
/// the folder's name.
pub fn display_name(path: &Path) -> String {
    let name = if path.is_file() {
        path.file_stem()
    } else {
        if let Some(repo) = hf_repo_name(path) {
            return repo;
        }
        path.file_name()
    };
    name.map_or_else(|| "model".to_owned(), |n| n.to_string_lossy().into_owned())
}

fn hf_repo_name(snapshot: &Path) -> Option<String> {
    let repo_dir = snapshot.parent()?.parent()?;
    let name = repo_dir.file_name()?.to_string_lossy();
    let rest = name.strip_prefix("models--")?;
    Some(rest.rsplit("--").next()?.to_owned())
}

/// A checkpoint file: `.safetensors` (family and problems from its header, read without loading
/// anything), or a pickle (listed so the user sees it, with what to do). LoRA, embedding and VAE
/// files are not models.
fn describe_file(p: &Path) -> Option<ModelInfo> {
    use ld_engine::checkpoint::{CheckpointKind, ModelFamily as Ckpt};
    let ext = p.extension()?.to_string_lossy().to_ascii_lowercase();
    let size = std::fs::metadata(p).ok()?.len();
    let name = p.file_stem()?.to_string_lossy().into_owned();
    let mut refiner = false;
    let mut defaults = None;
    let mut needs_vae = false;
    let (format, family, problem) = match ext.as_str() {
        "safetensors" => match ld_engine::checkpoint::inspect(p) {
            Ok(info) => {
                if info.kind != CheckpointKind::Checkpoint {
                    return None;
                }
                let family = match info.family {
                    Some(Ckpt::Sd1) => Family::Sd1,
                    Some(Ckpt::Sd2) => Family::Sd2,
                    Some(Ckpt::SdxlBase | Ckpt::SdxlRefiner) => Family::Sdxl,
                    None => Family::Unknown,
                };
                // The family's embedded configs give the native size, steps and CFG.
                defaults = ld_engine::model_defaults::ModelDefaults::for_checkpoint(&name, &info);
                refiner = info.family == Some(Ckpt::SdxlRefiner);
                // A VAE beside it (A1111's `<name>.vae.safetensors`) makes it whole; the jobs
                // load it from there.
                let vae_beside = info.needs_vae && ld_engine::single_file::sibling_vae(p).is_some();
                needs_vae = info.needs_vae && !vae_beside && !refiner;
                let problem = if refiner {
                    Some(REFINER_PROBLEM.to_owned())
                } else if vae_beside {
                    None
                } else {
                    (!info.loadable).then(|| {
                        info.note
                            .clone()
                            .unwrap_or_else(|| "This checkpoint cannot be loaded yet.".to_owned())
                    })
                };
                ("safetensors", family, problem)
            }
            // Small unreadable files are stray LoRAs or downloads in progress: not worth a row.
            Err(_) if size < 500_000_000 => return None,
            Err(e) => (
                "safetensors",
                Family::Unknown,
                Some(format!(
                    "{e}. Download the file again; it may be damaged or incomplete."
                )),
            ),
        },
        "ckpt" | "pt" | "pth" | "bin" if size >= 500_000_000 => (
            "pickle",
            Family::Unknown,
            Some(
                "This is a pickle file (.ckpt), which can run hidden code when opened, so it is \
                 never loaded. Download the .safetensors version of this model instead."
                    .to_owned(),
            ),
        ),
        _ => return None,
    };
    Some(ModelInfo {
        name,
        family,
        path: p.to_path_buf(),
        size_bytes: size,
        format,
        problem,
        managed: false,
        catalog_id: None,
        fast: defaults.is_some_and(|d| d.is_fast()),
        refiner,
        sha256: None,
        short_hash: None,
        defaults,
        needs_vae,
    })
}

fn is_model_folder(p: &Path) -> bool {
    p.join("model_index.json").is_file() && p.join("unet").is_dir()
}

/// Why a refiner (folder or single file) is not offered as a model to draw with.
const REFINER_PROBLEM: &str =
    "This is an SDXL refiner: it finishes pictures of an SDXL model and cannot draw on its own.";

fn describe(dir: &Path, managed: bool) -> ModelInfo {
    let defaults = ld_engine::model_defaults::ModelDefaults::detect(dir).ok();
    let refiner =
        defaults.is_some_and(|d| d.family == ld_engine::model_defaults::ModelFamily::SdxlRefiner);
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
        problem: refiner.then(|| REFINER_PROBLEM.to_owned()),
        fast: defaults.is_some_and(|d| d.is_fast()),
        refiner,
        sha256: None,
        short_hash: None,
        defaults,
        needs_vae: false,
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
    // One left by a delete that was cut short (ours: the name is hidden and only made here)
    // would block the rename of a later copy of the same model.
    if doomed.is_dir() {
        std::fs::remove_dir_all(&doomed)?;
    }
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
        // sd1 is named twice (as a root and inside models/tiny): listed once.
        let models = scan(
            t.path(),
            &[tiny("sd1"), tiny("sd2").parent().unwrap().to_path_buf()],
        );
        let names: Vec<_> = models.iter().map(|m| (m.name.as_str(), m.family)).collect();
        assert_eq!(
            names[..4],
            [
                ("sd1", Family::Sd1),
                ("sd1-inpaint", Family::Sd1),
                ("sd1-lcm", Family::Sd1),
                ("sd2", Family::Sd2)
            ]
        );
        // The SDXL test models, when present, are told apart by their pipeline class.
        assert!(names[4..]
            .iter()
            .all(|(n, f)| n.starts_with("sdxl") && *f == Family::Sdxl));
        assert!(models.iter().all(|m| !m.managed && m.size_bytes > 10_000));
        // Another folder that happens to have the same name gets a suffix.
        let other = tempfile::tempdir().unwrap();
        fake_model(&other.path().join("sd1"));
        let models = scan(t.path(), &[tiny("sd1"), other.path().into()]);
        let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["sd1", "sd1 (2)"]);
    }

    fn fake_model(dir: &Path) {
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        std::fs::write(dir.join("model_index.json"), "{}").unwrap();
    }

    #[test]
    fn a_delete_cut_short_does_not_block_the_next_one() {
        // Found by review: the folder an interrupted delete left (`.deleting-<name>`) made the
        // rename of a later download of the same model fail, so it could never be deleted.
        let managed = tempfile::tempdir().unwrap();
        let leftover = managed.path().join(".deleting-sd-1.5");
        fake_model(&leftover);
        let dir = managed.path().join("sd-1.5");
        fake_model(&dir);
        std::fs::write(dir.join(crate::download::MARKER), "{}").unwrap();
        let models = scan(managed.path(), &[]);
        assert_eq!(models.len(), 1, "the leftover is hidden");
        assert!(models[0].managed);
        delete_managed(&models[0]).unwrap();
        assert_eq!(std::fs::read_dir(managed.path()).unwrap().count(), 0);
    }

    fn sparse(path: &Path, len: u64) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::File::create(path).unwrap().set_len(len).unwrap();
    }

    #[test]
    fn a1111_comfyui_and_hugging_face_layouts_are_found_in_place() {
        let a1111 = tempfile::tempdir().unwrap();
        sparse(
            &a1111
                .path()
                .join("models/Stable-diffusion/dreamy.safetensors"),
            2_000_000_000,
        );
        sparse(
            &a1111.path().join("models/Stable-diffusion/old.ckpt"),
            2_000_000_000,
        );
        // Small files next to checkpoints are LoRAs or embeddings, not models.
        sparse(
            &a1111
                .path()
                .join("models/Stable-diffusion/tiny-lora.safetensors"),
            10_000,
        );
        let comfy = tempfile::tempdir().unwrap();
        sparse(
            &comfy
                .path()
                .join("models/checkpoints/juggernaut.safetensors"),
            6_000_000_000,
        );
        // Sorted into folders, as both apps list them (found by review: these were missed).
        sparse(
            &comfy
                .path()
                .join("models/checkpoints/SDXL/Pony/ponyish.safetensors"),
            6_000_000_000,
        );
        let hf = tempfile::tempdir().unwrap();
        let repo = hf.path().join("hub/models--stabilityai--sd-turbo");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        fake_model(&repo.join("snapshots/abc123"));
        fake_model(&repo.join("snapshots/old999"));
        let managed = tempfile::tempdir().unwrap();
        // A download in progress is hidden.
        fake_model(&managed.path().join(".sd-1.5.partial"));

        let models = scan(
            managed.path(),
            &[a1111.path().into(), comfy.path().into(), hf.path().into()],
        );
        let got: Vec<(&str, &str)> = models.iter().map(|m| (m.name.as_str(), m.format)).collect();
        assert_eq!(
            got,
            [
                ("dreamy", "safetensors"),
                ("juggernaut", "safetensors"),
                ("old", "pickle"),
                ("ponyish", "safetensors"),
                ("sd-turbo", "diffusers"),
            ]
        );
        let old = models.iter().find(|m| m.name == "old").unwrap();
        assert!(old
            .problem
            .as_deref()
            .unwrap()
            .contains(".safetensors version"));
        assert!(models.iter().all(|m| !m.managed));
        let snap = models.iter().find(|m| m.name == "sd-turbo").unwrap();
        assert!(
            snap.path.ends_with("snapshots/abc123"),
            "the revision refs/main names"
        );
    }

    #[test]
    fn sdxl_single_files_are_listed_as_usable() {
        use candle_core::{DType, Device, Tensor};
        // Header names as in real SDXL files (diffusers CHECKPOINT_KEY_NAMES "xl_base" /
        // "xl_refiner"); the tensors are tiny, the header is all the listing reads.
        let save = |path: &Path, names: &[&str]| {
            let t = Tensor::zeros(4, DType::F16, &Device::Cpu).unwrap();
            let map: std::collections::HashMap<String, Tensor> =
                names.iter().map(|n| (n.to_string(), t.clone())).collect();
            candle_core::safetensors::save(&map, path).unwrap();
        };
        let t = tempfile::tempdir().unwrap();
        save(
            &t.path().join("xl-base.safetensors"),
            &[
                "model.diffusion_model.out.2.bias",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
                "first_stage_model.encoder.conv_in.weight",
                "first_stage_model.decoder.conv_in.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
            ],
        );
        save(
            &t.path().join("xl-refiner.safetensors"),
            &[
                "model.diffusion_model.out.2.bias",
                "model.diffusion_model.label_emb.0.0.weight",
                "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
            ],
        );
        let models = scan(t.path(), &[]);
        let base = models.iter().find(|m| m.name == "xl-base").unwrap();
        assert_eq!((base.family, base.problem.as_deref()), (Family::Sdxl, None));
        assert!(!base.refiner);
        let d = base.defaults.unwrap();
        assert_eq!(d.family, ld_engine::model_defaults::ModelFamily::Sdxl);
        // SDXL 1.0's native 1024x1024 (unet sample_size 128 x 8), 30 steps at CFG 5.
        assert_eq!((d.width, d.steps, d.cfg_scale), (1024, 30, 5.0));
        let refiner = models.iter().find(|m| m.name == "xl-refiner").unwrap();
        assert!(refiner.refiner && refiner.family == Family::Sdxl);
        assert!(refiner.problem.as_deref().unwrap().contains("refiner"));
        assert_eq!(
            refiner.defaults.unwrap().family,
            ld_engine::model_defaults::ModelFamily::SdxlRefiner
        );
    }

    #[test]
    fn loras_and_embeddings_are_found_in_known_folders() {
        let data = tempfile::tempdir().unwrap();
        let a1111 = tempfile::tempdir().unwrap();
        sparse(&data.path().join("loras/mine.safetensors"), 10);
        sparse(
            &a1111.path().join("models/Lora/style/Pastel.safetensors"),
            10,
        );
        sparse(&a1111.path().join("models/Lora/readme.txt"), 10);
        sparse(
            &a1111.path().join("embeddings/EasyNegative.safetensors"),
            10,
        );
        let loras = network_files(&lora_dirs(data.path(), &[a1111.path().into()]));
        let names: Vec<_> = loras.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["mine", "Pastel"]);
        let emb = network_files(&embedding_dirs(data.path(), &[a1111.path().into()]));
        assert_eq!(emb[0].name, "EasyNegative");
    }

    #[test]
    fn find_matches_names_and_a1111_titles() {
        let models = scan(&tiny("sd1"), &[]);
        assert_eq!(find(&models, "SD1").unwrap().name, "sd1");
        assert_eq!(find(&models, "sd1 [abcdef0123]").unwrap().name, "sd1");
        assert!(find(&models, "other").is_none());
        // A1111's titles of checkpoint files, as chat apps saved them (found by review).
        for title in [
            "sd1.safetensors",
            "SD1.SAFETENSORS [6ce0161689]",
            "SDXL/sd1.safetensors [6ce0161689]",
            "models\\sd1.ckpt",
        ] {
            assert_eq!(
                find(&models, title).map(|m| m.name.as_str()),
                Some("sd1"),
                "{title}"
            );
        }
        assert!(find(&models, "other.safetensors").is_none());
        assert!(find(&models, "é.safetensors").is_none());
        assert!(
            !models[0].managed,
            "not downloaded by us: never ours to delete"
        );
    }
}

/// A LoRA or a textual-inversion embedding file, named by its file stem as prompts use it
/// (`<lora:NAME:0.8>`, or the embedding's name in the text).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkFile {
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// Where LoRAs live: the data folder's `loras/`, and in each added folder its own `Lora`/`loras`
/// folders (A1111: `models/Lora`, ComfyUI: `models/loras`).
pub fn lora_dirs(data_root: &Path, user_roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = vec![data_root.join("loras")];
    for r in user_roots {
        for sub in [
            "models/Lora",
            "Lora",
            "models/loras",
            "loras",
            "models/LyCORIS",
        ] {
            dirs.push(r.join(sub));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Where embeddings live: the data folder's `embeddings/`, A1111's `embeddings/`, ComfyUI's
/// `models/embeddings`.
pub fn embedding_dirs(data_root: &Path, user_roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = vec![data_root.join("embeddings")];
    for r in user_roots {
        for sub in ["embeddings", "models/embeddings"] {
            dirs.push(r.join(sub));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// The `.safetensors` files under `dirs` (and their subfolders), first name wins, sorted by name.
pub fn network_files(dirs: &[PathBuf]) -> Vec<NetworkFile> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<NetworkFile>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.is_dir() && depth > 0 {
                walk(&p, depth - 1, out);
            } else if p
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
            {
                let name = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if out.iter().any(|n| n.name.eq_ignore_ascii_case(&name)) {
                    continue;
                }
                let size_bytes = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                out.push(NetworkFile {
                    name,
                    path: p,
                    size_bytes,
                });
            }
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        walk(d, 3, &mut out);
    }
    out.sort_by_key(|n| n.name.to_lowercase());
    out
}

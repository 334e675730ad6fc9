//! The "SD VAE" setting, as AUTOMATIC1111 has it: which VAE turns a model's drawing into the
//! picture's pixels (it decides colours and fine detail; a model without a good one gives
//! washed-out, greyish pictures). "Automatic" is the model's own, or `<name>.vae.safetensors`
//! beside a single-file checkpoint; "None" is the model's own only; else a VAE file from the VAE
//! folders, by its file name (what A1111's `/sdapi/v1/sd-vae` lists and `sd_vae` holds).

use crate::models::{Family, ModelInfo};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The setting's value for the model's own VAE or the one beside it (A1111's default).
pub const AUTOMATIC: &str = "Automatic";
/// The setting's value for the model's own VAE only.
pub const NONE: &str = "None";

/// A VAE file the setting may name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VaeFile {
    /// The file's name with its extension ("vae-ft-mse-840000-ema-pruned.safetensors"), as
    /// A1111 names VAEs: what the setting holds.
    pub name: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// The model family the file says it is for (SAI ModelSpec metadata); `None`: it does not
    /// say, which is most files (SD1 and SDXL VAEs have the same tensor shapes).
    pub family: Option<Family>,
}

/// Where VAE files are looked for, each with how many levels of subfolders to read: the data
/// folder's `vae/` and, in each folder the user added, A1111's `models/VAE` and ComfyUI's
/// `models/vae` (any `.safetensors` VAE in them, in subfolders too); and the model folders
/// themselves, the app's `models/` and each added folder (only files directly in them), where
/// users drop a VAE beside their checkpoints. The `vae/` of a diffusers model folder (an added
/// folder may be one) is that model's own, not a choice.
pub fn vae_dirs(
    data_root: &Path,
    models_root: &Path,
    user_roots: &[PathBuf],
) -> Vec<(PathBuf, usize)> {
    let mut dirs = vec![(data_root.join("vae"), 3), (models_root.to_path_buf(), 0)];
    for r in user_roots {
        for sub in ["models/VAE", "VAE", "models/vae", "vae"] {
            dirs.push((r.join(sub), 3));
        }
        dirs.push((r.clone(), 0));
    }
    let model_part = |d: &Path| {
        d.parent()
            .is_some_and(|p| p.join("model_index.json").is_file())
    };
    dirs.retain(|(d, _)| d.is_dir() && !model_part(d));
    dirs
}

/// The VAE files under `dirs` (from [`vae_dirs`]): `.safetensors` files whose header says they
/// are a VAE alone (no weights are read). First name wins (case-insensitive), sorted by name.
/// Pickles (`.pt`, `.ckpt`) are never opened, so never listed; nor are diffusers components
/// (`diffusion_pytorch_model.safetensors`, a model's or a VAE repository's), whose name says
/// nothing to choose by.
pub fn vae_files(dirs: &[(PathBuf, usize)]) -> Vec<VaeFile> {
    /// `named_only`: in a folder of models, only files with "vae" in their name are opened, so
    /// composing a job does not read the header of every checkpoint there (found by review).
    fn walk(dir: &Path, depth: usize, named_only: bool, out: &mut Vec<VaeFile>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            // Hidden entries are ours in progress (a download's `.part` file).
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        for p in paths {
            if p.is_dir() {
                if depth > 0 {
                    walk(&p, depth - 1, named_only, out);
                }
                continue;
            }
            let is_safetensors = p
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
            let Some(name) = p.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let component = name.starts_with("diffusion_pytorch_model");
            let unnamed = named_only && !name.to_ascii_lowercase().contains("vae");
            if !is_safetensors
                || component
                || unnamed
                || out.iter().any(|v| v.name.eq_ignore_ascii_case(&name))
            {
                continue;
            }
            let Ok(info) = ld_engine::checkpoint::inspect(&p) else {
                continue;
            };
            if info.kind != ld_engine::checkpoint::CheckpointKind::Vae {
                continue;
            }
            use ld_engine::checkpoint::ModelFamily as Ckpt;
            out.push(VaeFile {
                name,
                size_bytes: std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
                path: p,
                family: info.family.map(|f| match f {
                    Ckpt::Sd1 => Family::Sd1,
                    Ckpt::Sd2 => Family::Sd2,
                    Ckpt::SdxlBase | Ckpt::SdxlRefiner => Family::Sdxl,
                }),
            });
        }
    }
    let mut out = Vec::new();
    for (d, depth) in dirs {
        // Depth 0: a folder of models (see `vae_dirs`), not a VAE folder.
        walk(d, *depth, *depth == 0, &mut out);
    }
    out.sort_by_key(|v| v.name.to_lowercase());
    out
}

/// The VAE file `wanted` names: its file name (case-insensitive), also without `.safetensors`
/// or with a folder in front (a full path, as A1111's list gives in `filename`).
pub fn find<'a>(files: &'a [VaeFile], wanted: &str) -> Option<&'a VaeFile> {
    let wanted = wanted.trim();
    let file = wanted.rsplit(['/', '\\']).next().unwrap_or(wanted);
    files.iter().find(|v| {
        v.name.eq_ignore_ascii_case(file)
            || Path::new(&v.name)
                .file_stem()
                .is_some_and(|s| s.to_string_lossy().eq_ignore_ascii_case(file))
    })
}

/// The setting's value for `wanted` (from a request): "Automatic", "None" or a listed file's
/// name as listed; `None` when it names no file in `files`.
pub fn setting_value(files: &[VaeFile], wanted: &str) -> Option<String> {
    let w = wanted.trim();
    if w.is_empty() || w.eq_ignore_ascii_case(AUTOMATIC) {
        return Some(AUTOMATIC.to_owned());
    }
    if w.eq_ignore_ascii_case(NONE) {
        return Some(NONE.to_owned());
    }
    find(files, w).map(|v| v.name.clone())
}

/// Whether a VAE setting names a file, rather than "Automatic" (or empty) or "None", the two
/// that give a checkpoint lacking its VAE none.
pub fn names_a_file(setting: &str) -> bool {
    let s = setting.trim();
    !s.is_empty() && !s.eq_ignore_ascii_case(AUTOMATIC) && !s.eq_ignore_ascii_case(NONE)
}

/// Clears the problem of checkpoints that lack only their VAE ([`ModelInfo::needs_vae`]) when
/// `setting` chooses a VAE file that fits them: the jobs decode with it, so they can draw and
/// be picked (found by review: they stayed "put a VAE beside it" with a VAE chosen).
pub fn usable_with(models: &mut [ModelInfo], setting: &str, files: &[VaeFile]) {
    let VaeChoice::File(file) = choose(setting, files) else {
        return;
    };
    for m in models.iter_mut().filter(|m| m.needs_vae) {
        if file.family.is_none_or(|f| fits(f, m.family)) {
            m.problem = None;
            m.needs_vae = false;
        }
    }
}

/// What a job was asked to decode with: the setting, resolved against the VAE files when the
/// job was composed.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum VaeChoice {
    /// The model's own, or `<name>.vae.safetensors` beside a single file.
    #[default]
    Automatic,
    /// The model's own only ("None").
    ModelOwn,
    File(VaeFile),
    /// A file the settings name that is not (or no longer) in a VAE folder.
    Missing(String),
}

/// The choice the setting `setting` makes among `files`.
pub fn choose(setting: &str, files: &[VaeFile]) -> VaeChoice {
    let s = setting.trim();
    if s.is_empty() || s.eq_ignore_ascii_case(AUTOMATIC) {
        VaeChoice::Automatic
    } else if s.eq_ignore_ascii_case(NONE) {
        VaeChoice::ModelOwn
    } else {
        match find(files, s) {
            Some(f) => VaeChoice::File(f.clone()),
            None => VaeChoice::Missing(s.to_owned()),
        }
    }
}

/// The VAE file a job loads for its model, and why it is not the one chosen.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VaeUse {
    /// A separate VAE file to load instead of the model's own; `None`: the model's own.
    pub path: Option<PathBuf>,
    /// Whether `path` is the file chosen in the settings (not one beside the model).
    pub chosen: bool,
    /// What the user should know (the chosen file was gone, or is for another family).
    pub note: Option<String>,
}

impl VaeUse {
    /// The VAE file's name, as A1111 reports `sd_vae_name` and writes "VAE" in the parameters.
    pub fn name(&self) -> Option<String> {
        self.path
            .as_ref()?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    }
}

/// Which VAE `model` draws with under `choice`. Never fails: a chosen file that is gone, or that
/// says it is for another model family, gives "Automatic" with a note saying so.
pub fn resolve(choice: &VaeChoice, model: &ModelInfo) -> VaeUse {
    let automatic = |note: Option<String>| VaeUse {
        path: ld_engine::single_file::sibling_vae(&model.path),
        chosen: false,
        note,
    };
    match choice {
        VaeChoice::Automatic => automatic(None),
        VaeChoice::ModelOwn => {
            // A checkpoint without a VAE inside cannot draw without the one beside it: "None"
            // keeps that one rather than fail (A1111 would decode with whatever VAE it last had).
            let Some(beside) = ld_engine::single_file::sibling_vae(&model.path) else {
                return VaeUse::default();
            };
            let needs = ld_engine::checkpoint::inspect(&model.path).is_ok_and(|i| i.needs_vae);
            if !needs {
                return VaeUse::default();
            }
            let name = beside.file_name().unwrap_or_default().to_string_lossy();
            VaeUse {
                note: Some(format!(
                    "The model '{}' has no VAE of its own, so {name} beside it was used although \
                     the VAE setting is \"None\".",
                    model.name
                )),
                path: Some(beside),
                chosen: false,
            }
        }
        VaeChoice::Missing(name) => automatic(Some(format!(
            "The VAE '{name}' chosen in Settings was not found in a VAE folder, so \"Automatic\" \
             was used (the model's own VAE). Put the file back, or choose another VAE in Settings."
        ))),
        VaeChoice::File(f) if !f.path.is_file() => automatic(Some(format!(
            "The VAE '{}' chosen in Settings is no longer at {}, so \"Automatic\" was used (the \
             model's own VAE). Put the file back, or choose another VAE in Settings.",
            f.name,
            f.path.display()
        ))),
        VaeChoice::File(f) => match f.family {
            Some(vae) if !fits(vae, model.family) => automatic(Some(format!(
                "The VAE '{}' chosen in Settings is made for {} models and '{}' is an {} model, \
                 so the model's own VAE was used.",
                f.name,
                vae.label(),
                model.name,
                model.family.label()
            ))),
            _ => VaeUse {
                path: Some(f.path.clone()),
                chosen: true,
                note: None,
            },
        },
    }
}

/// Whether a VAE made for `vae` decodes a `model` model's drawings: SD1 and SD2 share one VAE
/// (SD 2.x was trained on SD 1's); SDXL's has other weights and scaling. Unknown fits anything.
fn fits(vae: Family, model: Family) -> bool {
    let xl = |f: Family| match f {
        Family::Sdxl => Some(true),
        Family::Sd1 | Family::Sd2 => Some(false),
        Family::Unknown => None,
    };
    match (xl(vae), xl(model)) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;

    /// A tiny VAE file in diffusers names (the tiny SD1 folder's own VAE).
    fn tiny_vae() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/tiny/sd1/vae/diffusion_pytorch_model.safetensors")
    }

    /// Writes a safetensors file of `tensors` with `metadata` (candle's writer takes none).
    fn save_with_metadata(
        tensors: &HashMap<String, Tensor>,
        metadata: &[(&str, &str)],
        path: &Path,
    ) {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut header = serde_json::Map::new();
        let meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        header.insert("__metadata__".into(), meta.into());
        let mut data = Vec::new();
        for name in names {
            let t = tensors[name].to_dtype(candle_core::DType::F32).unwrap();
            let start = data.len();
            for v in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": t.dims(), "data_offsets": [start, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend(json);
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn only_a_file_name_is_a_vae_file() {
        // A1111's options may name a VAE for a checkpoint lacking its own in the same call:
        // only a file gives it one (found by review: "None" let such a model be saved).
        for setting in ["", "  ", "Automatic", "automatic", "None", " NONE "] {
            assert!(!names_a_file(setting), "{setting:?}");
        }
        assert!(names_a_file("anime.safetensors"));
        assert!(names_a_file("gone.safetensors"));
    }

    #[test]
    fn lists_vae_files_from_the_vae_folders_and_beside_the_models_only() {
        let data = tempfile::tempdir().unwrap();
        let user = tempfile::tempdir().unwrap();
        let models = data.path().join("models");
        let a1111_vae = user.path().join("models/VAE/sub");
        for d in [&data.path().join("vae"), &models, &a1111_vae] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::copy(tiny_vae(), data.path().join("vae/b-own.safetensors")).unwrap();
        std::fs::copy(tiny_vae(), a1111_vae.join("a-user.safetensors")).unwrap();
        std::fs::copy(tiny_vae(), models.join("c-beside.vae.safetensors")).unwrap();
        // Among models only files named as VAEs are opened (a folder of checkpoints is not
        // read header by header for every job).
        std::fs::copy(tiny_vae(), models.join("d-unnamed.safetensors")).unwrap();
        // The same name again in a later folder: the first wins.
        std::fs::copy(tiny_vae(), user.path().join("B-OWN.safetensors")).unwrap();
        // Not VAEs: a LoRA, a pickle, a text file.
        let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/refs");
        std::fs::copy(
            refs.join("lora_kohya.safetensors"),
            data.path().join("vae/lora.safetensors"),
        )
        .unwrap();
        std::fs::write(data.path().join("vae/old.vae.pt"), b"pickle").unwrap();
        std::fs::write(data.path().join("vae/notes.txt"), b"x").unwrap();
        // Deep in the models folder: a model's own VAE in a diffusers folder is not listed.
        std::fs::create_dir_all(models.join("m/vae")).unwrap();
        std::fs::copy(tiny_vae(), models.join("m/vae/deep.safetensors")).unwrap();

        // An added folder that is a diffusers model: its `vae/` is its own.
        let tiny_model = tiny_vae().parent().unwrap().parent().unwrap().to_path_buf();
        let dirs = vae_dirs(
            data.path(),
            &models,
            &[user.path().to_path_buf(), tiny_model],
        );
        let files = vae_files(&dirs);
        let names: Vec<&str> = files.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "a-user.safetensors",
                "b-own.safetensors",
                "c-beside.vae.safetensors"
            ]
        );
        assert_eq!(files[1].path, data.path().join("vae/b-own.safetensors"));
        assert!(files
            .iter()
            .all(|v| v.size_bytes > 1000 && v.family.is_none()));

        assert_eq!(
            find(&files, "B-Own.safetensors").map(|v| &v.path),
            Some(&files[1].path)
        );
        assert_eq!(find(&files, "b-own").map(|v| &v.name), Some(&files[1].name));
        assert_eq!(
            find(&files, "/elsewhere/models/VAE/a-user.safetensors").map(|v| &v.name),
            Some(&files[0].name)
        );
        assert!(find(&files, "nope.safetensors").is_none());
        assert_eq!(setting_value(&files, "none").as_deref(), Some(NONE));
        assert_eq!(setting_value(&files, "").as_deref(), Some(AUTOMATIC));
        assert_eq!(
            setting_value(&files, "b-own").as_deref(),
            Some("b-own.safetensors")
        );
        assert_eq!(setting_value(&files, "nope"), None);
    }

    #[test]
    fn a_vae_that_says_its_family_is_kept_from_models_of_the_other() {
        // SD1 and SDXL VAEs have the same shapes: only ModelSpec metadata tells them apart. A
        // VAE that says SDXL is not used for an SD1 model (its pictures would come out wrong,
        // with no error to explain them); SD1's VAE fits SD2 (SD 2.x was trained on it).
        let dir = tempfile::tempdir().unwrap();
        let tensors = candle_core::safetensors::load(tiny_vae(), &Device::Cpu).unwrap();
        let xl = dir.path().join("sdxl_vae.safetensors");
        save_with_metadata(
            &tensors,
            &[("modelspec.architecture", "stable-diffusion-xl-v1-base/vae")],
            &xl,
        );
        let sd1 = dir.path().join("sd1_vae.safetensors");
        save_with_metadata(
            &tensors,
            &[("modelspec.architecture", "stable-diffusion-v1/vae")],
            &sd1,
        );
        let files = vae_files(&[(dir.path().to_path_buf(), 0)]);
        let family: Vec<_> = files.iter().map(|v| (v.name.as_str(), v.family)).collect();
        assert_eq!(
            family,
            [
                ("sd1_vae.safetensors", Some(Family::Sd1)),
                ("sdxl_vae.safetensors", Some(Family::Sdxl))
            ]
        );
        let model = |family| ModelInfo {
            name: "m".into(),
            family,
            path: dir.path().join("m"),
            size_bytes: 0,
            format: "diffusers",
            problem: None,
            managed: false,
            catalog_id: None,
            fast: false,
            refiner: false,
            sha256: None,
            short_hash: None,
            defaults: None,
            needs_vae: false,
        };
        // A checkpoint without a VAE is usable with a chosen VAE file of its family (or one
        // that does not say), not with another family's or none.
        let lacking = |family| ModelInfo {
            problem: Some("no VAE inside".into()),
            needs_vae: true,
            ..model(family)
        };
        let mut models = [lacking(Family::Sd1), lacking(Family::Sdxl)];
        usable_with(&mut models, AUTOMATIC, &files);
        assert!(models.iter().all(|m| m.problem.is_some()));
        usable_with(&mut models, "sdxl_vae.safetensors", &files);
        assert!(models[0].problem.is_some() && models[1].problem.is_none());
        assert!(!models[1].needs_vae);
        let xl_choice = choose("sdxl_vae.safetensors", &files);
        let refused = resolve(&xl_choice, &model(Family::Sd1));
        assert_eq!(refused.path, None);
        let note = refused.note.unwrap();
        assert!(
            note.contains("'sdxl_vae.safetensors'")
                && note.contains("SDXL")
                && note.contains("SD1"),
            "{note}"
        );
        let used = resolve(&xl_choice, &model(Family::Sdxl));
        assert_eq!(
            (used.path, used.chosen, used.note),
            (Some(xl.clone()), true, None)
        );
        let sd1_choice = choose("sd1_vae.safetensors", &files);
        assert_eq!(resolve(&sd1_choice, &model(Family::Sd2)).path, Some(sd1));
        assert_eq!(resolve(&sd1_choice, &model(Family::Sdxl)).path, None);
        // A family the model does not say: used, and a mismatch explains itself at load.
        assert_eq!(resolve(&xl_choice, &model(Family::Unknown)).path, Some(xl));
    }
}

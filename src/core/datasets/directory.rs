//! Datasets read from a subdirectory of the operator's datasets directory (`dataset.json` or class folders).

use super::*;

/// The file that describes a dataset directory; without it every image file is an unlabelled image.
pub const MANIFEST: &str = "dataset.json";

pub(super) const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif"];

/// `dataset.json`: `{"kind": "pairs", "items": [{"original": "a.png", "transformed": "a_snow.png", "label": 3}]}`,
/// or items `{"image": "x.jpg", "label": 1}` (labelled) and `{"image": "x.jpg"}` (unlabelled).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Manifest {
    pub(super) kind: String,
    pub(super) items: Vec<ManifestItem>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ManifestItem {
    pub(super) image: Option<String>,
    pub(super) original: Option<String>,
    pub(super) transformed: Option<String>,
    pub(super) label: Option<Value>,
}

pub(super) fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads files while their total stays within `max_bytes`.
pub(super) struct Reader {
    pub(super) dir: PathBuf,
    pub(super) name: String,
    pub(super) left: usize,
    pub(super) max_bytes: usize,
}

impl Reader {
    fn read(&mut self, path: &Path) -> Result<Bytes, CoreError> {
        let bytes = std::fs::read(path).map_err(|e| CoreError::Internal(format!("{}: {e}", path.display())))?;
        self.left = self.left.checked_sub(bytes.len()).ok_or_else(|| {
            invalid(format!(
                "the images of '{}' are over the limit of {} bytes (--max-dataset-bytes)",
                self.name, self.max_bytes
            ))
        })?;
        Ok(Bytes::from(bytes))
    }

    fn read_named(&mut self, file: &str) -> Result<Bytes, CoreError> {
        let path = file_inside(&self.dir, file)?;
        self.read(&path)
    }
}

/// The parts of the dataset in subdirectory `name` of the datasets directory: as its `dataset.json` says,
/// or, without one, its image files (by extension, sorted by name) as an unlabelled dataset.
pub(super) fn read_directory(
    root: Option<&Path>,
    name: &str,
    max_images: usize,
    max_bytes: usize,
) -> Result<DatasetParts, CoreError> {
    let dir = subdirectory(root, name, "datasets directory", "--datasets-dir")?;
    let mut reader = Reader { dir: dir.clone(), name: name.to_string(), left: max_bytes, max_bytes };
    let manifest_path = dir.join(MANIFEST);
    if !manifest_path.is_file() {
        let paths: Vec<PathBuf> = files(&dir, max_images)?.into_iter().filter(|p| has_image_extension(p)).collect();
        let images = paths.iter().map(|path| reader.read(path)).collect::<Result<_, _>>()?;
        return Ok(DatasetParts { kind: Some("unlabelled".into()), images, ..DatasetParts::default() });
    }
    let text =
        std::fs::read(&manifest_path).map_err(|e| CoreError::Internal(format!("{}: {e}", manifest_path.display())))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| invalid(format!("{MANIFEST} of '{name}' is not valid: {e}")))?;
    if manifest.items.len() > max_images {
        return Err(invalid(format!(
            "{MANIFEST} of '{name}' lists {} items, over the limit of {max_images} (--max-dataset-images)",
            manifest.items.len()
        )));
    }
    let mut parts = DatasetParts { kind: Some(manifest.kind), ..DatasetParts::default() };
    for (i, item) in manifest.items.iter().enumerate() {
        match (&item.image, &item.original, &item.transformed) {
            (Some(image), None, None) => parts.images.push(reader.read_named(image)?),
            (None, Some(original), Some(transformed)) => {
                parts.originals.push(reader.read_named(original)?);
                parts.transformed.push(reader.read_named(transformed)?);
            }
            _ => {
                return Err(invalid(format!(
                    "{MANIFEST} items[{i}] must name an 'image', or an 'original' and a 'transformed'"
                )))
            }
        }
    }
    // Labels as the upload gives them, so one check serves both; an item without one fails that check.
    if manifest.items.iter().any(|item| item.label.is_some()) {
        parts.labels =
            Some(Value::Array(manifest.items.into_iter().map(|item| item.label.unwrap_or(Value::Null)).collect()));
    }
    Ok(parts)
}

//! The natural photos every edit falls back on: default statistics (computed once per layer and lineage,
//! cached on disk and in memory) and the guard's check photos.

use super::*;

/// Natural photos the server ships (`make setup` fetches them): `statistics/` gives every edit that names
/// no statistics its second moment, `check/` is the breakage guard's default check set. Disjoint sets.
#[derive(Debug, Clone)]
pub struct NaturalPhotos {
    pub dir: PathBuf,
    /// Where computed default statistics are kept across restarts.
    pub cache_dir: PathBuf,
}

impl NaturalPhotos {
    fn files(&self, set: &str) -> Result<Vec<PathBuf>, EditError> {
        let dir = self.dir.join(set);
        files(&dir, usize::MAX).map_err(|why| {
            EditError::Invalid(format!(
                "the natural photos {} are missing ({why}): run `make setup`, or name 'statistics' and a guard 'dataset'",
                dir.display()
            ))
        })
    }
}

/// Default statistics and how many photos they came from.
pub(super) struct DefaultStatistics {
    pub(super) moment: SecondMoment,
    pub(super) images: usize,
}

impl Thread {
    /// The second moment of the keys at `layer` of the version `parent` (whose changes are `lineage`) over
    /// the natural statistics photos, from the on-disk cache when it was computed before. Keys at a layer
    /// only depend on the weights before it, so a lineage that changes nothing before `layer` shares the
    /// base's statistics.
    pub(super) fn default_statistics(
        &mut self,
        package: &LoadedPackage,
        parent: &dyn Classifier,
        lineage: &Lineage,
        layer: &str,
    ) -> Result<DefaultStatistics, EditError> {
        let files = self.natural.files("statistics")?;
        let after = parent.parameters_after(layer)?;
        let mut lineage_key = Sha256::new();
        for change in lineage.iter() {
            let delta = Delta::from_safetensors(change)?;
            if delta.parameter_names().iter().any(|name| !after.contains(name)) {
                lineage_key.update(change);
            }
        }
        let layer_key = format!("{layer}\0{:x}", lineage_key.finalize());
        let memory_key = (package.package.name.clone(), package.generation, layer_key.clone());
        if let Some(moment) = self.moments.get(&memory_key) {
            return Ok(DefaultStatistics { moment: moment.shallow_clone(), images: files.len() });
        }
        let weights = files_sha256(&[package.package.weights_path()])?;
        let preprocessing =
            serde_json::to_string(&package.package.config.preprocessing).map_err(|e| EditError::Io(e.to_string()))?;
        let path = cache_path(&self.natural.cache_dir, &weights, &layer_key, &preprocessing, &files_sha256(&files)?);
        if let Ok(moment) = SecondMoment::load(&path) {
            self.moments.insert(memory_key, moment.shallow_clone());
            return Ok(DefaultStatistics { moment, images: files.len() });
        }
        let (device, limits) = (self.device, self.limits);
        let preprocessing = &package.package.config.preprocessing;
        let batches = files
            .chunks(STATISTICS_BATCH)
            .map(|chunk| file_batch(chunk, preprocessing, limits, device))
            .collect::<Result<Vec<_>, _>>()?;
        let moment = SecondMoment::accumulate(parent, layer, batches)?;
        std::fs::create_dir_all(&self.natural.cache_dir)
            .map_err(|e| EditError::Io(format!("{}: {e}", self.natural.cache_dir.display())))?;
        moment.save(&path)?;
        self.moments.insert(memory_key, moment.shallow_clone());
        Ok(DefaultStatistics { moment, images: files.len() })
    }

    /// The natural check photos, preprocessed as `package` expects, on the device.
    pub(super) fn check_photos(&mut self, package: &LoadedPackage) -> Result<Tensor, EditError> {
        let name = &package.package.name;
        if let Some((generation, photos)) = self.check_photos.get(name) {
            if *generation == package.generation {
                return Ok(photos.shallow_clone());
            }
        }
        let files = self.natural.files("check")?;
        let limits = self.limits;
        let photos = file_batch(&files, &package.package.config.preprocessing, limits, self.device)?;
        self.check_photos.insert(name.clone(), (package.generation, photos.shallow_clone()));
        Ok(photos)
    }

    /// The base's top-1 class of each natural check photo, computed once per load of the model.
    pub(super) fn base_check_answers(&mut self, package: &LoadedPackage) -> Result<Vec<u32>, EditError> {
        let name = &package.package.name;
        if let Some((generation, classes)) = self.base_check_answers.get(name) {
            if *generation == package.generation {
                return Ok(classes.clone());
            }
        }
        let photos = self.check_photos(package)?;
        let classes = answers(self.base(package)?, &photos)?;
        self.base_check_answers.insert(name.clone(), (package.generation, classes.clone()));
        Ok(classes)
    }
}

/// The images of `files`, preprocessed into one batch on `device`.
pub(super) fn file_batch(
    files: &[PathBuf],
    preprocessing: &Preprocessing,
    limits: DecodeLimits,
    device: Device,
) -> Result<Tensor, EditError> {
    let images = files
        .iter()
        .map(|f| std::fs::read(f).map(Bytes::from).map_err(|e| EditError::Io(format!("{}: {e}", f.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(input_batch(&images, 0, preprocessing, limits)?.to_device(device))
}

/// Decodes and preprocesses `images` into one batch (on the CPU); `first` is the first image's index, for
/// the error that names an image that does not decode.
pub(crate) fn input_batch(
    images: &[Bytes],
    first: usize,
    preprocessing: &Preprocessing,
    limits: DecodeLimits,
) -> Result<Tensor, EditError> {
    let mut inputs = Vec::with_capacity(images.len());
    for (j, bytes) in images.iter().enumerate() {
        let image = decode(bytes, limits).map_err(|e| EditError::Invalid(format!("image {}: {e}", first + j)))?;
        inputs.push(input_tensor(&preprocessing.apply(&image), 3));
    }
    Ok(Tensor::stack(&inputs, 0))
}

//! Second-moment statistics of the keys at a layer, `C = mean k k^T` over every position of every image
//! (uncentred), accumulated in float64 batch by batch, with a sample of the keys themselves (a gated edit
//! sets its gate above where ordinary keys score), and the whitening `Z = C^{-1/2}` that the rewrite's
//! direction uses. Cached on disk under the model weights' hash, the layer and the preprocessing, since
//! the same layer of the same checkpoint under other preprocessing has other statistics.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::tensor_io::{from_safetensors, to_safetensors};
use super::EditError;
use crate::models::Classifier;

/// Eigenvalues below this fraction of the largest are raised to it before inverting: keys rarely span
/// every channel, and an unfloored inverse square root lets the direction follow the exemplar's rarest,
/// least general features. Chosen by measurement (README, "Choosing the edit settings"): 1e-4 corrected
/// no error on the synthetic benchmark, 1e-2 about half, 3e-2 the most while keeping clean accuracy.
pub const RELATIVE_EIGENVALUE_FLOOR: f64 = 3e-2;

/// Images per forward pass when accumulating statistics.
pub const STATISTICS_BATCH: usize = 16;
/// One key position in this many joins the sample, up to `SAMPLE_SIZE` of them.
const SAMPLE_STRIDE: i64 = 4;
const SAMPLE_SIZE: i64 = 4096;
/// Bumped when the cached files change what they hold (the sample joined the moment in 2).
const CACHE_FORMAT: &str = "2";

pub struct SecondMoment {
    /// C_in x C_in, float64, on the CPU.
    pub moment: Tensor,
    /// Key positions averaged over.
    pub count: i64,
    /// Some of those keys (positions x C_in, float32, on the CPU); absent from statistics stored before
    /// samples were kept.
    pub sample: Option<Tensor>,
}

impl SecondMoment {
    /// Streams `batches` (each N x 3 x H x W, preprocessed) through the model up to `layer`.
    pub fn accumulate(
        model: &dyn Classifier,
        layer: &str,
        batches: impl IntoIterator<Item = Tensor>,
    ) -> Result<Self, EditError> {
        let _guard = tch::no_grad_guard();
        let mut sum: Option<Tensor> = None;
        let mut count = 0;
        let mut sample = Vec::new();
        let mut sampled = 0;
        for batch in batches {
            let key = model.edit_block(&batch, layer)?.key;
            let channels = key.size()[1];
            let flat = key.transpose(0, 1).reshape([channels, -1]).to_kind(Kind::Double);
            let positions = flat.size()[1];
            // Every SAMPLE_STRIDE-th position counted over the whole set, so batches need not divide it.
            let first = (SAMPLE_STRIDE - count % SAMPLE_STRIDE) % SAMPLE_STRIDE;
            if sampled < SAMPLE_SIZE && first < positions {
                let taken = flat.slice(1, first, positions, SAMPLE_STRIDE);
                let taken = taken.narrow(1, 0, taken.size()[1].min(SAMPLE_SIZE - sampled));
                sampled += taken.size()[1];
                sample.push(taken.tr().to_kind(Kind::Float).to_device(Device::Cpu));
            }
            count += positions;
            let outer = flat.matmul(&flat.tr()).to_device(Device::Cpu);
            sum = Some(match sum {
                Some(s) => s + outer,
                None => outer,
            });
        }
        let sum = sum.ok_or_else(|| EditError::Invalid("statistics need at least one image".into()))?;
        Ok(Self { moment: sum / count as f64, count, sample: Some(Tensor::cat(&sample, 0)) })
    }

    /// The same statistics, sharing the tensors.
    pub fn shallow_clone(&self) -> Self {
        Self {
            moment: self.moment.shallow_clone(),
            count: self.count,
            sample: self.sample.as_ref().map(Tensor::shallow_clone),
        }
    }

    fn named(&self) -> Vec<(String, Tensor)> {
        let mut named = vec![
            ("moment".to_string(), self.moment.shallow_clone()),
            ("count".to_string(), Tensor::from_slice(&[self.count])),
        ];
        named.extend(self.sample.as_ref().map(|s| ("sample".to_string(), s.shallow_clone())));
        named
    }

    /// `C^{-1/2}` (float64) by symmetric eigendecomposition, eigenvalues floored at
    /// `RELATIVE_EIGENVALUE_FLOOR` times the largest.
    pub fn whitening(&self) -> Tensor {
        whitening(&self.moment)
    }

    pub fn to_safetensors(&self) -> Result<Vec<u8>, EditError> {
        to_safetensors(&self.named())
    }

    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, EditError> {
        Self::from_named(from_safetensors(bytes)?, "the statistics")
    }

    fn from_named(tensors: Vec<(String, Tensor)>, what: &str) -> Result<Self, EditError> {
        let find = |name: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| EditError::Invalid(format!("{what} lack '{name}'")))
        };
        Ok(Self {
            moment: find("moment")?.to_kind(Kind::Double),
            count: find("count")?.int64_value(&[0]),
            sample: find("sample").ok().map(|s| s.to_kind(Kind::Float)),
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), EditError> {
        // Servers sharing a cache directory may write the same statistics at once: each its own file.
        let tmp = path.with_extension(format!("{}.{}.tmp", std::process::id(), uuid::Uuid::new_v4()));
        Tensor::write_safetensors(&self.named(), &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))
    }

    pub fn load(path: &Path) -> Result<Self, EditError> {
        Self::from_named(Tensor::read_safetensors(path)?, &path.display().to_string())
    }
}

pub fn whitening(moment: &Tensor) -> Tensor {
    let symmetric = (moment + moment.tr()) / 2.0;
    let (values, vectors) = symmetric.linalg_eigh("L");
    let largest = values.max().double_value(&[]).max(f64::MIN_POSITIVE);
    let floored = values.clamp_min(largest * RELATIVE_EIGENVALUE_FLOOR);
    vectors.matmul(&floored.rsqrt().diag_embed(0, -2, -1)).matmul(&vectors.tr())
}

/// Where the statistics of (weights, layer, preprocessing, image set) are cached. The image set is part of
/// the key too: statistics of other images are other statistics.
pub fn cache_path(
    cache_dir: &Path,
    weights_sha256: &str,
    layer: &str,
    preprocessing: &str,
    images_sha256: &str,
) -> PathBuf {
    let mut hasher = Sha256::new();
    for part in [CACHE_FORMAT, weights_sha256, layer, preprocessing, images_sha256] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    cache_dir.join(format!("{:x}.safetensors", hasher.finalize()))
}

/// The hex sha256 of the contents of `paths`, in order (a checkpoint, or an image set), streamed.
pub fn files_sha256(paths: &[PathBuf]) -> Result<String, EditError> {
    let mut hasher = Sha256::new();
    for path in paths {
        let mut file = std::fs::File::open(path).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| EditError::Io(format!("{}: {e}", path.display())))?;
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitens_a_known_covariance() {
        let _rng = crate::edit::seeded(1);
        let a = Tensor::randn([6, 6], (Kind::Double, Device::Cpu));
        let c = a.matmul(&a.tr()) + Tensor::eye(6, (Kind::Double, Device::Cpu));
        let z = whitening(&c);
        // Z C Z = I and Z is symmetric.
        let identity = z.matmul(&c).matmul(&z);
        let eye = Tensor::eye(6, (Kind::Double, Device::Cpu));
        assert!((identity - &eye).abs().max().double_value(&[]) < 1e-8);
        assert!((&z - z.tr()).abs().max().double_value(&[]) < 1e-10);
    }

    #[test]
    fn floors_a_singular_covariance() {
        let k = Tensor::from_slice(&[1.0f64, 2.0, 0.0]).view([3, 1]);
        let c = k.matmul(&k.tr());
        let z = whitening(&c);
        assert!(z.isfinite().all().int64_value(&[]) == 1);
        // Along the key itself the whitening is C^{-1/2}: |Z k| = 1.
        assert!((z.matmul(&k).norm().double_value(&[]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let dir = Path::new("/cache");
        let base = cache_path(dir, "abc", "_conv_head", "{}", "set");
        assert_ne!(base, cache_path(dir, "abd", "_conv_head", "{}", "set"));
        assert_ne!(base, cache_path(dir, "abc", "_blocks.1._project_conv", "{}", "set"));
        assert_ne!(base, cache_path(dir, "abc", "_conv_head", "{\"crop\":1}", "set"));
        assert_ne!(base, cache_path(dir, "abc", "_conv_head", "{}", "other set"));
    }
}

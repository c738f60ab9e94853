//! Copies of the exemplars in other arrangements, made from the exemplars alone: a random crop (half to all
//! of the area, aspect ratio 3/4 to 4/3), resized back to the input size, and a horizontal flip, the same
//! transform applied to the original, the modified copy and the mask so that they stay aligned. The guard
//! checks that the
//! originals' copies keep their predictions (the old concept in other arrangements must not move), and the
//! least-squares solver takes keys from them (one exemplar gives few positions in one arrangement only).

use tch::{Kind, Tensor};

use super::Exemplars;

/// Smallest crop, as a fraction of the image's area, and the widest aspect ratio (and its inverse).
const MIN_AREA: f64 = 0.5;
const MAX_ASPECT: f64 = 4.0 / 3.0;

/// `copies` transformed copies of each exemplar (N * copies of them, exemplar by exemplar), drawn from
/// libtorch's generator: the caller seeds it for a reproducible edit. Labels are carried over.
pub fn augmented(exemplars: &Exemplars, copies: usize) -> Exemplars {
    let _guard = tch::no_grad_guard();
    let size = exemplars.original.size();
    let (n, height, width) = (size[0], size[2], size[3]);
    let draws = Tensor::rand([n * copies as i64, 5], (Kind::Double, tch::Device::Cpu));
    let draws: Vec<f64> = Vec::<f64>::try_from(draws.reshape([-1])).unwrap_or_default();
    let mut original = Vec::new();
    let mut modified = Vec::new();
    let mut mask = Vec::new();
    let mut labels = Vec::new();
    for (index, draw) in draws.chunks(5).enumerate() {
        let i = index as i64 / copies as i64;
        let area = MIN_AREA + (1.0 - MIN_AREA) * draw[0];
        let aspect = MAX_ASPECT.powf(2.0 * draw[1] - 1.0);
        let side = |fraction: f64, full: i64| ((fraction.sqrt() * full as f64).round() as i64).clamp(1, full);
        let (h, w) = (side(area / aspect, height), side(area * aspect, width));
        let (y, x) = (((height - h) as f64 * draw[2]) as i64, ((width - w) as f64 * draw[3]) as i64);
        let flip = draw[4] < 0.5;
        let transform = |batch: &Tensor| {
            let crop = batch.narrow(0, i, 1).narrow(2, y, h).narrow(3, x, w);
            let resized = crop.upsample_bilinear2d([height, width], false, None, None);
            if flip {
                resized.flip([3])
            } else {
                resized
            }
        };
        original.push(transform(&exemplars.original));
        modified.push(transform(&exemplars.modified));
        mask.push(transform(&exemplars.mask));
        if let Some(l) = &exemplars.labels {
            labels.push(l.narrow(0, i, 1));
        }
    }
    Exemplars {
        original: Tensor::cat(&original, 0),
        modified: Tensor::cat(&modified, 0),
        mask: Tensor::cat(&mask, 0),
        labels: (!labels.is_empty()).then(|| Tensor::cat(&labels, 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn copies_stay_aligned_and_reproducible() {
        // The mask is the left half; the modified image equals the original times two. Whatever the crop
        // and flip, each copy's modified image is twice its original, and its mask stays in [0, 1].
        let original = Tensor::rand([2, 3, 32, 40], (Kind::Float, Device::Cpu));
        let mask = Tensor::zeros([2, 1, 32, 40], (Kind::Float, Device::Cpu));
        let _ = mask.narrow(3, 0, 20).fill_(1.0);
        let exemplars = Exemplars { modified: &original * 2.0, original, mask, labels: None };
        let _rng = crate::edit::seeded(3);
        let copies = augmented(&exemplars, 4);
        assert_eq!(copies.original.size(), vec![8, 3, 32, 40]);
        assert_eq!(copies.mask.size(), vec![8, 1, 32, 40]);
        assert!((&copies.modified - &copies.original * 2.0).abs().max().double_value(&[]) < 1e-5);
        assert!(copies.mask.min().double_value(&[]) >= 0.0 && copies.mask.max().double_value(&[]) <= 1.0 + 1e-6);
        // Not all copies are the same arrangement.
        assert!((copies.original.get(0) - copies.original.get(1)).abs().max().double_value(&[]) > 1e-3);
        tch::manual_seed(3);
        assert!(augmented(&exemplars, 4).original.equal(&copies.original));
    }
}

//! Concept masks at feature resolution. The authors' code asserted an integer pooling factor (224-pixel
//! inputs); area pooling works for any input size.

use tch::{Kind, Tensor};

/// Loss weights at the value resolution: the square root of the mask's area average over each cell.
/// `mask` is N x 1 x H x W with values in [0, 1].
pub fn loss_weights(mask: &Tensor, value_size: (i64, i64)) -> Tensor {
    mask.to_kind(Kind::Float).adaptive_avg_pool2d([value_size.0, value_size.1]).sqrt()
}

/// Direction weights at the key resolution: the mask's area average over each cell.
pub fn key_weights(mask: &Tensor, key_size: (i64, i64)) -> Tensor {
    mask.to_kind(Kind::Float).adaptive_avg_pool2d([key_size.0, key_size.1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn pools_masks_of_odd_sizes() {
        // A 1 x 1 x 7 x 9 mask whose left 3 columns are set, pooled to 3 x 4 and 2 x 2.
        let mask = Tensor::zeros([1, 1, 7, 9], (Kind::Float, Device::Cpu));
        let _ = mask.narrow(3, 0, 3).fill_(1.0);
        let pooled = key_weights(&mask, (3, 4));
        assert_eq!(pooled.size(), vec![1, 1, 3, 4]);
        let total = (pooled.sum(Kind::Float).double_value(&[]) * 100.0).round() / 100.0;
        assert!(total > 0.0);
        // The right-most column of cells sees no concept.
        assert_eq!(pooled.select(3, 3).abs().sum(Kind::Float).double_value(&[]), 0.0);
        let loss = loss_weights(&mask, (2, 2));
        // Adaptive pooling of 9 columns into 2 cells: the first covers columns 0..5 (3 of 5 set).
        let expected = (3.0f64 / 5.0).sqrt();
        assert!((loss.double_value(&[0, 0, 0, 0]) - expected).abs() < 1e-6);
        assert_eq!(loss.double_value(&[0, 0, 0, 1]), 0.0);
    }

    #[test]
    fn a_full_mask_stays_full() {
        let mask = Tensor::ones([2, 1, 225, 301], (Kind::Float, Device::Cpu));
        let pooled = loss_weights(&mask, (7, 7));
        assert!((pooled - 1.0).abs().max().double_value(&[]) < 1e-6);
    }
}
